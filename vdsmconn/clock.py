"""One clock for the daemon, so tests can drive backoff and timers without sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time


class Clock:
    def time(self) -> float:
        """Wall-clock seconds since the epoch, for timestamps shown to clients."""
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def sleep_or(self, seconds: float, event: asyncio.Event) -> None:
        """Sleep `seconds`, cut short when `event` is set. One timer and one waiter: every
        connected key sleeps here between probes, so no task is made for it."""
        if event.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, seconds)):
                await event.wait()


class FakeClock(Clock):
    """A clock that moves only when a test calls `advance`."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self._now = start
        self._seq = itertools.count()
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []

    def time(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + max(0.0, seconds), next(self._seq), fut))
        await fut

    async def sleep_or(self, seconds: float, event: asyncio.Event) -> None:
        """Sleep on the fake clock, cut short when `event` is set."""
        sleeper = asyncio.ensure_future(self.sleep(seconds))
        waker = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waker):
                task.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)

    def pending(self) -> list[float]:
        """Deadlines of the sleepers still waiting, soonest first."""
        return sorted(d for d, _, f in self._sleepers if not f.done())

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper whose deadline has come, in order.

        Tasks that are about to sleep (a `sleep` scheduled but not yet started) get to
        register first: a test that advances as soon as it sees a retry announced must not
        move time past a sleeper that has not begun."""
        for _ in range(5):
            await asyncio.sleep(0)
        target = self._now + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._sleepers)
            self._now = max(self._now, deadline)
            if not fut.done():
                fut.set_result(None)
                for _ in range(5):
                    await asyncio.sleep(0)
        self._now = target
        await asyncio.sleep(0)
