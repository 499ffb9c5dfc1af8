"""systemd/vdsmconn.service under real systemd (PID 1 in the test guest): active only after
READY=1, a hung event loop restarted by the watchdog, mounts left in place by restart and
stop (same mount ids, files still there) and adopted after the start, without a remount;
iSCSI sessions adopted by the restarted daemon, never logged out.

The unit is the shipped file with ExecStart pointed at this tree: the guest's python3 with
the PYTHONPATH tests/guest/inguest.py gives the tests (the tree and the project's venv
packages). Standard library only at the top level (Debian's python3 collects this module).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guest.fixtures import (
    IscsiTargetFactory,
    SystemdUnit,
    SystemdUnitFactory,
    sh,
    wait_for,
)
from vdsmconn.cli import Client

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parents[2]
NAME = "vdsmconn.service"
SOCKET = "/run/vdsmconn/vdsmconn.sock"


def unit_text(config: Path, watchdog: int = 30, stop_timeout: int = 30) -> str:
    text = (REPO / "systemd" / "vdsmconn.service").read_text()
    start = (f"ExecStart={sys.executable} -m vdsmconn -c {config}\n"
             f"Environment=PYTHONPATH={os.environ.get('PYTHONPATH', REPO)}\n"
             "Environment=PYTHONDONTWRITEBYTECODE=1\nWorkingDirectory=/")
    text, n = re.subn(r"^ExecStart=.*$", start, text, flags=re.M)
    assert n == 1
    text = re.sub(r"^WatchdogSec=.*$", f"WatchdogSec={watchdog}", text, flags=re.M)
    return re.sub(r"^TimeoutStopSec=.*$", f"TimeoutStopSec={stop_timeout}", text, flags=re.M)


class Vdsmconn:
    """The unit, its configuration (JSON is YAML) and its journal."""

    def __init__(self, factory: SystemdUnitFactory, base: Path, **unit: int) -> None:
        self.base = base
        self.mount_root = base / "mnt"
        config = base / "vdsmconn.yaml"
        config.write_text(json.dumps({
            "state_dir": str(base / "state"), "run_dir": "/run/vdsmconn",
            "mount_root": str(self.mount_root),
            "rpc": {"socket": SOCKET, "socket_group": None},
            "metrics": {"listen": None},
            "supervisor": {"backoff_initial": 0.2, "backoff_max": 2, "probe_interval": 2},
        }))
        self.since = sh("date", "+%Y-%m-%d %H:%M:%S").stdout.strip()
        self.unit: SystemdUnit = factory(NAME, unit_text(config, **unit))

    def call(self, method: str, **params: Any) -> Any:
        with Client(SOCKET, timeout=30) as c:
            return c.call(method, params, wait=float(params.get("timeout", 0) or 0),
                          expect=object)

    def journal(self) -> str:
        return sh("journalctl", "-u", NAME, "--since", self.since, "-o", "cat",
                  "--no-pager").stdout

    def main_pid(self) -> int:
        return int(self.unit.show("MainPID"))


@pytest.fixture
def vdsmconn(systemd_unit: SystemdUnitFactory, tmp_path: Path) -> Iterator[Vdsmconn]:
    v = Vdsmconn(systemd_unit, tmp_path)
    try:
        yield v
    finally:
        v.unit.systemctl("stop", check=False)
        for m in reversed(mounts_under(v.mount_root)):
            subprocess.run(["umount", "-l", m[1]], check=False, timeout=30)


def mounts_under(root: Path) -> list[tuple[int, str]]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4].startswith(str(root) + "/"):
            out.append((int(fields[0]), fields[4]))
    return sorted(out, key=lambda m: m[1])


def test_unit_is_active_only_once_ready(vdsmconn: Vdsmconn) -> None:
    vdsmconn.unit.start()  # Type=notify: returns once READY=1 came
    # No retry: READY=1 promises the state is loaded and the socket listens.
    assert vdsmconn.call("getHostInfo")["pid"] == vdsmconn.main_pid()
    assert vdsmconn.unit.is_active() == "active"
    assert vdsmconn.unit.show("StatusText") == "supervising 0 connections"
    journal = vdsmconn.journal()
    assert journal.index("READY socket=") > journal.index("LISTEN path=")
    assert oct(os.stat(SOCKET).st_mode & 0o777) == "0o660"
    vdsmconn.unit.stop()
    assert vdsmconn.unit.is_active() == "inactive"
    assert "STOPPED" in vdsmconn.journal()


def test_hung_event_loop_is_restarted_by_the_watchdog(
    systemd_unit: SystemdUnitFactory, tmp_path: Path
) -> None:
    # 10 s, not less: under emulation on a busy machine a healthy loop may miss a 3 s one.
    v = Vdsmconn(systemd_unit, tmp_path, watchdog=10, stop_timeout=5)
    try:
        v.unit.start()
        hung = v.main_pid()
        os.kill(hung, signal.SIGSTOP)
        wait_for("a new daemon", lambda: v.main_pid() not in (0, hung)
                 and v.unit.is_active() == "active", timeout=120)
        assert int(v.unit.show("NRestarts")) == 1
        assert v.call("getHostInfo")["pid"] == v.main_pid()
        assert not Path(f"/proc/{hung}").exists()
        log = sh("journalctl", "-u", NAME, "--since", v.since, "--no-pager").stdout
        assert "watchdog timeout" in log.lower(), log[-3000:]
    finally:
        v.unit.systemctl("stop", check=False)


def tmpfs(name: str) -> dict[str, Any]:
    return {"type": "posixfs", "connection": name, "vfs_type": "tmpfs", "mnt_options": "size=1m"}


def test_restart_and_stop_leave_mounts_which_are_adopted(vdsmconn: Vdsmconn) -> None:
    v = vdsmconn
    v.unit.start()
    cids = {"g1": "vc-sd1", "g2": "vc-sd2"}
    for cid, name in cids.items():
        v.call("manageStorageServer", connectionID=cid, connection=tmpfs(name))
    statuses = v.call("waitStorageServer", connectionIDs=list(cids), timeout=30)
    for cid, status in statuses.items():
        Path(status["path"], "marker").write_text(cid)
    before = mounts_under(v.mount_root)
    assert [p for _, p in before] == [str(v.mount_root / n) for n in sorted(cids.values())]

    def still_there(when: str) -> None:
        assert mounts_under(v.mount_root) == before, when
        for cid, name in cids.items():
            assert (v.mount_root / name / "marker").read_text() == cid, when

    def adopted(when: str) -> None:
        statuses = v.call("waitStorageServer", connectionIDs=list(cids), timeout=30)
        assert {s["state"] for s in statuses.values()} == {"connected"}, when
        still_there(when)

    first = v.main_pid()
    v.unit.restart()
    assert v.main_pid() != first
    still_there("after restart")
    adopted("after restart")
    v.unit.stop()
    assert v.unit.is_active() == "inactive"
    still_there("after stop")
    v.unit.start()
    adopted("after start")
    journal = v.journal()
    assert journal.count("ADOPT key=") == 4, journal[-3000:]
    assert journal.count("RUN argv=mount") == 2  # never remounted
    assert "UMOUNT" not in journal and "RUN argv=umount" not in journal
    v.call("unmanageStorageServer", prefix="g")
    wait_for("the mounts to go", lambda: mounts_under(v.mount_root) == [], timeout=30)
    time.sleep(0.1)


def test_restart_adopts_iscsi_sessions_without_logout(
        vdsmconn: Vdsmconn, iscsi_target: IscsiTargetFactory) -> None:
    v = vdsmconn
    t = iscsi_target()
    v.unit.start()
    v.call("manageStorageServer", connectionID="s1", connection={
        "type": "iscsi", "connection": "127.0.0.1", "iqn": t.iqn, "tpgt": 1})
    first = v.call("waitStorageServer", connectionIDs=["s1"], timeout=60)["s1"]
    assert first["state"] == "connected"
    sessions = t.sessions()  # "tcp: [sid] portal,tpgt iqn (non-flash)"
    assert len(sessions) == 1
    pid = v.main_pid()
    v.unit.restart()
    assert v.main_pid() != pid
    assert t.sessions() == sessions  # the same session id: never logged out
    after = v.call("waitStorageServer", connectionIDs=["s1"], timeout=60)["s1"]
    assert after["state"] == "connected" and after["path"] == first["path"]
    assert after["paths"][0]["session"] == first["paths"][0]["session"]
    journal = v.journal()
    print(f"OBSERVED systemctl restart with a session: {sessions[0]}, "
          f"path={after['path']}, adopt={journal.count('ADOPT key=iscsi:')}")
    assert journal.count("ADOPT key=iscsi:") == 1, journal[-3000:]
    assert journal.count("--login") == 1  # the first daemon's only
    assert "--logout" not in journal
    v.call("unmanageStorageServer", connectionID="s1")
    wait_for("logout after unmanage", lambda: t.sessions() == [], timeout=30)
