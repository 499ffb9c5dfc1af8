"""The benchmark's rig: JSON-RPC clients, the mount table, and the daemon under test.

Shared by the phases of bench.py and of its phase modules (commit.py, scale.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import math
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
# Where the daemon's code is imported from: the repository, or (--source) a snapshot of it,
# so that edits made to the tree during a run cannot change the code being measured.
SOURCE = REPO
READY_TIMEOUT = 60.0
CALL_TIMEOUT = 300.0

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
        # Called with the new process's pid right after it is spawned (a profiler that
        # records the start-up too).
        self.on_spawn: Callable[[int], None] | None = None

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
            if self.on_spawn is not None:
                self.on_spawn(self.proc.pid)
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



# --- helpers of several phases ---------------------------------------------------------------


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
