"""The one async runner for every external command: deadline, group kill, secret masking.

Every command runs in its own process group (session) with stdin from /dev/null unless input
is given, stdout and stderr captured. On its deadline the whole group gets SIGKILL; a group
that is reaped within the grace period raises `errors.Timeout`, one that is not (a member in
uninterruptible sleep) raises `StuckCommand`, whose `reaped` task finishes when the process
finally exits. The runner owns those tasks; `close()` cancels them. Children are started and
waited for in a few reused daemon threads (fork/exec and the wait block; asyncio's subprocess
transport spent ~1.5 ms of loop time per child), the deadline and the kill stay on the loop.

Secrets never leave the runner: `model.Secret` items are revealed only for exec, and items
(or comma-separated parts of items) shaped `name=value`, and the value after `--name` or after
`-n name -v`, where `is_secret_name(name)`, are shown as the mask in `Result.argv`, in log
lines and in exception messages. `Result.stderr` is scrubbed of every secret value too;
`Result.stdout` is left as the tool printed it, for parsers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import selectors
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from vdsmconn import errors
from vdsmconn.model import MASK, Secret, is_secret_name

log = logging.getLogger(__name__)

Arg = str | Secret

DEFAULT_GRACE = 5.0
_TAIL = 400


@dataclass(frozen=True)
class Result:
    """A finished command. `argv` is the masked form, safe to show."""

    argv: tuple[str, ...]
    rc: int
    stdout: str
    stderr: str
    seconds: float


class StuckCommand(errors.CommandStuck):
    """The command's process group did not die after SIGKILL within the grace period.

    `reaped` completes with the exit status once the process is finally reaped; the caller
    must not start another operation on the same key before it does.
    """

    def __init__(self, message: str, reaped: asyncio.Task[int]) -> None:
        super().__init__(message)
        self.reaped = reaped


@dataclass
class _Child:
    """One command, started and waited for in a spawner thread: fork/exec and the wait are
    blocking calls, and asyncio's subprocess transport cost the loop ~1.5 ms per child."""

    argv: list[str]
    env: dict[str, str]
    input: bytes | None
    prepare: Callable[[], object] | None = None
    unprepared: OSError | None = None  # what `prepare` raised
    started: concurrent.futures.Future[int] = field(default_factory=concurrent.futures.Future)
    done: concurrent.futures.Future[tuple[int, bytes, bytes]] = field(
        default_factory=concurrent.futures.Future)
    killed: threading.Event = field(default_factory=threading.Event)
    pid: int = 0

    def run(self) -> None:
        """In a spawner thread: start the child, then collect its output and status."""
        self.started.set_running_or_notify_cancel()  # neither can be cancelled from now on
        self.done.set_running_or_notify_cancel()
        if self.prepare is not None:
            try:
                self.prepare()
            except OSError as exc:
                self.unprepared = exc
                self.started.set_exception(exc)
                return
        try:
            proc = subprocess.Popen(
                self.argv, env=self.env, start_new_session=True, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL if self.input is None else subprocess.PIPE,
            )
        except BaseException as exc:
            self.started.set_exception(exc)
            return
        self.started.set_result(proc.pid)
        try:
            out, err = self._collect(proc)
            self.done.set_result((proc.wait(), out, err))
        except BaseException as exc:  # the pipes or the pidfd failed: still reap it
            proc.wait()
            self.done.set_exception(exc)

    def _collect(self, proc: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
        """stdout and stderr until the process has exited and the pipes are at their end;
        once it was killed, until it has exited (a descendant that left the group may hold
        the pipes open)."""
        assert proc.stdout is not None and proc.stderr is not None
        chunks: dict[int, list[bytes]] = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}
        # (a dict keeps the order: stdout, then stderr)
        pending = memoryview(self.input or b"")
        pidfd = os.pidfd_open(proc.pid)
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(pidfd, selectors.EVENT_READ)
                for fd in chunks:
                    os.set_blocking(fd, False)
                    selector.register(fd, selectors.EVENT_READ)
                if proc.stdin is not None:
                    os.set_blocking(proc.stdin.fileno(), False)
                    selector.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
                exited = False
                readers = set(chunks)
                while readers and not (exited and self.killed.is_set()):
                    for key, _ in selector.select(0.1 if exited else None):
                        if key.fd == pidfd:
                            exited = True
                            selector.unregister(pidfd)
                        elif key.fd in chunks:
                            data = os.read(key.fd, 65536)
                            if data:
                                chunks[key.fd].append(data)
                            else:
                                readers.discard(key.fd)
                                selector.unregister(key.fd)
                        else:
                            pending = _feed(selector, key.fd, pending, proc)
        finally:
            os.close(pidfd)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        out, err = chunks.values()
        return b"".join(out), b"".join(err)


