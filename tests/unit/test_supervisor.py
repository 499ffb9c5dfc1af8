"""Supervisors driven by a fake clock: backoff, retries, one operation per key, stuck commands.

Real connectors on temporary directories; the command runner is the fake one where a mount
command has to fail or hang.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.wait import eventually as until
from vdsmconn import config, connectors
from vdsmconn.clock import FakeClock
from vdsmconn.connectors.base import Connected, HostContext, QuickCheck
from vdsmconn.host.fakerunner import FakeRunner
from vdsmconn.host.mountinfo import Mount
from vdsmconn.model import ConnectionKey, ConnectionSpec, LocalSpec, PosixSpec, State
from vdsmconn.reconcile.reconciler import Reconciler
from vdsmconn.reconcile.supervisor import SWEEP_GRACE
from vdsmconn.reconcile.sweep import Ticket
from vdsmconn.state.actual import ActualState, KeyStatus
from vdsmconn.state.desired import DesiredState


class World:
    def __init__(self, tmp: Path) -> None:
        base = config.local(str(tmp))
        sup = dataclasses.replace(base.supervisor, backoff_initial=1.0, backoff_max=8.0,
                                  probe_interval=30.0)
        self.config = dataclasses.replace(base, supervisor=sup)
        self.clock = FakeClock()
        self.runner = FakeRunner()
        self.desired = DesiredState()
        self.actual = ActualState()
        host = HostContext(config.host_settings(self.config), self.runner,
                           state=self.actual.host)  # shared, as in the daemon
        self.connectors = connectors.build(host)
        self.rec = Reconciler(self.config, self.desired, self.actual, self.connectors,
                              self.clock)
        self.changes: list[tuple[str, str | None, str | None]] = []
        self.actual.listen(lambda c: self.changes.append((str(c.key), c.old, c.new)))

    def manage(self, cid: str, spec: ConnectionSpec) -> ConnectionKey:
        self.desired.apply_put(cid, spec)
        self.rec.kick(spec.key)
        return spec.key

    def unmanage(self, cid: str) -> None:
        key = self.desired.apply_delete(cid)
        assert key is not None
        self.rec.kick(key)

    def status(self, key: ConnectionKey) -> KeyStatus:
        st = self.actual.get(key)
        assert st is not None
        return st

    async def settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = World(tmp_path)
    yield w
    await w.rec.close()
    await w.runner.close()


async def test_failed_connect_backs_off_then_succeeds(world: World, tmp_path: Path) -> None:
    data = tmp_path / "later"
    key = world.manage("c", LocalSpec(connection=str(data)))
    await until(lambda: world.actual.get(key) and world.status(key).state == State.FAILED, "")
    st = world.status(key)
    assert st.last_error is not None and st.last_error.code == 451
    assert st.attempts == 1
    assert st.next_retry is not None
    first_delay = st.next_retry - world.clock.time()
    assert 0.8 <= first_delay <= 1.2  # backoff_initial 1.0 with 20% jitter

    await world.clock.advance(first_delay)
    await until(lambda: world.status(key).attempts == 2 and world.status(key).next_retry, "")
    second_delay = (world.status(key).next_retry or 0) - world.clock.time()
    assert 1.6 <= second_delay <= 2.4  # doubled

    data.mkdir()
    await world.clock.advance(second_delay)
    await until(lambda: world.status(key).state == State.CONNECTED, "")
    st = world.status(key)
    assert st.next_retry is None and st.path is not None
    assert os.readlink(st.path) == str(data)
    assert world.rec._supervisors[key].backoff.failures == 0  # reset on success


async def test_backoff_is_capped(world: World, tmp_path: Path) -> None:
    key = world.manage("c", LocalSpec(connection=str(tmp_path / "never")))
    delays = []
    for attempt in range(1, 8):
        await until(lambda a=attempt: world.actual.get(key) and  # type: ignore[misc]
                    world.status(key).attempts == a and world.status(key).next_retry, "")
        delay = (world.status(key).next_retry or 0) - world.clock.time()
        delays.append(delay)
        await world.clock.advance(delay)
    assert max(delays) <= 8.0
    assert delays[-1] >= 8.0 * 0.8


async def test_kick_cuts_backoff_short_for_unmanage(world: World, tmp_path: Path) -> None:
    key = world.manage("c", LocalSpec(connection=str(tmp_path / "missing")))
    await until(lambda: world.actual.get(key) and world.status(key).state == State.FAILED, "")
    world.unmanage("c")
    await until(lambda: world.actual.get(key) is None, "")
    assert key not in world.rec._supervisors
    assert world.changes[-1] == (str(key), State.DISCONNECTING, None)


async def test_mount_failure_reports_stderr(world: World) -> None:
    world.runner.expect(["mount", "-t", "xfs"], rc=32, stderr="mount: wrong fs type",
                        prefix=True)
    key = world.manage("c", PosixSpec(connection="/dev/vc-x", vfs_type="xfs"))
    await until(lambda: world.actual.get(key) and world.status(key).state == State.FAILED, "")
    err = world.status(key).last_error
    assert err is not None and err.code == 477 and "wrong fs type" in err.message
    assert world.runner.argvs[0] == (
        "mount", "-t", "xfs", "/dev/vc-x", f"{world.config.mount_root}/_dev_vc-x")


async def test_stuck_command_blocks_further_operations(world: World) -> None:
    mp = f"{world.config.mount_root}/_dev_vc-y"
    world.runner.expect(["mount", "-t", "xfs", "/dev/vc-y", mp], stuck=True, times=1)
    key = world.manage("c", PosixSpec(connection="/dev/vc-y", vfs_type="xfs"))
    await until(lambda: world.actual.get(key) and world.status(key).state == State.STUCK, "")
    world.unmanage("c")
    await world.settle()
    await world.clock.advance(100)
    await world.settle()
    # Nothing else ran on the key while the command could not be killed.
    assert world.runner.argvs == [("mount", "-t", "xfs", "/dev/vc-y", mp)]
    assert world.status(key).state == State.STUCK
    world.runner.release()
    # Once the command is reaped, the queued unmanage runs: the key is torn down.
    await until(lambda: world.actual.get(key) is None, "")
    states = [new for k, _, new in world.changes if k == str(key)]
    assert states == [State.CONNECTING, State.STUCK, State.FAILED, State.DISCONNECTING, None]


async def test_one_operation_at_a_time_per_key(world: World, tmp_path: Path) -> None:
    """Many kicks while an operation runs queue behind it; nothing runs in parallel."""
    data = tmp_path / "d"
    data.mkdir()
    spec = LocalSpec(connection=str(data))
    key = world.manage("a", spec)
    for n in range(20):
        world.manage(f"b{n}", spec)
    await until(lambda: world.actual.get(key) and world.status(key).state == State.CONNECTED, "")
    states = [new for k, _, new in world.changes if k == str(key)]
    assert states == [State.CONNECTING, State.CONNECTED]
    assert len(world.rec._supervisors) == 1


async def test_held_key_is_not_torn_down_until_the_change_is_durable(
        world: World, tmp_path: Path) -> None:
    """An unmanage not yet on disk may still be undone: its key stays up meanwhile."""
    data = tmp_path / "held"
    data.mkdir()
    key = world.manage("c", LocalSpec(connection=str(data)))
    await until(lambda: world.actual.get(key) and world.status(key).state == State.CONNECTED, "")
    world.desired.hold([key])
    world.desired.apply_delete("c")
    await world.clock.advance(100)  # probe intervals pass while the commit is pending
    await world.settle()
    assert world.status(key).state == State.CONNECTED
    world.desired.apply_put("c", LocalSpec(connection=str(data)))  # the store failed
    world.desired.unhold([key])
    await world.clock.advance(100)
    await world.settle()
    assert world.status(key).state == State.CONNECTED
    world.desired.hold([key])
    world.desired.apply_delete("c")
    world.desired.unhold([key])
    world.rec.kick(key)  # durable now
    await until(lambda: world.actual.get(key) is None, "")


async def test_a_key_the_sweep_does_not_check_is_probed_by_its_supervisor(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The sweep stalls (a bug): within a few probe intervals the supervisor probes itself."""
    data = tmp_path / "d"
    data.mkdir()
    local = world.connectors["localfs"]
    monkeypatch.setattr(local, "quick_check", lambda spec: QuickCheck(
        spec.connection, lambda: None, "check", local.host.probes, 5.0))
    enlisted: list[float] = []

    def stalled(sup: Any, check: QuickCheck, due: float) -> Ticket:
        enlisted.append(due)
        return Ticket(sup, check)  # never checked

    monkeypatch.setattr(world.rec.sweep, "enlist", stalled)
    key = world.manage("c", LocalSpec(connection=str(data)))
    await until(lambda: world.actual.get(key) and world.status(key).state == State.CONNECTED, "")
    first = world.status(key).last_check
    await until(lambda: enlisted, "enlisted")
    assert first is not None and enlisted == [first + 30.0]
    await world.clock.advance(30.0 * SWEEP_GRACE)
    assert world.status(key).last_check == first  # a hang would not be given up on yet
    await world.clock.advance(5.0)
    await until(lambda: world.status(key).last_check != first, "probed by its supervisor")
    assert "not checked by the sweep for 95 s; probing here" in caplog.text
    assert world.status(key).state == State.CONNECTED and len(enlisted) == 2


