"""Mount health with a real FUSE file system that hangs, fails or serves on command (vcfuse):
a hung mount goes stuck while the daemon keeps full speed, and every failure is repaired."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, failure, mounted, running
from tests.fusefs import MOUNT_COMMAND, VcFuse
from vdsmconn.model import escape_mount_name

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")]

PROBE_INTERVAL = 1
PROBE_TIMEOUT = 3


class Watcher:
    """Collects storageServerStateChanged notifications, with their arrival time.

    Its own socket, not `Client`: closing a socket file that another thread is reading
    blocks on the reader's lock; `shutdown` ends the read at once."""

    def __init__(self, daemon: Daemon) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(daemon.socket)
        request = {"jsonrpc": "2.0", "id": 1, "method": "subscribe",
                   "params": {"events": ["storageServerStateChanged"]}}
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with self.sock.makefile("rb") as f:
            for line in f:
                msg = json.loads(line)
                if msg.get("method") == "storageServerStateChanged":
                    self.events.append((time.monotonic(), msg["params"]))

    def first(self, cid: str, state: str, after: float,
              timeout: float = 30) -> tuple[float, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, body in list(self.events):
                if at >= after and cid in body["connectionIDs"] and body["newState"] == state:
                    return at, body
            time.sleep(0.02)
        raise AssertionError(f"{cid} never {state}: {[b for _, b in self.events]}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def fuse_daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon whose mount command starts vcfuse for `-t fuse.vcfuse`."""
    supervisor = {"probe_interval": PROBE_INTERVAL, "probe_timeout": PROBE_TIMEOUT}
    with running(tmp_path, mount_command=MOUNT_COMMAND, supervisor=supervisor) as d:
        yield d


@pytest.fixture
def vcfuse(tmp_path: Path) -> Iterator[VcFuse]:
    fs = VcFuse(tmp_path / "ctl")
    try:
        yield fs
    finally:
        fs.set_mode("serve")  # lets held callers go, so nothing stays in D state
        fs.kill_servers()


def manage(daemon: Daemon, fs: VcFuse, cid: str = "f") -> tuple[str, int]:
    daemon.call("manageStorageServer", connectionID=cid, connection=fs.connection)
    status = daemon.call("waitStorageServer", connectionIDs=[cid], timeout=20)[cid]
    path = f"{daemon.mount_root}/{escape_mount_name(str(fs.ctl))}"
    assert status["path"] == path
    m = mounted(path)
    assert m is not None and m.fstype == "fuse.vcfuse" and m.source == str(fs.ctl)
    return path, m.mount_id


def test_hang_goes_stuck_rpc_stays_fast_unhang_reconnects(fuse_daemon: Daemon,
                                                          vcfuse: VcFuse) -> None:
    path, _ = manage(fuse_daemon, vcfuse)
    watcher = Watcher(fuse_daemon)
    try:
        hung_at = time.monotonic()
        vcfuse.set_mode("hang")
        time.sleep(PROBE_INTERVAL + 0.5)  # a probe is now out, waiting on the hung mount
        slowest = 0.0
        with fuse_daemon.client() as c:
            for _ in range(100):
                start = time.monotonic()
                listing = c.call("getStorageServerList", {"connectionIDs": ["f"]})
                slowest = max(slowest, time.monotonic() - start)
                assert listing["f"]["managed"]
        # Far below the probe deadline: no call waited for the hung probe.
        assert slowest < PROBE_TIMEOUT / 2, f"an RPC call took {slowest:.3f} s during the hang"
        stuck_at, stuck = watcher.first("f", "stuck", hung_at)
        assert stuck["lastError"]["code"] == 481
        assert "does not answer" in stuck["lastError"]["message"]
        assert stuck_at - hung_at < PROBE_INTERVAL + PROBE_TIMEOUT + 1
        print(f"stuck {stuck_at - hung_at:.2f} s after the hang; slowest RPC {slowest:.4f} s")
        vcfuse.set_mode("serve")
        status = fuse_daemon.call("waitStorageServer", connectionIDs=["f"], timeout=30)["f"]
        assert status["state"] == "connected" and status["attempts"] == 0
        assert failure(status)["code"] in (477, 481)  # the hang, or a remount during it
        assert "ABORTED fuse connection" in fuse_daemon.log()
    finally:
        watcher.close()
    fuse_daemon.call("unmanageStorageServer", connectionID="f")
    fuse_daemon.wait_gone(path)
    vcfuse.wait_no_servers()


def test_eio_fails_with_481_and_remounts(fuse_daemon: Daemon, vcfuse: VcFuse) -> None:
    path, _ = manage(fuse_daemon, vcfuse)
    first_server = vcfuse.pid()
    vcfuse.set_mode("eio")
    status = fuse_daemon.wait_error("f", 481)
    assert "Input/output error" in failure(status)["message"]
    vcfuse.set_mode("serve")
    status = fuse_daemon.call("waitStorageServer", connectionIDs=["f"], timeout=30)["f"]
    assert status["connected"] and status["attempts"] == 0
    assert failure(status)["code"] in (477, 481)  # the outage, or a remount during it
    # Mount ids are reused by the kernel: the new server's pid tells the mount is new.
    assert vcfuse.pid() != first_server and vcfuse.servers() == [vcfuse.pid()]
    assert "UNMOUNTED path=" + path in fuse_daemon.log()
    fuse_daemon.call("unmanageStorageServer", connectionID="f")
    fuse_daemon.wait_gone(path)
    vcfuse.wait_no_servers()


def test_killed_server_is_detected_and_remounted(fuse_daemon: Daemon, vcfuse: VcFuse) -> None:
    path, _ = manage(fuse_daemon, vcfuse)
    killed = vcfuse.pid()
    os.kill(killed, 9)
    status = fuse_daemon.wait_error("f", 481)
    assert "Transport endpoint is not connected" in failure(status)["message"]
    fuse_daemon._until("a new vcfuse server", lambda: vcfuse.pid() != killed, 20)
    status = fuse_daemon.call("waitStorageServer", connectionIDs=["f"], timeout=30)["f"]
    assert status["connected"] and status["attempts"] == 0
    assert failure(status)["code"] in (477, 481)  # the outage, or a remount during it
    assert mounted(path) is not None and vcfuse.servers() == [vcfuse.pid()]
    fuse_daemon.call("unmanageStorageServer", connectionID="f")
    fuse_daemon.wait_gone(path)
    vcfuse.wait_no_servers()


def test_unmanage_while_hung_unmounts_and_leaves_no_process(fuse_daemon: Daemon,
                                                           vcfuse: VcFuse) -> None:
    path, _ = manage(fuse_daemon, vcfuse)
    vcfuse.set_mode("hang")
    fuse_daemon.wait_error("f", 481)
    fuse_daemon.call("unmanageStorageServer", connectionID="f")
    fuse_daemon.wait_gone(path)
    vcfuse.wait_no_servers()
    fuse_daemon.wait_nothing_listed()


def test_fuse_mount_outlives_kill9_of_the_daemon(fuse_daemon: Daemon, vcfuse: VcFuse) -> None:
    path, mount_id = manage(fuse_daemon, vcfuse)
    server = vcfuse.pid()
    fuse_daemon.kill9()
    assert server in vcfuse.servers()
    assert os.statvfs(path).f_bsize == 4096  # still served
    fuse_daemon.start()
    status = fuse_daemon.call("waitStorageServer", connectionIDs=["f"], timeout=20)["f"]
    m = mounted(path)
    assert status["connected"] and m is not None and m.mount_id == mount_id
    assert vcfuse.servers() == [server]
    assert f"ADOPT key={status['key']}" in fuse_daemon.log()
    fuse_daemon.call("unmanageStorageServer", connectionID="f")
    fuse_daemon.wait_gone(path)
    vcfuse.wait_no_servers()
