"""The one async runner for every external command: deadline, group kill, secret masking.

Every command runs in its own process group (session) with stdin from /dev/null unless input
is given, stdout and stderr captured. On its deadline the whole group gets SIGKILL; a group
that is reaped within the grace period raises `errors.Timeout`, one that is not (a member in
uninterruptible sleep) raises `StuckCommand`, whose `reaped` task finishes when the process
finally exits. The runner owns those tasks; `close()` cancels them. Children are started and
waited for in a few reused daemon threads (the start and the wait block; asyncio's subprocess
transport spent ~1.5 ms of loop time per child), the deadline and the kill stay on the loop.
A spawner thread starts a child with libc's posix_spawn and lets go of the GIL only where it
waits: for the child's exec, and in poll (each time it takes the GIL back it waits behind
the event loop; subprocess.Popen did so some thirty times per child).

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
import ctypes
import errno
import fcntl
import functools
import logging
import os
import queue
import select
import shlex
import shutil
import signal
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
    """One command, started and waited for in a spawner thread: the start and the wait
    block, and asyncio's subprocess transport cost the loop ~1.5 ms per child."""

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
            pid, stdin, stdout, stderr = _start(self.argv, self.env, self.input is not None)
        except BaseException as exc:
            self.started.set_exception(exc)
            return
        self.started.set_result(pid)
        try:
            out, err = self._collect(pid, stdin, stdout, stderr)
            self.done.set_result((_reaped(pid), out, err))
        except BaseException as exc:  # the pipes or the pidfd failed: still reap it
            os.waitpid(pid, 0)
            self.done.set_exception(exc)

    def _collect(self, pid: int, stdin: int | None, stdout: int,
                 stderr: int) -> tuple[bytes, bytes]:
        """stdout and stderr until the process has exited and the pipes are at their end;
        once it was killed, until it has exited (a descendant that left the group may hold
        the pipes open). Closes the three pipes. Only the poll lets go of the GIL."""
        chunks: dict[int, list[bytes]] = {stdout: [], stderr: []}
        pending = memoryview(self.input or b"")
        buffer = ctypes.create_string_buffer(65536)
        pidfd = _pidfd_open(pid)
        try:
            poll = select.poll()  # no descriptor of its own, unlike an epoll
            poll.register(pidfd, select.POLLIN)
            for fd in chunks:
                poll.register(fd, select.POLLIN)
            if stdin is not None:
                os.set_blocking(stdin, False)
                poll.register(stdin, select.POLLOUT)
            exited = False
            readers = set(chunks)
            while (readers or not exited) and not (exited and self.killed.is_set()):
                for fd, _ in poll.poll(100 if exited else None):
                    if fd == pidfd:
                        exited = True
                        poll.unregister(pidfd)
                    elif fd in chunks:
                        data = _read(fd, buffer)
                        if data is None:
                            continue
                        if data:
                            chunks[fd].append(data)
                        else:
                            readers.discard(fd)
                            poll.unregister(fd)
                    elif stdin is not None:
                        pending = _feed(stdin, pending)
                        if not pending:
                            poll.unregister(stdin)
                            _LIBC.close(stdin)
                            stdin = None
        finally:
            for fd in (pidfd, stdout, stderr) if stdin is None else (pidfd, stdin, stdout, stderr):
                _LIBC.close(fd)
        out, err = chunks.values()
        return b"".join(out), b"".join(err)


