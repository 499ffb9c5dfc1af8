"""NFS for real, in the test guest: the kernel NFS client against nfs-kernel-server, driven
through the real daemon. Mount options read back from mountinfo, shared keys, a server that
goes away and comes back, stale file handles after a re-export, restart adoption.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, failure, mounted, running
from tests.guest.fixtures import NfsExport
from vdsmconn.host import mountinfo

pytestmark = pytest.mark.guest


@pytest.fixture
def nfs_daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon with short timeouts: mount.nfs retries a dead server for 2 minutes."""
    with running(tmp_path, supervisor={"probe_interval": 1, "probe_timeout": 3,
                                       "command_timeout": 10}) as d:
        yield d


def nfs(export: NfsExport, version: str, **fields: Any) -> dict[str, Any]:
    return {"type": "nfs", "connection": export.remote, "protocol_version": version, **fields}


def connected(daemon: Daemon, *cids: str, timeout: float = 60) -> dict[str, Any]:
    result: dict[str, Any] = daemon.call("waitStorageServer", connectionIDs=list(cids),
                                         timeout=timeout)
    return result


def report(what: str, **figures: Any) -> None:
    """Observed figures, for the issue's notes (pytest -s or the guest's output file)."""
    print(f"OBSERVED {what}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def audit(daemon: Daemon) -> list[str]:
    """The daemon's state changes and commands, in order (mount ids are reused by the
    kernel, so the log is what tells a remount from the same mount)."""
    words = (" STATE ", " RUN ", " UNMOUNTED ", " ADOPT ", " PROBE ", " CONNECT key")
    text = daemon.log_file.read_text(errors="replace")  # all of it: log() is the tail
    return [line for line in text.splitlines() if any(w in line for w in words)]


def mount_runs(daemon: Daemon) -> int:
    return sum(1 for line in audit(daemon) if "RUN argv=mount -t nfs " in line)


@pytest.mark.parametrize(("version", "fstype", "vers"), [
    ("3", "nfs", "vers=3"),
    ("4.2", "nfs4", "vers=4.2"),
])  # fmt: skip
def test_manage_mounts_with_spec_8_options(nfs_daemon: Daemon, nfs_export: NfsExport,
                                           version: str, fstype: str, vers: str) -> None:
    (nfs_export.path / "hello").write_text("from the server\n")
    start = time.monotonic()
    reply = nfs_daemon.call("manageStorageServer", connectionID="n1",
                            connection=nfs(nfs_export, version))
    status = connected(nfs_daemon, "n1")["n1"]
    seconds = time.monotonic() - start
    path = f"{nfs_daemon.mount_root}/127.0.0.1:_srv_vdsmconn-nfs_{nfs_export.path.name}"
    assert reply["key"] == f"file:{path.rsplit('/', 1)[1]}"
    assert status["state"] == "connected" and status["path"] == path
    m = mounted(path)
    assert m is not None
    report(f"nfs v{version} mount", seconds=round(seconds, 2), fstype=m.fstype,
           source=m.source, options=",".join(m.options), super=",".join(m.super_options))
    assert (m.fstype, m.source) == (fstype, nfs_export.remote)
    shown = set(m.super_options)
    assert {vers, "soft", "nosharecache", "timeo=100", "retrans=3"} <= shown, shown
    assert "hard" not in shown
    if version == "3":
        # nolock: the kernel shows it as nolock plus local locking of everything.
        assert {"nolock", "local_lock=all"} <= shown, shown
    else:
        assert "local_lock=none" in shown, shown
    assert Path(path, "hello").read_text() == "from the server\n"
    Path(path, "written").write_text("from the client\n")
    assert (nfs_export.path / "written").read_text() == "from the client\n"
    nfs_daemon.call("unmanageStorageServer", connectionID="n1")
    nfs_daemon.wait_gone(path)


def test_two_cids_share_one_mount(nfs_daemon: Daemon, nfs_export: NfsExport) -> None:
    nfs_daemon.call("manageStorageServer", connectionID="a", connection=nfs(nfs_export, "4.2"))
    # The same export spelled another way is the same key.
    other = nfs(nfs_export, "4.2", connection=nfs_export.remote.replace(":/", "://") + "/")
    nfs_daemon.call("manageStorageServer", connectionID="b", connection=other)
    statuses = connected(nfs_daemon, "a", "b")
    assert statuses["a"]["key"] == statuses["b"]["key"] and statuses["a"]["refs"] == 2
    path = statuses["a"]["path"]
    first = mounted(path)
    assert first is not None
    assert [m.mountpoint for m in mountinfo.read() if m.mountpoint == path] == [path]
    nfs_daemon.call("unmanageStorageServer", connectionID="a")
    status = nfs_daemon.call("getStorageServerList", connectionIDs=["b"])["b"]
    assert status["refs"] == 1 and status["connected"]
    again = mounted(path)
    assert again is not None and again.mount_id == first.mount_id
    nfs_daemon.call("unmanageStorageServer", connectionID="b")
    nfs_daemon.wait_gone(path)


def test_server_stopped_then_back_recovers_without_a_human(nfs_daemon: Daemon,
                                                            nfs_export: NfsExport) -> None:
    conn = nfs(nfs_export, "4.2", timeout=5, retrans=1)
    nfs_daemon.call("manageStorageServer", connectionID="s", connection=conn)
    status = connected(nfs_daemon, "s")["s"]
    path = status["path"]
    first = mounted(path)
    assert first is not None and "timeo=5" in first.super_options
    stopped = time.monotonic()
    nfs_export.stop()
    broken = nfs_daemon.wait_error("s", 481, timeout=60)
    noticed = time.monotonic() - stopped
    report("server stopped", noticed_s=round(noticed, 2), state=broken["state"],
           error=broken["lastError"])
    assert broken["state"] in ("failed", "stuck", "connecting", "disconnecting")
    assert not broken["connected"] or broken["state"] != "connected"
    # The daemon keeps trying while the server is away, and each mount that fails is a 477
    # with mount.nfs's own words, or a 480 if mount.nfs keeps retrying past its deadline.
    tried: dict[str, Any] = {}

    def mount_failed() -> bool:
        nonlocal tried
        tried = nfs_daemon.call("getStorageServerList", connectionIDs=["s"])["s"]
        return failure(tried).get("code") in (477, 480) and tried["attempts"] >= 2
    nfs_daemon._until("no failed mount while the server is away", mount_failed, 60)
    report("while away", state=tried["state"], attempts=tried["attempts"],
           error=failure(tried), away_s=round(time.monotonic() - stopped, 2))
    assert tried["state"] in ("failed", "connecting")
    message = failure(tried)["message"]
    if failure(tried)["code"] == 477:
        assert message.startswith(f"mount of {nfs_export.remote} failed: "), message
        assert "mount.nfs" in message, message
    else:
        assert message.startswith("Command mount ") and "timed out after 10 s" in message
    started = time.monotonic()
    nfs_export.start()
    status = connected(nfs_daemon, "s", timeout=120)["s"]
    back = time.monotonic() - started
    again = mounted(path)
    report("server back", recovered_s=round(back, 2), state=status["state"],
           attempts=status["attempts"], mount_runs=mount_runs(nfs_daemon))
    print("\n".join(audit(nfs_daemon)))
    assert status["state"] == "connected" and again is not None
    assert mount_runs(nfs_daemon) >= 2
    Path(path, "after").write_text("back\n")
    assert (nfs_export.path / "after").read_text() == "back\n"
    nfs_daemon.call("unmanageStorageServer", connectionID="s")
    nfs_daemon.wait_gone(path, timeout=60)


@pytest.mark.parametrize("version", ["3", "4.2"])
def test_reexport_with_new_fsid_is_stale_and_remounted(nfs_daemon: Daemon,
                                                       nfs_export: NfsExport,
                                                       version: str) -> None:
    nfs_daemon.call("manageStorageServer", connectionID="e", connection=nfs(nfs_export, version))
    path = connected(nfs_daemon, "e")["e"]["path"]
    first = mounted(path)
    assert first is not None
    start = time.monotonic()
    nfs_export.reexport()
    stale = nfs_daemon.wait_error("e", 481, timeout=60)
    noticed = time.monotonic() - start
    report(f"re-export v{version}", noticed_s=round(noticed, 2), state=stale["state"],
           error=failure(stale))
    assert "tale" in failure(stale)["message"]
    deadline = time.monotonic() + 60
    while mount_runs(nfs_daemon) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    status = connected(nfs_daemon, "e")["e"]
    report(f"remounted v{version}", seconds=round(time.monotonic() - start, 2),
           attempts=status["attempts"], mount_runs=mount_runs(nfs_daemon))
    print("\n".join(audit(nfs_daemon)))
    assert status["state"] == "connected" and mounted(path) is not None
    assert mount_runs(nfs_daemon) == 2
    assert any(" UNMOUNTED " in f" {line}" for line in audit(nfs_daemon))
    Path(path, "fresh").write_text("ok\n")
    assert (nfs_export.path / "fresh").read_text() == "ok\n"
    nfs_daemon.call("unmanageStorageServer", connectionID="e")
    nfs_daemon.wait_gone(path)


def test_restart_leaves_mount_and_adopts_it(nfs_daemon: Daemon, nfs_export: NfsExport) -> None:
    nfs_daemon.call("manageStorageServer", connectionID="r", connection=nfs(nfs_export, "4.2"))
    path = connected(nfs_daemon, "r")["r"]["path"]
    first = mounted(path)
    assert first is not None
    assert nfs_daemon.stop() == 0
    kept = mounted(path)
    assert kept is not None and kept.mount_id == first.mount_id
    nfs_daemon.start()
    status = connected(nfs_daemon, "r")["r"]
    adopted = mounted(path)
    report("restart", state=status["state"], attempts=status["attempts"],
           old_id=first.mount_id, new_id=adopted.mount_id if adopted else None)
    assert status["state"] == "connected"
    assert adopted is not None and adopted.mount_id == first.mount_id
    assert any(f"ADOPT key={status['key']}" in line for line in audit(nfs_daemon))
    assert mount_runs(nfs_daemon) == 1  # the daemon before the restart mounted; not after
    nfs_daemon.call("unmanageStorageServer", connectionID="r")
    nfs_daemon.wait_gone(path)
    assert mounted(path) is None
