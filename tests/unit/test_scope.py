"""host/scope.py against a private dbus-daemon and a stand-in for systemd's Manager."""


import asyncio
import logging
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import pytest

from vdsmconn.host import scope
from vdsmconn.host.command import CommandRunner

dbus_fast = pytest.importorskip("dbus_fast")
from dbus_fast import Variant  # noqa: E402
from dbus_fast.aio import MessageBus  # noqa: E402
from dbus_fast.annotations import DBusSignature, DBusStr  # noqa: E402
from dbus_fast.service import ServiceInterface, dbus_method, dbus_signal  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("dbus-daemon") is None,
                                reason="dbus-daemon not installed (package dbus-daemon)")

Properties = Annotated[list[list[Any]], DBusSignature("a(sv)")]
Aux = Annotated[list[Any], DBusSignature("a(sa(sv))")]
JobPath = Annotated[str, DBusSignature("o")]
JobRemoved = Annotated[list[Any], DBusSignature("uoss")]


@dataclass
class Call:
    name: str
    mode: str
    properties: dict[str, Any]


@dataclass
class Recorder:
    calls: list[Call] = field(default_factory=list)
    subscribed: int = 0
    result: str = "done"  # what JobRemoved reports
    refuse: str | None = None  # an error name to answer StartTransientUnit with
    refusals: int = 1_000_000  # how many times
    signal: bool = True  # whether JobRemoved is sent at all


class FakeManager(ServiceInterface):
    """org.freedesktop.systemd1.Manager as far as scope.py uses it."""

    def __init__(self, rec: Recorder) -> None:
        super().__init__(scope.MANAGER)
        self.rec = rec
        self.jobs = 0

    @dbus_method()
    def Subscribe(self) -> None:
        self.rec.subscribed += 1

    @dbus_method()
    def StartTransientUnit(self, name: DBusStr, mode: DBusStr, properties: Properties,
                           aux: Aux) -> JobPath:
        from dbus_fast.errors import DBusError

        if self.rec.refuse and self.rec.refusals > 0:
            self.rec.refusals -= 1
            raise DBusError(self.rec.refuse, f"Unit {name} refused")
        props = {k: v.value if isinstance(v, Variant) else v for k, v in properties}
        self.rec.calls.append(Call(name, mode, props))
        self.jobs += 1
        path = f"/org/freedesktop/systemd1/job/{self.jobs}"
        if self.rec.signal:
            asyncio.get_running_loop().call_soon(self.JobRemoved, self.jobs, path, name)
        return path

    @dbus_signal()
    def JobRemoved(self, job_id: int, path: str, unit: str) -> JobRemoved:
        return [job_id, path, unit, self.rec.result]


