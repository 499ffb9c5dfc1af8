"""sd_notify without libsystemd: READY, STATUS, STOPPING and watchdog pings."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

STATUS_INTERVAL = 1.0  # seconds between two STATUS= updates at most
_failed: set[str] = set()  # notify sockets a send failed on


def notify(message: str) -> bool:
    """Send one notification; False when not run by systemd (no NOTIFY_SOCKET)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as e:
        # Once at warning level: a gone socket would otherwise log on every update.
        level = logging.DEBUG if address in _failed else logging.WARNING
        _failed.add(address)
        log.log(level, "sd_notify to %s failed: %s", address, e)
        return False
    return True


def watchdog_interval() -> float | None:
    """Half the watchdog period systemd asked for, in seconds; None when there is none."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


async def watchdog(interval: float) -> None:
    """Ping while the event loop runs; a stalled loop stops the pings."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


class StatusReporter:
    """Keeps systemd's STATUS= text current: `changed()` may be called on every state change;
    the text is sent at most once per `interval` seconds, the last change always included."""

    def __init__(self, text: Callable[[], str], interval: float = STATUS_INTERVAL) -> None:
        self._text = text
        self._interval = interval
        self._last_sent = float("-inf")
        self._last_text: str | None = None
        self._timer: asyncio.TimerHandle | None = None

    def changed(self) -> None:
        if self._timer is not None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, self._last_sent + self._interval - loop.time())
        self._timer = loop.call_later(delay, self._send)

    def ready(self) -> None:
        """Tell systemd the daemon is ready, with the current status text."""
        self._last_text = self._text()
        self._last_sent = asyncio.get_running_loop().time()
        notify(f"READY=1\nSTATUS={self._last_text}")

    def _send(self) -> None:
        self._timer = None
        text = self._text()
        self._last_sent = asyncio.get_running_loop().time()
        if text != self._last_text:
            self._last_text = text
            notify(f"STATUS={text}")

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
