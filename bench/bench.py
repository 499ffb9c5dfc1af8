"""vdsmconn benchmark (issues 8 and 16): every figure is a ratio against a baseline measured
in the same run on the same machine, or an absolute number with its target.

Run through `bench/run` (as root, from anywhere): it puts the whole run in a private mount
namespace, so the thousand benchmark mounts are invisible to the rest of the host and vanish
with the run even if it is killed. This script still unmounts and stops everything it
started, on success and on failure.

Output: progress on stderr; on stdout a human table, and as the last line one JSON object.
With `--profile DIR`, py-spy samples the daemon during each phase (collapsed stacks in DIR,
and next to each its summary: pyspy.py).

Modules beside this one: rig.py (clients, mount table, the daemon process), pyspy.py (the
profiler), commit.py (group commit on the disk and on slowfs, a FUSE file system with a slow
fsync from tests/fusefs), scale.py (the daemon at rest with 1,000 keys, a restart with 10,000).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import rig
from commit import phase_group_commit, run_slow_commit
from pyspy import Profiler
from rig import (
    CALL_TIMEOUT,
    MNT_DETACH,
    REPO,
    AsyncClient,
    Client,
    Daemon,
    MountTable,
    RpcError,
    manage_simple_many,
    median,
    pct,
    posix,
    progress,
    umount_below,
    umount_syscall,
    unmanage_all,
)
from scale import run_adopt10k, run_idle

TARGETS: dict[str, tuple[str, float]] = {
    "connect_ratio": ("<=", 1.0),
    "remount_ratio": ("<=", 3.0),
    "group_commit_ratio": (">=", 2.0),
    "rpc_rtt_ratio": ("<=", 4.0),
    "group_commit_ratio_slow_disk": (">=", 10.0),
    "list_ratio": ("<=", 1.2),
    "hung_p99_ratio": ("<=", 1.5),
    "rss_10k_mb": ("<=", 150.0),
    "adopt_1000_s": ("<=", 5.0),
    "remounts_on_restart": ("<=", 0.0),
    "isolation_ratio": ("<=", 1.5),
    "stomp_rtt_ratio": ("<=", 1.5),
    "idle_cpu_1000_pct": ("<=", 1.0),
    "adopt_10000_s": ("<=", 5.0),
    "remounts_on_restart_10000": ("<=", 0.0),
}

# The figures each phase measures (--phases picks phases; all by default).
PHASES: dict[str, tuple[str, ...]] = {
    "rtt": ("rpc_rtt_ratio",),
    "connect": ("connect_ratio", "remount_ratio"),
    "commit": ("group_commit_ratio",),
    "slowdisk": ("group_commit_ratio_slow_disk",),
    "list": ("list_ratio", "rss_10k_mb", "idle_cpu_1000_pct", "adopt_1000_s",
             "remounts_on_restart"),
    "hung": ("hung_p99_ratio",),
    "isolation": ("isolation_ratio",),
    "stomp": ("stomp_rtt_ratio",),
    "adopt10k": ("adopt_10000_s", "remounts_on_restart_10000"),
}


# --- baselines -----------------------------------------------------------------------------


def direct_mounts(base: Path, n: int) -> list[float]:
    """n sequential `mount -t tmpfs`, each timed; then unmount them."""
    root = base / "direct"
    paths = [root / f"d-{i}" for i in range(n)]
    for p in paths:
        p.mkdir(parents=True, exist_ok=True)
    times = []
    try:
        for p in paths:
            t0 = time.perf_counter()
            subprocess.run(["mount", "-t", "tmpfs", "bench-direct", str(p)], check=True)
            times.append(time.perf_counter() - t0)
    finally:
        for p in paths:
            subprocess.run(["umount", str(p)], check=False, stderr=subprocess.DEVNULL)
    return times


ECHO_SERVER = """
import asyncio, sys
async def serve(reader, writer):
    while line := await reader.readline():
        writer.write(line)
        await writer.drain()
    writer.close()
async def main():
    server = await asyncio.start_unix_server(serve, sys.argv[1], limit=1 << 20)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""


