"""A `CommandRunner` for connector unit tests: canned answers, every call recorded.

    fake = FakeRunner()
    fake.expect(["mount", "-t", "nfs"], prefix=True)                   # rc 0, no output
    fake.expect(["iscsiadm", "-m", "session"], rc=21, stderr="No active sessions.")
    fake.expect(["umount", "/mnt/x"], timeout=True)                     # raises errors.Timeout
    ...
    assert fake.argvs == [("mount", "-t", "nfs", "-o", "soft", "srv:/a", "/mnt/x"), ...]

An expectation matches a call whose argv equals it (or, with `prefix=True`, starts with it);
the first matching expectation in the order given answers. `times=N` uses it up after N
calls (default: it answers forever). A call nothing matches raises `UnexpectedCommand` (an
AssertionError) and is recorded in `unexpected` as well, so a test sees it even if the code
under test swallowed the exception. `stuck=True` raises `StuckCommand` whose `reaped` task
finishes when the test calls `release()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from vdsmconn.host.command import (
    Arg,
    CommandRunner,
    Result,
    StuckCommand,
    check_result,
    mask_argv,
    reveal_argv,
    show,
    timeout_error,
)


class UnexpectedCommand(AssertionError):
    """The code under test ran a command the test did not expect."""


@dataclass
class Expectation:
    argv: tuple[str, ...]
    prefix: bool = False
    rc: int = 0
    stdout: str = ""
    stderr: str = ""
    timeout: bool = False
    stuck: bool = False
    times: int | None = None

    def matches(self, argv: tuple[str, ...]) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.prefix:
            return argv[: len(self.argv)] == self.argv
        return argv == self.argv


@dataclass(frozen=True)
class Call:
    """One recorded call: the revealed argv (secrets in clear, for assertions)."""

    argv: tuple[str, ...]
    timeout: float
    input: bytes | None
    env: Mapping[str, str] | None


class FakeRunner(CommandRunner):
    """Answers `run` from expectations; never starts a process."""

    def __init__(self) -> None:
        super().__init__(grace=0.0)
        self.expectations: list[Expectation] = []
        self.calls: list[Call] = []
        self.unexpected: list[tuple[str, ...]] = []
        self._released = asyncio.Event()

    def expect(
        self,
        argv: Sequence[str],
        rc: int = 0,
        stdout: str = "",
        stderr: str = "",
        *,
        prefix: bool = False,
        timeout: bool = False,
        stuck: bool = False,
        times: int | None = None,
    ) -> Expectation:
        exp = Expectation(tuple(argv), prefix, rc, stdout, stderr, timeout, stuck, times)
        self.expectations.append(exp)
        return exp

    @property
    def argvs(self) -> list[tuple[str, ...]]:
        return [call.argv for call in self.calls]

    def release(self) -> None:
        """Let the `reaped` tasks of simulated stuck commands finish."""
        self._released.set()

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
        if prepare is not None:
            prepare()  # a test's local directory; what it raises, nothing runs after
        revealed = tuple(reveal_argv(argv))
        shown = mask_argv(argv)
        self.calls.append(Call(revealed, timeout, input, env))
        exp = next((e for e in self.expectations if e.matches(revealed)), None)
        if exp is None:
            self.unexpected.append(revealed)
            raise UnexpectedCommand(f"unexpected command: {show(shown)}")
        if exp.times is not None:
            exp.times -= 1
        await asyncio.sleep(0)  # a real command always yields to the loop
        if exp.timeout:
            raise timeout_error(shown, timeout)
        if exp.stuck:
            reaper = asyncio.get_running_loop().create_task(self._reap_when_released(exp.rc))
            self._reapers.add(reaper)
            reaper.add_done_callback(self._reapers.discard)
            raise StuckCommand(f"Command {show(shown)} could not be killed", reaper)
        result = Result(shown, exp.rc, exp.stdout, exp.stderr, 0.0)
        return check_result(result) if check else result

    async def _reap_when_released(self, rc: int) -> int:
        await self._released.wait()
        return rc
