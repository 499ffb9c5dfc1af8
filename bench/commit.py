"""Group commit: durable manage calls per second against single-row SQLite commits on the
same file system, in alternating one-second windows; on the machine's disk and on slowfs, a
passthrough FUSE file system whose fsync takes a fixed time (tests/fusefs/slowfs.py)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from pyspy import Profiler
from rig import (
    CALL_TIMEOUT,
    MNT_DETACH,
    REPO,
    Daemon,
    RpcError,
    posix,
    progress,
    umount_syscall,
    unmanage_all,
)

Rows = list[tuple[str, str]]


def sqlite_commits_per_s(directory: Path, seconds: float) -> float:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "baseline.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        n = 0
        row = json.dumps({"type": "posixfs", "connection": "x", "vfs_type": "tmpfs"})
        t0 = time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (v) VALUES (?)", (row,))
            conn.execute("COMMIT")
            n += 1
        return n / elapsed
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{path}{suffix}")


def phase_group_commit(daemon: Daemon, clients: int, seconds: float,
                       sqlite_dir: Path) -> dict[str, float]:
    """The daemon's durable manage rate and the SQLite baseline, measured in alternating
    one-second windows: the disk is shared, and its speed changes from second to second."""
    conn = posix("bench-gc")
    daemon.call("manageStorageServer", {"connectionID": "gc-warm", "connection": conn})
    windows = max(1, round(seconds))
    calls = 0
    daemon_s = 0.0
    client_cpu = 0.0
    rates = []
    for window in range(windows):
        if window % 2:
            rates.append(sqlite_commits_per_s(sqlite_dir, 1.0))
        n, elapsed, cpu = _manage_window(daemon, clients, 1.0, window, conn)
        calls += n
        daemon_s += elapsed
        client_cpu += cpu
        if window % 2 == 0:
            rates.append(sqlite_commits_per_s(sqlite_dir, 1.0))
    unmanage_all(daemon, "gc-")
    return {"gc_calls": calls, "gc_per_s": calls / daemon_s,
            "sqlite_per_s": sum(rates) / len(rates), "client_us": client_cpu / calls * 1e6}


def _manage_window(daemon: Daemon, clients: int, seconds: float, window: int,
                   conn: dict[str, Any]) -> tuple[int, float, float]:
    """`clients` connections, each with one manage call in flight, for `seconds`: the calls
    answered, the seconds taken and the client's CPU seconds.

    The client is one thread waiting on all sockets at once, with orjson, rather than
    asyncio streams: it shares the machine's two vCPUs with the daemon, and a client
    costing 50 µs of CPU per call (asyncio streams and json) took that from the daemon
    (13 µs this way; the engine's client does not run on the host at all)."""
    sel = selectors.DefaultSelector()
    socks = []
    try:
        for _ in range(clients):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(s)
            s.connect(daemon.socket)
            s.setblocking(False)
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        stop_at = t0 + seconds
        count = 0
        for i, s in enumerate(socks):
            sel.register(s, selectors.EVENT_READ, _Caller(s, f"gc-{window}-{i}-", conn))
        while sel.get_map():
            events = sel.select(CALL_TIMEOUT)
            if not events:
                raise RpcError(f"no answer to manageStorageServer in {CALL_TIMEOUT} s")
            for key, _ in events:
                caller: _Caller = key.data
                count += caller.receive()
                if caller.waiting == 0:
                    if time.perf_counter() < stop_at:
                        caller.send()
                    else:
                        sel.unregister(caller.sock)
        return count, time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        sel.close()
        for s in socks:
            s.close()


class _Caller:
    """One client connection of `_manage_window`: a manage call at a time, each for a new
    CID."""

    def __init__(self, sock: socket.socket, prefix: str, conn: dict[str, Any]) -> None:
        self.sock, self.prefix, self.conn = sock, prefix, conn
        self.calls = 0
        self.waiting = 0
        self.buffer = b""
        self.send()

    def send(self) -> None:
        self.calls += 1
        self.sock.sendall(orjson.dumps({
            "jsonrpc": "2.0", "id": self.calls, "method": "manageStorageServer",
            "params": {"connectionID": f"{self.prefix}{self.calls}", "connection": self.conn},
        }) + b"\n")
        self.waiting += 1

    def receive(self) -> int:
        """Read what the daemon sent; the number of answers it completed."""
        data = self.sock.recv(1 << 16)
        if not data:
            raise RpcError("the daemon closed the connection")
        lines = (self.buffer + data).split(b"\n")
        self.buffer = lines.pop()
        for line in lines:
            reply = orjson.loads(line)
            if "error" in reply or reply.get("id") != self.calls:
                raise RpcError(f"manageStorageServer: unexpected answer {reply}")
            self.waiting -= 1
        return len(lines)


def fsync_latency(directory: Path, n: int = 20) -> float:
    """Median seconds of one fsync of a freshly written file in `directory`."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    times = []
    try:
        for i in range(n):
            os.pwrite(fd, b"x" * 100, i * 100)
            t0 = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(path)
    return sorted(times)[len(times) // 2]


def run_slow_commit(args: argparse.Namespace, base: Path, profiler: Profiler,
                    daemons: list[Daemon], result: dict[str, float], rows: Rows) -> None:
    """group_commit_ratio again, with the daemon's state directory and the SQLite baseline
    on slowfs: a passthrough of a tmpfs whose fsync is answered `--fsync-delay` late."""
    sys.path.insert(0, str(REPO))
    from tests.fusefs import slowfs

    delay = args.fsync_delay
    progress(f"group commit on a slow disk (fsync +{delay * 1e3:g} ms): {args.gc_clients} "
             f"clients for {args.gc_seconds}s")
    root = base / "slowdisk"
    backing, fs = root / "backing", root / "fs"
    backing.mkdir(parents=True)
    (root / "mnt").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "bench-slowdisk", str(backing)], check=True,
                   timeout=30)
    try:
        with slowfs(backing, fs, delay):
            fsync_s = fsync_latency(fs)
            d = Daemon(root, "slowdisk")
            d.settings["state_dir"] = str(fs / "state")
            daemons.append(d)
            try:
                d.start()
                with profiler.phase(d, "group-commit-slow-disk"):
                    g = phase_group_commit(d, args.gc_clients, args.gc_seconds, fs / "sqlite")
            finally:
                d.stop()
    finally:
        with contextlib.suppress(OSError):
            umount_syscall(str(backing), MNT_DETACH)
    result["group_commit_ratio_slow_disk"] = g["gc_per_s"] / g["sqlite_per_s"]
    rows.append(("group_commit_ratio_slow_disk", f"{g['gc_per_s']:.0f} durable manage/s with "
                 f"{args.gc_clients} clients vs {g['sqlite_per_s']:.0f} single-row commits/s, "
                 f"both on slowfs (tmpfs passthrough, fsync answered {delay * 1e3:g} ms late; "
                 f"one fsync measured {fsync_s * 1e3:.2f} ms; alternating 1 s windows; client "
                 f"{g['client_us']:.0f} us CPU per call)"))
