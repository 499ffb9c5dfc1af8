"""vdsmconn benchmark (issue 8): every figure is a ratio against a baseline measured in the
same run on the same machine, or an absolute number with its target.

Run through `bench/run` (as root, from anywhere): it puts the whole run in a private mount
namespace, so the thousand benchmark mounts are invisible to the rest of the host and vanish
with the run even if it is killed. This script still unmounts and stops everything it
started, on success and on failure.

Output: progress on stderr; on stdout a human table, and as the last line one JSON object.
With `--profile DIR`, py-spy samples the daemon during each phase (collapsed stacks in DIR).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import math
import os
import platform
import secrets
import select
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
# Where the daemon's code is imported from: the repository, or (--source) a snapshot of it,
# so that edits made to the tree during a run cannot change the code being measured.
SOURCE = REPO
READY_TIMEOUT = 60.0
CALL_TIMEOUT = 300.0

TARGETS: dict[str, tuple[str, float]] = {
    "connect_ratio": ("<=", 1.0),
    "remount_ratio": ("<=", 3.0),
    "group_commit_ratio": (">=", 2.0),
    "rpc_rtt_ratio": ("<=", 4.0),
    "list_ratio": ("<=", 2.0),
    "hung_p99_ratio": ("<=", 1.5),
    "rss_10k_mb": ("<=", 150.0),
    "adopt_1000_s": ("<=", 5.0),
    "remounts_on_restart": ("<=", 0.0),
    "isolation_ratio": ("<=", 1.5),
    "stomp_rtt_ratio": ("<=", 1.5),
}

# The figures each phase measures (--phases picks phases; all by default).
PHASES: dict[str, tuple[str, ...]] = {
    "rtt": ("rpc_rtt_ratio",),
    "connect": ("connect_ratio", "remount_ratio"),
    "commit": ("group_commit_ratio",),
    "list": ("list_ratio", "rss_10k_mb", "adopt_1000_s", "remounts_on_restart"),
    "hung": ("hung_p99_ratio",),
    "isolation": ("isolation_ratio",),
    "stomp": ("stomp_rtt_ratio",),
}


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


# --- clients (the same code talks to the daemon and to the echo baseline) -------------------


class RpcError(Exception):
    pass


class Client:
    """Blocking newline-delimited JSON-RPC client over a unix stream socket."""

    def __init__(self, path: str, timeout: float = CALL_TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.next_id = 1

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, method: str, params: Any = None) -> int:
        rid, self.next_id = self.next_id, self.next_id + 1
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        return rid

    def receive(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise RpcError("connection closed")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def call(self, method: str, params: Any = None) -> Any:
        rid = self.send(method, params)
        while True:
            msg = self.receive()
            if msg.get("id") == rid:
                break
        if "error" in msg:
            raise RpcError(f"{method}: {msg['error']}")
        return msg["result"]

    def pipeline(self, calls: list[tuple[str, Any]]) -> list[Any]:
        """Send every call without waiting, then collect the replies (any order)."""
        ids = {self.send(method, params): i for i, (method, params) in enumerate(calls)}
        results: list[Any] = [None] * len(calls)
        while ids:
            msg = self.receive()
            i = ids.pop(msg.get("id"), None)
            if i is None:
                continue
            if "error" in msg:
                raise RpcError(f"{calls[i][0]}: {msg['error']}")
            results[i] = msg["result"]
        return results


class AsyncClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.next_id = reader, writer, 1

    @classmethod
    async def open(cls, path: str) -> AsyncClient:
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 28)
        return cls(reader, writer)

    async def call(self, method: str, params: Any = None) -> Any:
        rid, self.next_id = self.next_id, self.next_id + 1
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        self.writer.write(json.dumps(msg).encode() + b"\n")
        await self.writer.drain()
        reply = json.loads(await self.reader.readline())
        if "error" in reply:
            raise RpcError(f"{method}: {reply['error']}")
        return reply["result"]

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


# --- the mount table -------------------------------------------------------------------------


class MountTable:
    """/proc/self/mountinfo, with poll(POLLPRI) to sleep until it changes."""

    def __init__(self) -> None:
        self.file = open("/proc/self/mountinfo", "rb", buffering=0)  # noqa: SIM115
        self.poller = select.poll()
        self.poller.register(self.file.fileno(), select.POLLPRI | select.POLLERR)

    def read(self) -> bytes:
        self.file.seek(0)
        chunks = []
        while chunk := self.file.read(1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)

    def ids(self, root: str) -> dict[str, int]:
        """mount point -> mount id, for mount points below root."""
        prefix = root.rstrip("/") + "/"
        out = {}
        for line in self.read().decode(errors="surrogateescape").splitlines():
            fields = line.split(" ")
            if fields[4].startswith(prefix):
                out[fields[4]] = int(fields[0])
        return out

    def wait_for(self, path: str, present: bool, timeout: float) -> float:
        """perf_counter time at which `path` was seen (not) mounted."""
        needle = f" {path} ".encode()
        deadline = time.perf_counter() + timeout
        self.poller.poll(0)  # consume a pending change notification
        while True:
            now = time.perf_counter()
            if (needle in self.read()) == present:
                return now
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError(f"{path} not {'mounted' if present else 'unmounted'}")
            self.poller.poll(left * 1000)

    def close(self) -> None:
        self.file.close()


_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2


def umount_syscall(path: str, flags: int = 0) -> None:
    if _libc.umount2(path.encode(), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def umount_below(root: str) -> None:
    """Lazily unmount everything below root, deepest first (cleanup)."""
    table = MountTable()
    try:
        for path in sorted(table.ids(root), key=len, reverse=True):
            with contextlib.suppress(OSError):
                umount_syscall(path, MNT_DETACH)
    finally:
        table.close()


# --- the daemon --------------------------------------------------------------------------------


class Daemon:
    def __init__(self, base: Path, name: str, supervisor: dict[str, Any] | None = None) -> None:
        self.base = base
        self.name = name
        self.socket = str(base / "run" / "s.sock")
        self.mount_root = str(base / "mnt")
        self.config_file = base / f"{name}.yaml"
        self.log_file = base / f"{name}.log"
        self.settings = {
            "state_dir": str(base / "state"),
            "run_dir": str(base / "run"),
            "mount_root": self.mount_root,
            "rpc": {"socket": self.socket, "socket_group": None},
            "metrics": {"listen": None},
            "logging": {"level": "info"},
        }
        if supervisor:
            self.settings["supervisor"] = supervisor
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.ready = 0.0

    def start(self) -> None:
        self.config_file.write_text(yaml.safe_dump(self.settings))
        notify_path = str(self.base / "run" / f"notify-{self.name}")
        os.makedirs(self.base / "run", exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(notify_path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(notify_path)
            notify.settimeout(0.5)
            env = dict(os.environ, NOTIFY_SOCKET=notify_path, PYTHONPATH=str(SOURCE))
            env.pop("WATCHDOG_USEC", None)
            with open(self.log_file, "ab") as log:
                self.started = time.perf_counter()
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "vdsmconn", "-c", str(self.config_file)],
                    stdout=log, stderr=log, env=env, cwd=str(SOURCE), start_new_session=True,
                )
            deadline = time.monotonic() + READY_TIMEOUT
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    message = notify.recv(4096).decode()
                except TimeoutError:
                    continue
                if "READY=1" in message.split("\n"):
                    self.ready = time.perf_counter()
                    return
        raise RuntimeError(f"daemon {self.name} not ready; log tail:\n{self.tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def client(self) -> Client:
        return Client(self.socket)

    def call(self, method: str, params: Any = None) -> Any:
        with self.client() as c:
            return c.call(method, params)

    def rss_mb(self) -> tuple[float, float]:
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            fields[name] = value.strip()
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

    def stop(self, timeout: float = 60.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def wait_keys(self, connected: int, keys: int, timeout: float, interval: float = 0.01) -> float:
        """Poll getHostInfo until `keys` keys exist, `connected` of them connected."""
        deadline = time.perf_counter() + timeout
        with self.client() as c:
            while True:
                info = c.call("getHostInfo")
                if info["keys"] == keys and info["states"]["connected"] == connected:
                    return time.perf_counter()
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"keys={keys} connected={connected} not reached: {info}")
                time.sleep(interval)


class Profiler:
    """py-spy record on the daemon for one phase, when --profile is given."""

    def __init__(self, out: Path | None) -> None:
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None

    @contextlib.contextmanager
    def phase(self, daemon: Daemon, name: str) -> Iterator[None]:
        if self.out is None:
            yield
            return
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.out.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            [pyspy, "record", "--nonblocking", "--threads", "--idle", "-r", "500",
             "-f", "raw", "-o", str(self.out / f"{name}.txt"), "-p", str(daemon.pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        try:
            yield
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


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


def posix(name: str, vfs: str = "tmpfs") -> dict[str, Any]:
    return {"type": "posixfs", "connection": name, "vfs_type": vfs}


def manage_simple_many(daemon: Daemon, pairs: list[tuple[str, dict[str, Any]]],
                       clients: int = 8, batch: int = 64) -> None:
    """Manage many CIDs: `clients` connections, each pipelining `batch` calls at a time."""

    async def worker(chunk: list[tuple[str, dict[str, Any]]]) -> None:
        c = await AsyncClient.open(daemon.socket)
        try:
            for i in range(0, len(chunk), batch):
                part = chunk[i:i + batch]
                lines = []
                ids = set()
                for cid, conn in part:
                    rid, c.next_id = c.next_id, c.next_id + 1
                    ids.add(rid)
                    lines.append(json.dumps({"jsonrpc": "2.0", "id": rid,
                                             "method": "manageStorageServer",
                                             "params": {"connectionID": cid,
                                                        "connection": conn}}).encode())
                c.writer.write(b"\n".join(lines) + b"\n")
                await c.writer.drain()
                while ids:
                    msg = json.loads(await c.reader.readline())
                    if "error" in msg:
                        raise RpcError(str(msg["error"]))
                    ids.discard(msg["id"])
        finally:
            await c.close()

    async def run() -> None:
        await asyncio.gather(*(worker(pairs[i::clients]) for i in range(clients)))

    asyncio.run(run())


def unmanage_all(daemon: Daemon, prefix: str, timeout: float = 300.0) -> None:
    """Unmanage every CID with `prefix`; return once no key is left and nothing is mounted
    under the mount root."""
    daemon.call("unmanageStorageServer", {"prefix": prefix})
    daemon.wait_keys(0, 0, timeout, interval=0.05)
    table = MountTable()
    try:
        deadline = time.monotonic() + timeout
        while table.ids(daemon.mount_root):
            if time.monotonic() > deadline:
                raise TimeoutError(f"mounts left under {daemon.mount_root}")
            time.sleep(0.02)
    finally:
        table.close()


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


def phase_restart(base: Path, daemon: Daemon, keys: int) -> tuple[Daemon, dict[str, float]]:
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
    rows.append(("list_ratio", f"list of {li['entries']} entries ({li['reply_bytes'] / 1e6:.1f} MB)"
                 f" {li['list_s'] * 1e3:.0f} ms vs dumps+loads {li['json_s'] * 1e3:.0f} ms"))
    rows.append(("rss_10k_mb", f"VmRSS {li['rss_mb']:.1f} MiB (before listing "
                 f"{li['rss_before_list']:.1f}, peak {li['hwm_mb']:.1f})"))
    rows.append(("(setup)", f"{args.keys * args.per_key} manage acked in "
                 f"{li['setup_manage_s']:.1f} s ({li['setup_manage_per_s']:.0f}/s), "
                 f"all {args.keys} connected after {li['setup_connected_s']:.1f} s"))

    progress(f"restart with {args.keys} mounts")
    d2, a = phase_restart(base, d1, args.keys)
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
                     "(alternating 1 s windows)"))

    if "list" in phases:
        run_list_restart(args, base, d1, profiler, daemons, result, rows)
    elif phases & {"rtt", "connect", "commit"}:
        d1.stop()

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
    print(f"code: {SOURCE}  load_at_end="
          + " ".join(Path("/proc/loadavg").read_text().split()[:3]))
    print(f"{'figure':22} {'value':>10} {'target':>8}  {'met':4} detail")
    details = dict(rows)
    for key, (op, target) in TARGETS.items():
        if key not in ordered:
            continue
        value = ordered[key]
        met = value <= target if op == "<=" else value >= target
        print(f"{key:22} {value:10.3f} {op + format(target, 'g'):>8}  {'yes' if met else 'NO':4} "
              f"{details.get(key, '')}")
    for key, detail in rows:
        if key.startswith("("):
            print(f"{key:22} {'':10} {'':8}  {'':4} {detail}")
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
    global SOURCE
    SOURCE = Path(args.source).resolve()
    if not (SOURCE / "vdsmconn" / "__main__.py").exists():
        print(f"bench: no vdsmconn package in {SOURCE}", file=sys.stderr)
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
