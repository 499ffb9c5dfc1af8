"""Run a blocking check in a thread the daemon is prepared to abandon, at most one per target.

A process touching a hung mount or disk can sleep uninterruptibly for minutes; such a check
must never run on the event loop, and never in a pool whose threads the interpreter waits for
at exit. Each check gets its own daemon thread; a caller that times out gets control back at
once, and the thread goes on (abandoned) until the kernel lets it return.

`Probes` is the one place that keeps "at most one outstanding probe per target": while a
thread for a target is still running, no second one is started for it. A caller arriving
meanwhile waits for the running one to end (within its own deadline) and then runs its
check; if the running one was already abandoned by an earlier caller's deadline, the new
caller gets `errors.Timeout` at once. Every backend checks through the one `Probes` of its
`HostContext`, so a dead mount or LUN holds one thread, however often it is probed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from vdsmconn import errors

T = TypeVar("T")


class Probe(Generic[T]):
    def __init__(self, fn: Callable[[], T], name: str) -> None:
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[T] = loop.create_future()
        self.name = name
        self.started = time.monotonic()
        self.abandoned = False  # a caller's deadline passed while this thread ran

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

    def abandon(self) -> None:
        """Nobody waits for the result any more: mark a late exception as retrieved, so it
        is not reported as never awaited."""
        if not self.abandoned:
            self.abandoned = True
            self.done.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def result(self, timeout: float) -> T:
        """The result, or `errors.Timeout` while the thread goes on (abandoned)."""
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(self.done)
        except TimeoutError:
            self.abandon()
            raise errors.Timeout(
                f"{self.name} did not return within {timeout:g} s", {"timeout": timeout}
            ) from None


async def run(fn: Callable[[], T], name: str, timeout: float) -> T:
    """A check in a thread of its own, with no target to share (name lookups and the like:
    nothing a hung server can pile up). Checks of mounts, directories and devices go through
    `Probes.run`."""
    return await Probe(fn, name).result(timeout)


class Probes:
    """At most one probe thread per target (a mount point, a directory, a device)."""

    def __init__(self) -> None:
        self._running: dict[str, Probe[Any]] = {}

    def running(self, target: str) -> bool:
        """Whether a probe thread of `target` has not returned yet (abandoned or not)."""
        found = self._running.get(target)
        return found is not None and found.running

    async def run(self, target: str, fn: Callable[[], T], name: str, timeout: float) -> T:
        """`fn()` in a thread of its own, within `timeout` seconds (`errors.Timeout` after).

        While a thread of `target` is running, none is started: this call waits for it to
        end within the same deadline, or fails at once if an earlier caller already gave up
        on it (it hangs). A cancelled caller leaves its thread running, still counted.
        """
        current: Probe[Any] | None = None
        try:
            async with asyncio.timeout(timeout):
                while (current := self._running.get(target)) is not None and current.running:
                    if current.abandoned:
                        age = time.monotonic() - current.started
                        raise errors.Timeout(
                            f"{name}: an earlier read has not returned yet ({current.name}, "
                            f"started {age:.0f} s ago)", {"timeout": timeout})
                    await asyncio.wait({current.done})  # its owner takes its result
                mine: Probe[T] = Probe(fn, name)
                current = mine
                self._track(target, mine)
                return await asyncio.shield(mine.done)
        except TimeoutError:
            if current is not None and current.running:
                current.abandon()
            raise errors.Timeout(
                f"{name} did not return within {timeout:g} s", {"timeout": timeout}
            ) from None

    def _track(self, target: str, probe: Probe[Any]) -> None:
        self._running[target] = probe
        # An exception is the caller's; one whose caller left (cancelled) is not "never
        # retrieved" either.
        probe.done.add_done_callback(lambda f: f.cancelled() or f.exception())

        def forget(_: asyncio.Future[Any]) -> None:
            if self._running.get(target) is probe:
                del self._running[target]

        probe.done.add_done_callback(forget)
