"""Clients that hang up mid-request: a change happens in memory and on disk, or in neither,
and one that happened has all its effects although nobody reads its reply."""

from __future__ import annotations

import socket
import threading
from typing import Any

import orjson
import pytest

from tests.daemon import Daemon, mounted

pytestmark = pytest.mark.root

CLIENTS = 40


def tmpfs(name: str) -> dict[str, Any]:
    return {"type": "posixfs", "connection": name, "vfs_type": "tmpfs", "mnt_options": "size=1m"}


def hang_up_after(daemon: Daemon, *requests: dict[str, Any]) -> None:
    """Send `requests` in one write and close the socket at once, reading nothing."""
    data = b"".join(orjson.dumps({"jsonrpc": "2.0", "id": i, **r}) + b"\n"
                    for i, r in enumerate(requests))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(daemon.socket)
        s.sendall(data)


def managed(daemon: Daemon) -> dict[str, str]:
    """CID -> key of every managed CID."""
    listed = daemon.call("getStorageServerList", includeUnmanaged=False)
    return {cid: st["key"] for cid, st in listed.items() if st["managed"]}


def test_hung_up_changes_are_whole_in_memory_on_disk_and_on_the_host(daemon: Daemon) -> None:
    # Half the clients drop a CID that is the last on its key, half add a new one; each
    # asks something quick first, whose reply meets a closed socket.
    for i in range(CLIENTS // 2):
        daemon.call("manageStorageServer", connectionID=f"old{i}", connection=tmpfs(f"old{i}"))
    daemon.call("waitStorageServer", connectionIDs=[f"old{i}" for i in range(CLIENTS // 2)],
                timeout=30)
    quick = {"method": "getHostInfo"}
    threads = []
    for i in range(CLIENTS // 2):
        for change in (
            {"method": "unmanageStorageServer", "params": {"connectionID": f"old{i}"}},
            {"method": "manageStorageServer",
             "params": {"connectionID": f"new{i}", "connection": tmpfs(f"new{i}")}},
        ):
            threads.append(threading.Thread(target=hang_up_after, args=(daemon, quick, change)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    def settled() -> bool:
        cids = set(managed(daemon))
        return not any(c.startswith("old") for c in cids) and len(cids) == CLIENTS // 2
    daemon._until("the hung-up changes not all made", settled, 30)
    before = managed(daemon)
    assert set(before) == {f"new{i}" for i in range(CLIENTS // 2)}
    # The last CID of each old key went: torn down now, not at the next start.
    for i in range(CLIENTS // 2):
        daemon.wait_gone(f"{daemon.mount_root}/old{i}")
    daemon.call("waitStorageServer", connectionIDs=list(before), timeout=30)
    mounts = {cid: mounted(f"{daemon.mount_root}/{cid}") for cid in before}
    assert all(m is not None for m in mounts.values())

    daemon.stop()
    daemon.start()
    assert managed(daemon) == before
    daemon.call("waitStorageServer", connectionIDs=list(before), timeout=30)
    for cid, m in mounts.items():
        now = mounted(f"{daemon.mount_root}/{cid}")
        assert now is not None and m is not None and now.mount_id == m.mount_id, cid
    for i in range(CLIENTS // 2):
        assert mounted(f"{daemon.mount_root}/old{i}") is None
    assert "TEARDOWN" not in daemon.log()
