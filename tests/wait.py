"""The one way tests wait for a condition: poll it within a generous bound.

The bound only keeps a broken test from hanging; it is never a timing (figures belong in
bench/run). Polling is for conditions that offer no event: another process, a thread, the
kernel's tables.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


def until(check: Callable[[], Any], what: str = "the condition", timeout: float = 30.0,
          interval: float = 0.02, detail: Callable[[], str] = lambda: "") -> None:
    """Block until `check()` is true, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not so within {timeout:g} s{detail()}")
        time.sleep(interval)


async def eventually(check: Callable[[], Any], what: str = "the condition",
                     timeout: float = 30.0, interval: float = 0.002) -> None:
    """Let the loop run until `check()` is true, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not so within {timeout:g} s")
        await asyncio.sleep(interval)
