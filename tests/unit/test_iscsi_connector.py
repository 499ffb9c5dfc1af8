"""The iSCSI connector on the fake command runner and a fake sysfs tree: exact iscsiadm argv,
node setup before login, CHAP masked, bonds, refcounted logout, parallel logins capped."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_iscsi_parse import write_session
from vdsmconn import config, errors
from vdsmconn.clock import Clock, FakeClock
from vdsmconn.connectors.base import Connected, HostContext
from vdsmconn.connectors.iscsi import SCAN_WAIT, IscsiConnector
from vdsmconn.connectors.iscsi_discovery import discover_send_targets
from vdsmconn.connectors.iscsi_paths import initiator_iface
from vdsmconn.host.command import Arg, Result
from vdsmconn.host.fakerunner import FakeRunner
from vdsmconn.host.iscsiadm import Iscsiadm
from vdsmconn.model import MASK, IscsiSpec, Secret
from vdsmconn.state.actual import PathStatus

IQN = "iqn.2003-01.org.vdsmconn.test:t1"
PASSWORD = "s3cr3t-Pa55word"


class HostRunner(FakeRunner):
    """A fake runner whose logins and logouts change the fake sysfs like the kernel does."""

    def __init__(self, sysfs: Path) -> None:
        super().__init__()
        self.sysfs = sysfs
        self.sid = 0
        self.login_rc: dict[str, int] = {}  # iface -> rc of its login
        self.active = 0
        self.most = 0

    async def run(self, argv: Sequence[Arg], *, timeout: float, input: bytes | None = None,
                  check: bool = False, env: Mapping[str, str] | None = None,
                  prepare: Callable[[], object] | None = None) -> Result:
        args = [str(a) if not isinstance(a, Secret) else a.reveal() for a in argv]
        if "--login" in args:
            iface = args[args.index("-I") + 1]
            rc = self.login_rc.get(iface, 0)
            self.active += 1
            self.most = max(self.most, self.active)
            try:
                await asyncio.sleep(0.01)
            finally:
                self.active -= 1
            stderr = "iscsiadm: initiator reported error (20 - could not connect to iscsid)\n"
            self.calls.append(self.calls[0].__class__(tuple(args), timeout, input, env))
            if rc == 0:
                self.sid += 1
                address, port = args[args.index("-p") + 1].split(",")[0].rsplit(":", 1)
                disk = f"sd{chr(ord('a') + self.sid)}"
                write_session(self.sysfs, self.sid, args[args.index("-T") + 1], address,
                              int(port), 1, iface, disk=disk)
                disk_node(self.sysfs, disk)
                return Result(tuple(args), 0, "", "", 0.01)
            return Result(tuple(args), rc, "", stderr if rc == 20 else "iscsiadm: auth\n", 0.01)
        if "--logout" in args:
            iface = args[args.index("-I") + 1]
            result = await super().run(argv, timeout=timeout, input=input, check=check, env=env,
                                         prepare=prepare)
            if result.rc == 0:
                for session in (self.sysfs / "class" / "iscsi_session").glob("session*"):
                    if (session / "ifacename").read_text().strip() == iface:
                        for f in session.iterdir():
                            if f.is_file():
                                f.unlink()
                        session.joinpath("ifacename").write_text("gone\n")
            return result
        return await super().run(argv, timeout=timeout, input=input, check=check, env=env,
                                         prepare=prepare)


async def connect(c: IscsiConnector, s: IscsiSpec) -> Connected:
    """A connect as the supervisor makes it: the logins, then the disks settled."""
    return await c.settle(s, await c.connect(s))


def wire(paths: Sequence[PathStatus] | None) -> list[dict[str, Any]]:
    """The `paths` of a status as a client reads them."""
    return [p.to_wire() for p in paths or ()]


def disk_node(sysfs: Path, disk: str) -> Path:
    """The disk's node in the test tree (`<sysfs>/dev/sdX`): a file that answers a direct
    read, until a test makes it fail (removes it) or hang (a FIFO)."""
    node = sysfs / "dev" / disk
    node.parent.mkdir(exist_ok=True)
    node.write_bytes(b"\0" * 4096)
    return node


def netdev(sysfs: Path, name: str, state: str = "up") -> None:
    d = sysfs / "class" / "net" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "operstate").write_text(state + "\n")


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    root = tmp_path / "sys"
    (root / "class" / "iscsi_session").mkdir(parents=True)
    return root


@pytest.fixture
def runner(sysfs: Path) -> HostRunner:
    r = HostRunner(sysfs)
    r.expect(["iscsiadm", "-m", "iface"], stdout="default tcp,<empty>,<empty>,<empty>,<empty>\n")
    r.expect(["iscsiadm", "-m", "node", "-T"], prefix=True, rc=21)  # no record yet (show)
    return r


def make(sysfs: Path, runner: FakeRunner, parallel: int = 10,
         probe_timeout: float = 10.0, clock: Clock | None = None) -> IscsiConnector:
    base = config.Config()
    cfg = dataclasses.replace(
        base, run_dir=str(sysfs.parent / "run"),
        iscsi=dataclasses.replace(base.iscsi, parallel_logins=parallel, sysfs_root=str(sysfs)),
        supervisor=dataclasses.replace(base.supervisor, probe_timeout=probe_timeout))
    return IscsiConnector(HostContext(config.host_settings(cfg), runner,
                                      clock=clock or Clock()))


def expect_setup(runner: FakeRunner) -> None:
    """Node records do not exist, every update and iface call succeeds."""
    runner.expectations.clear()
    runner.expect(["iscsiadm", "-m", "iface"], stdout="default tcp,<empty>,<empty>,<empty>,"
                  "<empty>\n")
    runner.expect(["iscsiadm", "-m", "iface", "-I"], prefix=True)
    for tail in (["-o", "new"], ["-o", "update"], ["-o", "delete"], ["--logout"]):
        runner.expectations.append(_Suffix(tail))  # type: ignore[arg-type]
    runner.expect(["iscsiadm", "-m", "node", "-T"], prefix=True, rc=21)


class _Suffix:
    """An expectation matching node calls that carry `words` (any position)."""

    def __init__(self, words: list[str]) -> None:
        self.words = words
        self.times = None
        self.rc, self.stdout, self.stderr = 0, "", ""
        self.timeout = self.stuck = False

    def matches(self, argv: tuple[str, ...]) -> bool:
        n = len(self.words)
        return argv[:3] == ("iscsiadm", "-m", "node") and any(
            list(argv[i:i + n]) == self.words for i in range(len(argv)))


def spec(**fields: object) -> IscsiSpec:
    return IscsiSpec(connection="10.77.4.2", iqn=IQN, **fields)  # type: ignore[arg-type]


async def test_connect_sets_up_node_then_logs_in(sysfs: Path, runner: HostRunner,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    expect_setup(runner)
    caplog.set_level(logging.DEBUG)
    c = make(sysfs, runner)
    s = spec(tpgt=1, user="u1", password=Secret(PASSWORD))
    found = await connect(c, s)
    node = ("iscsiadm", "-m", "node", "-T", IQN, "-p", "10.77.4.2:3260,1", "-I", "default")
    upd = (*node, "-o", "update", "-n")
    assert runner.argvs == [
        node,  # does the record exist? (rc 21: no)
        (*node, "-o", "new"),
        (*upd, "node.startup", "-v", "manual"),
        (*upd, "node.session.initial_login_retry_max", "-v", "1"),
        (*upd, "node.conn[0].timeo.login_timeout", "-v", "15"),
        (*upd, "node.session.auth.authmethod", "-v", "CHAP"),
        (*upd, "node.session.auth.username", "-v", "u1"),
        (*upd, "node.session.auth.password", "-v", PASSWORD),
        (*node, "--login"),
    ]
    assert found.paths is not None and not found.degraded
    assert [(p["iface"], p["netdev"], p["state"]) for p in wire(found.paths)] == [
        ("default", None, "up")]
    assert found.path == "/dev/sdb" and wire(found.paths)[0]["devices"] == ["/dev/sdb"]
    assert c.present(s) is not None
    # The password is in no log line (the fake runner logs nothing: mask_argv is the path).
    assert PASSWORD not in caplog.text


def unscanned(sysfs: Path, sid: int) -> Path:
    """Session `sid` as it is right after its login: the kernel has not shown its LUN yet."""
    session = sysfs / "class" / "iscsi_session" / f"session{sid}"
    lun = next((session / "device").glob("target*/*"))
    shutil.rmtree(lun / "block")
    return lun / "block"


async def settle_started(c: IscsiConnector, s: IscsiSpec, clock: FakeClock,
                         found: Connected) -> asyncio.Task[Connected]:
    settling = asyncio.create_task(c.settle(s, found))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not settling.done() and clock.pending(), "settle does not wait for the scan"
    return settling


async def test_settle_waits_for_the_lun_scan_event_not_a_poll(sysfs: Path,
                                                            runner: HostRunner) -> None:
    expect_setup(runner)
    clock = FakeClock()
    c = make(sysfs, runner, clock=clock)
    c.host.devices.watched = True  # udev tells of block devices
    s = spec()
    found = await c.connect(s)
    block = unscanned(sysfs, 1)
    settling = await settle_started(c, s, clock, c.present(s) or found)
    (block / "sdb").mkdir(parents=True)  # the kernel scanned the LUN: udev says so
    c.host.devices.changed()
    settled = await asyncio.wait_for(settling, 5)  # no clock time passed
    assert settled.path == "/dev/sdb" and not settled.degraded


async def test_settle_gives_up_waiting_for_a_lun_after_the_scan_wait(
        sysfs: Path, runner: HostRunner) -> None:
    expect_setup(runner)
    clock = FakeClock()
    c = make(sysfs, runner, clock=clock)
    c.host.devices.watched = True
    s = spec()
    found = await c.connect(s)
    unscanned(sysfs, 1)
    settling = await settle_started(c, s, clock, found)
    c.host.devices.changed()  # another device: still none of ours
    await clock.advance(SCAN_WAIT)
    settled = await asyncio.wait_for(settling, 5)
    assert settled.path is None and wire(settled.paths)[0]["state"] == "up"  # no LUN: a target


async def test_failed_login_deletes_the_record_it_created(sysfs: Path,
                                                          runner: HostRunner) -> None:
    expect_setup(runner)
    runner.login_rc["default"] = 20
    c = make(sysfs, runner)
    with pytest.raises(errors.IscsiSetupError) as caught:
        await connect(c, spec(tpgt=1))
    assert "20 - could not connect to iscsid" in caught.value.message
    node = ("iscsiadm", "-m", "node", "-T", IQN, "-p", "10.77.4.2:3260,1", "-I", "default")
    assert runner.argvs[-2:] == [(*node, "--login"), (*node, "-o", "delete")]


async def test_chap_rejected_is_476(sysfs: Path, runner: HostRunner) -> None:
    expect_setup(runner)
    runner.login_rc["default"] = 24
    c = make(sysfs, runner)
    with pytest.raises(errors.IscsiAuthError):
        await connect(c, spec(user="u", password=Secret("wrong")))


async def test_bond_one_path_per_interface_missing_skipped(sysfs: Path,
                                                           runner: HostRunner) -> None:
    expect_setup(runner)
    netdev(sysfs, "eth1")
    netdev(sysfs, "eth2")
    c = make(sysfs, runner)
    s = spec(netIfaceNames=("eth1", "ethX", "eth2"))
    found = await connect(c, s)
    assert found.paths is not None
    assert [(p["iface"], p["netdev"], p["state"]) for p in wire(found.paths)] == [
        ("eth1", "eth1", "up"), ("eth2", "eth2", "up")]
    assert ("iscsiadm", "-m", "iface", "-I", "eth1", "-o", "new") in runner.argvs
    assert ("iscsiadm", "-m", "iface", "-I", "eth1", "-o", "update", "-n",
            "iface.net_ifacename", "-v", "eth1") in runner.argvs
    assert not any("ethX" in argv for argv in runner.argvs)
    # A link goes down: the path is down at once, the connection degraded.
    netdev(sysfs, "eth2", "down")
    assert c.link_changed("eth2", up=False) == [s.key]
    now = c.present(s)
    assert now is not None and now.degraded
    assert now.paths is not None and [p["state"] for p in wire(now.paths)] == ["up", "down"]


async def test_bond_without_any_interface_uses_default(sysfs: Path,
                                                       runner: HostRunner) -> None:
    expect_setup(runner)
    c = make(sysfs, runner)
    found = await connect(c, spec(netIfaceNames=("nope0", "nope1")))
    assert found.paths is not None and [p["iface"] for p in wire(found.paths)] == ["default"]


async def test_bond_some_present_all_fail_is_failed(sysfs: Path, runner: HostRunner) -> None:
    expect_setup(runner)
    netdev(sysfs, "eth1")
    netdev(sysfs, "eth2")
    runner.login_rc.update(eth1=20, eth2=20)
    c = make(sysfs, runner)
    with pytest.raises(errors.IscsiSetupError):
        await connect(c, spec(netIfaceNames=("eth1", "eth2")))


async def test_bond_one_path_failing_is_degraded(sysfs: Path, runner: HostRunner) -> None:
    expect_setup(runner)
    netdev(sysfs, "eth1")
    netdev(sysfs, "eth2")
    runner.login_rc["eth2"] = 20
    c = make(sysfs, runner)
    found = await connect(c, spec(netIfaceNames=("eth1", "eth2")))
    assert found.degraded and found.paths is not None
    down = wire(found.paths)[1]
    assert down["state"] == "down" and down["lastError"]["code"] == 465


async def test_iface_bound_elsewhere_is_never_rebound(sysfs: Path, runner: HostRunner) -> None:
    expect_setup(runner)
    runner.expectations.insert(0, runner.expectations[0].__class__(
        ("iscsiadm", "-m", "iface"), stdout="eth1 tcp,<empty>,<empty>,eth9,<empty>\n"))
    netdev(sysfs, "eth1")
    c = make(sysfs, runner)
    with pytest.raises(errors.IscsiIfaceError) as caught:
        await connect(c, spec(netIfaceName="eth1"))
    assert "bound to eth9" in caught.value.message
    assert not any("update" in argv and "iface" in argv[2] for argv in runner.argvs)


async def test_initiator_name_gets_an_iface_of_its_own(sysfs: Path,
                                                       runner: HostRunner) -> None:
    expect_setup(runner)
    c = make(sysfs, runner)
    name = "iqn.2026-11.org.example:host7"
    iface = initiator_iface(name)
    assert iface.startswith("vdsmconn-") and iface != initiator_iface(name + "x")
    found = await connect(c, spec(initiatorName=name))
    assert found.paths is not None and [p["iface"] for p in wire(found.paths)] == [iface]
    assert runner.argvs[:3] == [
        ("iscsiadm", "-m", "iface"),
        ("iscsiadm", "-m", "iface", "-I", iface, "-o", "new"),
        ("iscsiadm", "-m", "iface", "-I", iface, "-o", "update", "-n", "iface.initiatorname",
         "-v", name)]
    assert ("iscsiadm", "-m", "node", "-T", IQN, "-p", "10.77.4.2:3260", "-I", iface,
            "--login") in runner.argvs


async def test_iface_logging_in_as_another_initiator_is_not_changed(
        sysfs: Path, runner: HostRunner) -> None:
    expect_setup(runner)
    runner.expectations.insert(0, runner.expectations[0].__class__(
        ("iscsiadm", "-m", "iface"),
        stdout="eth1 tcp,<empty>,<empty>,eth1,iqn.2026-11.org.example:other\n"))
    netdev(sysfs, "eth1")
    c = make(sysfs, runner)
    with pytest.raises(errors.IscsiIfaceError) as caught:
        await connect(c, spec(netIfaceName="eth1", initiatorName="iqn.2026-11.org.example:me"))
    assert caught.value.code == 473
    assert "logs in as iqn.2026-11.org.example:other" in caught.value.message
    assert not any("--login" in argv for argv in runner.argvs)


@pytest.mark.parametrize("cap", [1, 2, 4])
async def test_parallel_logins_capped(sysfs: Path, runner: HostRunner, cap: int) -> None:
    expect_setup(runner)
    names = [f"eth{i}" for i in range(6)]
    for name in names:
        netdev(sysfs, name)
    c = make(sysfs, runner, parallel=cap)
    found = await connect(c, spec(netIfaceNames=tuple(names)))
    assert found.paths is not None and len(found.paths) == 6
    assert sum("--login" in argv for argv in runner.argvs) == 6
    assert runner.most == cap  # reached, never passed


async def test_two_keys_logout_only_after_the_last(sysfs: Path, runner: HostRunner) -> None:
    expect_setup(runner)
    c = make(sysfs, runner)
    any_tpgt, tpgt1 = spec(), spec(tpgt=1)
    assert any_tpgt.key != tpgt1.key
    await connect(c, any_tpgt)
    await connect(c, tpgt1)
    await c.disconnect(any_tpgt)
    assert not any("--logout" in argv for argv in runner.argvs)
    assert c.present(tpgt1) is not None
    await c.disconnect(tpgt1)
    assert sum("--logout" in argv for argv in runner.argvs) == 1
    assert runner.argvs[-1][-2:] == ("-o", "delete")


async def test_logout_failure_is_474_and_kept(sysfs: Path, runner: HostRunner) -> None:
    expect_setup(runner)
    c = make(sysfs, runner)
    s = spec()
    await connect(c, s)
    failing = _Suffix(["--logout"])
    failing.rc = 10
    runner.expectations.insert(0, failing)  # type: ignore[arg-type]
    runner.expectations[0].stderr = "iscsiadm: Could not logout of all requested sessions\n"
    with pytest.raises(errors.IscsiLogoutError) as caught:
        await c.disconnect(s)
    assert "Could not logout" in caught.value.message
    assert c.users(s, "default") == {s.key}  # still ours: the retry logs out


async def test_logout_past_its_deadline_is_480(sysfs: Path, runner: HostRunner) -> None:
    expect_setup(runner)
    c = make(sysfs, runner)
    s = spec()
    await connect(c, s)
    slow = _Suffix(["--logout"])
    slow.timeout = True
    runner.expectations.insert(0, slow)  # type: ignore[arg-type]
    with pytest.raises(errors.Timeout) as caught:
        await c.disconnect(s)
    assert caught.value.code == 480 and "timed out after 60 s" in caught.value.message
    assert c.users(s, "default") == {s.key}


async def test_node_setup_past_its_deadline_is_480(sysfs: Path, runner: HostRunner) -> None:
    expect_setup(runner)
    slow = _Suffix(["-o", "update"])
    slow.timeout = True
    runner.expectations.insert(0, slow)  # type: ignore[arg-type]
    with pytest.raises(errors.Timeout) as caught:
        await connect(make(sysfs, runner), spec())
    assert caught.value.code == 480 and "-o update" in caught.value.message


# --- a path is up only while its disks answer ----------------------------------------------


def states(c: IscsiConnector, s: IscsiSpec) -> tuple[bool, list[tuple[str, int | None]]]:
    """(degraded, [(state, lastError code) per path]) as the status shows them."""
    found = c.present(s)
    assert found is not None and found.paths is not None
    return found.degraded, [(p["state"], p["lastError"] and p["lastError"]["code"])
                            for p in wire(found.paths)]


def probe_threads(disk: str) -> int:
    return sum(t.name == f"probe reading /dev/{disk}" for t in threading.enumerate())


async def test_failing_disk_keeps_its_path_down_until_it_answers(
        sysfs: Path, runner: HostRunner) -> None:
    expect_setup(runner)
    netdev(sysfs, "eth1")
    netdev(sysfs, "eth2")
    c = make(sysfs, runner)
    s = spec(netIfaceNames=("eth1", "eth2"))
    await connect(c, s)
    assert states(c, s) == (False, [("up", None), ("up", None)])
    node = sysfs / "dev" / "sdc"  # the disk of eth2's session
    node.unlink()  # reads of it fail
    await c.probe(s)  # one path left: degraded, not failed
    assert states(c, s) == (True, [("up", None), ("down", 481)])
    for _ in range(3):  # looking again does not bring it back: only a read that answers does
        await c.probe(s)
        assert states(c, s) == (True, [("up", None), ("down", 481)])
    (sysfs / "dev" / "sdb").unlink()
    with pytest.raises(errors.StaleMount) as caught:
        await c.probe(s)  # no path left
    assert caught.value.code == 481
    assert caught.value.message == "/dev/sdb does not answer: No such file or directory"
    assert states(c, s) == (True, [("down", 481), ("down", 481)])
    with pytest.raises(errors.StaleMount):
        await connect(c, s)  # a reconnect reads the disks too: still down
    disk_node(sysfs, "sdb")
    disk_node(sysfs, "sdc")
    await c.probe(s)
    assert states(c, s) == (False, [("up", None), ("up", None)])


async def test_hung_disk_is_stuck_with_one_thread_however_often_probed(
        sysfs: Path, runner: HostRunner) -> None:
    expect_setup(runner)
    c = make(sysfs, runner, probe_timeout=0.1)
    s = spec()
    await connect(c, s)
    node = sysfs / "dev" / "sdb"
    node.unlink()
    os.mkfifo(node)  # opening it blocks until a writer comes: a read that hangs
    try:
        most = 0
        for _ in range(10):
            with pytest.raises(errors.MountHung) as caught:
                await c.probe(s)
            most = max(most, probe_threads("sdb"))
            assert states(c, s) == (True, [("down", 481)])
        assert caught.value.message.startswith("/dev/sdb does not answer: reading /dev/sdb: "
                                               "an earlier read has not returned yet")
        assert most == 1
    finally:
        with contextlib.suppress(OSError):
            os.close(os.open(node, os.O_WRONLY | os.O_NONBLOCK))  # the reader goes on
    await until_no_probe_thread("sdb")
    node.unlink()
    disk_node(sysfs, "sdb")
    await c.probe(s)
    assert states(c, s) == (False, [("up", None)])


async def until_no_probe_thread(disk: str) -> None:
    async with asyncio.timeout(10):
        while probe_threads(disk):  # noqa: ASYNC110 - a thread, not a loop event
            await asyncio.sleep(0.01)


async def test_discovery_record_deleted_chap_masked_ipv6_dropped(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    runner = FakeRunner()
    record = ["iscsiadm", "-m", "discoverydb", "-t", "sendtargets", "-p", "10.77.4.2:3260"]
    runner.expect([*record, "--discover", "-o", "nonpersistent"],
                  stdout="10.77.4.2:3260,1 iqn.x:a\n[fd00::2]:3260,1 iqn.x:a\n")
    runner.expect(record, prefix=True)
    adm = Iscsiadm(runner, 10)
    found = await discover_send_targets(adm, "10.77.4.2", 3260, "u", Secret(PASSWORD))
    assert [t.to_wire() for t in found] == [
        {"portal": "10.77.4.2:3260", "tpgt": 1, "iqn": "iqn.x:a"}]
    assert runner.argvs[-1] == (*record, "-o", "delete")
    assert (*record, "-o", "update", "-n", "discovery.sendtargets.auth.password", "-v",
            PASSWORD) in runner.argvs
    both = await discover_send_targets(adm, "10.77.4.2", 3260, ipv6_enabled=True)
    assert [t.portal for t in both] == ["10.77.4.2:3260", "[fd00::2]:3260"]
    # A failed discovery still deletes its record, and reports 476 for CHAP.
    runner.expectations.insert(0, runner.expectations[0].__class__(
        (*record, "--discover", "-o", "nonpersistent"), rc=19,
        stderr="iscsiadm: Login authentication failed with target\n"))
    with pytest.raises(errors.IscsiAuthError):
        await discover_send_targets(adm, "10.77.4.2", 3260, "u", Secret("bad"))
    assert runner.argvs[-1] == (*record, "-o", "delete")


async def test_discovery_past_its_deadline_is_480_and_deletes_its_record() -> None:
    runner = FakeRunner()
    record = ["iscsiadm", "-m", "discoverydb", "-t", "sendtargets", "-p", "10.77.4.2:3260"]
    runner.expect([*record, "--discover", "-o", "nonpersistent"], timeout=True)
    runner.expect(record, prefix=True)
    with pytest.raises(errors.Timeout) as caught:
        await discover_send_targets(Iscsiadm(runner, 10), "10.77.4.2", 3260)
    assert caught.value.code == 480 and "timed out" in caught.value.message
    assert runner.argvs[-1] == (*record, "-o", "delete")


def test_secret_masked_in_logged_argv() -> None:
    from vdsmconn.host.command import mask_argv

    argv: list[str | Secret] = ["iscsiadm", "-m", "node", "-o", "update", "-n",
                                "node.session.auth.password", "-v", Secret(PASSWORD)]
    assert mask_argv(argv)[-1] == MASK
    argv2 = ["iscsiadm", "-m", "node", "-o", "update", "-n", "node.session.auth.password_in",
             "-v", PASSWORD]
    assert PASSWORD not in " ".join(mask_argv(argv2))


def strict_bond(sysfs: Path, runner: HostRunner) -> None:
    """eth1 and eth2 with strict rp_filter; eth1 is the route to the portal."""
    expect_setup(runner)
    runner.expect(["ip", "-o", "route", "get", "10.77.4.2"],
                  stdout="10.77.4.2 dev eth1 src 10.77.4.1 uid 0 \\    cache \n")
    for name in ("eth1", "eth2"):
        netdev(sysfs, name)
        conf = sysfs / "proc-net-conf" / name
        conf.mkdir(parents=True)
        (conf / "rp_filter").write_text("1\n")


async def test_rp_filter_loosened_off_route_and_restored(sysfs: Path,
                                                         runner: HostRunner) -> None:
    strict_bond(sysfs, runner)
    c = make(sysfs, runner)
    s = spec(netIfaceNames=("eth1", "eth2"))
    await connect(c, s)
    # eth1 is the route to the portal: left strict; eth2 is not: loose while used.
    assert (sysfs / "proc-net-conf" / "eth1" / "rp_filter").read_text().strip() == "1"
    assert (sysfs / "proc-net-conf" / "eth2" / "rp_filter").read_text().strip() == "2"
    await c.disconnect(s)
    assert (sysfs / "proc-net-conf" / "eth2" / "rp_filter").read_text().strip() == "1"
    assert list((sysfs.parent / "run" / "rp_filter").iterdir()) == []


async def test_rp_filter_restored_by_a_restarted_daemon(sysfs: Path,
                                                        runner: HostRunner) -> None:
    """Loosened by one daemon, which stops before the last session goes: the next one,
    which never loosened it, restores it when it disconnects."""
    strict_bond(sysfs, runner)
    s = spec(netIfaceNames=("eth1", "eth2"))
    await connect(make(sysfs, runner), s)
    rp = sysfs / "proc-net-conf" / "eth2" / "rp_filter"
    assert rp.read_text().strip() == "2"
    assert (sysfs.parent / "run" / "rp_filter" / "eth2").read_text() == "1"
    again = make(sysfs, runner)  # a new daemon: nothing in memory
    assert again.present(s) is not None  # adopts the sessions
    await again.disconnect(s)
    assert rp.read_text().strip() == "1"
    assert not (sysfs.parent / "run" / "rp_filter" / "eth2").exists()


async def test_probe_logs_missing_path_in_again_without_setup(sysfs: Path,
                                                              runner: HostRunner) -> None:
    expect_setup(runner)
    netdev(sysfs, "eth1")
    netdev(sysfs, "eth2")
    c = make(sysfs, runner)
    s = spec(netIfaceNames=("eth1", "eth2"))
    await connect(c, s)
    session = next(p for p in (sysfs / "class" / "iscsi_session").iterdir()
                   if (p / "ifacename").read_text().strip() == "eth2")
    (session / "targetname").unlink()  # the session is gone
    now = c.present(s)
    assert now is not None and now.degraded
    calls = len(runner.argvs)
    netdev(sysfs, "eth1", "down")  # a path whose link is down is not logged in
    (next(p for p in (sysfs / "class" / "iscsi_session").iterdir()
          if (p / "ifacename").read_text().strip() == "eth1") / "targetname").unlink()
    await c.probe(s)
    node = ("iscsiadm", "-m", "node", "-T", IQN, "-p", "10.77.4.2:3260", "-I", "eth2")
    assert runner.argvs[calls:] == [(*node, "--login")]  # set up already: the login alone
    after = c.present(s)
    assert after is not None and after.paths is not None
    assert [p["state"] for p in wire(after.paths)] == ["down", "up"]


async def test_session_failed_beyond_probe_timeout_is_logged_out_and_in(
        sysfs: Path, runner: HostRunner) -> None:
    expect_setup(runner)
    base = config.Config()
    cfg = dataclasses.replace(
        base, iscsi=dataclasses.replace(base.iscsi, sysfs_root=str(sysfs)),
        supervisor=dataclasses.replace(base.supervisor, probe_timeout=0.05))
    clock = FakeClock()
    c = IscsiConnector(HostContext(config.host_settings(cfg), runner, clock=clock))
    s = spec()
    await connect(c, s)
    state = sysfs / "class" / "iscsi_session" / "session1" / "state"
    state.write_text("FAILED\n")
    with pytest.raises(errors.IscsiSetupError, match="no path"):
        await c.probe(s)  # first seen FAILED: left to iscsid's recovery for now
    assert not any("--logout" in argv for argv in runner.argvs)
    await clock.advance(0.1)
    await c.probe(s)  # FAILED beyond probe_timeout: logged out and in again
    assert [argv[-1] for argv in runner.argvs[-2:]] == ["--logout", "--login"]
    found = c.present(s)
    assert found is not None and not found.degraded


async def test_unmanaged_sessions_are_listed(sysfs: Path, runner: HostRunner) -> None:
    expect_setup(runner)
    c = make(sysfs, runner)
    s = spec()
    await connect(c, s)
    write_session(sysfs, 7, "iqn.2003-01.org.other:t9", "10.9.9.9", 3260, 1, "default")
    assert [(x.sid, x.iqn) for x in c.unmanaged([s])] == [(7, "iqn.2003-01.org.other:t9")]
    assert {x.sid for x in c.unmanaged([])} == {1, 7}
