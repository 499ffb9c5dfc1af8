"""A FUSE mount whose server never answers: the probe is abandoned, the key goes stuck, the
daemon keeps serving, and the mount is recovered by a forced unmount."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.daemon import Daemon, mounted

pytestmark = pytest.mark.root


@pytest.fixture
def hung_fuse(daemon: Daemon) -> Iterator[str]:
    """A FUSE mount at the mount point of posixfs `vc-hung`, whose server never answers."""
    path = f"{daemon.mount_root}/vc-hung"
    os.makedirs(path)
    fd = os.open("/dev/fuse", os.O_RDWR)
    try:
        subprocess.run(
            # -i: straight to the kernel, not through a mount.fuse helper if one is installed
            ["mount", "-i", "-t", "fuse", "-o", f"fd={fd},rootmode=40000,user_id=0,group_id=0",
             "vc-hung", path], check=True, timeout=10, pass_fds=(fd,),
        )
        yield path
    finally:
        os.close(fd)  # aborts the connection: every caller still waiting gets ENOTCONN
        if mounted(path):
            subprocess.run(["umount", "-l", path], check=False, timeout=10)


def test_hung_mount_goes_stuck_and_daemon_keeps_serving(daemon: Daemon, hung_fuse: str) -> None:
    watcher = daemon.client()
    watcher.call("subscribe", {"events": ["storageServerStateChanged"]})
    daemon.call("manageStorageServer", connectionID="h",
                connection={"type": "posixfs", "connection": "vc-hung", "vfs_type": "fuse"})
    daemon.call("manageStorageServer", connectionID="ok",
                connection={"type": "posixfs", "connection": "vc-fine", "vfs_type": "tmpfs"})
    daemon.call("waitStorageServer", connectionIDs=["ok"], timeout=20)
    # The first probe of the hung mount is under way: the daemon must answer meanwhile.
    started = time.monotonic()
    for _ in range(20):
        assert daemon.call("getHostInfo")["version"]
    assert time.monotonic() - started < 5
    stuck = None
    for note in watcher.notifications():
        body = note["params"]
        if body["connectionIDs"] == ["h"] and body["newState"] == "stuck":
            stuck = body
            break
    watcher.close()
    assert stuck is not None and stuck["oldState"] == "connected"
    assert stuck["lastError"]["code"] == 481
    assert stuck["lastError"]["message"].endswith("did not return within 3 s")
    log = daemon.log()
    assert "PROBE key=file:vc-hung failed code=481" in log
    assert "does not answer" in log
    # Recovery: the daemon unmounts the hung mount, then tries to mount it again itself
    # (which fails here: nobody serves this FUSE file system).
    daemon._until("hung mount unmounted", lambda: mounted(hung_fuse) is None, 20)
    daemon.wait_attempts("h", 2)
    assert daemon.call("getStorageServerList", connectionIDs=["ok"])["ok"]["connected"]
    daemon.call("unmanageStorageServer", connectionID="h")
    daemon.call("unmanageStorageServer", connectionID="ok")
    daemon.wait_gone(f"{daemon.mount_root}/vc-fine")
