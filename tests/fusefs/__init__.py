"""Test file systems: vcfuse (a FUSE file system that hangs, fails or serves on command) and
slowfs (a passthrough FUSE file system whose fsync takes as long as asked)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
MOUNT_COMMAND = str(HERE / "mount_command.py")
SLOWFS = str(HERE / "slowfs.py")
MNT_DETACH = 2


class VcFuse:
    """The control side of one vcfuse file system (its CTL folder)."""

    def __init__(self, ctl: Path) -> None:
        ctl.mkdir(parents=True, exist_ok=True)
        self.ctl = ctl

    @property
    def connection(self) -> dict[str, Any]:
        return {"type": "posixfs", "connection": str(self.ctl), "vfs_type": "fuse.vcfuse"}

    def set_mode(self, mode: str) -> None:
        tmp = self.ctl / "mode.tmp"
        tmp.write_text(mode + "\n")
        os.replace(tmp, self.ctl / "mode")

    def pid(self) -> int:
        return int((self.ctl / "pid").read_text())

    def servers(self) -> list[int]:
        """Pids of every vcfuse server of this CTL folder still running."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z" and any(b"vcfuse" in a for a in cmdline) and \
                    str(self.ctl).encode() in cmdline:
                found.append(int(entry))
        return found

    def wait_no_servers(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.servers():
            if time.monotonic() > deadline:
                raise AssertionError(f"vcfuse servers still running: {self.servers()}")
            time.sleep(0.05)

    def kill_servers(self) -> None:
        for pid in self.servers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


@contextlib.contextmanager
def slowfs(backing: Path, mountpoint: Path, fsync_delay: float,
           timeout: float = 10.0) -> Iterator[int]:
    """Serve `backing` at `mountpoint` through slowfs, each fsync answered `fsync_delay`
    seconds late; yields the server's pid. On exit the mount is detached and the server,
    which ends with the last user of the mount, is waited for (killed after `timeout`)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(
        [sys.executable, SLOWFS, "--fsync-delay", repr(fsync_delay), str(backing),
         str(mountpoint)], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert server.stdout is not None
        ready, _, _ = select.select([server.stdout], [], [], timeout)
        line = server.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            raise RuntimeError(f"slowfs did not mount {mountpoint} (rc {server.poll()})")
        yield server.pid
    finally:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.umount2(str(mountpoint).encode(), MNT_DETACH)  # fails only if never mounted
        try:
            server.wait(timeout)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if server.stdout is not None:
            server.stdout.close()
