"""Reverse-path filtering of iSCSI bond interfaces: written to /proc, remembered in /run.

An iSCSI bond logs in through interfaces that are not the route to the portal; the portal's
replies come back where the kernel's best route does not lead, and strict `rp_filter` drops
them. `RpFilter` sets it loose on such an interface while a session uses it, and restores it
when none does. The files are small and in memory (procfs, tmpfs): they never block.
"""

from __future__ import annotations

import contextlib
import logging
import os

from vdsmconn.host.command import CommandRunner

log = logging.getLogger(__name__)

PROC_CONF = "/proc/sys/net/ipv4/conf"
RP_STRICT, RP_LOOSE = "1", "2"


class RpFilter:
    """Reverse-path filtering of bond interfaces that are not the route to the portal.

    Replies of a portal reached through such an interface arrive where the kernel's best
    route to the portal does not lead, and strict `rp_filter` drops them: it is set loose
    while a session uses the interface, and restored when none does. The value to restore is
    also kept in a file under `saved_dir` (in /run: gone with a reboot, which resets it
    anyway), so a daemon restarted between loosening and restoring still restores it.
    """

    def __init__(self, runner: CommandRunner, timeout: float, conf: str = PROC_CONF,
                 saved_dir: str | None = None) -> None:
        self.runner = runner
        self.timeout = timeout
        self.conf = conf
        self.saved_dir = saved_dir
        self.saved: dict[str, str] = {}

    def _path(self, netdev: str) -> str:
        return os.path.join(self.conf, netdev, "rp_filter")

    async def route_dev(self, address: str) -> str | None:
        result = await self.runner.run(["ip", "-o", "route", "get", address],
                                       timeout=self.timeout)
        words = result.stdout.split()
        return words[words.index("dev") + 1] if result.rc == 0 and "dev" in words else None

    async def loosen(self, netdev: str, address: str) -> None:
        path = self._path(netdev)
        if netdev in self.saved or ":" in address or not _exists(path):
            return
        if await self.route_dev(address) == netdev:
            return
        value = _swap(path, RP_STRICT, RP_LOOSE)
        if value is None:
            return
        self.saved[netdev] = value
        self._keep(netdev, value)
        log.info("RP_FILTER netdev=%s %s->%s (not the route to %s)", netdev, value, RP_LOOSE,
                 address)

    def restore(self, netdev: str) -> None:
        value = self.saved.pop(netdev, None) or self._kept(netdev)
        if self.saved_dir is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.saved_dir, netdev))
        if value is None:
            return
        try:
            with open(self._path(netdev), "w") as f:
                f.write(value)
        except OSError as e:  # the interface is gone: nothing left to restore
            log.info("RP_FILTER netdev=%s not restored: %s", netdev, e.strerror)
            return
        log.info("RP_FILTER netdev=%s restored to %s", netdev, value)

    def _keep(self, netdev: str, value: str) -> None:
        if self.saved_dir is None:
            return
        os.makedirs(self.saved_dir, 0o755, exist_ok=True)
        tmp = os.path.join(self.saved_dir, f".{netdev}.tmp")
        with open(tmp, "w") as f:
            f.write(value)
        os.replace(tmp, os.path.join(self.saved_dir, netdev))

    def _kept(self, netdev: str) -> str | None:
        if self.saved_dir is None:
            return None
        try:
            with open(os.path.join(self.saved_dir, netdev)) as f:
                value = f.read().strip()
        except FileNotFoundError:
            return None
        return value if value == RP_STRICT else None  # only strict is ever loosened


def _exists(path: str) -> bool:
    return os.path.exists(path)  # /proc: answers at once


def _swap(path: str, old: str, new: str) -> str | None:
    """Write `new` if the file holds `old`; the old value, or None if left alone."""
    with open(path) as f:
        value = f.read().strip()
    if value != old:
        return None
    with open(path, "w") as f:
        f.write(new)
    return value
