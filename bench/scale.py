"""Scale phases: the daemon at rest with 1,000 connected keys (CPU, memory, threads), and a
restart with 10,000 managed mounts (adoption time, mounts replaced)."""

from __future__ import annotations

import argparse
import ctypes
import os
import secrets
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from pyspy import Profiler
from rig import (
    Daemon,
    MountTable,
    manage_simple_many,
    posix,
    progress,
    umount_below,
)

Rows = list[tuple[str, str]]
MARKER = ".bench-marker"


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime + stime, cutime + cstime) of a process, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def phase_idle(daemon: Daemon, seconds: float, settle: float) -> dict[str, Any]:
    """CPU time the daemon uses at rest over `seconds`, after `settle` seconds of quiet;
    its thread count sampled every half second meanwhile."""
    time.sleep(settle)
    hz = os.sysconf("SC_CLK_TCK")
    counts = []
    t0 = time.monotonic()
    own0, children0 = cpu_ticks(daemon.pid)
    while (left := t0 + seconds - time.monotonic()) > 0:
        counts.append(threads(daemon.pid))
        time.sleep(min(0.5, left))
    own1, children1 = cpu_ticks(daemon.pid)
    elapsed = time.monotonic() - t0
    info = daemon.call("getHostInfo")
    return {"cpu_pct": (own1 - own0) / hz / elapsed * 100,
            "children_pct": (children1 - children0) / hz / elapsed * 100,
            "seconds": elapsed, "rss_mb": daemon.rss_mb()[0],
            "threads_min": min(counts), "threads_median": statistics.median(counts),
            "threads_max": max(counts), "keys": info["keys"],
            "connected": info["states"]["connected"]}


def run_idle(args: argparse.Namespace, daemon: Daemon, profiler: Profiler, keys: int,
             result: dict[str, float], rows: Rows) -> None:
    progress(f"idle: {keys} connected keys at rest for {args.idle_seconds:g} s")
    with profiler.phase(daemon, "idle"):
        idle = phase_idle(daemon, args.idle_seconds, settle=5.0)
    if idle["connected"] != keys:
        raise RuntimeError(f"idle phase: {idle['connected']} of {keys} keys connected")
    result["idle_cpu_1000_pct"] = idle["cpu_pct"]
    rows.append(("idle_cpu_1000_pct", f"{idle['cpu_pct']:.2f}% of one core over "
                 f"{idle['seconds']:.0f} s at rest with {keys} connected tmpfs keys (supervisor"
                 f" defaults; children {idle['children_pct']:.2f}%); VmRSS "
                 f"{idle['rss_mb']:.1f} MiB, threads {idle['threads_min']}-"
                 f"{idle['threads_max']} (median {idle['threads_median']:g})"))


