"""Block device events (pyudev) -> typed events, so a vanished managed volume is noticed at once.

The `udev` source carries events after udevd has processed them (links in /dev/disk and
/dev/mapper are in place); without a running udevd it delivers nothing at all, and no error
(TESTING.md), so the `kernel` source (raw uevents) is used then. The events only wake the
reconciler: what a device looks like is read from the host, never taken from the event.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

UDEVD_NAMES = ("systemd-udevd", "udevd")


@dataclass(frozen=True)
class DeviceEvent:
    action: str  # add, remove, change, ...
    name: str  # kernel name: loop0, sda, dm-3
    node: str | None  # /dev/loop0
    source: str  # udev or kernel


def udevd_running(proc: str = "/proc") -> bool:
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            with open(f"{proc}/{entry}/comm") as f:
                if f.read().strip() in UDEVD_NAMES:
                    return True
        except OSError:
            continue
    return False


def available() -> str | None:
    """None if pyudev can be used, else why not."""
    try:
        import pyudev  # noqa: F401
    except ImportError:
        return "pyudev is not installed"
    return None


class UdevWatcher:
    """Calls `callback` with every block device event until cancelled."""

    def __init__(self, source: str | None = None) -> None:
        self.source = source
        self.ready = asyncio.Event()  # set once the monitor listens

    async def run(self, callback: Callable[[DeviceEvent], None]) -> None:
        import pyudev

        source = self.source or ("udev" if await asyncio.to_thread(udevd_running) else "kernel")
        monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=source)
        monitor.filter_by("block")
        monitor.start()
        loop = asyncio.get_running_loop()
        fd = monitor.fileno()

        def readable() -> None:
            while True:
                try:
                    device = monitor.poll(timeout=0)
                except Exception as e:  # a malformed message must not end the watch
                    log.warning("UDEV receive failed: %s", e)
                    return
                if device is None:
                    return
                event = _event(device, source)
                if event is not None:
                    log.debug("UDEV %s %s", event.action, event.name)
                    callback(event)

        loop.add_reader(fd, readable)
        log.info("UDEV watching block devices source=%s", source)
        self.ready.set()
        try:
            await asyncio.Future()  # until cancelled
        finally:
            loop.remove_reader(fd)  # the socket closes with the monitor object


def _event(device: Any, source: str) -> DeviceEvent | None:
    if device.subsystem != "block":
        return None
    return DeviceEvent(action=str(device.action or ""), name=str(device.sys_name),
                       node=device.device_node, source=source)
