"""storageServerStateChanged events on the real daemon: order, slow subscribers, and the CLI
that lives on them (`watch`, `wait` progress)."""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, mounted
from tests.wait import until
from vdsmconn.cli import CLEAR

pytestmark = pytest.mark.root
EVENT = "storageServerStateChanged"


def tmpfs(name: str) -> dict[str, Any]:
    return {"type": "posixfs", "connection": name, "vfs_type": "tmpfs", "mnt_options": "size=1m"}


class Collector:
    """A subscriber reading its connection in a thread, keeping every event."""

    def __init__(self, daemon: Daemon) -> None:
        self.client = daemon.client()
        self.client.call("subscribe", {"events": [EVENT]})
        self.events: list[dict[str, Any]] = []
        self.closed = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for note in self.client.notifications():
                self.events.append(note["params"])
        except Exception:
            pass
        self.closed.set()

    def states(self, key: str) -> list[tuple[str | None, str | None]]:
        return [(e["oldState"], e["newState"]) for e in list(self.events) if e["key"] == key]

    def wait_for(self, what: str, check: Any, timeout: float = 20.0) -> None:
        until(check, what, timeout, detail=lambda: f": {self.events[-20:]}")

    def close(self) -> None:
        if self.client._sock is not None:
            self.client._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(10)
        self.client.close()


@pytest.fixture
def collector(daemon: Daemon) -> Iterator[Collector]:
    c = Collector(daemon)
    yield c
    c.close()


def test_external_umount_is_seen_as_connected_failed_connected(
    daemon: Daemon, collector: Collector
) -> None:
    daemon.call("manageStorageServer", connectionID="ev", connection=tmpfs("vc-ev"))
    daemon.call("waitStorageServer", connectionIDs=["ev"], timeout=20)
    path = f"{daemon.mount_root}/vc-ev"
    subprocess.run(["umount", path], check=True, timeout=10)
    key = "file:vc-ev"
    collector.wait_for("no reconnect", lambda: collector.states(key).count(
        ("connecting", "connected")) == 2)
    states = [new for _old, new in collector.states(key)]
    assert states == ["connecting", "connected", "failed", "connecting", "connected"]
    failed = next(e for e in collector.events if e["newState"] == "failed")
    assert failed["connectionIDs"] == ["ev"] and failed["oldState"] == "connected"
    assert failed["lastError"]["code"] == 477
    times = [e["time"] for e in collector.events if e["key"] == key]
    assert times == sorted(times)
    assert mounted(path) is not None
    daemon.call("unmanageStorageServer", connectionID="ev")
    collector.wait_for("no removal", lambda: (("disconnecting", None) in collector.states(key)))


def test_subscriber_that_never_reads_is_dropped_without_slowing_anyone(
    daemon: Daemon, collector: Collector, tmp_path: Path
) -> None:
    lazy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lazy.connect(daemon.socket)
    lazy.sendall(b'{"jsonrpc":"2.0","id":1,"method":"subscribe",'
                 b'"params":{"events":["storageServerStateChanged"]}}\n')
    # Big events (long CIDs, two per key) on many keys fill the lazy reader's socket buffer
    # and then its bounded queue.
    keys = 150
    batch = []
    for n in range(keys):
        folder = tmp_path / f"d{n}"
        folder.mkdir()
        for side in "ab":
            cid = f"FLOW_{n}_{side}_" + "x" * 230
            batch.append({"jsonrpc": "2.0", "id": f"{n}{side}", "method": "manageStorageServer",
                          "params": {"connectionID": cid, "connection": f"localfs://{folder}"}})
    slowest = 0.0
    try:
        for cycle in range(4):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                c.connect(daemon.socket)
                c.sendall(json.dumps(batch).encode() + b"\n")
                replies = json.loads(c.makefile("rb").readline())
                assert len(replies) == 2 * keys and all("result" in r for r in replies)
            while True:
                started = time.monotonic()
                info = daemon.call("getHostInfo")
                slowest = max(slowest, time.monotonic() - started)
                if info["states"]["connected"] == keys:
                    break
                time.sleep(0.05)
            assert daemon.call("unmanageStorageServer", prefix="FLOW_")["connectionIDs"]
            collector.wait_for("not all removed", lambda c=cycle: sum(
                1 for e in collector.events if e["newState"] is None) == keys * (c + 1), 60)
            if "reason=outgoing queue overflow" in daemon.log_file.read_text():
                break
        assert "reason=outgoing queue overflow" in daemon.log_file.read_text(), \
            "the lazy reader was not dropped"
        # The reading subscriber got every event of every key, in order.
        removed = [e for e in collector.events if e["newState"] is None]
        assert len(removed) == keys * (cycle + 1)
        for e in collector.events[:40]:
            assert collector.states(e["key"])[:4] == [
                (None, "connecting"), ("connecting", "connected"),
                ("connected", "disconnecting"), ("disconnecting", None)]
        assert slowest < 2.0, f"a call took {slowest:.2f}s while a subscriber did not read"
        # The lazy reader finds the end of its connection after what was buffered.
        lazy.settimeout(10)
        while lazy.recv(1 << 20):
            pass
    finally:
        lazy.close()
    assert os.listdir(daemon.mount_root) == []  # every link gone with its key


