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
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from vdsmconn import errors

T = TypeVar("T")

POOL_SIZE = 16  # threads kept for checks that answer; a hung one is replaced
MAX_THREADS = 256  # pool threads at most, however many checks are slow at once
SLOW = 1.0  # seconds: a check running this long may hang; its thread no longer counts
IDLE = "probe idle"
BATCH = 64  # checks of a sweep handed to one thread at a time
BUSY = object()  # a sweep's outcome for a target whose earlier probe is still running


class _Job(Protocol):
    def run_in(self, worker: _Worker) -> None: ...


class _Worker(threading.Thread):
    def __init__(self, pool: _Pool) -> None:
        super().__init__(name=IDLE, daemon=True)
        self.pool = pool
        self.job: Probe[Any] | None = None  # the check it is in
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
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.workers: set[_Worker] = set()
        self.lock = threading.Lock()

    def submit(self, job: _Job) -> None:
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
    def __init__(self, fn: Callable[[], T], name: str, *, submit: bool = True) -> None:
        self.loop = asyncio.get_running_loop()
        # Made when a caller waits for it: a check of a sweep that nobody awaits costs the
        # loop no future and no callbacks.
        self._done: asyncio.Future[T] | None = None
        self.settled = False  # its outcome has reached the loop
        self.on_settle: Callable[[], None] | None = None
        self.name = name
        self.fn = fn
        self.started = time.monotonic()
        self.taken: float | None = None  # when a thread took it up (monotonic)
        self.worker: _Worker | None = None
        self.finished = False  # the check itself has returned
        self.abandoned = False  # a caller's deadline passed while a thread ran it
        self.value: T | None = None  # what the check returned, once finished
        self.error: BaseException | None = None  # or what it raised
        if submit:
            _POOL.submit(self)

    def execute(self, worker: _Worker) -> None:
        """In a pool thread: run the check and keep its outcome."""
        self.worker, self.taken = worker, time.monotonic()
        worker.job, worker.name = self, f"probe {self.name}"
        try:
            self.value = self.fn()
        except BaseException as e:  # delivered to the awaiting task, not lost
            self.error = e
        worker.job, worker.name = None, IDLE
        self.finished = True

    def run_in(self, worker: _Worker) -> None:
        """In a pool thread: run the check, hand its outcome to the loop."""
        self.execute(worker)
        # A probe that returns after the loop has closed has nobody left to tell.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.settle)

    def settle(self) -> None:
        """On the loop, once finished: its outcome to whoever awaits it."""
        if self.settled:
            return
        self.settled = True
        if self._done is not None:
            self._resolve(self._done)
        if self.on_settle is not None:
            self.on_settle()

    @property
    def done(self) -> asyncio.Future[T]:
        """The outcome as a future (resolved when the check has settled)."""
        if self._done is None:
            self._done = self.loop.create_future()
            if self.settled:
                self._resolve(self._done)
        return self._done

    def _resolve(self, future: asyncio.Future[T]) -> None:
        if future.done():
            return
        if self.error is not None:
            future.set_exception(self.error)
            # Delivered to whoever awaits it; a caller that left is no "never retrieved".
            future.exception()
        else:
            future.set_result(self.value)  # type: ignore[arg-type]

    @property
    def running(self) -> bool:
        return not self.settled

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

    async def outcome(self, timeout: float) -> T:
        """The result within `timeout` of the check's own running time; `TimeoutError`
        after it, with the check still running (the caller abandons it or not)."""
        left = self.left(timeout)  # a check taken up a while ago has less left
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