@pytest.fixture
def bus_address(tmp_path: Path) -> Iterator[str]:
    """A private dbus-daemon, stopped by pid afterwards."""
    address = f"unix:path={tmp_path}/bus"
    proc = subprocess.Popen(["dbus-daemon", "--session", f"--address={address}", "--nofork",
                             "--nopidfile", "--nosyslog", "--print-address=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        printed = proc.stdout.readline().decode()  # printed once it listens
        assert printed.startswith(address), f"dbus-daemon did not start: {printed!r}"
        yield address
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture
async def systemd(bus_address: str) -> AsyncIterator[Recorder]:
    rec = Recorder()
    bus = await MessageBus(bus_address=bus_address).connect()
    bus.export(scope.OBJECT_PATH, FakeManager(rec))
    await bus.request_name(scope.BUS_NAME)
    try:
        yield rec
    finally:
        bus.disconnect()
        await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]


async def test_command_runs_as_the_pid_given_to_the_scope(systemd: Recorder,
                                                          bus_address: str) -> None:
    runner = CommandRunner()
    unit = scope.unit_name("/rhev/data-center/mnt/glusterSD/srv:_vol")
    result = await scope.run_in_scope(
        runner, ["sh", "-c", "echo $$"], unit=unit, slice_="test.slice",
        description="vdsmconn mount of srv:/vol", timeout=10, bus_address=bus_address)
    assert result.rc == 0
    assert len(systemd.calls) == 1
    call = systemd.calls[0]
    assert call.name == "vdsmconn-mount-rhev-data\\x2dcenter-mnt-glusterSD-srv:_vol.scope"
    assert call.mode == "fail"
    assert call.properties["Slice"] == "test.slice"
    assert call.properties["Description"] == "vdsmconn mount of srv:/vol"
    # The gate execs the command: the pid systemd got is the command's own pid.
    assert call.properties["PIDs"] == [int(result.stdout)]
    assert systemd.subscribed == 1
    # The gate's arguments are not part of what the command sees.
    masked = await scope.run_in_scope(
        runner, ["sh", "-c", 'printf "%s," "$@"', "x", "a", "password=s3"], unit=unit,
        slice_="test.slice", description="d", timeout=10, bus_address=bus_address)
    assert masked.stdout == "a,password=s3,"
    assert "s3" not in " ".join(masked.argv)
    await runner.close()


async def test_existing_unit_gets_a_scope_named_after_the_pid(systemd: Recorder,
                                                              bus_address: str) -> None:
    systemd.refuse, systemd.refusals = scope.UNIT_EXISTS, 1
    runner = CommandRunner()
    result = await scope.run_in_scope(
        runner, ["sh", "-c", "echo $$"], unit="vdsmconn-mount-x.scope", slice_="test.slice",
        description="d", timeout=10, bus_address=bus_address)
    await runner.close()
    pid = int(result.stdout)
    assert [c.name for c in systemd.calls] == [f"vdsmconn-mount-x-{pid}.scope"]
    assert systemd.calls[0].properties["PIDs"] == [pid]


async def test_refused_scope_still_runs_the_command(systemd: Recorder, bus_address: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    systemd.refuse = "org.freedesktop.systemd1.BadUnitSetting"
    runner = CommandRunner()
    with caplog.at_level(logging.WARNING, "vdsmconn.host.scope"):
        result = await scope.run_in_scope(
            runner, ["echo", "ran"], unit="vdsmconn-mount-x.scope", slice_="test.slice",
            description="d", timeout=10, bus_address=bus_address)
    assert result.rc == 0 and result.stdout == "ran\n"
    assert "BadUnitSetting" in caplog.text and "running outside a scope" in caplog.text
    await runner.close()


async def test_failed_job_is_an_error(systemd: Recorder, bus_address: str) -> None:
    systemd.result = "failed"
    with pytest.raises(scope.ScopeError, match="result 'failed'"):
        await scope.start_scope("vdsmconn-mount-x.scope", [os.getpid()], "test.slice", "d",
                                bus_address=bus_address, timeout=5)
    assert systemd.calls[0].properties["PIDs"] == [os.getpid()]


async def test_missing_job_removed_times_out(systemd: Recorder, bus_address: str) -> None:
    systemd.signal = False
    with pytest.raises(scope.ScopeError, match="did not finish"):
        await scope.start_scope("vdsmconn-mount-x.scope", [1], "test.slice", "d",
                                bus_address=bus_address, timeout=0.5)


async def test_no_bus_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(scope.ScopeError, match="cannot connect"):
        await scope.start_scope("u.scope", [1], "s.slice", "d",
                                bus_address=f"unix:path={tmp_path}/none", timeout=2)


async def test_gate_refuses_without_the_word() -> None:
    """A gate whose scope step never happened does not run the command."""
    runner = CommandRunner()
    result = await runner.run(["/bin/sh", "-c", scope._GATE, "g", "/dev/null", "/dev/null",
                               "echo", "ran"], timeout=5)
    assert result.rc == 125 and result.stdout == ""
    await runner.close()


def test_unit_names_are_escaped_and_bounded() -> None:
    assert scope.escape("/rhev/data-center/mnt/a b") == "rhev-data\\x2dcenter-mnt-a\\x20b"
    assert scope.escape("/.hidden/x") == "\\x2ehidden-x"
    assert scope.escape("/") == "-"
    long = scope.unit_name("/m/" + "x" * 400)
    assert len(long) <= 255 and long.endswith("x.scope")
    assert long != scope.unit_name("/n/" + "x" * 400)


def test_unavailable_without_systemd(tmp_path: Path) -> None:
    reason = scope.unavailable(str(tmp_path / "none"))
    assert reason is not None and "not PID 1" in reason
    assert scope.unavailable(str(tmp_path)) is None
    info = scope.describe("vdsmconn.slice")
    assert info["slice"] == "vdsmconn.slice"
    assert info["available"] is (info["reason"] is None)


async def test_fuse_mount_command_runs_in_a_scope_of_the_configured_slice(
        systemd: Recorder, bus_address: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """GlusterConnector -> run_in_scope -> the system bus (here: the private one)."""
    import dataclasses

    from vdsmconn import config
    from vdsmconn.connectors.base import HostContext
    from vdsmconn.connectors.gluster import GlusterConnector
    from vdsmconn.model import GlusterSpec, PosixSpec

    monkeypatch.setattr(scope, "unavailable", lambda *a: None)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus_address)
    record = tmp_path / "mount-args"
    stand_in = tmp_path / "mount"
    stand_in.write_text(f'#!/bin/sh\necho "$$ $*" >> {record}\n')
    stand_in.chmod(0o755)
    cfg = dataclasses.replace(config.local(str(tmp_path)), mount_command=str(stand_in),
                              gluster_command="/bin/false", scope_slice="storage.slice")
    runner = CommandRunner()
    host = HostContext(config.host_settings(cfg), runner)
    connector = GlusterConnector(host)
    spec = GlusterSpec(connection="srv:/vol", mnt_options="backup-volfile-servers=b")
    await connector.connect(spec)
    pid, args = record.read_text().split(" ", 1)
    path = f"{cfg.mount_root}/glusterSD/srv:_vol"
    assert args.split() == ["-t", "glusterfs", "-o", "backup-volfile-servers=b", "srv:/vol", path]
    (call,) = systemd.calls
    assert call.properties["PIDs"] == [int(pid)]
    assert call.properties["Slice"] == "storage.slice"
    assert call.name == scope.unit_name(path) and call.name.startswith("vdsmconn-mount-")
    # Not FUSE: no scope.
    from vdsmconn.connectors.mount import PosixConnector

    await PosixConnector(host).connect(PosixSpec(connection="x", vfs_type="tmpfs"))
    assert len(systemd.calls) == 1 and len(record.read_text().splitlines()) == 2
    await runner.close()
