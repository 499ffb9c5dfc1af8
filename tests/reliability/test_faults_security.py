"""Faults (full state disk, corrupt database) and the socket's access control, with a real
unprivileged user."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, mounted

pytestmark = pytest.mark.root

TMPFS = {"type": "posixfs", "connection": "vc-fault", "vfs_type": "tmpfs"}

CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("CONNECT-FAILED", e.errno); sys.exit(0)
try:  # a refused client may find the connection closed before it writes
    s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"getHostInfo"}\\n')
except OSError:
    pass
print(s.makefile("rb").readline().decode().strip() or "CLOSED")
"""


def as_nobody(socket_path: str) -> str:
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    out = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", python, "-c",
         CLIENT, socket_path], capture_output=True, text=True, timeout=30, cwd="/",
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_unprivileged_user_cannot_use_the_socket(daemon: Daemon) -> None:
    os.chmod(daemon.run_dir, 0o755)  # let nobody reach the socket file itself
    # The file mode (0660, root's group) keeps nobody out...
    assert as_nobody(daemon.socket).startswith("CONNECT-FAILED 13")
    # ...and with the mode opened up, the peer-credential check still does.
    os.chmod(daemon.socket, 0o666)
    reply = as_nobody(daemon.socket)
    assert '"error"' in reply and "version" not in reply
    assert "REFUSE" in daemon.log()
    assert daemon.call("getHostInfo")["version"]  # root still served


@pytest.fixture
def small_state(tmp_path: Path) -> Iterator[Path]:
    """A state directory on a 2 MiB tmpfs."""
    state = tmp_path / "smallstate"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "vc-state", str(state)],
                   check=True, timeout=10)
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False, timeout=10)


def fill(path: Path) -> None:
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_full_state_disk_fails_cleanly_and_recovers(tmp_path: Path, small_state: Path) -> None:
    d = Daemon(tmp_path, state_dir=str(small_state / "db"))
    try:
        d.start()
        d.call("manageStorageServer", connectionID="before", connection=TMPFS)
        filler = small_state / "filler"
        fill(filler)
        errors = []
        for n in range(20):  # the WAL may still have room for a few
            try:
                d.call("manageStorageServer", connectionID=f"full{n}",
                       connection=dict(TMPFS, connection=f"vc-full{n}"))
            except Exception as e:
                errors.append(e)
        assert errors, "no write failed on a full disk"
        err: Any = errors[0]
        assert err.code == 100 and "Cannot save state change" in err.message
        failed = {f"full{n}" for n in range(20)} - set(d.call("getStorageServerList"))
        assert len(failed) == len(errors)  # a failed manage left nothing behind
        filler.unlink()
        d.call("manageStorageServer", connectionID="after", connection=TMPFS)
        d.kill9()
        d.start()
        listing = d.call("getStorageServerList", includeUnmanaged=False)
        assert {"before", "after"} <= set(listing) and not failed & set(listing)
        for cid in listing:
            d.call("unmanageStorageServer", connectionID=cid)
        for cid in listing:
            d.wait_gone(f"{d.mount_root}/{listing[cid]['key'].removeprefix('file:')}")
    finally:
        d.cleanup()


def test_corrupt_database_refuses_start_and_touches_no_mount(daemon: Daemon) -> None:
    daemon.call("manageStorageServer", connectionID="c", connection=TMPFS)
    path = daemon.call("waitStorageServer", connectionIDs=["c"], timeout=20)["c"]["path"]
    before = mounted(path)
    daemon.stop()
    db = Path(daemon.settings["state_dir"]) / "vdsmconn.db"
    for side in ("-wal", "-shm"):
        Path(f"{db}{side}").unlink(missing_ok=True)
    db.write_bytes(b"this is not a database" * 100)
    proc = subprocess.run([sys.executable, "-m", "vdsmconn", "-c", str(daemon.config_file)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert str(db) in proc.stderr
    after = mounted(path)
    assert before is not None and after is not None and after.mount_id == before.mount_id


def test_restart_during_outage_keeps_retrying_and_recovers(daemon: Daemon,
                                                           tmp_path: Path) -> None:
    data = tmp_path / "export"
    data.mkdir()
    daemon.call("manageStorageServer", connectionID="o", connection=f"localfs://{data}")
    daemon.call("waitStorageServer", connectionIDs=["o"], timeout=20)
    data.rename(tmp_path / "export-away")  # the storage goes away
    daemon.wait_error("o", 451)
    daemon.kill9()
    daemon.start()
    status = daemon.wait_attempts("o", 2)
    assert status["state"] in ("failed", "connecting") and not status["connected"]
    (tmp_path / "export-away").rename(data)  # and comes back
    status = daemon.call("waitStorageServer", connectionIDs=["o"], timeout=30)["o"]
    assert status["connected"] and os.readlink(status["path"]) == str(data)
    daemon.call("unmanageStorageServer", connectionID="o")
    daemon.wait_gone(status["path"])