# --- restart with 10,000 managed mounts ------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def mount_tmpfs(source: str, target: str) -> None:
    """What `mount -t tmpfs SOURCE TARGET` does, without a process per mount."""
    if _libc.mount(source.encode(), target.encode(), b"tmpfs", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def seed_state(root: Path, pairs: list[tuple[str, dict[str, Any]]],
               daemons: list[Daemon]) -> dict[str, float]:
    """The desired state of `pairs`, managed through the daemon's API and committed by the
    daemon itself, but by one whose mount command always fails (and is not retried within
    the hour): it records the CIDs without mounting. The mounts are then made the way the
    daemon makes them (tmpfs, the connection as source, at the mount point of its key), and
    the seeding daemon stops: the next one finds what a stopped daemon leaves behind.

    Making 10,000 mounts through the daemon itself takes much longer today (every connect
    reads the whole mount table, every state change counts all keys): see --setup10k."""
    seed = Daemon(root, "seed10k", supervisor={"max_operations": 1, "max_operations_per_server": 1,
                                                "backoff_initial": 3600,
                                                "backoff_max": 3600})
    seed.settings["mount_command"] = shutil.which("false") or "/bin/false"
    daemons.append(seed)
    seed.start()
    try:
        t0 = time.perf_counter()
        manage_simple_many(seed, pairs)
        acked = time.perf_counter() - t0
        found = seed.call("getStorageServerList", {"connectionIDs": [pairs[0][0]]})
        key = found[pairs[0][0]]["key"]
    finally:
        seed.stop()
    expected = f"file:{pairs[0][1]['connection']}"
    if key != expected:  # the mount points below are named after the connection
        raise RuntimeError(f"key {key!r}, expected {expected!r}")
    t0 = time.perf_counter()
    for _cid, conn in pairs:
        path = os.path.join(seed.mount_root, conn["connection"])
        os.makedirs(path, 0o755, exist_ok=True)
        mount_tmpfs(conn["connection"], path)
    return {"manage_s": acked, "mount_s": time.perf_counter() - t0}


def setup_through_daemon(root: Path, pairs: list[tuple[str, dict[str, Any]]],
                         daemons: list[Daemon], timeout: float) -> dict[str, float]:
    """Manage `pairs` through a daemon with default settings until all are connected."""
    d = Daemon(root, "setup10k")
    daemons.append(d)
    d.start()
    try:
        t0 = time.perf_counter()
        manage_simple_many(d, pairs)
        acked = time.perf_counter() - t0
        d.wait_keys(len(pairs), len(pairs), timeout, interval=0.5)
        return {"manage_s": acked, "mount_s": time.perf_counter() - t0 - acked}
    finally:
        d.stop()


def wait_connected(d: Daemon, n: int, timeout: float) -> tuple[float, int, dict[str, Any]]:
    """Poll getHostInfo until all `n` keys are connected, or `timeout` seconds after the
    daemon's start: the time then, the highest thread count of the daemon seen meanwhile,
    and the last getHostInfo."""
    peak = 0
    deadline = d.started + timeout
    with d.client() as c:
        while True:
            peak = max(peak, threads(d.pid))
            info = c.call("getHostInfo")
            now = time.perf_counter()
            if (info["keys"] == n and info["states"]["connected"] == n) or now > deadline:
                return now, peak, info
            time.sleep(0.05)


def phase_adopt(root: Path, n: int, daemons: list[Daemon], profiler: Profiler,
                timeout: float) -> dict[str, Any]:
    """Start a daemon with default settings on the state and mounts left in `root`; seconds
    from its start until all `n` keys are connected, and how many mounts it replaced (mount
    id or marker file changed)."""
    table = MountTable()
    try:
        mount_root = str(root / "mnt")
        before = table.ids(mount_root)
        markers = {}
        for path in before:
            token = secrets.token_hex(8)
            Path(path, MARKER).write_text(token)
            markers[path] = token
        d = Daemon(root, "adopt10k")
        daemons.append(d)
        with profiler.from_start(d, "adopt10k"):
            d.start()
            done = wait_connected(d, n, timeout)
        after = table.ids(mount_root)
        replaced = 0
        for path, mount_id in before.items():
            try:
                marker = Path(path, MARKER).read_text()
            except OSError:
                marker = None
            if after.get(path) != mount_id or marker != markers[path]:
                replaced += 1
        out = {"adopt_s": done[0] - d.started, "ready_s": d.ready - d.started,
               "replaced": replaced, "mounts_before": len(before), "mounts_after": len(after),
               "rss_mb": d.rss_mb()[0], "peak_threads": done[1],
               "states": {k: v for k, v in done[2]["states"].items() if v}}
        d.stop()
        return out
    finally:
        table.close()


def run_adopt10k(args: argparse.Namespace, base: Path, profiler: Profiler,
                 daemons: list[Daemon], result: dict[str, float], rows: Rows) -> None:
    n = args.keys10k
    root = base / "adopt10k"
    (root / "mnt").mkdir(parents=True)
    pairs = [(f"T{k:05d}", posix(f"t{k:05d}")) for k in range(n)]
    try:
        progress(f"adopt10k: {n} managed tmpfs mounts ({args.setup10k} setup)")
        if args.setup10k == "daemon":
            setup = setup_through_daemon(root, pairs, daemons, args.setup10k_timeout)
        else:
            setup = seed_state(root, pairs, daemons)
        progress(f"adopt10k: setup {setup['manage_s']:.1f} s manage, {setup['mount_s']:.1f} s "
                 "mounts; restart")
        a = phase_adopt(root, n, daemons, profiler, timeout=args.adopt10k_timeout)
    finally:
        t0 = time.perf_counter()
        umount_below(str(root / "mnt"))
        unmounted = time.perf_counter() - t0
    result["adopt_10000_s"] = a["adopt_s"]
    result["remounts_on_restart_10000"] = a["replaced"]
    states = ", ".join(f"{k} {v}" for k, v in a["states"].items())
    outcome = (f"all {n} connected" if a["states"].get("connected") == n else
               f"NOT all connected when given up ({states})")
    rows.append(("adopt_10000_s", f"start -> {outcome} {a['adopt_s']:.2f} s (READY=1 after "
                 f"{a['ready_s']:.2f} s; peak {a['peak_threads']} threads, VmRSS "
                 f"{a['rss_mb']:.0f} MiB after)"))
    rows.append(("remounts_on_restart_10000", f"{a['replaced']} of {a['mounts_before']} mounts"
                 f" replaced ({a['mounts_after']} mounted after)"))
    how = ("through a daemon (--setup10k daemon)" if args.setup10k == "daemon" else
           "CIDs through the API of a daemon that cannot mount, then mount(2)")
    rows.append(("(adopt10k setup)", f"{n} CIDs acked in {setup['manage_s']:.1f} s, mounted in "
                 f"{setup['mount_s']:.1f} s, {how}; lazy unmount of all {unmounted:.1f} s"))