def _start(argv: list[str], env: dict[str, str],
           stdin: bool) -> tuple[int, int | None, int, int]:
    """Start `argv` in a session of its own with pipes for stdout and stderr (and stdin if
    asked; /dev/null otherwise): (pid, stdin, stdout, stderr), our ends.

    libc's posix_spawn through ctypes, which lets go of the GIL for the call: the calling
    thread waits there until the child has exec'd, which on a busy host is a scheduler slice
    or more, and os.posix_spawn (like subprocess.Popen) held the GIL all that time, stopping
    the event loop with it. The child's only descriptors are 0, 1 and 2 (every other
    descriptor of this process is close-on-exec: Python's own, PEP 446, and those it was
    given, `close_on_exec_all`). It gets SIGPIPE and SIGXFSZ (which Python ignores) back at
    their defaults, and no signal blocked, as subprocess.Popen gave it."""
    ends: list[int] = []  # the child's, closed here once it has them
    ours: list[int] = []
    actions = _FileActions()
    try:
        stdin_ours: int | None = None
        if stdin:
            child_in, stdin_ours = _pipe()
            ends.append(child_in)
            ours.append(stdin_ours)
            actions.dup2(child_in, 0)
        else:
            actions.open_null(0)
        stdout, child_out = _pipe(nonblocking=True)
        stderr, child_err = _pipe(nonblocking=True)
        ours += [stdout, stderr]
        ends += [child_out, child_err]
        actions.dup2(child_out, 1)
        actions.dup2(child_err, 2)
        executable, search = argv[0], True
        if "/" not in executable and env.get("PATH") != os.environ.get("PATH"):
            # posix_spawnp searches the daemon's PATH; a PATH of the command's own is
            # searched here.
            executable = shutil.which(executable, path=env.get("PATH")) or executable
            search = False
        pid = _spawn(executable, argv, env, actions, search)
    except BaseException:
        for fd in ours:
            _LIBC.close(fd)
        raise
    finally:
        actions.destroy()
        for fd in ends:
            _LIBC.close(fd)
    return pid, stdin_ours, stdout, stderr


# Calls that return at once keep the GIL (PyDLL): giving it up and waiting for it again
# behind a busy event loop costs far more than the call. posix_spawn lets go (CDLL).
_LIBC = ctypes.PyDLL(None, use_errno=True)
_LIBC_WAITING = ctypes.CDLL(None, use_errno=True)
_SYS_PIDFD_OPEN = 434  # the same number on every architecture Linux has


def _pipe(nonblocking: bool = False) -> tuple[int, int]:
    """A close-on-exec pipe: (read end, write end); `nonblocking`: the read end (ours: a
    read that would wait must never hold the GIL)."""
    ends = (ctypes.c_int * 2)()
    if _LIBC.pipe2(ends, os.O_CLOEXEC) != 0:
        raise _errno("pipe2")
    if nonblocking and _LIBC.fcntl(ends[0], fcntl.F_SETFL, os.O_NONBLOCK) != 0:
        error = _errno("fcntl")
        _LIBC.close(ends[0])
        _LIBC.close(ends[1])
        raise error
    return ends[0], ends[1]


def _pidfd_open(pid: int) -> int:
    fd: int = _LIBC.syscall(_SYS_PIDFD_OPEN, pid, 0)
    if fd < 0:
        raise _errno("pidfd_open")
    return fd


def _read(fd: int, buffer: ctypes.Array[ctypes.c_char]) -> bytes | None:
    """What a readable pipe holds (b"" at its end; None: nothing after all)."""
    n: int = _LIBC.read(fd, buffer, len(buffer))
    if n < 0:
        if ctypes.get_errno() in (errno.EAGAIN, errno.EINTR):
            return None
        raise _errno("read")
    return ctypes.string_at(buffer, n)


def _reaped(pid: int) -> int:
    """The exit status of `pid`, which has exited (its pidfd said so), or minus the signal
    that killed it."""
    status = ctypes.c_int()
    if _LIBC.waitpid(pid, ctypes.byref(status), os.WNOHANG) != pid:
        raise _errno("waitpid")
    return os.waitstatus_to_exitcode(status.value)


