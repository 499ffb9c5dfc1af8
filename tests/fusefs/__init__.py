"""Test file systems: vcfuse (a FUSE file system that hangs, fails or serves on command)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
MOUNT_COMMAND = str(HERE / "mount_command.py")


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
