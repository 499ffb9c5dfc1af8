"""The iSCSI connector under the real reconciler (fake runner, fake sysfs, fake clock): a bond
with one path failing is `degraded` with that path's error; CHAP rejected is 476, retried
with growing nextRetry; unmanage logs out."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from tests.unit.test_iscsi_connector import (
    IQN,
    HostRunner,
    disk_node,
    expect_setup,
    netdev,
    wire,
)
from tests.wait import eventually as until
from vdsmconn import config
from vdsmconn.clock import FakeClock
from vdsmconn.connectors.base import HostContext
from vdsmconn.connectors.iscsi import IscsiConnector
from vdsmconn.model import IscsiSpec, Secret, State
from vdsmconn.reconcile.reconciler import Reconciler
from vdsmconn.state.actual import ActualState
from vdsmconn.state.desired import DesiredState


def world(sysfs: Path, runner: HostRunner) -> tuple[Reconciler, FakeClock]:
    base = config.Config()
    cfg = dataclasses.replace(
        base, iscsi=dataclasses.replace(base.iscsi, sysfs_root=str(sysfs)),
        supervisor=dataclasses.replace(base.supervisor, backoff_initial=1.0, backoff_max=30.0,
                                       probe_interval=30.0))
    clock = FakeClock()
    host = HostContext(config.host_settings(cfg), runner)
    table: dict[str, Any] = {"iscsi": IscsiConnector(host)}
    return Reconciler(cfg, DesiredState(), ActualState(), table, clock), clock


async def test_bond_with_a_failing_path_is_degraded(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    (sysfs / "class" / "iscsi_session").mkdir(parents=True)
    runner = HostRunner(sysfs)
    expect_setup(runner)
    netdev(sysfs, "eth1")
    netdev(sysfs, "eth2")
    runner.login_rc["eth2"] = 20
    rec, _ = world(sysfs, runner)
    spec = IscsiSpec(connection="10.77.4.2", iqn=IQN, netIfaceNames=("eth1", "eth2"))
    try:
        rec.desired.apply_put("c", spec)
        rec.kick(spec.key)
        await until(lambda: (st := rec.actual.get(spec.key)) is not None
                    and st.state == State.DEGRADED)
        st = rec.actual.get(spec.key)
        assert st is not None and st.connected and st.paths is not None
        assert [(p["iface"], p["state"]) for p in wire(st.paths)] == [("eth1", "up"),
                                                                        ("eth2", "down")]
        assert wire(st.paths)[1]["lastError"]["code"] == 465
        assert "could not connect to iscsid" in wire(st.paths)[1]["lastError"]["message"]
        rec.desired.apply_delete("c")
        rec.kick(spec.key)
        await until(lambda: rec.actual.get(spec.key) is None)
        assert sum("--logout" in argv for argv in runner.argvs) == 1  # eth2 had no session
    finally:
        await rec.close()


async def test_chap_rejected_is_476_retried_with_growing_next_retry(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    (sysfs / "class" / "iscsi_session").mkdir(parents=True)
    runner = HostRunner(sysfs)
    expect_setup(runner)
    runner.login_rc["default"] = 24
    rec, clock = world(sysfs, runner)
    spec = IscsiSpec(connection="10.77.4.2", iqn=IQN, user="u", password=Secret("bad-one"))
    try:
        rec.desired.apply_put("c", spec)
        rec.kick(spec.key)
        delays = []
        for attempt in (1, 2, 3, 4):
            await until(lambda a=attempt: (st := rec.actual.get(spec.key)) is not None  # type: ignore[misc]
                        and st.attempts == a and st.next_retry is not None)
            st = rec.actual.get(spec.key)
            assert st is not None and st.state == State.FAILED and st.last_error is not None
            assert st.last_error.code == 476 and st.next_retry is not None
            delays.append(st.next_retry - clock.time())
            await clock.advance(delays[-1])
        assert delays == sorted(delays) and delays[-1] > 2 * delays[0], delays
        assert sum("--login" in argv for argv in runner.argvs) >= 4
    finally:
        await rec.close()


async def test_disk_that_stops_answering_fails_the_key_until_it_answers(
        tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    (sysfs / "class" / "iscsi_session").mkdir(parents=True)
    runner = HostRunner(sysfs)
    expect_setup(runner)
    rec, clock = world(sysfs, runner)
    spec = IscsiSpec(connection="10.77.4.2", iqn=IQN)
    try:
        rec.desired.apply_put("c", spec)
        rec.kick(spec.key)
        await until(lambda: (st := rec.actual.get(spec.key)) is not None
                    and st.state == State.CONNECTED)
        (sysfs / "dev" / "sdb").unlink()  # the LUN's reads fail from now on
        await clock.advance(30.0)  # the next probe
        await until(lambda: (st := rec.actual.get(spec.key)) is not None
                    and st.state == State.FAILED and st.next_retry is not None)
        st = rec.actual.get(spec.key)
        assert st is not None and st.last_error is not None and st.next_retry is not None
        assert (st.last_error.code, st.last_error.message) == (
            481, "/dev/sdb does not answer: No such file or directory")
        assert not any("--logout" in argv for argv in runner.argvs)  # left logged in
        assert st.paths is not None and [p["state"] for p in wire(st.paths)] == ["down"]
        disk_node(sysfs, "sdb")  # it answers again
        await clock.advance(st.next_retry - clock.time())
        await until(lambda: (st := rec.actual.get(spec.key)) is not None
                    and st.state == State.CONNECTED)
        st = rec.actual.get(spec.key)
        assert st is not None and st.paths is not None and st.last_error is None
        assert [p["state"] for p in wire(st.paths)] == ["up"]
        assert sum("--login" in argv for argv in runner.argvs) == 1  # the same session
    finally:
        await rec.close()