def _errno(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


# glibc's (and musl's) posix_spawnattr flags: the os module names only the file actions.
_SETSIGDEF, _SETSIGMASK, _SETSID = 0x04, 0x08, 0x80
_OPAQUE = 1024  # bytes, more than glibc's posix_spawnattr_t (336), file actions (80), sigset_t


def _ok(rc: int, what: str) -> None:
    if rc != 0:
        raise OSError(rc, f"{what}: {os.strerror(rc)}")


class _FileActions:
    """A posix_spawn_file_actions_t."""

    def __init__(self) -> None:
        self.buffer = ctypes.create_string_buffer(_OPAQUE)
        _ok(_LIBC.posix_spawn_file_actions_init(self.buffer), "posix_spawn_file_actions_init")

    def dup2(self, fd: int, target: int) -> None:
        _ok(_LIBC.posix_spawn_file_actions_adddup2(self.buffer, fd, target),
            "posix_spawn_file_actions_adddup2")

    def open_null(self, target: int) -> None:
        _ok(_LIBC.posix_spawn_file_actions_addopen(self.buffer, target, os.devnull.encode(),
                                                   os.O_RDONLY, 0),
            "posix_spawn_file_actions_addopen")

    def destroy(self) -> None:
        _LIBC.posix_spawn_file_actions_destroy(self.buffer)


@functools.cache
def _attributes() -> ctypes.Array[ctypes.c_char]:
    """The spawn attributes every child gets (made once, only read by posix_spawn)."""
    attr = ctypes.create_string_buffer(_OPAQUE)
    _ok(_LIBC.posix_spawnattr_init(attr), "posix_spawnattr_init")
    defaults, none = ctypes.create_string_buffer(_OPAQUE), ctypes.create_string_buffer(_OPAQUE)
    _LIBC.sigemptyset(defaults)
    _LIBC.sigemptyset(none)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        _LIBC.sigaddset(defaults, int(sig))
    _ok(_LIBC.posix_spawnattr_setsigdefault(attr, defaults), "posix_spawnattr_setsigdefault")
    _ok(_LIBC.posix_spawnattr_setsigmask(attr, none), "posix_spawnattr_setsigmask")
    _ok(_LIBC.posix_spawnattr_setflags(attr, ctypes.c_short(_SETSID | _SETSIGDEF | _SETSIGMASK)),
        "posix_spawnattr_setflags")
    return attr


def _strings(items: list[bytes]) -> ctypes.Array[ctypes.c_char_p]:
    return (ctypes.c_char_p * (len(items) + 1))(*items, None)


def _spawn(executable: str, argv: list[str], env: dict[str, str], actions: _FileActions,
           search: bool) -> int:
    """posix_spawn(p): the child's pid; an OSError (FileNotFoundError...) if it cannot run."""
    pid = ctypes.c_int()
    call = _LIBC_WAITING.posix_spawnp if search else _LIBC_WAITING.posix_spawn
    rc = call(ctypes.byref(pid), os.fsencode(executable), actions.buffer, _attributes(),
              _strings([os.fsencode(a) for a in argv]),
              _strings([os.fsencode(f"{k}={v}") for k, v in env.items()]))
    if rc != 0:
        raise OSError(rc, os.strerror(rc), executable)
    return pid.value


def close_on_exec_all() -> None:
    """Make every descriptor above 2 close-on-exec: those this process was given when it
    started (Python's own are from the start, PEP 446), so that no child gets them."""
    for name in os.listdir("/proc/self/fd"):
        if int(name) > 2:
            with contextlib.suppress(OSError):  # the listing's own, closed by now
                os.set_inheritable(int(name), False)


def _feed(fd: int, pending: memoryview) -> memoryview:
    """Write what stdin takes of `pending` (all of it is dropped once nobody reads)."""
    try:
        return pending[os.write(fd, pending):] if pending else pending
    except BlockingIOError:
        return pending
    except BrokenPipeError:
        return pending[:0]


class _Spawner:
    """Daemon threads that run `_Child.run`, started on demand and reused. A thread whose
    child cannot be killed stays with it; daemon threads do not hold up the exit."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._first = True

    def submit(self, job: Callable[[], None]) -> None:
        if self._first:
            self._first = False
            close_on_exec_all()
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
