"""The probe registry with real threads: a hung target never holds more than one thread, however
often it is probed; a second target is not held up by the first; a caller arriving while a
probe is under way waits for it, then probes itself."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

import pytest

from tests.wait import eventually as until
from vdsmconn import errors
from vdsmconn.host import probe
from vdsmconn.host.probe import Probes


def threads(name: str) -> int:
    return sum(t.name == f"probe {name}" for t in threading.enumerate())


@pytest.fixture
def hang() -> Iterator[threading.Event]:
    """Set at the end, so no probe thread outlives the test."""
    release = threading.Event()
    yield release
    release.set()


async def test_hung_target_holds_one_thread_across_many_probes(
        hang: threading.Event) -> None:
    probes = Probes()
    calls = 0

    def stuck() -> None:
        nonlocal calls
        calls += 1
        hang.wait()

    with pytest.raises(errors.Timeout, match=r"check of /mnt/dead did not return within 0\.05 s"):
        await probes.run("/mnt/dead", stuck, "check of /mnt/dead", 0.05)
    most = threads("check of /mnt/dead")
    for _ in range(50):
        with pytest.raises(errors.Timeout, match="an earlier read has not returned yet"):
            await probes.run("/mnt/dead", stuck, "check of /mnt/dead", 0.05)
        most = max(most, threads("check of /mnt/dead"))
    # Callers at once, too: none starts a thread while the abandoned one runs.
    results = await asyncio.gather(
        *(probes.run("/mnt/dead", stuck, "check of /mnt/dead", 0.05) for _ in range(20)),
        return_exceptions=True)
    assert all(isinstance(r, errors.Timeout) for r in results)
    most = max(most, threads("check of /mnt/dead"))
    assert (most, calls) == (1, 1)
    assert probes.running("/mnt/dead")
    hang.set()
    await until(lambda: not probes.running("/mnt/dead"))
    # Returned: the next probe runs again.
    assert await probes.run("/mnt/dead", lambda: "fine", "check of /mnt/dead", 5) == "fine"


async def test_second_target_is_not_held_up_by_a_hung_one(hang: threading.Event) -> None:
    probes = Probes()
    hung = asyncio.ensure_future(probes.run("/mnt/dead", hang.wait, "check of /mnt/dead", 30))
    await until(lambda: probes.running("/mnt/dead"))
    for _ in range(5):
        assert await probes.run("/mnt/live", lambda: 42, "check of /mnt/live", 5) == 42
    assert not hung.done() and threads("check of /mnt/dead") == 1
    hang.set()
    assert await hung is True


async def test_caller_during_a_probe_waits_for_it_then_probes_itself() -> None:
    probes = Probes()
    first_in = threading.Event()
    go_on = threading.Event()
    order: list[str] = []

    def first() -> str:
        first_in.set()
        go_on.wait(10)
        order.append("first")
        return "a"

    def second() -> str:
        order.append("second")
        return "b"

    one = asyncio.ensure_future(probes.run("/dev/sdb", first, "read of /dev/sdb", 30))
    await asyncio.to_thread(first_in.wait, 10)
    two = asyncio.ensure_future(probes.run("/dev/sdb", second, "read of /dev/sdb", 30))
    await asyncio.sleep(0.05)
    assert order == [] and not two.done()  # no second thread while the first runs
    assert threads("read of /dev/sdb") == 1
    go_on.set()
    assert (await one, await two) == ("a", "b")
    assert order == ["first", "second"]


async def test_waiting_past_the_deadline_abandons_the_running_probe(
        hang: threading.Event) -> None:
    probes = Probes()
    one = asyncio.ensure_future(probes.run("/dev/sdb", hang.wait, "read of /dev/sdb", 30))
    await until(lambda: probes.running("/dev/sdb"))
    with pytest.raises(errors.Timeout, match=r"did not return within 0\.05 s"):
        await probes.run("/dev/sdb", lambda: None, "read of /dev/sdb", 0.05)
    # It has now been given up on: the next caller learns so at once.
    with pytest.raises(errors.Timeout, match="has not returned yet"):
        await probes.run("/dev/sdb", lambda: None, "read of /dev/sdb", 30)
    assert threads("read of /dev/sdb") == 1
    hang.set()
    assert await one is True


async def test_errors_reach_the_caller_and_a_cancelled_caller_leaves_no_second_thread(
        hang: threading.Event) -> None:
    probes = Probes()

    def fails() -> None:
        raise FileNotFoundError(2, "No such file or directory", "/dev/sdz")

    with pytest.raises(FileNotFoundError):
        await probes.run("/dev/sdz", fails, "read of /dev/sdz", 5)
    task = asyncio.ensure_future(probes.run("/dev/sdy", hang.wait, "read of /dev/sdy", 30))
    await until(lambda: probes.running("/dev/sdy"))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The thread of the cancelled caller still counts: the next caller waits for it.
    late = asyncio.ensure_future(probes.run("/dev/sdy", lambda: "x", "read of /dev/sdy", 30))
    await asyncio.sleep(0.05)
    assert not late.done() and threads("read of /dev/sdy") == 1
    hang.set()
    assert await late == "x"


async def test_a_check_that_returned_in_time_is_no_hang_when_the_loop_was_busy() -> None:
    """A deadline passed while the loop itself was blocked (a start-up with thousands of
    keys): the thread had returned long before, so its result counts."""
    probes = Probes()

    async def registry(fn: Callable[[], str]) -> str:
        return await probes.run("/mnt/busy", fn, "check of /mnt/busy", 0.1)

    async def alone(fn: Callable[[], str]) -> str:
        return await probe.run(fn, "check of nothing", 0.1)

    for check in (registry, alone):
        answered = threading.Event()

        def quick(answered: threading.Event = answered) -> str:
            answered.set()
            return "ok"

        async def busy_loop(answered: threading.Event = answered) -> None:
            await asyncio.sleep(0)
            answered.wait(10)
            threading.Event().wait(0.3)  # the loop is blocked past the probe's deadline

        blocker = asyncio.create_task(busy_loop())
        assert await check(quick) == "ok"
        await blocker


def pool_threads() -> int:
    return sum(isinstance(t, probe._Worker) and not t.abandoned for t in threading.enumerate())


async def test_checks_reuse_a_few_threads_and_queue_without_losing_their_deadline() -> None:
    probes = Probes()
    go_on = threading.Event()

    def slow() -> str:
        go_on.wait(10)
        return "slow"

    # Every pool thread busy for a while: checks queue behind them, and the deadline of each
    # counts from the moment a thread takes it up.
    busy = [asyncio.ensure_future(probes.run(f"/mnt/busy{i}", slow, f"check {i}", 30))
            for i in range(probe.POOL_SIZE)]
    quick = [asyncio.ensure_future(probes.run(f"/mnt/q{i}", lambda: "q", f"check q{i}", 0.2))
             for i in range(200)]
    await asyncio.sleep(0.4)  # longer than the quick checks' deadline, all still queued
    go_on.set()
    assert await asyncio.gather(*quick) == ["q"] * 200
    assert await asyncio.gather(*busy) == ["slow"] * probe.POOL_SIZE
    assert pool_threads() <= probe.POOL_SIZE


async def test_checks_hanging_in_every_thread_do_not_hold_up_one_that_answers(
        hang: threading.Event) -> None:
    probes = Probes()
    hung = [asyncio.ensure_future(probes.run(f"/mnt/dead{i}", hang.wait, f"dead {i}", 60))
            for i in range(probe.POOL_SIZE)]
    await until(lambda: threads("dead 0") == 1 and all(
        threads(f"dead {i}") == 1 for i in range(probe.POOL_SIZE)))
    try:
        await asyncio.sleep(probe.SLOW + 0.2)
        # Every pool thread has been in its check for a while: one more thread serves the
        # rest, and leaves the pool once it is free again.
        ran_in = await probes.run("/mnt/live", threading.current_thread, "live", 5)
        assert isinstance(ran_in, probe._Worker) and ran_in.name == probe.IDLE
        await until(lambda: not ran_in.is_alive())
        assert pool_threads() == probe.POOL_SIZE
    finally:
        hang.set()
    assert await asyncio.gather(*hung) == [True] * probe.POOL_SIZE
