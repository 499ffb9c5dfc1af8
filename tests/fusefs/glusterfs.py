"""A real GlusterFS server for tests: glusterd inside a network namespace we create.

The namespace has one veth link to the root namespace with two addresses (two brick hosts
for one glusterd); the root side is `.1`. Everything is undone in `close()`: volumes, the
processes of the namespace (glusterd, bricks, self-heal daemon) by pid, glusterd's state in
/var/lib/glusterd (the package's `groups` and `hooks` stay), the namespace and the link.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

STATE = Path("/var/lib/glusterd")
PACKAGE_FILES = {"groups", "hooks"}


def _run(*argv: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          check=check)


def missing() -> str | None:
    """Why a GlusterFS server cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("glusterd", "gluster", "mount.glusterfs", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (glusterfs-server, glusterfs-client)"
    if any(_named(pid, b"glusterd") for pid in _pids()):
        return "a glusterd is already running on this machine"
    return None


def _pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def _named(pid: int, name: bytes) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_bytes().strip() == name
    except OSError:
        return False


class GlusterServer:
    def __init__(self, base: Path, subnet: int) -> None:
        self.base = base
        self.ns = f"vcgl{os.getpid()}"
        self.host_link, self.ns_link = f"vcg{os.getpid()}a", f"vcg{os.getpid()}b"
        self.prefix = f"10.{200 + subnet % 50}.{os.getpid() % 250}"
        self.root_ip = f"{self.prefix}.1"
        self.hosts = (f"{self.prefix}.2", f"{self.prefix}.3")
        self.pidfile = base / "glusterd.pid"
        self.volumes: list[str] = []
        self.created = 0
        self._netns_inode: int | None = None

    # --- set up ---------------------------------------------------------------------------

    def start(self) -> None:
        _run("ip", "netns", "add", self.ns)
        _run("ip", "link", "add", self.host_link, "type", "veth", "peer", "name", self.ns_link)
        _run("ip", "link", "set", self.ns_link, "netns", self.ns)
        _run("ip", "addr", "add", f"{self.root_ip}/24", "dev", self.host_link)
        _run("ip", "link", "set", self.host_link, "up")
        for ip in self.hosts:
            self.in_ns("ip", "addr", "add", f"{ip}/24", "dev", self.ns_link)
        self.in_ns("ip", "link", "set", self.ns_link, "up")
        self.in_ns("ip", "link", "set", "lo", "up")
        self._netns_inode = os.stat(f"/run/netns/{self.ns}").st_ino
        self.in_ns("glusterd", "-f", "/etc/glusterfs/glusterd.vol", "-p", str(self.pidfile),
                   "-l", str(self.base / "glusterd.log"))
        deadline = time.monotonic() + 30
        while self.cli("volume", "list", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("glusterd did not answer within 30 s")
            time.sleep(0.2)

    def in_ns(self, *argv: str, timeout: float = 60,
              check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("nsenter", f"--net=/run/netns/{self.ns}", *argv, timeout=timeout,
                    check=check)

    def cli(self, *argv: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return _run("gluster", "--mode=script", *argv, timeout=timeout, check=check)

    def create_volume(self, name: str, hosts: tuple[str, ...], ping_timeout: int = 5) -> str:
        """Create and start volume `name` with one brick per host; `host:/name`."""
        self.created += 1
        bricks = []
        for i, host in enumerate(hosts):
            brick = self.base / f"{self.created}-{name}-brick{i}"
            brick.mkdir()
            bricks.append(f"{host}:{brick}")
        self.cli("volume", "create", name, *bricks, "force")
        self.volumes.append(name)
        self.cli("volume", "set", name, "network.ping-timeout", str(ping_timeout))
        self.cli("volume", "start", name)
        return f"{hosts[0]}:/{name}"

    # --- faults ---------------------------------------------------------------------------

    def brick_pids(self, name: str) -> list[int]:
        return [pid for pid in self.ns_pids() if _named(pid, b"glusterfsd")
                and f"--volfile-id {name}.".encode() in _cmdline(pid).replace(b"\0", b" ")]

    def start_volume_force(self, name: str) -> None:
        deadline = time.monotonic() + 30
        while True:
            self.cli("volume", "start", name, "force")
            if self.brick_pids(name):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"bricks of {name} did not come back")
            time.sleep(0.5)

    def link(self, up: bool) -> None:
        _run("ip", "link", "set", self.host_link, "up" if up else "down")

    # --- tear down ------------------------------------------------------------------------

    def ns_pids(self) -> list[int]:
        found = []
        for pid in _pids():
            try:
                if os.stat(f"/proc/{pid}/ns/net").st_ino == self._netns_inode:
                    found.append(pid)
            except OSError:
                continue
        return found

    def close(self) -> None:
        for name in reversed(self.volumes):
            self.cli("volume", "stop", name, "force", check=False, timeout=60)
            self.cli("volume", "delete", name, check=False, timeout=60)
        if self._netns_inode is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in self.ns_pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                deadline = time.monotonic() + 10
                while self.ns_pids() and time.monotonic() < deadline:
                    time.sleep(0.1)
        _run("ip", "link", "del", self.host_link, check=False)
        _run("ip", "netns", "del", self.ns, check=False)
        if STATE.is_dir():
            for entry in STATE.iterdir():
                if entry.name not in PACKAGE_FILES:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def client_pids(mountpoint: str) -> list[int]:
    """The glusterfs FUSE client processes serving `mountpoint`."""
    return [pid for pid in _pids() if _named(pid, b"glusterfs")
            and _cmdline(pid).split(b"\0")[-2:-1] == [mountpoint.encode()]]


def client_args(pid: int) -> list[str]:
    return [a.decode() for a in _cmdline(pid).split(b"\0") if a]
