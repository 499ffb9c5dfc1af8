"""Periodic probes in rounds: `Probes.sweep` with real threads (a hung check is cut out and the
rest go on), and the sweep of enlisted keys on a fake clock (who is probed when, who is woken).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.wait import eventually as until
from vdsmconn import errors
from vdsmconn.clock import FakeClock
from vdsmconn.connectors.base import QuickCheck
from vdsmconn.host.probe import BUSY, Probes
from vdsmconn.reconcile.sweep import Sweep


@pytest.fixture
def hang() -> Iterator[threading.Event]:
    """Set at the end, so no probe thread outlives the test."""
    release = threading.Event()
    yield release
    release.set()


def threads(name: str) -> int:
    return sum(t.name == f"probe {name}" for t in threading.enumerate())


async def test_a_hung_check_is_cut_out_and_the_rest_of_its_round_goes_on(
        hang: threading.Event) -> None:
    probes = Probes()
    ran: list[str] = []

    def check(target: str) -> Callable[[], None]:
        def fn() -> None:
            ran.append(target)
            if target == "/mnt/3":
                hang.wait()
            if target == "/mnt/7":
                raise OSError(5, "Input/output error")
        return fn

    targets = [f"/mnt/{i}" for i in range(200)]  # several batches
    outcomes = await probes.sweep([(t, check(t), f"probe of {t}") for t in targets], 0.3)
    assert isinstance(outcomes[3], errors.Timeout)
    assert "probe of /mnt/3 did not return within 0.3 s" in outcomes[3].message
    assert isinstance(outcomes[7], OSError)
    assert all(o is None for i, o in enumerate(outcomes) if i not in (3, 7))
    assert sorted(ran) == sorted(targets)  # every check ran once, those after the hang too
    # The hung check holds its thread and its target, as a probe run alone would.
    assert threads("probe of /mnt/3") == 1
    with pytest.raises(errors.Timeout, match="an earlier read has not returned yet"):
        await probes.run("/mnt/3", lambda: None, "probe of /mnt/3", 5)
    again = await probes.sweep([("/mnt/3", check("/mnt/3"), "probe of /mnt/3")], 5)
    assert isinstance(again[0], errors.Timeout) and ran.count("/mnt/3") == 1
    hang.set()
    await until(lambda: not probes.running("/mnt/3"))
    assert await probes.sweep([("/mnt/3", lambda: None, "probe of /mnt/3")], 5) == [None]


async def test_a_target_already_being_probed_is_busy_not_probed_twice(
        hang: threading.Event) -> None:
    probes = Probes()
    slow = asyncio.create_task(probes.run("/mnt/slow", hang.wait, "probe of /mnt/slow", 30))
    await until(lambda: probes.running("/mnt/slow"))
    calls: list[str] = []
    outcomes = await probes.sweep([("/mnt/slow", lambda: calls.append("slow"), "x"),
                                   ("/mnt/ok", lambda: calls.append("ok"), "y")], 5)
    assert outcomes == [BUSY, None] and calls == ["ok"]
    hang.set()
    assert await slow is True


class FakeSup:
    def __init__(self) -> None:
        self.probed_at: list[float] = []
        self.kicks: list[bool] = []

    def probed(self, now: float) -> None:
        self.probed_at.append(now)

    def kick(self, suspect: bool = False) -> None:
        self.kicks.append(suspect)


async def test_keys_are_probed_every_interval_in_few_rounds(hang: threading.Event) -> None:
    clock = FakeClock()
    sweep = Sweep(clock, 10.0)
    rounds: list[int] = []
    sweep.on_round = rounds.append
    probes = Probes()
    start = clock.time()
    sups = [FakeSup() for _ in range(100)]
    for i, sup in enumerate(sups):
        target = f"/mnt/{i}"
        fail = i == 50
        hung = i == 60

        def fn(fail: bool = fail, hung: bool = hung) -> None:
            if fail:
                raise OSError(116, "Stale file handle")
            if hung:
                hang.wait()

        # Due spread over one interval, as keys connected at different times are.
        sweep.enlist(sup, QuickCheck(target, fn, f"probe of {target}", probes, 0.2),
                     start + 10 + i * 0.1)
    cancelled = FakeSup()
    ticket = sweep.enlist(cancelled, QuickCheck("/mnt/x", lambda: None, "x", probes, 0.2),
                          start + 10)
    ticket.cancel()  # its supervisor woke: the sweep leaves it alone
    try:
        for _ in range(20):
            await clock.advance(1.0)
            await until(lambda: not sweep._rounds, "round done", timeout=10)
        # 100 keys due over 10 s: about ten rounds, not a hundred hand-offs.
        healthy = [s for i, s in enumerate(sups) if i not in (50, 60)]
        assert all(s.probed_at for s in healthy)
        assert sum(rounds) >= 100 and len(rounds) <= 13
        assert sups[50].probed_at == [] and sups[50].kicks == [True]  # failed: woken
        assert sups[60].probed_at == [] and sups[60].kicks == [True]  # hung: woken
        assert cancelled.probed_at == [] and cancelled.kicks == []
        # Each probed key is due again one interval after its check (a round takes keys
        # due up to a second later); the woken ones are their supervisors' to enlist again.
        for _ in range(10):
            await clock.advance(1.0)
            await until(lambda: not sweep._rounds, "round done", timeout=10)
        assert all(len(s.probed_at) >= 2 for s in healthy)
        assert all(b - a >= 9.0 for s in healthy for a, b in itertools.pairwise(s.probed_at))
        assert sups[50].kicks == [True] and sups[60].kicks == [True]
    finally:
        await sweep.close()


async def test_a_round_that_waits_for_a_hang_does_not_hold_up_the_next(
        hang: threading.Event) -> None:
    clock = FakeClock()
    sweep = Sweep(clock, 10.0)
    probes = Probes()
    stuck, fine = FakeSup(), FakeSup()
    start = clock.time()
    sweep.enlist(stuck, QuickCheck("/mnt/h", hang.wait, "h", probes, 30), start + 10)
    sweep.enlist(fine, QuickCheck("/mnt/f", lambda: None, "f", probes, 30), start + 15)
    try:
        await clock.advance(10)
        await until(lambda: probes.running("/mnt/h"), "hung check under way")
        await clock.advance(5)
        # Well before the hung check's deadline (30 s), the next round has run.
        await until(lambda: fine.probed_at, "the next round ran", timeout=10)
        assert stuck.kicks == []
    finally:
        await sweep.close()


async def test_a_round_that_fails_hands_its_keys_back_to_their_supervisors() -> None:
    class Broken(Probes):
        async def sweep(self, checks: Any, timeout: float) -> list[object]:
            raise RuntimeError("a bug")

    clock = FakeClock()
    sweep = Sweep(clock, 10.0)
    sups = [FakeSup() for _ in range(3)]
    for i, sup in enumerate(sups):
        sweep.enlist(sup, QuickCheck(f"/mnt/{i}", lambda: None, "x", Broken(), 1.0),
                     clock.time() + 10)
    try:
        await clock.advance(10)
        await until(lambda: all(s.kicks for s in sups), "woken")
        assert [s.kicks for s in sups] == [[True]] * 3 and not any(s.probed_at for s in sups)
    finally:
        await sweep.close()


async def test_idle_waits_for_a_running_probe_but_not_for_a_hung_one(
        hang: threading.Event) -> None:
    probes = Probes()
    slow = threading.Event()
    running = asyncio.create_task(probes.run("/mnt/s", slow.wait, "s", 30))
    await until(lambda: probes.running("/mnt/s"))
    waiter = asyncio.create_task(probes.idle("/mnt/s", 30))
    await asyncio.sleep(0.05)
    assert not waiter.done()  # the check is still out
    slow.set()
    await asyncio.wait_for(waiter, 10)
    assert await running is True
    with pytest.raises(errors.Timeout):
        await probes.run("/mnt/h", hang.wait, "h", 0.05)
    await asyncio.wait_for(probes.idle("/mnt/h", 30), 10)  # abandoned: not waited for (30 s)
    await probes.idle("/mnt/none", 30)
