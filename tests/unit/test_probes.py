"""The probe registry with real threads: a hung target never holds more than one thread, however
often it is probed; a second target is not held up by the first; a caller arriving while a
probe is under way waits for it, then probes itself."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from tests.unit.test_iscsi_supervisor import until
from vdsmconn import errors
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
