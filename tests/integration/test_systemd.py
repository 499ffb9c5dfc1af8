"""sd_notify on a NOTIFY_SOCKET the test owns: READY, STATUS with counts, STOPPING, watchdog
pings at the asked rate (and none from a stopped loop); the unit file passes
`systemd-analyze verify`. The unit under real systemd: tests/guest/test_guest_systemd.py."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.daemon import Daemon
from vdsmconn import manpage

pytestmark = pytest.mark.root
UNIT = Path(__file__).resolve().parents[2] / "systemd" / "vdsmconn.service"


class NotifyDaemon(Daemon):
    """The daemon with every sd_notify message it sends kept, with its arrival time."""

    def start(self, **env: str) -> None:
        self.config_file.write_text(yaml.safe_dump(self.settings))
        self.messages: list[tuple[float, str]] = []
        path = str(self.run_dir / "notify")
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(path)
        self._notify.settimeout(0.1)
        self._reading = True
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vdsmconn", "-c", str(self.config_file)],
                stdout=log, stderr=log, env=dict(os.environ, NOTIFY_SOCKET=path, **env),
            )
        self.until("READY=1", 30)

    def _read(self) -> None:
        while self._reading:
            with contextlib.suppress(TimeoutError):
                self.messages.append((time.monotonic(), self._notify.recv(4096).decode()))

    def sent(self, field: str) -> list[tuple[float, str]]:
        """(time, value) of every `field=value` line sent."""
        return [(t, line.split("=", 1)[1]) for t, m in list(self.messages)
                for line in m.split("\n") if line.startswith(field + "=")]

    def until(self, line: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not any(line in m.split("\n") for _, m in list(self.messages)):
            assert time.monotonic() < deadline, f"no {line!r}: {self.messages}\n{self.log()}"
            time.sleep(0.02)

    def cleanup(self) -> None:
        super().cleanup()
        self._reading = False
        self._reader.join(5)
        self._notify.close()


@pytest.fixture
def notify_daemon(tmp_path: Path) -> Iterator[NotifyDaemon]:
    d = NotifyDaemon(tmp_path)
    try:
        yield d
    finally:
        d.cleanup()


def test_ready_status_counts_and_stopping(notify_daemon: NotifyDaemon, tmp_path: Path) -> None:
    d = notify_daemon
    d.start()
    first = d.messages[0][1].split("\n")
    assert first == ["READY=1", "STATUS=supervising 0 connections"]
    assert d.call("getHostInfo")["version"]  # READY=1 came after the socket listened
    d.call("manageStorageServer", connectionID="s1", connection=f"localfs://{tmp_path}")
    d.call("manageStorageServer", connectionID="s2", connection="localfs:///nonexistent/dir")
    d.call("waitStorageServer", connectionIDs=["s1"], timeout=10)
    d.wait_error("s2", 451)
    d.until("STATUS=supervising 2 connections: 1 connected, 1 failed")
    d.call("unmanageStorageServer", prefix="s")
    d.until("STATUS=supervising 0 connections")
    assert d.stop() == 0
    d.until("STOPPING=1")
    assert d.messages[-1][1] == "STOPPING=1"


def test_status_updates_are_rate_limited(notify_daemon: NotifyDaemon, tmp_path: Path) -> None:
    d = notify_daemon
    d.start()
    for n in range(30):
        (tmp_path / f"d{n}").mkdir()
        d.call("manageStorageServer", connectionID=f"r{n}",
               connection=f"localfs://{tmp_path}/d{n}")
    d.until("STATUS=supervising 30 connections: 30 connected")
    statuses = d.sent("STATUS")
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(statuses[1:])]
    assert len(statuses) <= 6, statuses  # 60 state changes, a few updates
    assert all(gap > 0.9 for gap in gaps), gaps
    d.call("unmanageStorageServer", prefix="r")
    d.until("STATUS=supervising 0 connections")


def test_watchdog_pings_at_the_configured_rate_while_the_loop_runs(
    notify_daemon: NotifyDaemon,
) -> None:
    d = notify_daemon
    d.start(WATCHDOG_USEC="400000")  # a ping every 0.2 s
    time.sleep(2.0)
    pings = [t for t, _ in d.sent("WATCHDOG")]
    recent = [t for t in pings if t > pings[-1] - 1.6]
    gaps = [b - a for a, b in itertools.pairwise(recent)]
    # Every WATCHDOG_USEC/2 = 0.2 s. Arrival times are taken by a thread of this busy test
    # process on a shared machine: the bounds only tell a pinging loop from a stalled or
    # racing one (the exact rate is the daemon's arithmetic, not a figure to time here).
    assert 3 <= len(recent) <= 16, gaps
    assert max(gaps) < 1.2, gaps
    assert d.proc is not None
    d.proc.send_signal(signal.SIGSTOP)  # a hung event loop sends nothing
    try:
        time.sleep(0.3)
        stopped_at = len(d.sent("WATCHDOG"))
        time.sleep(1.0)
        assert len(d.sent("WATCHDOG")) == stopped_at
    finally:
        d.proc.send_signal(signal.SIGCONT)
    time.sleep(1.0)
    assert len(d.sent("WATCHDOG")) >= stopped_at + 3


def test_watchdog_for_another_pid_is_ignored(notify_daemon: NotifyDaemon) -> None:
    d = notify_daemon
    d.start(WATCHDOG_USEC="200000", WATCHDOG_PID="1")
    time.sleep(0.6)
    assert d.sent("WATCHDOG") == []


def unit_settings() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if re.match(r"^[A-Za-z]+=", line):
            name, value = line.split("=", 1)
            found.setdefault(name, []).append(value)
    return found


def test_unit_leaves_mounts_alone_and_shares_the_mount_namespace() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["KillMode"] == ["process"]
    assert s["Restart"] == ["on-failure"]
    assert int(s["WatchdogSec"][0]) > 0
    assert s["RuntimeDirectory"] == ["vdsmconn"] and s["StateDirectory"] == ["vdsmconn"]
    # Anything that gives the service a mount namespace of its own would hide its mounts.
    for name in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
                 "PrivateMounts", "ProtectKernelTunables", "ProtectKernelModules",
                 "ProtectControlGroups", "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths",
                 "TemporaryFileSystem", "BindPaths", "ProtectProc", "ProcSubset", "ProtectClock",
                 "DevicePolicy", "DeviceAllow", "RootDirectory", "MountFlags"):
        assert name not in s, name


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # The unit names the packaged /usr/bin/vdsmconnd; verify checks that it exists.
    daemon = Path(sys.executable).with_name("vdsmconnd")
    if not daemon.exists():
        pytest.skip("vdsmconnd not installed in this environment")
    unit = tmp_path / "vdsmconn.service"
    unit.write_text(UNIT.read_text().replace("ExecStart=/usr/bin/vdsmconnd",
                                             f"ExecStart={daemon}"))
    # Its Documentation= names the man pages the packages install: verify asks man for them.
    for page in manpage.write(tmp_path / "man" / "tmp"):
        section = tmp_path / "man" / f"man{page.suffix[1:]}"
        section.mkdir(exist_ok=True)
        page.rename(section / page.name)
    env = dict(os.environ, MANPATH=str(tmp_path / "man"))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60, check=False, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout + proc.stderr == ""