def _mount_at(path: str, source: str, fstype: str = "xfs", mount_id: int = 100) -> Mount:
    return Mount(mount_id, 1, "0:1", "/", path, ("rw",), fstype, source, ("rw",))


async def test_a_mount_table_change_wakes_only_the_key_whose_mount_went(
        world: World, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Of the connected keys, those whose mount went or was replaced are woken, and no
    other: a key whose mount is still there is not looked at again."""
    caplog.set_level(logging.INFO)
    world.runner.expect(["mount", "-t", "xfs"], prefix=True)
    keys = [world.manage(f"c{i}", PosixSpec(connection=f"/dev/vc-{i}", vfs_type="xfs"))
            for i in range(3)]
    await until(lambda: all(world.actual.get(k) and world.status(k).state == State.CONNECTED
                            for k in keys), "connected")
    paths = [world.status(k).path or "" for k in keys]
    table = {p: _mount_at(p, f"/dev/vc-{i}", mount_id=100 + i) for i, p in enumerate(paths)}
    world.rec.on_mounts(table)
    await world.settle()
    assert "VANISHED" not in caplog.text
    world.changes.clear()

    table = {**table, paths[2]: _mount_at(paths[2], "/dev/other", mount_id=200)}
    del table[paths[0]]
    connector = world.connectors[PosixSpec.TYPE]
    looked_at: list[str] = []
    present = connector.present

    def counted(spec: PosixSpec) -> Connected | None:
        looked_at.append(spec.connection)
        return present(spec)

    monkeypatch.setattr(connector, "present", counted)
    world.rec.on_mounts(table)
    assert sorted(looked_at) == ["/dev/vc-0", "/dev/vc-2"]
    monkeypatch.undo()
    # The mount at paths[2] was replaced by a foreign one: not its key's connection either.
    vanished = {r.getMessage() for r in caplog.records if r.getMessage().startswith("VANISHED")}
    assert vanished == {f"VANISHED key={keys[0]}", f"VANISHED key={keys[2]}"}
    await until(lambda: {k for k, _, new in world.changes if new == State.FAILED}
                == {str(keys[0]), str(keys[2])}, "both failed")
    assert str(keys[1]) not in {k for k, _, _ in world.changes}
