"""iSCSI on our machines, for real: tgtd in a network namespace behind a veth link, the real
iscsiadm (node and iface records work here; login exits 20: no kernel initiator), libiscsi's
userspace login for testStorageServer.

- testStorageServer through the real daemon: reachable + CHAP login ok; wrong CHAP → 476;
  link down → unreachable within the timeout.
- A Reconciler with the real connector and runner (fake clock for the backoff): the real login
  failure is `failed` with 465 and iscsiadm's message, retried with growing `nextRetry`; the
  node record it created is gone after each failure; a bond interface here fails with 473
  (`iface --op=update` exits 7) and its iface record is removed.
- The CHAP password is in no log line.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon
from tests.netns import InNetns, NetnsLink, sh
from tests.wait import eventually
from vdsmconn import config, connectors
from vdsmconn.clock import FakeClock
from vdsmconn.connectors.base import HostContext
from vdsmconn.host.command import CommandRunner
from vdsmconn.model import IscsiSpec, Secret, State
from vdsmconn.reconcile.reconciler import Reconciler
from vdsmconn.state.actual import ActualState
from vdsmconn.state.desired import DesiredState

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("tgtd") is None, reason="tgt is not installed (apt: tgt)"),
    pytest.mark.skipif(shutil.which("iscsiadm") is None,
                       reason="open-iscsi is not installed (apt: open-iscsi)"),
]

PASSWORD = "Tgt-Chap-Pa55word"
USER = "vdsmuser"


@dataclass
class Tgtd(InNetns):
    work: Path
    tag: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def net(self) -> NetnsLink:
        return NetnsLink(f"vcis{self.tag}", f"10.252.{self.tag % 250}")

    @property
    def control(self) -> str:
        return str(100 + self.tag % 100)

    @property
    def iqn(self) -> str:
        return f"iqn.2003-01.org.vdsmconn.test:tgt{self.tag}"

    def adm(self, *args: str) -> None:
        sh("tgtadm", "-C", self.control, "--lld", "iscsi", *args)

    def start(self) -> None:
        self.net.create()
        lun = self.work / "lun.img"
        with open(lun, "wb") as f:
            f.truncate(16 * 1024 * 1024)
        with open(self.work / "tgtd.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.ns}", "tgtd", "-f", "-C", self.control,
                 "--iscsi", f"portal={self.address}:3260"], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.adm("--op", "new", "--mode", "target", "--tid", "1", "-T", self.iqn)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.adm("--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b",
                 str(lun))
        self.adm("--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
        self.adm("--op", "new", "--mode", "account", "--user", USER, "--password", PASSWORD)
        self.adm("--op", "bind", "--mode", "account", "--tid", "1", "--user", USER)

    def cleanup(self) -> None:
        if self.proc is not None:
            sh("tgtadm", "-C", self.control, "--lld", "iscsi", "--op", "delete", "--force",
               "--mode", "target", "--tid", "1", check=False)
            sh("tgtadm", "-C", self.control, "--op", "delete", "--mode", "system", check=False)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None
        self.net.delete()


@pytest.fixture
def tgtd(tmp_path: Path) -> Iterator[Tgtd]:
    server = Tgtd(tmp_path, os.getpid() % 1000)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def iscsi(tgtd: Tgtd, **fields: Any) -> dict[str, Any]:
    return {"type": "iscsi", "connection": tgtd.address, "iqn": tgtd.iqn, **fields}


def check(daemon: Daemon, connection: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    start = time.monotonic()
    result: dict[str, Any] = daemon.call("testStorageServer", connection=connection,
                                         timeout=timeout)
    elapsed = time.monotonic() - start
    print(f"OBSERVED {elapsed:.3f}s " + "; ".join(
        f"{s['step']} {'ok' if s['ok'] else 'FAILED'} {s['seconds']:.3f}s: {s['detail']}"
        for s in result["steps"]))
    assert elapsed < timeout + 2, result
    return result


def steps(result: dict[str, Any]) -> list[tuple[str, bool]]:
    return [(s["step"], s["ok"]) for s in result["steps"]]


needs_libiscsi = pytest.mark.skipif(shutil.which("iscsi-inq") is None,
                                    reason="libiscsi-bin is not installed (iscsi-inq)")


@needs_libiscsi
def test_reachable_target_logs_in_with_chap(daemon: Daemon, tgtd: Tgtd) -> None:
    result = check(daemon, iscsi(tgtd, user=USER, password=PASSWORD))
    assert steps(result) == [("resolve", True), ("connect", True), ("login", True)], result
    assert "with CHAP" in result["steps"][2]["detail"]
    assert result["ok"] is True
    assert PASSWORD not in daemon.log_file.read_text()


@needs_libiscsi
def test_wrong_chap_is_476(daemon: Daemon, tgtd: Tgtd) -> None:
    result = check(daemon, iscsi(tgtd, user=USER, password="wrong-password-1"))
    assert steps(result) == [("resolve", True), ("connect", True), ("login", False)], result
    detail = result["steps"][2]["detail"]
    assert "476" in detail and "Authentication failure" in detail, detail
    assert "wrong-password-1" not in daemon.log_file.read_text()


@needs_libiscsi
def test_unknown_target_name_fails_login(daemon: Daemon, tgtd: Tgtd) -> None:
    result = check(daemon, iscsi(tgtd, iqn=tgtd.iqn + "x", user=USER, password=PASSWORD))
    assert steps(result)[-1] == ("login", False)
    assert "Target not found" in result["steps"][2]["detail"]


def test_link_down_is_unreachable_within_the_timeout(daemon: Daemon, tgtd: Tgtd) -> None:
    sh("ip", "link", "set", tgtd.link, "down")
    try:
        result = check(daemon, iscsi(tgtd), timeout=3.0)
    finally:
        sh("ip", "link", "set", tgtd.link, "up")
    assert steps(result) == [("resolve", True), ("connect", False)], result
    assert "unreachable" in result["steps"][1]["detail"]


# --- the real connector under a reconciler ----------------------------------------------------


class World:
    def __init__(self, tmp: Path) -> None:
        base = config.local(str(tmp))
        sup = dataclasses.replace(base.supervisor, backoff_initial=1.0, backoff_max=8.0,
                                  command_timeout=20.0)
        self.config = dataclasses.replace(base, supervisor=sup)
        self.clock = FakeClock()
        self.runner = CommandRunner()
        self.desired = DesiredState()
        self.actual = ActualState()
        self.connectors = connectors.build(
            HostContext(config.host_settings(self.config), self.runner))
        self.rec = Reconciler(self.config, self.desired, self.actual, self.connectors,
                              self.clock)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = World(tmp_path)
    yield w
    await w.rec.close()
    await w.runner.close()


def node_records(iqn: str) -> list[str]:
    out = sh("iscsiadm", "-m", "node", check=False).stdout
    return [line for line in out.splitlines() if iqn in line]


async def test_real_login_failure_is_465_retried_with_backoff(
        world: World, tgtd: Tgtd, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    spec = IscsiSpec(connection=tgtd.address, iqn=tgtd.iqn, tpgt=1, user=USER,
                     password=Secret(PASSWORD))
    world.desired.apply_put("c1", spec)
    world.rec.kick(spec.key)
    delays = []
    for attempt in (1, 2, 3):
        def retry_announced(a: int = attempt) -> bool:
            st = world.actual.get(spec.key)
            return st is not None and st.attempts == a and st.next_retry is not None
        await eventually(retry_announced)
        st = world.actual.get(spec.key)
        assert st is not None and st.state == State.FAILED and st.last_error is not None
        assert st.last_error.code == 465
        assert "20 - could not connect to iscsid" in st.last_error.message
        assert st.next_retry is not None
        delays.append(st.next_retry - world.clock.time())
        assert node_records(tgtd.iqn) == []  # the record it created is gone again
        await world.clock.advance(delays[-1])
    assert st is not None and st.last_error is not None
    print(f"OBSERVED 465 message={st.last_error.message!r} delays={delays}")
    assert delays[0] < delays[1] < delays[2]
    assert PASSWORD not in caplog.text
    assert "node.session.auth.password -v '********'" in caplog.text  # the argv, masked
    world.desired.apply_delete("c1")
    world.rec.kick(spec.key)
    await eventually(lambda: world.actual.get(spec.key) is None)
    assert node_records(tgtd.iqn) == []


async def test_bond_iface_here_is_473_and_leaves_no_iface(world: World, tgtd: Tgtd) -> None:
    spec = IscsiSpec(connection=tgtd.address, iqn=tgtd.iqn, tpgt=1,
                     netIfaceNames=(tgtd.link, "nosuchnic0"))
    world.desired.apply_put("b1", spec)
    world.rec.kick(spec.key)
    await eventually(lambda: (st := world.actual.get(spec.key)) is not None
                and st.last_error is not None)
    st = world.actual.get(spec.key)
    assert st is not None and st.state == State.FAILED and st.last_error is not None
    print(f"OBSERVED bond here: {st.last_error.code} {st.last_error.message}")
    assert st.last_error.code == 473
    assert "Cound not locate transport" in st.last_error.message  # iscsiadm's spelling
    assert not Path(f"/etc/iscsi/ifaces/{tgtd.link}").exists()  # noqa: ASYNC240
    world.desired.apply_delete("b1")
    world.rec.kick(spec.key)
    await eventually(lambda: world.actual.get(spec.key) is None)
