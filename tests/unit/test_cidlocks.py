"""Per-CID exclusion: free CIDs are taken at once, waiters are served in order, and a
cancelled waiter neither keeps a CID nor loses it for the others."""

from __future__ import annotations

import asyncio

import pytest

from vdsmconn.cidlocks import CidLocks


def test_a_free_cid_is_taken_without_waiting() -> None:
    locks = CidLocks()
    step = locks.acquire(["b", "a", "b"]).__await__()
    with pytest.raises(StopIteration) as done:
        next(step)  # finished in its first step: it never suspended
    assert done.value.value == ["a", "b"]
    assert locks.held("a") and locks.held("b")
    locks.release(["a", "b"])
    assert not locks.held("a") and not locks.held("b")
    with pytest.raises(StopIteration) as done:
        next(locks.acquire(["c"]).__await__())
    assert done.value.value == ["c"] and locks.held("c")
    locks.release(["c"])
    assert not locks.held("c")


async def test_waiters_get_the_cid_in_the_order_they_came() -> None:
    locks = CidLocks()
    order: list[int] = []
    await locks.acquire(["c"])

    async def take(n: int) -> None:
        held = await locks.acquire(["c"])
        order.append(n)
        await asyncio.sleep(0)
        locks.release(held)

    tasks = [asyncio.create_task(take(n)) for n in range(5)]
    await asyncio.sleep(0)
    assert order == []
    locks.release(["c"])
    async with asyncio.timeout(10):
        await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert not locks.held("c")


async def test_overlapping_sets_asked_in_any_order_do_not_deadlock() -> None:
    locks = CidLocks()
    inside = 0

    async def change(cids: list[str]) -> None:
        nonlocal inside
        held = await locks.acquire(cids)
        inside += 1
        assert inside == 1  # every pair below overlaps: one at a time
        await asyncio.sleep(0)
        inside -= 1
        locks.release(held)

    async with asyncio.timeout(10):
        await asyncio.gather(*(change(c) for c in (["a", "b"], ["b", "a"], ["b", "c", "a"],
                                                   ["a", "c"]) * 5))
    assert not any(locks.held(c) for c in "abc")


async def test_a_waiter_cancelled_before_its_turn_holds_nothing() -> None:
    locks = CidLocks()
    await locks.acquire(["x"])
    waiting = asyncio.create_task(locks.acquire(["w", "x"]))
    after = asyncio.create_task(locks.acquire(["x"]))
    await asyncio.sleep(0)
    assert locks.held("w")  # taken while it waits for "x"
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not locks.held("w")
    locks.release(["x"])
    async with asyncio.timeout(10):
        assert await after == ["x"]  # the cancelled waiter was passed over
    locks.release(["x"])
    assert not locks.held("x")


async def test_a_waiter_cancelled_after_its_turn_came_passes_the_cid_on() -> None:
    locks = CidLocks()
    await locks.acquire(["x"])
    first = asyncio.create_task(locks.acquire(["x"]))
    second = asyncio.create_task(locks.acquire(["x"]))
    await asyncio.sleep(0)
    locks.release(["x"])  # handed to `first`, which has not run yet
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    async with asyncio.timeout(10):
        assert await second == ["x"]
    locks.release(["x"])
    assert not locks.held("x")