def rpc_settings(daemon: Daemon, **rpc: Any) -> None:
    daemon.settings["rpc"] = {**daemon.settings["rpc"], **rpc}


@pytest.fixture
def idle_daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    rpc_settings(d, idle_timeout=1.0)
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


def cli(daemon: Daemon, *args: str, **kw: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "vdsmconn.cli", "--socket", daemon.socket,
                             *args], **kw)


def test_watch_keeps_its_connection_past_idle_timeout(idle_daemon: Daemon,
                                                      tmp_path: Path) -> None:
    d = idle_daemon
    quiet = d.client()
    quiet.call("subscribe", {"events": [EVENT]})
    watch = cli(d, "watch", "--keepalive", "0.3", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(2.5)  # beyond idle_timeout: a quiet subscriber is dropped, watch is not
        assert list(quiet.notifications()) == []
        assert watch.poll() is None
        d.call("manageStorageServer", connectionID="w1", connection=f"localfs://{tmp_path}")
        d.call("waitStorageServer", connectionIDs=["w1"], timeout=10)
        d.call("unmanageStorageServer", connectionID="w1")
        time.sleep(0.5)
    finally:
        quiet.close()
        watch.send_signal(signal.SIGINT)
        out, err = watch.communicate(timeout=10)
    lines = out.decode().splitlines()
    assert watch.returncode == 0, err
    assert [line.split("  ")[2] for line in lines] == [
        "- -> connecting", "connecting -> connected", "connected -> disconnecting",
        "disconnecting -> -"]
    assert "w1" in lines[0]
    assert "reason=idle" in d.log()


def test_watch_on_a_terminal_redraws_a_table(daemon: Daemon, tmp_path: Path) -> None:
    daemon.call("manageStorageServer", connectionID="before", connection=tmpfs("vc-w0"))
    daemon.call("waitStorageServer", connectionIDs=["before"], timeout=20)
    leader, follower = pty.openpty()
    watch = cli(daemon, "watch", stdout=follower, stderr=subprocess.PIPE)
    os.close(follower)
    screen = b""

    def read_until(text: bytes, timeout: float = 15) -> None:
        nonlocal screen
        deadline = time.monotonic() + timeout
        while text not in screen.rsplit(CLEAR.encode(), 1)[-1]:
            assert time.monotonic() < deadline, screen.decode(errors="replace")[-2000:]
            screen += os.read(leader, 65536)

    try:
        read_until(b"before")
        daemon.call("manageStorageServer", connectionID="later", connection=tmpfs("vc-w1"))
        read_until(b"later")
        read_until(b"connected", 15)
    finally:
        watch.send_signal(signal.SIGINT)
        watch.wait(10)
        os.close(leader)
    last = screen.decode().rsplit(CLEAR, 1)[-1]
    rows = {line.split()[0]: line.split() for line in last.splitlines()
            if line.startswith(("before", "later"))}
    assert rows["before"][1:3] == ["posixfs", "connected"]
    assert rows["later"][1] == "posixfs"
    assert "recent events:" in last
    for cid in ("before", "later"):
        daemon.call("unmanageStorageServer", connectionID=cid)
    daemon.wait_gone(f"{daemon.mount_root}/vc-w0")
    daemon.wait_gone(f"{daemon.mount_root}/vc-w1")


def test_wait_shows_progress_until_connected(daemon: Daemon, tmp_path: Path) -> None:
    data = tmp_path / "later"
    daemon.call("manageStorageServer", connectionID="p1", connection=f"localfs://{data}")
    daemon.wait_error("p1", 451)
    wait = cli(daemon, "wait", "--progress", "--timeout", "20", "p1",
               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.5)
    data.mkdir()
    out, err = wait.communicate(timeout=30)
    assert wait.returncode == 0, err
    progress = err.decode().splitlines()
    assert progress[0].startswith("waiting: p1 ")
    assert any("  p1  connecting -> connected  key=file:" in line for line in progress), progress
    assert out.decode().splitlines()[1].split()[:3] == ["p1", "localfs", "connected"]
    daemon.call("unmanageStorageServer", connectionID="p1")


def test_update_in_place_never_reports_the_key_gone_and_the_last_event_names_the_cids(
    daemon: Daemon, collector: Collector
) -> None:
    daemon.call("manageStorageServer", connectionID="up", connection=tmpfs("vc-up"))
    daemon.call("waitStorageServer", connectionIDs=["up"], timeout=20)
    bigger = {**tmpfs("vc-up"), "mnt_options": "size=2m"}
    daemon.call("updateStorageServer", connectionID="up", connection=bigger)
    key = "file:vc-up"
    collector.wait_for("reconnected after the update",
                       lambda: collector.states(key)[-1:] == [("connecting", "connected")]
                       and len(collector.states(key)) > 2)
    assert all(new is not None for _, new in collector.states(key))
    m = mounted(f"{daemon.mount_root}/vc-up")
    assert m is not None and "size=2048k" in m.super_options
    daemon.call("unmanageStorageServer", connectionID="up")
    collector.wait_for("the key gone", lambda: collector.states(key)[-1][1] is None)
    last = [e for e in collector.events if e["key"] == key][-1]
    assert last["connectionIDs"] == ["up"]
