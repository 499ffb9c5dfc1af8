"""The netlink link monitor on real veth links: up/down events within milliseconds, only
changes reported, and the iSCSI connector told which keys a link concerns."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from vdsmconn.monitors import netlink
from vdsmconn.monitors.netlink import LinkEvent, LinkWatcher

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(netlink.available() is not None, reason="pyroute2 is not installed"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 is not installed"),
]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, timeout=10, capture_output=True)


@pytest.fixture
def veth() -> Iterator[str]:
    name = f"vcnl{os.getpid() % 10000}"
    ip("link", "add", name, "type", "veth", "peer", "name", name + "p")
    ip("link", "set", name + "p", "up")
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], check=False, timeout=10)


async def test_link_down_and_up_events_arrive_at_once(veth: str) -> None:
    watcher = LinkWatcher()
    events: list[tuple[float, LinkEvent]] = []
    task = asyncio.ensure_future(watcher.run(lambda e: events.append((time.monotonic(), e))))
    try:
        await asyncio.wait_for(watcher.ready.wait(), 10)
        assert watcher.states[veth] is False  # created down: known before any event
        for n, up in enumerate((True, False, True), start=1):
            start = time.monotonic()
            await asyncio.to_thread(ip, "link", "set", veth, "up" if up else "down")
            mine: list[tuple[float, LinkEvent]] = []
            async with asyncio.timeout(20):
                while len(mine := [(a, e) for a, e in events if e.name == veth]) < n:  # noqa: ASYNC110
                    await asyncio.sleep(0.001)
            at, event = mine[-1]
            print(f"OBSERVED link {'up' if up else 'down'} event after {at - start:.4f}s")
            assert event.up is up
        # Only changes: the up/down flaps of the peer are its own, ours are exactly three.
        assert [e.up for _, e in events if e.name == veth] == [True, False, True]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
