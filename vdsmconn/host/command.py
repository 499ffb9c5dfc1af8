"""The one async runner for every external command: deadline, group kill, secret masking.

Every command runs in its own process group (session) with stdin from /dev/null unless input
is given, stdout and stderr captured. On its deadline the whole group gets SIGKILL; a group
that is reaped within the grace period raises `errors.Timeout`, one that is not (a member in
uninterruptible sleep) raises `StuckCommand`, whose `reaped` task finishes when the process
finally exits. The runner owns those tasks; `close()` cancels them.

Secrets never leave the runner: `model.Secret` items are revealed only for exec, and items
(or comma-separated parts of items) shaped `name=value`, and the value after `--name` or after
`-n name -v`, where `is_secret_name(name)`, are shown as the mask in `Result.argv`, in log
lines and in exception messages. `Result.stderr` is scrubbed of every secret value too;
`Result.stdout` is left as the tool printed it, for parsers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Also tells when the process itself has exited: on Python 3.11 `Process.wait()` waits
    for the pipes to close too, which a descendant that left the group may hold open."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=2**16, loop=loop)
        self.exited: asyncio.Future[None] = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


@dataclass(frozen=True)
class _Child:
    proc: asyncio.subprocess.Process
    transport: asyncio.SubprocessTransport
    exited: asyncio.Future[None]


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
    ) -> Result:
        if not argv:
            raise ValueError("empty argv")
        shown = mask_argv(argv)
        secrets = secret_values(argv)
        start = time.monotonic()
        child = await self._spawn(argv, shown, input is not None, env)
        try:
            async with asyncio.timeout(timeout):
                out, err = await child.proc.communicate(input)
        except TimeoutError:
            await self._wait_killed(child, self._kill(child, shown, start), shown)
            log.warning("TIMEOUT argv=%s deadline=%gs", show(shown), timeout)
            raise timeout_error(shown, timeout) from None
        except asyncio.CancelledError:
            self._kill(child, shown, start)
            log.warning("CANCELLED argv=%s pid=%d killed", show(shown), child.proc.pid)
            raise
        rc = await child.proc.wait()  # already exited: communicate() waits for it
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
        with_input: bool,
        env: Mapping[str, str] | None,
    ) -> _Child:
        full_env = {**os.environ, "LC_ALL": "C", **(env or {})}
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.subprocess_exec(
                lambda: _Protocol(loop),
                *reveal_argv(argv),
                stdin=asyncio.subprocess.PIPE if with_input else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                env=full_env,
            )
        except FileNotFoundError:
            log.warning("RUN argv=%s not found", show(shown))
            raise errors.BackendUnavailable(f"Command not found: {shown[0]}") from None
        except OSError as e:
            log.warning("RUN argv=%s cannot start: %s", show(shown), e.strerror)
            raise errors.GeneralError(f"Cannot run {shown[0]}: {e.strerror}") from None
        return _Child(asyncio.subprocess.Process(transport, protocol, loop), transport,
                      protocol.exited)

    def _kill(self, child: _Child, shown: tuple[str, ...], start: float) -> asyncio.Task[int]:
        """SIGKILL the process group; the returned task (owned here) reaps the process."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.proc.pid, signal.SIGKILL)
        reaper = asyncio.get_running_loop().create_task(
            self._reap(child, shown, start), name=f"reap-{child.proc.pid}"
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
        pid = child.proc.pid
        log.error("STUCK argv=%s pid=%d did not die after SIGKILL within %gs",
                  show(shown), pid, self.grace)
        raise StuckCommand(
            f"Command {show(shown)} could not be killed (pid {pid} still running)", reaper
        )

    async def _reap(self, child: _Child, shown: tuple[str, ...], start: float) -> int:
        """The exit status once the process has exited; its pipes are closed then, even if a
        descendant that left the group still holds them."""
        await child.exited
        child.transport.close()
        rc = child.proc.returncode
        if rc is None:  # process_exited() is only called with the status set
            raise RuntimeError(f"pid {child.proc.pid} exited without a status")
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