def _feed(selector: selectors.BaseSelector, fd: int, pending: memoryview,
          proc: subprocess.Popen[bytes]) -> memoryview:
    """Write what stdin takes of `pending`; close it when all is written (or unwanted)."""
    try:
        pending = pending[os.write(fd, pending):] if pending else pending
    except (BrokenPipeError, BlockingIOError) as exc:
        if isinstance(exc, BlockingIOError):
            return pending
        pending = pending[:0]
    if not pending:
        selector.unregister(fd)
        assert proc.stdin is not None
        proc.stdin.close()
    return pending


class _Spawner:
    """Daemon threads that run `_Child.run`, started on demand and reused. A thread whose
    child cannot be killed stays with it; daemon threads do not hold up the exit."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)
        if not self._idle.acquire(timeout=0):
            threading.Thread(target=self._work, name="vdsmconn-spawn", daemon=True).start()

    def _work(self) -> None:
        while True:
            self._jobs.get()()
            self._idle.release()


_SPAWNER = _Spawner()


# --- masking -------------------------------------------------------------------------------


def _mask_pairs(item: str) -> str:
    """`a=1,password=x` -> `a=1,password=********`; `--token=x` -> `--token=********`."""
    if "=" not in item:
        return item
    parts = []
    for part in item.split(","):
        name, sep, _ = part.partition("=")
        if sep and is_secret_name(name.lstrip("-")):
            part = f"{name}={MASK}"
        parts.append(part)
    return ",".join(parts)


def _secret_follows(prev: str, before_prev: str) -> bool:
    """Whether the item after `prev` is a secret value (`--password X`, `-n x.auth -v X`)."""
    if prev.startswith("--") and "=" not in prev and is_secret_name(prev[2:]):
        return True
    return prev == "-v" and is_secret_name(before_prev)


def mask_argv(argv: Sequence[Arg]) -> tuple[str, ...]:
    """The argv as it may be shown: every secret item or value replaced by the mask."""
    shown: list[str] = []
    for i, item in enumerate(argv):
        prev = str(argv[i - 1]) if i >= 1 else ""
        before_prev = str(argv[i - 2]) if i >= 2 else ""
        if isinstance(item, Secret) or _secret_follows(prev, before_prev):
            shown.append(MASK)
        else:
            shown.append(_mask_pairs(item))
    return tuple(shown)


def secret_values(argv: Sequence[Arg]) -> list[str]:
    """The revealed values that `mask_argv` hides, longest first (for scrubbing text)."""
    values: list[str] = []
    for item, shown in zip(reveal_argv(argv), mask_argv(argv), strict=True):
        if item == shown:
            continue
        if shown == MASK:
            values.append(item)
            continue
        for part, shown_part in zip(item.split(","), shown.split(","), strict=True):
            if part != shown_part:
                values.append(part.partition("=")[2])
    return sorted((v for v in values if v), key=len, reverse=True)


def reveal_argv(argv: Sequence[Arg]) -> list[str]:
    return [item.reveal() if isinstance(item, Secret) else item for item in argv]


def scrub(text: str, secrets: Sequence[str]) -> str:
    for value in secrets:
        text = text.replace(value, MASK)
    return text


def show(argv: Sequence[str]) -> str:
    """A masked argv as one shell-like string, for messages and logs."""
    return shlex.join(argv)


def tail(text: str, limit: int = _TAIL) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def check_result(result: Result) -> Result:
    """Raise `errors.GeneralError` if the command failed, else return the result."""
    if result.rc != 0:
        raise errors.GeneralError(
            f"Command {show(result.argv)} failed with rc={result.rc}: {tail(result.stderr)}",
            {"rc": result.rc},
        )
    return result


def timeout_error(argv: Sequence[str], timeout: float) -> errors.Timeout:
    return errors.Timeout(f"Command {show(argv)} timed out after {timeout:g} s")


# --- the runner ---------------------------------------------------------------------------


class CommandRunner:
    """Runs external commands without blocking the event loop. One per daemon.

    `env` given to `run` is added to the daemon's environment, over `LC_ALL=C` (so tool output
    is in the form the parsers expect). `grace` is how long to wait for a killed process group
    to be reaped before calling it stuck.
    """

    def __init__(self, *, grace: float = DEFAULT_GRACE, audit_level: int = logging.INFO) -> None:
        self.grace = grace
        self.audit_level = audit_level
        self._reapers: set[asyncio.Task[int]] = set()

    @property
    def pending_reapers(self) -> frozenset[asyncio.Task[int]]:
        """Reaper tasks of killed processes that have not exited yet."""
        return frozenset(self._reapers)

    async def run(
        self,
        argv: Sequence[Arg],
        *,
        timeout: float,
        input: bytes | None = None,
        check: bool = False,
        env: Mapping[str, str] | None = None,
        prepare: Callable[[], object] | None = None,
    ) -> Result:
        """`prepare` runs in the thread that starts the command, just before (creating its
        mount point, say: one hand-off for both); an `OSError` it raises is raised here as
        it was, and the command is not started."""
        if not argv:
            raise ValueError("empty argv")
        shown = mask_argv(argv)
        secrets = secret_values(argv)
        start = time.monotonic()
        child = await self._spawn(argv, shown, input, env, prepare)
        done = asyncio.wrap_future(child.done)
        try:
            async with asyncio.timeout(timeout):
                rc, out, err = await asyncio.shield(done)
        except TimeoutError:
            await self._wait_killed(child, self._kill(child, shown, start), shown)
            log.warning("TIMEOUT argv=%s deadline=%gs", show(shown), timeout)
            raise timeout_error(shown, timeout) from None
        except asyncio.CancelledError:
            self._kill(child, shown, start)
            log.warning("CANCELLED argv=%s pid=%d killed", show(shown), child.pid)
            raise
        result = Result(
            argv=shown,
            rc=rc,
            stdout=out.decode("utf-8", errors="replace"),
            stderr=scrub(err.decode("utf-8", errors="replace"), secrets),
            seconds=time.monotonic() - start,
        )
        self._audit(result)
        return check_result(result) if check else result

    async def close(self) -> None:
        """Cancel the tasks waiting for stuck processes (the processes stay where they are)."""
        reapers = list(self._reapers)
        for task in reapers:
            task.cancel()
        await asyncio.gather(*reapers, return_exceptions=True)
        self._reapers.clear()

    async def _spawn(
        self,
        argv: Sequence[Arg],
        shown: tuple[str, ...],
        input: bytes | None,
        env: Mapping[str, str] | None,
        prepare: Callable[[], object] | None,
    ) -> _Child:
        child = _Child(reveal_argv(argv), {**os.environ, "LC_ALL": "C", **(env or {})}, input,
                       prepare)
        _SPAWNER.submit(child.run)
        started = asyncio.wrap_future(child.started)
        try:
            child.pid = await asyncio.shield(started)
        except asyncio.CancelledError:  # the child may be starting: it is killed once it is
            started.add_done_callback(lambda _: self._kill_started(child, shown))
            raise
        except OSError as e:
            if e is child.unprepared:
                raise
            if isinstance(e, FileNotFoundError):
                log.warning("RUN argv=%s not found", show(shown))
                raise errors.BackendUnavailable(f"Command not found: {shown[0]}") from None
            log.warning("RUN argv=%s cannot start: %s", show(shown), e.strerror)
            raise errors.GeneralError(f"Cannot run {shown[0]}: {e.strerror}") from None
        return child

    def _kill_started(self, child: _Child, shown: tuple[str, ...]) -> None:
        if child.started.exception() is None:
            child.pid = child.started.result()
            self._kill(child, shown, time.monotonic())

    def _kill(self, child: _Child, shown: tuple[str, ...], start: float) -> asyncio.Task[int]:
        """SIGKILL the process group; the returned task (owned here) reaps the process."""
        child.killed.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        reaper = asyncio.get_running_loop().create_task(
            self._reap(child, shown, start), name=f"reap-{child.pid}"
        )
        self._reapers.add(reaper)
        reaper.add_done_callback(self._reapers.discard)
        return reaper

    async def _wait_killed(self, child: _Child, reaper: asyncio.Task[int],
                           shown: tuple[str, ...]) -> None:
        """Wait `grace` for the killed process to be reaped, else raise `StuckCommand`."""
        done, _ = await asyncio.wait({reaper}, timeout=self.grace)
        if done:
            return
        pid = child.pid
        log.error("STUCK argv=%s pid=%d did not die after SIGKILL within %gs",
                  show(shown), pid, self.grace)
        raise StuckCommand(
            f"Command {show(shown)} could not be killed (pid {pid} still running)", reaper
        )

    async def _reap(self, child: _Child, shown: tuple[str, ...], start: float) -> int:
        """The exit status once the process has exited (its spawner thread stops reading
        pipes that a descendant which left the group may still hold)."""
        rc, _, _ = await asyncio.shield(asyncio.wrap_future(child.done))
        log.log(self.audit_level, "REAPED argv=%s rc=%d secs=%.3f",
                show(shown), rc, time.monotonic() - start)
        return rc

    def _audit(self, result: Result) -> None:
        if result.rc == 0:
            log.log(self.audit_level, "RUN argv=%s rc=0 secs=%.3f",
                    show(result.argv), result.seconds)
        else:
            log.log(max(self.audit_level, logging.INFO), "RUN argv=%s rc=%d secs=%.3f err=%r",
                    show(result.argv), result.rc, result.seconds, tail(result.stderr, 200))
