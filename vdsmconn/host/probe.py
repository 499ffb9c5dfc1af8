"""Run a blocking check in a thread the daemon is prepared to abandon, at most one per target.

A process touching a hung mount or disk can sleep uninterruptibly for minutes; such a check
must never run on the event loop, and never in a pool whose threads the interpreter waits for
at exit. Checks run on a small pool of daemon threads; a caller that times out gets control
back at once, and the thread goes on (abandoned) until the kernel lets it return, while a new
thread takes its place in the pool. Starting a thread costs the loop far more than the check
of a healthy mount, so threads are reused; and a check's deadline counts from the moment a
thread takes it up, so a burst of checks (a start-up with thousands of keys) queues for a
thread instead of failing as if each mount hung.

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
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from vdsmconn import errors

T = TypeVar("T")

POOL_SIZE = 16  # threads kept for checks that answer; a hung one is replaced
MAX_THREADS = 256  # pool threads at most, however many checks are slow at once
SLOW = 1.0  # seconds: a check running this long may hang; its thread no longer counts
IDLE = "probe idle"


class _Worker(threading.Thread):
    def __init__(self, pool: _Pool) -> None:
        super().__init__(name=IDLE, daemon=True)
        self.pool = pool
        self.job: Probe[Any] | None = None
        self.abandoned = False  # replaced in the pool while stuck in a check

    def run(self) -> None:
        while not self.abandoned and not self.pool.surplus(self):
            job = self.pool.jobs.get()
            job.run_in(self)


class _Pool:
    """Threads that run checks. A thread whose check is given up on leaves the pool (it
    ends when the check returns) and the next submission starts another."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.jobs: queue.SimpleQueue[Probe[Any]] = queue.SimpleQueue()
        self.workers: set[_Worker] = set()
        self.lock = threading.Lock()

    def submit(self, job: Probe[Any]) -> None:
        with self.lock:
            if self._short():
                worker = _Worker(self)
                self.workers.add(worker)
                worker.start()
        self.jobs.put(job)

    def _short(self) -> bool:
        """A thread is missing: the pool is not full yet, or every thread is in a check that
        has run for a while (checks of dead servers must not hold up those that answer)."""
        if len(self.workers) < self.size:
            return True
        if len(self.workers) >= MAX_THREADS:
            return False
        now = time.monotonic()
        for worker in self.workers:
            job = worker.job
            taken = job.taken if job is not None else None
            if taken is None or now - taken < SLOW:
                return False
        return True

    def surplus(self, worker: _Worker) -> bool:
        """Leave the pool if it has more threads than it keeps (one started while all
        others were slow), now that this one is free."""
        with self.lock:
            if len(self.workers) > self.size and self.jobs.empty():
                self.workers.discard(worker)
                return True
            return False

    def replace(self, worker: _Worker) -> None:
        with self.lock:
            worker.abandoned = True
            self.workers.discard(worker)


_POOL = _Pool(POOL_SIZE)


class Probe(Generic[T]):
    def __init__(self, fn: Callable[[], T], name: str) -> None:
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[T] = self.loop.create_future()
        self.name = name
        self.fn = fn
        self.started = time.monotonic()
        self.taken: float | None = None  # when a thread took it up (monotonic)
        self.worker: _Worker | None = None
        self.finished = False  # the check itself has returned
        self.abandoned = False  # a caller's deadline passed while a thread ran it
        _POOL.submit(self)

    def run_in(self, worker: _Worker) -> None:
        """In a pool thread: run the check, hand its outcome to the loop."""
        self.worker, self.taken = worker, time.monotonic()
        worker.job, worker.name = self, f"probe {self.name}"
        try:
            result: T | None = self.fn()
            exc: BaseException | None = None
        except BaseException as e:  # delivered to the awaiting task, not lost
            result, exc = None, e
        worker.job, worker.name = None, IDLE
        self.finished = True
        # A probe that returns after the loop has closed has nobody left to tell.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._settle, result, exc)

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

    def left(self, timeout: float) -> float | None:
        """Seconds left of `timeout` counted from when a thread took the check up (all of it
        while it waits for a thread); None once it is past: the check hangs."""
        if self.finished:
            return timeout  # it returned: its outcome is on its way to the loop
        taken = self.taken
        if taken is None:
            return timeout
        left = taken + timeout - time.monotonic()
        return left if left > 0 else None

    def abandon(self) -> None:
        """Nobody waits for the result any more: its thread leaves the pool, and a late
        exception is marked as retrieved, so it is not reported as never awaited."""
        if not self.abandoned:
            self.abandoned = True
            if self.worker is not None:
                _POOL.replace(self.worker)
            self.done.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def outcome(self, timeout: float) -> T:
        """The result within `timeout` of the check's own running time; `TimeoutError`
        after it, with the check still running (the caller abandons it or not)."""
        left: float | None = timeout
        while left is not None:
            try:
                async with asyncio.timeout(left):
                    return await asyncio.shield(self.done)
            except TimeoutError:
                left = self.left(timeout)
            except asyncio.CancelledError:
                # Its caller left: give it up if it hangs, so its thread leaves the pool.
                self._watch(timeout)
                raise
        raise TimeoutError

    def _watch(self, timeout: float) -> None:
        if not self.running or self.abandoned:
            return
        left = self.left(timeout)
        if left is None:
            self.abandon()
        else:
            self.loop.call_later(left, self._watch, timeout)

    async def result(self, timeout: float) -> T:
        """The result, or `errors.Timeout` while the thread goes on (abandoned)."""
        try:
            return await self.outcome(timeout)
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
        """`fn()` on a probe thread, within `timeout` seconds of its running (`errors.Timeout`
        after).

        While a thread of `target` is running, none is started: this call waits for it to
        end within the same deadline, or fails at once if an earlier caller already gave up
        on it (it hangs). A cancelled caller leaves its thread running, still counted.
        """
        while (current := self._running.get(target)) is not None and current.running:
            if current.abandoned:
                age = time.monotonic() - current.started
                raise errors.Timeout(
                    f"{name}: an earlier read has not returned yet ({current.name}, "
                    f"started {age:.0f} s ago)", {"timeout": timeout})
            try:
                await current.outcome(timeout)  # its owner takes its result
            except TimeoutError:
                current.abandon()
                raise errors.Timeout(
                    f"{name} did not return within {timeout:g} s", {"timeout": timeout}
                ) from None
            except Exception:  # the earlier caller's error, reported to it
                continue
        mine: Probe[T] = Probe(fn, name)
        self._track(target, mine)
        return await mine.result(timeout)

    def _track(self, target: str, probe: Probe[Any]) -> None:
        self._running[target] = probe
        # An exception is the caller's; one whose caller left (cancelled) is not "never
        # retrieved" either.
        probe.done.add_done_callback(lambda f: f.cancelled() or f.exception())

        def forget(_: asyncio.Future[Any]) -> None:
            if self._running.get(target) is probe:
                del self._running[target]

        probe.done.add_done_callback(forget)
