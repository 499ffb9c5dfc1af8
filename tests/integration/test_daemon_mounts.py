"""The real daemon over its real socket, with real mounts (tmpfs, xfs on a loop device)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, mounted

pytestmark = pytest.mark.root


def tmpfs(name: str, options: str = "size=4m") -> dict[str, Any]:
    return {"type": "posixfs", "connection": name, "vfs_type": "tmpfs", "mnt_options": options}


def wait_connected(daemon: Daemon, *cids: str, timeout: float = 20) -> dict[str, Any]:
    result: dict[str, Any] = daemon.call("waitStorageServer", connectionIDs=list(cids),
                                         timeout=timeout)
    return result


def test_tmpfs_manage_mounts_and_unmanage_unmounts(daemon: Daemon) -> None:
    reply = daemon.call("manageStorageServer", connectionID="c1", connection=tmpfs("vc-t1"))
    assert reply == {"connectionID": "c1", "key": "file:vc-t1"}
    status = wait_connected(daemon, "c1")["c1"]
    path = f"{daemon.mount_root}/vc-t1"
    assert status["state"] == "connected" and status["path"] == path
    m = mounted(path)
    assert m is not None and m.fstype == "tmpfs" and m.source == "vc-t1"
    assert "size=4096k" in m.super_options
    assert daemon.call("unmanageStorageServer", connectionID="c1") == {"connectionIDs": ["c1"]}
    daemon.wait_gone(path)
    assert not os.path.exists(path)


def test_xfs_on_loop_device(daemon: Daemon, loop_xfs: str) -> None:
    conn = f"posixfs://{loop_xfs}?vfs_type=xfs&mnt_options=noatime"
    daemon.call("manageStorageServer", connectionID="x", connection=conn)
    status = wait_connected(daemon, "x")["x"]
    m = mounted(status["path"])
    assert m is not None and m.fstype == "xfs" and m.source == loop_xfs
    assert "noatime" in m.options
    assert status["connection"] == {"type": "posixfs", "connection": loop_xfs,
                                    "vfs_type": "xfs", "mnt_options": "noatime"}
    daemon.call("unmanageStorageServer", connectionID="x")
    daemon.wait_gone(status["path"])


def test_localfs_links_directory(daemon: Daemon, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    daemon.call("manageStorageServer", connectionID="l", connection=f"localfs://{data}")
    status = wait_connected(daemon, "l")["l"]
    assert os.readlink(status["path"]) == str(data)
    daemon.call("unmanageStorageServer", connectionID="l")
    daemon.wait_gone(status["path"], link=True)
    assert data.is_dir()


def test_two_cids_share_one_mount_and_last_unmanage_unmounts(daemon: Daemon) -> None:
    daemon.call("manageStorageServer", connectionID="a", connection=tmpfs("vc-share"))
    daemon.call("manageStorageServer", connectionID="b", connection=tmpfs("vc-share"))
    statuses = wait_connected(daemon, "a", "b")
    assert statuses["a"]["refs"] == 2 and statuses["a"]["key"] == statuses["b"]["key"]
    path = statuses["a"]["path"]
    first = mounted(path)
    assert first is not None
    daemon.call("unmanageStorageServer", connectionID="a")
    status = daemon.call("getStorageServerList", connectionIDs=["b"])["b"]
    assert status["refs"] == 1 and status["connected"]
    again = mounted(path)
    assert again is not None and again.mount_id == first.mount_id
    daemon.call("unmanageStorageServer", connectionID="b")
    daemon.wait_gone(path)


def test_kill9_restart_adopts_mount_without_remount(daemon: Daemon) -> None:
    daemon.call("manageStorageServer", connectionID="k", connection=tmpfs("vc-adopt"))
    path = wait_connected(daemon, "k")["k"]["path"]
    before = mounted(path)
    assert before is not None
    daemon.kill9()
    daemon.start()
    status = wait_connected(daemon, "k")["k"]
    after = mounted(path)
    assert after is not None and after.mount_id == before.mount_id
    assert status["state"] == "connected" and status["lastCheck"] is not None
    assert "ADOPT key=file:vc-adopt" in daemon.log()
    daemon.call("unmanageStorageServer", connectionID="k")
    daemon.wait_gone(path)


def test_sigterm_leaves_mounts_in_place(daemon: Daemon) -> None:
    daemon.call("manageStorageServer", connectionID="t", connection=tmpfs("vc-term"))
    path = wait_connected(daemon, "t")["t"]["path"]
    before = mounted(path)
    assert daemon.stop() == 0
    after = mounted(path)
    assert before is not None and after is not None and after.mount_id == before.mount_id
    daemon.start()
    wait_connected(daemon, "t")
    after_start = mounted(path)
    assert after_start is not None and after_start.mount_id == before.mount_id
    daemon.call("unmanageStorageServer", connectionID="t")
    daemon.wait_gone(path)


def test_external_umount_is_repaired(daemon: Daemon) -> None:
    daemon.call("manageStorageServer", connectionID="r", connection=tmpfs("vc-repair"))
    path = wait_connected(daemon, "r")["r"]["path"]
    marker = Path(path, "marker")
    marker.write_text("old mount")  # a new tmpfs will not have it (mount ids are reused)
    subprocess.run(["umount", path], check=True, timeout=10)
    daemon.wait_mounted(path)
    assert not marker.exists()
    status = wait_connected(daemon, "r")["r"]
    assert status["connected"]
    assert "VANISHED key=file:vc-repair" in daemon.log()
    daemon.call("unmanageStorageServer", connectionID="r")
    daemon.wait_gone(path)


def test_foreign_mount_under_root_is_listed_and_left_alone(daemon: Daemon) -> None:
    path = f"{daemon.mount_root}/foreign"
    os.makedirs(path)
    subprocess.run(["mount", "-t", "tmpfs", "vc-foreign", path], check=True, timeout=10)
    try:
        found = daemon.call("getStorageServerList")
        unmanaged = [s for cid, s in found.items() if cid.startswith("unmanaged:")]
        assert len(unmanaged) == 1
        assert unmanaged[0]["managed"] is False and unmanaged[0]["path"] == path
        assert unmanaged[0]["connection"]["connection"] == "vc-foreign"
        assert daemon.call("getStorageServerList", includeUnmanaged=False) == {}
        m = mounted(path)
        assert m is not None
    finally:
        subprocess.run(["umount", path], check=True, timeout=10)


def test_concurrent_clients_on_one_key_end_consistent(daemon: Daemon) -> None:
    """50 clients manage and unmanage CIDs on one key at once: refs match what is left."""
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            with daemon.client() as c:
                for round_ in range(4):
                    cid = f"cc-{n}"
                    c.call("manageStorageServer", {"connectionID": cid,
                                                   "connection": tmpfs("vc-conc")})
                    if (n + round_) % 2:
                        c.call("unmanageStorageServer", {"connectionID": cid})
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    listing = daemon.call("getStorageServerList", prefix="cc-")
    present = sorted(listing)
    assert present == sorted(f"cc-{n}" for n in range(50) if not (n + 3) % 2)
    wait_connected(daemon, *present)
    refs = {s["refs"] for s in daemon.call("getStorageServerList", prefix="cc-").values()}
    assert refs == {len(present)}
    path = f"{daemon.mount_root}/vc-conc"
    assert sum(1 for m in _all_mounts() if m == path) == 1
    assert daemon.call("unmanageStorageServer", prefix="cc-")["connectionIDs"] == present
    daemon.wait_gone(path)
    assert sum(1 for m in _all_mounts() if m == path) == 0


def _all_mounts() -> list[str]:
    from vdsmconn.host import mountinfo
    return [m.mountpoint for m in mountinfo.read()]


def test_update_moves_cid_to_new_key(daemon: Daemon) -> None:
    daemon.call("manageStorageServer", connectionID="u", connection=tmpfs("vc-old"))
    old_path = wait_connected(daemon, "u")["u"]["path"]
    reply = daemon.call("updateStorageServer", connectionID="u", connection=tmpfs("vc-new"))
    assert reply == {"connectionID": "u", "key": "file:vc-new"}
    daemon.wait_gone(old_path)
    status = wait_connected(daemon, "u")["u"]
    assert status["path"] == f"{daemon.mount_root}/vc-new" and mounted(status["path"])
    daemon.call("unmanageStorageServer", connectionID="u")
    daemon.wait_gone(status["path"])


def test_update_same_key_new_options_remounts(daemon: Daemon) -> None:
    daemon.call("manageStorageServer", connectionID="o", connection=tmpfs("vc-opt", "size=4m"))
    path = wait_connected(daemon, "o")["o"]["path"]
    daemon.call("updateStorageServer", connectionID="o", connection=tmpfs("vc-opt", "size=8m"))
    daemon.wait_mounted(path, option="size=8192k")
    daemon.call("unmanageStorageServer", connectionID="o")
    daemon.wait_gone(path)


def test_failing_mount_reports_error_and_retries(daemon: Daemon, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-device")
    daemon.call("manageStorageServer", connectionID="f",
                connection={"type": "posixfs", "connection": missing, "vfs_type": "xfs"})
    status = daemon.call("waitStorageServer", connectionIDs=["f"], timeout=20, until="error")
    assert status["f"]["state"] == "failed"
    assert status["f"]["lastError"]["code"] == 477
    assert status["f"]["nextRetry"] is not None
    retried = daemon.wait_attempts("f", 3)
    assert retried["attempts"] >= 3
    err = daemon.error("waitStorageServer", connectionIDs=["f"], timeout=0.5)
    assert err.code == 480 and err.data["f"]["state"] in ("failed", "connecting")
    daemon.call("unmanageStorageServer", connectionID="f")


def test_test_verb_mounts_read_only_and_manages_nothing(daemon: Daemon, loop_xfs: str) -> None:
    result = daemon.call("testStorageServer",
                         connection={"type": "posixfs", "connection": loop_xfs,
                                     "vfs_type": "xfs"})
    assert result["ok"] is True
    assert [s["step"] for s in result["steps"]] == ["source", "mount"]
    assert daemon.call("getStorageServerList") == {}
    bad = daemon.call("testStorageServer",
                      connection={"type": "posixfs", "connection": "/dev/vc-none",
                                  "vfs_type": "xfs"})
    assert bad["ok"] is False and bad["steps"][0]["step"] == "source"
    assert "does not exist" in bad["steps"][0]["detail"]


def test_teardown_interrupted_by_kill9_finishes_after_restart(daemon: Daemon,
                                                             tmp_path: Path) -> None:
    """The last CID goes, the daemon dies before its umount finishes: the next daemon
    unmounts (the mount is not left behind as an unmanaged one)."""
    flag = tmp_path / "umount-started"
    slow = tmp_path / "slow-umount"
    slow.write_text(f"#!/bin/sh\necho $$ > {flag}\nexec sleep 300\n")
    slow.chmod(0o755)
    daemon.call("manageStorageServer", connectionID="td", connection=tmpfs("vc-teardown"))
    path = wait_connected(daemon, "td")["td"]["path"]
    daemon.kill9()
    daemon.settings["umount_command"] = str(slow)
    daemon.start()
    wait_connected(daemon, "td")
    daemon.call("unmanageStorageServer", connectionID="td")
    daemon._until("umount started", flag.exists, 20)
    daemon.kill9()
    daemon._until("umount pid written", lambda: flag.read_text().strip().isdigit(), 5)
    os.kill(int(flag.read_text()), 9)  # the stand-in outlived the daemon (own session)
    assert mounted(path) is not None
    del daemon.settings["umount_command"]
    daemon.start()
    daemon.wait_gone(path)
    daemon.wait_nothing_listed()
    daemon.stop()
    db = sqlite3.connect(Path(daemon.settings["state_dir"]) / "vdsmconn.db")
    try:
        assert db.execute("SELECT count(*) FROM teardowns").fetchone() == (0,)
    finally:
        db.close()
    daemon.start()


def test_failed_teardown_is_listed_with_its_error_until_it_succeeds(tmp_path: Path) -> None:
    """The last CID went but the umount fails: the list shows the key, not managed, with the
    error (once: its mount is not also listed as a foreign one) until a retry succeeds."""
    busy = tmp_path / "busy"
    wrapper = tmp_path / "umount"
    wrapper.write_text(f'#!/bin/sh\nif [ -e {busy} ]; then echo "umount: target is busy." >&2; '
                       'exit 32; fi\nexec umount "$@"\n')
    wrapper.chmod(0o755)
    d = Daemon(tmp_path, umount_command=str(wrapper),
               supervisor={"backoff_initial": 0.2, "backoff_max": 0.5})
    try:
        d.start()
        d.call("manageStorageServer", connectionID="b", connection=tmpfs("vc-busy"))
        path = wait_connected(d, "b")["b"]["path"]
        busy.touch()
        d.call("unmanageStorageServer", connectionID="b")

        def failed_teardown() -> bool:
            listing = d.call("getStorageServerList")
            return any(st["lastError"] for st in listing.values())

        d._until("the failed teardown listed", failed_teardown, 20)
        (entry,) = d.call("getStorageServerList").values()
        assert (entry["managed"], entry["refs"], entry["state"], entry["key"]) == (
            False, 0, "disconnecting", "file:vc-busy")
        assert entry["connection"] == tmpfs("vc-busy") and entry["path"] == path
        assert "target is busy" in entry["lastError"]["message"]
        assert d.call("getStorageServerList", includeUnmanaged=False) == {}
        assert mounted(path) is not None
        busy.unlink()
        d.wait_gone(path)
        d.wait_nothing_listed()
    finally:
        busy.unlink(missing_ok=True)
        d.cleanup()
