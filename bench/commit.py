"""Group commit: durable manage calls per second against single-row SQLite commits on the
same file system, in alternating one-second windows; on the machine's disk and on slowfs, a
passthrough FUSE file system whose fsync takes a fixed time (tests/fusefs/slowfs.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pyspy import Profiler
from rig import (
    MNT_DETACH,
    REPO,
    AsyncClient,
    Daemon,
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
    rates = []
    for window in range(windows):
        if window % 2:
            rates.append(sqlite_commits_per_s(sqlite_dir, 1.0))
        n, elapsed = asyncio.run(_manage_window(daemon, clients, 1.0, window, conn))
        calls += n
        daemon_s += elapsed
        if window % 2 == 0:
            rates.append(sqlite_commits_per_s(sqlite_dir, 1.0))
    unmanage_all(daemon, "gc-")
    return {"gc_calls": calls, "gc_per_s": calls / daemon_s,
            "sqlite_per_s": sum(rates) / len(rates)}


async def _manage_window(daemon: Daemon, clients: int, seconds: float, window: int,
                         conn: dict[str, Any]) -> tuple[int, float]:
    opened = [await AsyncClient.open(daemon.socket) for _ in range(clients)]
    count = 0
    stop_at = time.perf_counter() + seconds

    async def worker(i: int, c: AsyncClient) -> None:
        nonlocal count
        j = 0
        while time.perf_counter() < stop_at:
            await c.call("manageStorageServer",
                         {"connectionID": f"gc-{window}-{i}-{j}", "connection": conn})
            j += 1
            count += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i, c) for i, c in enumerate(opened)))
    elapsed = time.perf_counter() - t0
    for c in opened:
        await c.close()
    return count, elapsed


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
                 f"one fsync measured {fsync_s * 1e3:.2f} ms; alternating 1 s windows)"))
