"""Run a blocking check in a thread the daemon is prepared to abandon.

A process touching a hung mount can sleep uninterruptibly for minutes; such a check must
never run on the event loop, and never in a pool whose threads the interpreter waits for at
exit. Each call gets its own daemon thread; a caller that times out gets control back at once
and can still learn when the thread finally returns (`Probe.done`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from vdsmconn import errors

T = TypeVar("T")


class Probe(Generic[T]):
    def __init__(self, fn: Callable[[], T], name: str) -> None:
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[T] = loop.create_future()
        self._name = name

        def target() -> None:
            try:
                result: T | None = fn()
                exc: BaseException | None = None
            except BaseException as e:  # delivered to the awaiting task, not lost
                result, exc = None, e
            # A probe that returns after the loop has closed has nobody left to tell.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._settle, result, exc)

        self._thread = threading.Thread(target=target, name=f"probe {name}", daemon=True)
        self._thread.start()

    def _settle(self, result: T | None, exc: BaseException | None) -> None:
        if self.done.done():
            return
        if exc is not None:
            self.done.set_exception(exc)
        else:
            self.done.set_result(result)  # type: ignore[arg-type]

    @property
    def running(self) -> bool:
        return not self.done.done()

    async def result(self, timeout: float) -> T:
        """The result, or `errors.Timeout` while the thread goes on (abandoned)."""
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(self.done)
        except TimeoutError:
            # Mark a late exception as retrieved, so it is not reported as never awaited.
            self.done.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise errors.Timeout(
                f"{self._name} did not return within {timeout:g} s", {"timeout": timeout}
            ) from None


async def run(fn: Callable[[], T], name: str, timeout: float) -> T:
    return await Probe(fn, name).result(timeout)