def rtt(client: Client, n: int) -> list[float]:
    """Round trips of a parameterless getHostInfo request: send, read a line, parse it."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        rid = client.send("getHostInfo")
        reply = client.receive()
        times.append(time.perf_counter() - t0)
        assert reply["id"] == rid
    return times


@contextlib.contextmanager
def echo_server(base: Path) -> Iterator[str]:
    path = str(base / "run" / "echo.sock")
    proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, path], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        yield path
    finally:
        proc.kill()
        proc.wait()


# --- phases ----------------------------------------------------------------------------------


def phase_rtt(base: Path, daemon: Daemon, n: int, rounds: int = 10) -> dict[str, float]:
    """Daemon and echo server measured in alternating rounds, so that load from elsewhere on
    the machine falls on both alike. The echoed request is read and parsed like a reply."""
    daemon_times: list[float] = []
    echo_times: list[float] = []
    with echo_server(base) as path, daemon.client() as d, Client(path) as e:
        rtt(d, 200)
        rtt(e, 200)
        for _ in range(rounds):
            daemon_times += rtt(d, n // rounds)
            echo_times += rtt(e, n // rounds)
    return {"daemon_rtt": median(daemon_times), "echo_rtt": median(echo_times)}


class TlsRoundTrips:
    """getHostInfo round trips over one mutual-TLS connection to the daemon, in newline
    JSON-RPC or in STOMP 1.2 (CONNECT, SUBSCRIBE, then SEND -> MESSAGE). Each reply is read
    to its end and parsed, as a client would."""

    def __init__(self, port: int, context: Any, stomp: bool) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=CALL_TIMEOUT)
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        self.stomp = stomp
        self.buf = b""
        self.next_id = 1
        if stomp:
            self.sock.sendall(b"CONNECT\naccept-version:1.2\nhost:bench\n\n\0"
                              b"SUBSCRIBE\nid:r\ndestination:bench.replies\nack:auto\n\n\0")
            assert self._frame().startswith(b"CONNECTED")

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise RpcError("connection closed")
        self.buf += chunk

    def _frame(self) -> bytes:
        """The next STOMP frame, its body read by content-length."""
        self.buf = self.buf.lstrip(b"\n")
        while (end := self.buf.find(b"\n\n")) < 0:
            self._fill()
        length = 0
        for line in self.buf[:end].split(b"\n"):
            if line.startswith(b"content-length:"):
                length = int(line[15:])
        total = end + 2 + length + 1
        while len(self.buf) < total:
            self._fill()
        frame, self.buf = self.buf[:total - 1], self.buf[total:]
        return frame

    def _line(self) -> bytes:
        while (end := self.buf.find(b"\n")) < 0:
            self._fill()
        line, self.buf = self.buf[:end], self.buf[end + 1:]
        return line

    def times(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            rid, self.next_id = self.next_id, self.next_id + 1
            body = json.dumps({"jsonrpc": "2.0", "id": rid, "method": "getHostInfo"}).encode()
            t0 = time.perf_counter()
            if self.stomp:
                self.sock.sendall(b"SEND\ndestination:jms.topic.vdsm_requests\n"
                                  b"reply-to:bench.replies\ncontent-length:%d\n\n" % len(body)
                                  + body + b"\0")
                frame = self._frame()
                reply = json.loads(frame[frame.index(b"\n\n") + 2:])
            else:
                self.sock.sendall(body + b"\n")
                reply = json.loads(self._line())
            times.append(time.perf_counter() - t0)
            assert reply["id"] == rid and "result" in reply, reply
        return times


def phase_stomp(base: Path, n: int, rounds: int = 10) -> dict[str, float]:
    """One daemon with a TLS listener; getHostInfo over STOMP and over newline JSON-RPC on
    two connections, measured in alternating rounds."""
    sys.path.insert(0, str(REPO))
    from tests.tlscerts import make_pki  # the test suite's certificates (openssl CLI)

    (base / "stomp" / "pki").mkdir(parents=True)
    (base / "stomp" / "mnt").mkdir(parents=True)
    pki = make_pki(base / "stomp" / "pki")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = Daemon(base / "stomp", "stomp")
    rpc = daemon.settings["rpc"]
    assert isinstance(rpc, dict)
    rpc["tcp"] = pki.tcp_settings(port)
    daemon.start()
    stomp_times: list[float] = []
    json_times: list[float] = []
    try:
        context = pki.client_context("engine")
        stomp, plain = TlsRoundTrips(port, context, True), TlsRoundTrips(port, context, False)
        try:
            stomp.times(200)
            plain.times(200)
            for _ in range(rounds):
                stomp_times += stomp.times(n // rounds)
                json_times += plain.times(n // rounds)
        finally:
            stomp.close()
            plain.close()
    finally:
        daemon.stop()
    return {"stomp_rtt": median(stomp_times), "jsonrpc_rtt": median(json_times)}


def phase_connect(daemon: Daemon, n: int) -> dict[str, float]:
    cids = [f"bench-{i}" for i in range(n)]
    calls = [("manageStorageServer", {"connectionID": cid, "connection": posix(cid)})
             for cid in cids]
    with daemon.client() as c:
        t0 = time.perf_counter()
        c.pipeline(calls)
        acked = time.perf_counter()
        c.call("waitStorageServer", {"connectionIDs": cids, "timeout": 120})
        t1 = time.perf_counter()
    return {"connect_s": t1 - t0, "connect_acked_s": acked - t0}


def phase_remount(daemon: Daemon, rounds: int, n_keys: int) -> list[float]:
    table = MountTable()
    times = []
    try:
        for i in range(rounds):
            path = f"{daemon.mount_root}/bench-{i % n_keys}"
            table.wait_for(path, True, 30)
            # The external umount is the syscall itself, so t0 is exact: the mount is gone.
            umount_syscall(path)
            t0 = time.perf_counter()
            t1 = table.wait_for(path, True, 30)
            times.append(t1 - t0)
            # Let the daemon finish its bookkeeping (state back to connected) before the next.
            daemon.call("waitStorageServer", {"connectionIDs": [f"bench-{i % n_keys}"],
                                              "timeout": 30})
            time.sleep(0.1)  # independent events: not inside the daemon's last read window
    finally:
        table.close()
    return times


def phase_list(daemon: Daemon, keys: int, per_key: int, calls: int,
               profiler: Profiler) -> dict[str, Any]:
    pairs = [(f"L{k:04d}-{j}", posix(f"k{k:04d}")) for k in range(keys) for j in range(per_key)]
    with profiler.phase(daemon, "list-setup"):
        t0 = time.perf_counter()
        manage_simple_many(daemon, pairs)
        acked = time.perf_counter()
        daemon.wait_keys(keys, keys, 600, interval=0.05)
        up = time.perf_counter()
    out: dict[str, Any] = {"setup_manage_s": acked - t0, "setup_connected_s": up - t0,
                           "setup_manage_per_s": len(pairs) / (acked - t0)}
    out["rss_before_list"] = daemon.rss_mb()[0]
    times = []
    base = []
    size = 0
    reply: Any = None
    with daemon.client() as c, profiler.phase(daemon, "list"):
        for _ in range(calls):
            t0 = time.perf_counter()
            rid = c.send("getStorageServerList")
            line = c.file.readline()
            reply = json.loads(line)
            times.append(time.perf_counter() - t0)
            assert reply["id"] == rid and "result" in reply, str(reply)[:300]
            size = len(line)
            # The baseline, alternating with the calls: the client encoding and parsing
            # the very reply it got.
            t0 = time.perf_counter()
            json.loads(json.dumps(reply))
            base.append(time.perf_counter() - t0)
    assert len(reply["result"]) >= keys * per_key, len(reply["result"])
    rss, hwm = daemon.rss_mb()
    out.update({"list_s": median(times), "json_s": median(base), "reply_bytes": size,
                "rss_mb": rss, "hwm_mb": hwm, "entries": len(reply["result"])})
    return out


def phase_restart(base: Path, daemon: Daemon, keys: int,
                  profiler: Profiler) -> tuple[Daemon, dict[str, float]]:
    table = MountTable()
    try:
        before = table.ids(daemon.mount_root)
        markers = {}
        for path in before:
            token = secrets.token_hex(8)
            Path(path, ".bench-marker").write_text(token)
            markers[path] = token
        daemon.stop()
        fresh = Daemon(base, "daemon2")
        with profiler.from_start(fresh, "restart"):
            fresh.start()
            done = fresh.wait_keys(keys, keys, 300)
        after = table.ids(daemon.mount_root)
        replaced = 0
        for path, mount_id in before.items():
            try:
                marker = Path(path, ".bench-marker").read_text()
            except OSError:
                marker = None
            if after.get(path) != mount_id or marker != markers[path]:
                replaced += 1
        return fresh, {"adopt_s": done - fresh.started,
                       "adopt_ready_s": fresh.ready - fresh.started,
                       "replaced": replaced, "mounts_before": len(before)}
    finally:
        table.close()


def hung_load(daemon: Daemon, seconds: float, clients: int) -> dict[str, list[float]]:
    async def run() -> dict[str, list[float]]:
        lat: dict[str, list[float]] = {"getStorageServerList": [], "manageStorageServer": []}
        stop_at = time.perf_counter() + seconds
        tag = secrets.token_hex(3)

        async def worker(i: int) -> None:
            c = await AsyncClient.open(daemon.socket)
            j = 0
            try:
                while time.perf_counter() < stop_at:
                    t0 = time.perf_counter()
                    await c.call("getStorageServerList")
                    t1 = time.perf_counter()
                    cid = f"hl-{tag}-{i}-{j}"
                    await c.call("manageStorageServer",
                                 {"connectionID": cid, "connection": posix("bench-hl")})
                    t2 = time.perf_counter()
                    lat["getStorageServerList"].append(t1 - t0)
                    lat["manageStorageServer"].append(t2 - t1)
                    # Untimed: keeps the list the same size in both measurements.
                    await c.call("unmanageStorageServer", {"connectionID": cid})
                    j += 1
            finally:
                await c.close()

        await asyncio.gather(*(worker(i) for i in range(clients)))
        return lat

    return asyncio.run(run())


def fuse_waiting_threads(pid: int) -> int:
    n = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            wchan = (task / "wchan").read_text()
            if "fuse" in wchan or "request_wait" in wchan:
                n += 1
    return n


def _hung_setup(daemon: Daemon, hung: dict[str, Any]) -> None:
    """20 healthy tmpfs keys, the key the load manages CIDs on, and the `hung` connection."""
    for i in range(20):
        daemon.call("manageStorageServer", {"connectionID": f"hb-{i}",
                                            "connection": posix(f"bench-hb-{i}")})
    daemon.call("manageStorageServer", {"connectionID": "hl-warm",
                                        "connection": posix("bench-hl")})
    daemon.call("manageStorageServer", {"connectionID": "hung", "connection": hung})
    daemon.call("waitStorageServer", {"connectionIDs": ["hl-warm", "hung"]
                                      + [f"hb-{i}" for i in range(20)], "timeout": 60})


def phase_hung(daemon: Daemon, control: Daemon, seconds: float, clients: int,
               profiler: Profiler) -> dict[str, Any]:
    """Two daemons in the same state, except that the FUSE mount of one never answers (the
    other's `bench-hung` is a healthy tmpfs). The same load runs against them in alternating
    one-second windows, so that load from elsewhere on the machine falls on both alike."""
    path = f"{daemon.mount_root}/bench-hung"
    os.makedirs(path, exist_ok=True)
    fd = os.open("/dev/fuse", os.O_RDWR)
    try:
        subprocess.run(
            ["mount", "-i", "-t", "fuse", "-o", f"fd={fd},rootmode=40000,user_id=0,group_id=0",
             "bench-hung", path], check=True, timeout=10, pass_fds=(fd,),
        )
        _hung_setup(daemon, posix("bench-hung", "fuse"))
        _hung_setup(control, posix("bench-hung"))
        # The first probe starts one probe_interval after the connect; wait until a daemon
        # thread sleeps in the FUSE request that will never be answered.
        deadline = time.monotonic() + 30
        while fuse_waiting_threads(daemon.pid) == 0:
            if time.monotonic() > deadline:
                raise RuntimeError("no daemon thread is waiting on the hung FUSE mount")
            time.sleep(0.05)
        hung_load(daemon, 0.5, clients)  # warm-up
        hung_load(control, 0.5, clients)
        with_hang: dict[str, list[float]] = {}
        without: dict[str, list[float]] = {}
        with profiler.phase(daemon, "hung-with"):
            for window in range(max(1, round(seconds))):
                order = [(daemon, with_hang), (control, without)]
                for target, samples in order if window % 2 == 0 else order[::-1]:
                    for method, lat in hung_load(target, 1.0, clients).items():
                        samples.setdefault(method, []).extend(lat)
        waiting = fuse_waiting_threads(daemon.pid)
        state = daemon.call("getStorageServerList", {"connectionIDs": ["hung"]})["hung"]["state"]
    finally:
        os.close(fd)  # aborts the FUSE connection: every waiter gets ENOTCONN
        with contextlib.suppress(OSError):
            umount_syscall(path, MNT_DETACH)
    out: dict[str, Any] = {"waiting_threads": waiting, "hung_state": state}
    for method in without:
        a, b = pct(without[method], 99), pct(with_hang[method], 99)
        out[method] = {"p99_without": a, "p99_with": b, "n_without": len(without[method]),
                       "n_with": len(with_hang[method]), "p50_without": median(without[method]),
                       "p50_with": median(with_hang[method])}
    # The figure: p99 over the calls of both methods (twice the samples of either alone).
    both_without = [x for m in without.values() for x in m]
    both_with = [x for m in with_hang.values() for x in m]
    out["p99_without"], out["p99_with"] = pct(both_without, 99), pct(both_with, 99)
    out["ratio"] = out["p99_with"] / out["p99_without"]
    return out


class DeadServer:
    """An address in a network namespace of our own whose nftables input policy is drop:
    every connection to it hangs until its deadline (glusterd never answers, TCP SYNs are
    never acknowledged)."""

    def __init__(self) -> None:
        tag = os.getpid()
        self.ns = f"vcbd{tag % 100000}"
        self.link, self.peer = f"{self.ns}h", f"{self.ns}n"
        self.subnet = f"10.248.{tag % 250}"
        self.address = f"{self.subnet}.2"

    def _run(self, *argv: str, check: bool = True) -> None:
        subprocess.run(argv, check=check, timeout=30, capture_output=True)

    def start(self) -> None:
        in_ns = ("nsenter", f"--net=/run/netns/{self.ns}")
        self._run("ip", "netns", "add", self.ns)
        self._run("ip", "link", "add", self.link, "type", "veth", "peer", "name", self.peer)
        self._run("ip", "link", "set", self.peer, "netns", self.ns)
        self._run("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.link)
        self._run("ip", "link", "set", self.link, "up")
        self._run("ip", "-n", self.ns, "addr", "add", f"{self.address}/24", "dev", self.peer)
        self._run("ip", "-n", self.ns, "link", "set", self.peer, "up")
        self._run(*in_ns, "nft", "add table inet vcdead; add chain inet vcdead input "
                  "{ type filter hook input priority 0; policy drop; }")

    def citing(self) -> dict[int, list[str]]:
        """Processes whose command line names the address."""
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            argv = raw.decode(errors="replace").rstrip("\0").split("\0")
            if any(self.address in a for a in argv):
                found[int(entry)] = argv
        return found

    def hanging(self) -> int:
        """Keys with a command (gluster CLI or mount) working on the dead server now."""
        volumes = set()
        for argv in self.citing().values():
            name = os.path.basename(argv[0])
            if name == "gluster" and "info" in argv:
                volumes.add(argv[argv.index("info") + 1])
            elif name == "mount":
                volumes.update(a for a in argv if a.startswith(f"{self.address}:/"))
        return len(volumes)

    def close(self) -> None:
        """Kill what still talks to the address (the glusterfs FUSE clients leave the mount
        command's process group), then remove the namespace and its link."""
        deadline = time.monotonic() + 20
        while (pids := list(self.citing())) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        self._run("ip", "netns", "del", self.ns, check=False)
        self._run("ip", "link", "del", self.link, check=False)


ISOLATION_DEAD_KEYS = 24
ISOLATION_BUSY = 16  # dead keys whose commands run at once: the old global limit, and the
# default per-server one


def healthy_connect(daemon: Daemon, table: MountTable, name: str, timeout: float) -> float:
    """Manage a new tmpfs key; seconds from the request to its mount in the mount table."""
    path = f"{daemon.mount_root}/{name}"
    t0 = time.perf_counter()
    daemon.call("manageStorageServer", {"connectionID": name, "connection": posix(name)})
    return table.wait_for(path, True, timeout) - t0


def phase_isolation(dead: DeadServer, with_dead: Daemon, alone: Daemon, rounds: int,
                    timeout: float) -> dict[str, Any]:
    """Two daemons in the same state, except that one also has 24 GlusterFS keys on a server
    that drops every packet (their commands hang until their deadline). A new tmpfs key is
    connected on each, alternately, `rounds` times, each time on the first one only once
    16 commands hang on the dead server (so a limit shared with the dead server is full);
    the figure is the ratio of the medians. Keys are not unmanaged between rounds: a
    teardown would wait for a slot as well."""
    table = MountTable()
    samples: dict[str, list[float]] = {"with": [], "alone": []}
    hanging = []
    try:
        healthy_connect(alone, table, "iso-warm", timeout)  # warm-up, before the dead keys
        healthy_connect(with_dead, table, "iso-warm", timeout)
        for i in range(ISOLATION_DEAD_KEYS):
            with_dead.call("manageStorageServer", {
                "connectionID": f"dead-{i}",
                "connection": {"type": "glusterfs", "connection": f"{dead.address}:/v{i}"}})
        for i in range(rounds):
            order = [("with", with_dead), ("alone", alone)]
            for label, daemon in order if i % 2 == 0 else order[::-1]:
                if daemon is with_dead:
                    hanging.append(wait_hanging(dead, timeout))
                samples[label].append(healthy_connect(daemon, table, f"iso-{i}", timeout))
                progress(f"isolation round {i} {label}: {samples[label][-1] * 1e3:.1f} ms")
    finally:
        table.close()
    found = with_dead.call("getStorageServerList", {"prefix": "dead-"})
    connecting = sum(1 for s in found.values() if s["state"] == "connecting")
    return {"with_s": median(samples["with"]), "alone_s": median(samples["alone"]),
            "with_max_s": max(samples["with"]), "hanging": min(hanging),
            "connecting": connecting}


def wait_hanging(dead: DeadServer, timeout: float) -> int:
    """Until ISOLATION_BUSY commands hang on the dead server; how many do."""
    deadline = time.monotonic() + timeout
    while (n := dead.hanging()) < ISOLATION_BUSY:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {n} commands hang on the dead server: {dead.citing()}")
        time.sleep(0.05)
    return n


# --- the run ---------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
            "kernel": platform.release(), "python": platform.python_version(),
            "load_at_start": " ".join(Path("/proc/loadavg").read_text().split()[:3])}


Rows = list[tuple[str, str]]


def run_connect(args: argparse.Namespace, base: Path, d1: Daemon, profiler: Profiler,
                result: dict[str, float], rows: Rows) -> None:
    progress(f"connect {args.connect} tmpfs")
    # Alternating with the baseline (100 direct `mount -t tmpfs`), medians of each.
    connects = []
    directs = []
    for i in range(args.repeat):
        if i:
            unmanage_all(d1, "bench-")
        directs.append(direct_mounts(base, args.connect))
        with profiler.phase(d1, f"connect-{i}"):
            connects.append(phase_connect(d1, args.connect))
    direct_total = median([sum(d) for d in directs])
    direct_one = median([x for d in directs for x in d])
    connect_s = median([c["connect_s"] for c in connects])
    acked_s = median([c["connect_acked_s"] for c in connects])
    result["connect_ratio"] = connect_s / direct_total
    rows.append(("connect_ratio", f"{args.connect} connected in {connect_s:.3f} s "
                 f"(all acked after {acked_s:.3f} s) vs {args.connect} direct "
                 f"mounts {direct_total:.3f} s (medians of {args.repeat})"))

    progress(f"remount x{args.remounts}")
    with profiler.phase(d1, "remount"):
        rem = phase_remount(d1, args.remounts, args.connect)
    result["remount_ratio"] = median(rem) / direct_one
    rows.append(("remount_ratio", f"umount -> mounted again median {median(rem) * 1e3:.1f} ms "
                 f"(max {max(rem) * 1e3:.1f}) vs one direct mount {direct_one * 1e3:.1f} ms"))
    unmanage_all(d1, "bench-")


def run_list_restart(args: argparse.Namespace, base: Path, d1: Daemon, profiler: Profiler,
                     daemons: list[Daemon], result: dict[str, float], rows: Rows) -> None:
    progress(f"list: {args.keys * args.per_key} CIDs on {args.keys} keys")
    li = phase_list(d1, args.keys, args.per_key, args.list_calls, profiler)
    result["list_ratio"] = li["list_s"] / li["json_s"]
    result["rss_10k_mb"] = round(li["rss_mb"], 1)
    rows.append(("list_ratio", f"list of {li['entries']} entries on {args.keys} keys "
                 f"({li['reply_bytes'] / 1e6:.1f} MB) {li['list_s'] * 1e3:.0f} ms vs the client's"
                 f" dumps+loads of it {li['json_s'] * 1e3:.0f} ms (medians of {args.list_calls})"))
    rows.append(("rss_10k_mb", f"VmRSS {li['rss_mb']:.1f} MiB (before listing "
                 f"{li['rss_before_list']:.1f}, peak {li['hwm_mb']:.1f})"))
    rows.append(("(setup)", f"{args.keys * args.per_key} manage acked in "
                 f"{li['setup_manage_s']:.1f} s ({li['setup_manage_per_s']:.0f}/s), "
                 f"all {args.keys} connected after {li['setup_connected_s']:.1f} s"))
    if args.idle_seconds > 0:
        run_idle(args, d1, profiler, args.keys, result, rows)

    progress(f"restart with {args.keys} mounts")
    d2, a = phase_restart(base, d1, args.keys, profiler)
    daemons.append(d2)
    result["adopt_1000_s"] = round(a["adopt_s"], 3)
    result["remounts_on_restart"] = a["replaced"]
    rows.append(("adopt_1000_s", f"start -> all {args.keys} connected {a['adopt_s']:.2f} s "
                 f"(READY=1 after {a['adopt_ready_s']:.2f} s)"))
    rows.append(("remounts_on_restart", f"{a['replaced']} of {a['mounts_before']} mounts "
                 "replaced (mount id or marker file changed)"))
    progress("unmanage everything (prefix)")
    t0 = time.perf_counter()
    unmanage_all(d2, "L")
    rows.append(("(teardown)", f"unmanage prefix: {args.keys} keys gone in "
                 f"{time.perf_counter() - t0:.1f} s"))
    d2.stop()


def run_hung(args: argparse.Namespace, base: Path, profiler: Profiler, daemons: list[Daemon],
             result: dict[str, float], rows: Rows) -> None:
    progress("hung FUSE mount")
    # Probes every second, and one that hangs stays out for the whole measurement.
    supervisor = {"probe_interval": 1, "probe_timeout": 120}
    d3 = Daemon(base, "daemon3", supervisor=supervisor)
    daemons.append(d3)
    d3.start()
    (base / "control" / "mnt").mkdir(parents=True)
    d4 = Daemon(base / "control", "control", supervisor=supervisor)
    daemons.append(d4)
    d4.start()
    h = phase_hung(d3, d4, args.hung_seconds, args.hung_clients, profiler)
    result["hung_p99_ratio"] = h["ratio"]
    lst, man = h["getStorageServerList"], h["manageStorageServer"]
    rows.append(("hung_p99_ratio", f"p99 {h['p99_without'] * 1e3:.1f} -> "
                 f"{h['p99_with'] * 1e3:.1f} ms; list {lst['p99_without'] * 1e3:.1f} -> "
                 f"{lst['p99_with'] * 1e3:.1f} ms, manage {man['p99_without'] * 1e3:.1f} -> "
                 f"{man['p99_with'] * 1e3:.1f} ms; p50 list {lst['p50_without'] * 1e3:.1f} -> "
                 f"{lst['p50_with'] * 1e3:.1f} ms ({h['waiting_threads']} daemon thread(s) "
                 f"blocked in FUSE, key {h['hung_state']}; alternating 1 s windows against"
                 " a control daemon)"))
    unmanage_all(d3, "h", timeout=60)
    unmanage_all(d4, "h", timeout=60)
    d3.stop()
    d4.stop()


def run_isolation(args: argparse.Namespace, base: Path, daemons: list[Daemon],
                  result: dict[str, float], rows: Rows) -> None:
    progress(f"isolation: {ISOLATION_DEAD_KEYS} glusterfs keys on a dead server")
    timeout = args.isolation_timeout
    pair = []
    for name in ("iso-dead", "iso-alone"):
        (base / name / "mnt").mkdir(parents=True)
        d = Daemon(base / name, name, supervisor={"command_timeout": timeout})
        daemons.append(d)
        d.start()
        pair.append(d)
    with_dead, alone = pair
    dead = DeadServer()
    try:
        dead.start()
        iso = phase_isolation(dead, with_dead, alone, args.isolation_rounds, 3 * timeout + 30)
    except Exception:
        progress(f"daemon {with_dead.name} log tail:\n{with_dead.tail()}")
        raise
    finally:
        with_dead.stop()  # first: it would start new mounts on the dead server
        dead.close()
        alone.stop()
        umount_below(str(base / "iso-dead"))
        umount_below(str(base / "iso-alone"))
    result["isolation_ratio"] = iso["with_s"] / iso["alone_s"]
    rows.append(("isolation_ratio", f"new tmpfs key mounted after {iso['with_s'] * 1e3:.1f} ms "
                 f"(max {iso['with_max_s'] * 1e3:.1f}) with {ISOLATION_DEAD_KEYS} glusterfs keys"
                 f" on a dead server vs {iso['alone_s'] * 1e3:.1f} ms alone (medians of "
                 f"{args.isolation_rounds}, alternating; each with >= {iso['hanging']} commands "
                 f"hanging, {iso['connecting']} dead keys connecting at the end; "
                 f"command_timeout {timeout:g} s)"))


def run(args: argparse.Namespace, base: Path, daemons: list[Daemon]) -> None:
    profiler = Profiler(Path(args.profile).resolve() if args.profile else None)
    phases = set(args.phases)
    info = machine()
    rows: list[tuple[str, str]] = []
    result: dict[str, float] = {}
    (base / "mnt").mkdir(parents=True)
    (base / "run").mkdir(parents=True)

    if phases & {"rtt", "connect", "commit", "list"}:
        d1 = Daemon(base, "daemon1")
        daemons.append(d1)
        d1.start()
        progress(f"daemon pid {d1.pid} ready in {d1.ready - d1.started:.2f}s")

    if "rtt" in phases:
        progress("rpc round trip")
        with profiler.phase(d1, "rtt"):
            r = phase_rtt(base, d1, args.rtt)
        result["rpc_rtt_ratio"] = r["daemon_rtt"] / r["echo_rtt"]
        rows.append(("rpc_rtt_ratio", f"getHostInfo {r['daemon_rtt'] * 1e6:.0f} us vs echo "
                     f"{r['echo_rtt'] * 1e6:.0f} us (medians of {args.rtt} each, alternating)"))

    if "connect" in phases:
        run_connect(args, base, d1, profiler, result, rows)

    if "commit" in phases:
        progress(f"group commit: {args.gc_clients} clients for {args.gc_seconds}s")
        with profiler.phase(d1, "group-commit"):
            g = phase_group_commit(d1, args.gc_clients, args.gc_seconds, base / "state-fs")
        sqlite_rate = g["sqlite_per_s"]
        result["group_commit_ratio"] = g["gc_per_s"] / sqlite_rate
        rows.append(("group_commit_ratio", f"{g['gc_per_s']:.0f} durable manage/s with "
                     f"{args.gc_clients} clients vs {sqlite_rate:.0f} single-row commits/s "
                     f"(alternating 1 s windows; client {g['client_us']:.0f} us CPU per call)"))

    if "list" in phases:
        run_list_restart(args, base, d1, profiler, daemons, result, rows)
    elif phases & {"rtt", "connect", "commit"}:
        d1.stop()

    if "slowdisk" in phases:
        run_slow_commit(args, base, profiler, daemons, result, rows)

    if "adopt10k" in phases:
        run_adopt10k(args, base, profiler, daemons, result, rows)

    if "hung" in phases:
        run_hung(args, base, profiler, daemons, result, rows)

    if "isolation" in phases:
        run_isolation(args, base, daemons, result, rows)

    if "stomp" in phases:
        progress("STOMP round trip over TLS")
        st = phase_stomp(base, args.rtt)
        result["stomp_rtt_ratio"] = st["stomp_rtt"] / st["jsonrpc_rtt"]
        rows.append(("stomp_rtt_ratio", f"getHostInfo over STOMP/TLS {st['stomp_rtt'] * 1e6:.0f}"
                     f" us vs newline JSON-RPC/TLS {st['jsonrpc_rtt'] * 1e6:.0f} us (medians of"
                     f" {args.rtt} each, alternating, one daemon)"))

    ordered = {k: float(round(result[k], 4)) for k in TARGETS if k in result}
    print()
    print("vdsmconn benchmark  " + "  ".join(f"{k}={v}" for k, v in info.items()))
    print(f"code: {rig.SOURCE}  load_at_end="
          + " ".join(Path("/proc/loadavg").read_text().split()[:3]))
    print(f"{'figure':28} {'value':>10} {'target':>8}  {'met':4} detail")
    details = dict(rows)
    for key, (op, target) in TARGETS.items():
        if key not in ordered:
            continue
        value = ordered[key]
        met = value <= target if op == "<=" else value >= target
        print(f"{key:28} {value:10.3f} {op + format(target, 'g'):>8}  {'yes' if met else 'NO':4} "
              f"{details.get(key, '')}")
    for key, detail in rows:
        if key.startswith("("):
            print(f"{key:28} {'':10} {'':8}  {'':4} {detail}")
    print(json.dumps(ordered))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", metavar="DIR", help="py-spy the daemon in each phase")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--source", metavar="DIR", default=str(REPO),
                        help="directory holding the vdsmconn package to run (default: this"
                        " repository)")
    parser.add_argument("--connect", type=int, default=100)
    parser.add_argument("--remounts", type=int, default=20)
    parser.add_argument("--rtt", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3,
                        help="connect runs (and direct-mount baselines); medians are used")
    parser.add_argument("--gc-clients", type=int, default=32)
    parser.add_argument("--gc-seconds", type=float, default=6.0,
                        help="one-second windows of each (daemon, SQLite baseline)")
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--per-key", type=int, default=10)
    parser.add_argument("--list-calls", type=int, default=10)
    parser.add_argument("--idle-seconds", type=float, default=30.0,
                        help="the daemon at rest with --keys connected keys, after listing"
                        " (0: skip)")
    parser.add_argument("--fsync-delay", type=float, default=0.002,
                        help="seconds slowfs adds to each fsync in the slowdisk phase")
    parser.add_argument("--keys10k", type=int, default=10000,
                        help="managed tmpfs mounts of the adopt10k phase")
    parser.add_argument("--setup10k", choices=("seed", "daemon"), default="seed",
                        help="adopt10k: record the CIDs through a daemon that cannot mount and"
                        " mount them directly (seed), or connect them all through a daemon"
                        " (daemon: quadratic today, an hour for 10,000)")
    parser.add_argument("--setup10k-timeout", type=float, default=3600.0)
    parser.add_argument("--adopt10k-timeout", type=float, default=120.0,
                        help="adopt10k: seconds after the start to give up waiting (the figure"
                        " is then the time given up, marked as such)")
    parser.add_argument("--hung-seconds", type=float, default=10.0,
                        help="one-second windows on each of the two daemons")
    parser.add_argument("--hung-clients", type=int, default=4)
    parser.add_argument("--isolation-rounds", type=int, default=10,
                        help="new tmpfs keys connected on each of the two daemons")
    parser.add_argument("--isolation-timeout", type=float, default=20.0,
                        help="command_timeout of the isolation daemons, seconds")
    parser.add_argument("--phases", type=lambda v: v.split(","), default=list(PHASES),
                        help="comma-separated phases to run, of " + ",".join(PHASES)
                        + " (default: all)")
    args = parser.parse_args()
    if unknown := set(args.phases) - set(PHASES):
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    rig.SOURCE = Path(args.source).resolve()
    if not (rig.SOURCE / "vdsmconn" / "__main__.py").exists():
        print(f"bench: no vdsmconn package in {rig.SOURCE}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench: must run as root (it mounts)", file=sys.stderr)
        return 2

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, terminate)
    base = Path(tempfile.mkdtemp(prefix="vcb-", dir="/tmp"))
    daemons: list[Daemon] = []
    try:
        run(args, base, daemons)
        return 0
    except Exception:
        for d in daemons:
            if d.proc is not None:
                progress(f"daemon {d.name} log tail:\n{d.tail()}")
        raise
    finally:
        for d in daemons:
            with contextlib.suppress(Exception):
                d.stop(timeout=20)
        umount_below(str(base))
        if args.keep:
            progress(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