class _Batch:
    """Checks run one after another on one pool thread and settled on the loop together: a
    round of periodic probes costs one hand-off, not one per check. The loop may cut the
    batch when a check hangs (`cut`): the thread stops after that check, and the checks not
    yet taken are the loop's to hand to another thread."""

    def __init__(self, probes: list[Probe[Any]]) -> None:
        self.probes = probes
        self.loop = probes[0].loop
        self.settled = self.loop.create_future()
        self._lock = threading.Lock()  # never held across a check
        self._next = 0
        self._cut = False

    def run_in(self, worker: _Worker) -> None:
        while True:
            with self._lock:
                if self._cut or self._next == len(self.probes):
                    break
                probe = self.probes[self._next]
                self._next += 1
            probe.execute(worker)
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._settle)

    def _settle(self) -> None:
        for probe in self.probes:
            if probe.finished:
                probe.settle()
        if not self.settled.done():
            self.settled.set_result(None)

    def current(self) -> Probe[Any] | None:
        """The check its thread is in, if any."""
        with self._lock:
            probe = self.probes[self._next - 1] if self._next else None
        return probe if probe is not None and not probe.finished else None

    def cut(self) -> list[Probe[Any]]:
        """Stop the thread after its current check; the checks it has not taken."""
        with self._lock:
            self._cut = True
            rest = self.probes[self._next:]
        self._settle()
        return rest

    async def finish(self, timeout: float) -> None:
        """Until every check of the batch has an outcome or hangs: a check still running
        `timeout` seconds after its thread took it up is abandoned (its thread leaves the
        pool), and the checks after it go to another thread."""
        batch = self
        while not batch.settled.done():
            current = batch.current()
            left = current.left(timeout) if current is not None else timeout
            if left is None and current is not None:
                current.abandon()
                rest = batch.cut()
                if not rest:
                    return
                batch = _Batch(rest)
                _POOL.submit(batch)
                continue
            await asyncio.wait({batch.settled}, timeout=left)


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
                    f"started {age:.0f} s ago); it did not return within {timeout:g} s",
                    {"timeout": timeout})
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

    async def idle(self, target: str, timeout: float) -> None:
        """Until no probe of `target` is running, within `timeout` of its running; one
        already given up on (it hangs) is not waited for. Its outcome is its caller's."""
        current = self._running.get(target)
        if current is not None and current.running and not current.abandoned:
            with contextlib.suppress(Exception):
                await current.outcome(timeout)

    async def sweep(self, checks: Sequence[tuple[str, Callable[[], object], str]],
                    timeout: float) -> list[object]:
        """Many checks `(target, fn, name)` at once, each within `timeout` seconds of its
        running, in a few threads (`BATCH` checks each) whose outcomes reach the loop
        together. The outcome of each: None when it returned, the exception it raised,
        `errors.Timeout` when it hangs (its thread goes on, abandoned, and counts for its
        target as a probe run alone would), or `BUSY` when a probe of its target was still
        running (none is started).
        """
        outcomes: list[object] = [None] * len(checks)
        started: list[tuple[int, Probe[Any]]] = []
        for i, (target, fn, name) in enumerate(checks):
            current = self._running.get(target)
            if current is not None and current.running:
                outcomes[i] = errors.Timeout(
                    f"{name}: an earlier read has not returned yet ({current.name})",
                    {"timeout": timeout}) if current.abandoned else BUSY
                continue
            probe: Probe[object] = Probe(fn, name, submit=False)
            self._track(target, probe)
            started.append((i, probe))
        batches = [_Batch([p for _, p in started[n:n + BATCH]])
                   for n in range(0, len(started), BATCH)]
        for batch in batches:
            _POOL.submit(batch)
        if len(batches) == 1:
            await batches[0].finish(timeout)
        elif batches:
            await asyncio.gather(*(batch.finish(timeout) for batch in batches))
        for i, probe in started:
            if probe.finished:
                outcomes[i] = probe.error
            else:
                outcomes[i] = errors.Timeout(f"{probe.name} did not return within {timeout:g} s",
                                             {"timeout": timeout})
        return outcomes

    def _track(self, target: str, probe: Probe[Any]) -> None:
        self._running[target] = probe

        def forget() -> None:
            if self._running.get(target) is probe:
                del self._running[target]

        probe.on_settle = forget
