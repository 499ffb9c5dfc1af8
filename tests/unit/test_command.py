"""The command runner against real processes, and the fake runner connectors are tested with."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.wait import eventually as until
from vdsmconn import errors
from vdsmconn.host import command
from vdsmconn.host.command import CommandRunner, StuckCommand, mask_argv
from vdsmconn.host.fakerunner import FakeRunner, UnexpectedCommand
from vdsmconn.model import MASK, Secret

SECRET = "hunter2-xyzzy"


@pytest.fixture
async def runner() -> AsyncIterator[CommandRunner]:
    r = CommandRunner()
    yield r
    await r.close()


def live_members(pgid: int) -> list[int]:
    """Pids of processes in group `pgid` that are not zombies."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = stat.rpartition(")")[2].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            pids.append(int(entry.name))
    return pids


async def wait_group_gone(pgid: int) -> None:
    await until(lambda: not live_members(pgid))


# --- real processes ------------------------------------------------------------------------


async def test_true_succeeds(runner: CommandRunner) -> None:
    result = await runner.run(["true"], timeout=10)
    assert (result.argv, result.rc, result.stdout, result.stderr) == (("true",), 0, "", "")
    assert result.seconds >= 0


async def test_false_returns_rc_without_raising(runner: CommandRunner) -> None:
    result = await runner.run(["false"], timeout=10)
    assert result.rc == 1


async def test_stdout_and_stderr_are_kept_apart(runner: CommandRunner) -> None:
    result = await runner.run(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10)
    assert (result.rc, result.stdout, result.stderr) == (3, "out\n", "err\n")


async def test_check_raises_general_error_with_rc_and_stderr(runner: CommandRunner) -> None:
    with pytest.raises(errors.GeneralError) as info:
        await runner.run(["sh", "-c", "echo boom >&2; exit 3"], timeout=10, check=True)
    assert "rc=3" in info.value.message
    assert "boom" in info.value.message
    assert info.value.data == {"rc": 3}


async def test_input_is_fed_to_stdin(runner: CommandRunner) -> None:
    result = await runner.run(["cat"], timeout=10, input=b"line 1\nline 2\n")
    assert result.stdout == "line 1\nline 2\n"


async def test_stdin_is_devnull_without_input(runner: CommandRunner) -> None:
    result = await runner.run(["cat"], timeout=10)  # would hang on an open pipe or tty
    assert (result.rc, result.stdout) == (0, "")


async def test_output_is_decoded_with_replacement(runner: CommandRunner) -> None:
    result = await runner.run(["printf", "caf\\303\\251 \\377"], timeout=10)
    assert result.stdout == "café \ufffd"


async def test_env_is_added_to_the_daemon_environment_in_c_locale(runner: CommandRunner) -> None:
    result = await runner.run(["sh", "-c", 'echo "$FOO $LC_ALL $PATH"'], timeout=10,
                              env={"FOO": "bar"})
    foo, lc_all, path = result.stdout.split()
    assert (foo, lc_all, path) == ("bar", "C", os.environ["PATH"])


async def test_prepare_runs_in_the_starting_thread_just_before_the_command(
        runner: CommandRunner, tmp_path: Path) -> None:
    made = tmp_path / "a" / "b"
    threads: list[str] = []

    def prepare() -> None:
        threads.append(threading.current_thread().name)
        made.mkdir(parents=True)

    result = await runner.run(["ls", "-d", str(made)], timeout=10, prepare=prepare)
    assert (result.rc, result.stdout) == (0, f"{made}\n")
    assert threads == ["vdsmconn-spawn"]  # not the loop's


async def test_an_error_of_prepare_is_raised_as_it_was_and_nothing_runs(
        runner: CommandRunner, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    marker = tmp_path / "ran"
    with pytest.raises(NotADirectoryError):
        await runner.run(["touch", str(marker)], timeout=10,
                         prepare=lambda: os.makedirs(tmp_path / "file" / "dir"))
    assert not marker.exists()
    # A command that cannot be found is still told apart from it.
    with pytest.raises(errors.BackendUnavailable):
        await runner.run(["no-such-command-vc"], timeout=10, prepare=lambda: None)


async def test_the_child_has_no_descriptor_of_the_daemon_but_0_1_2(
        runner: CommandRunner) -> None:
    given = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(given, True)  # as one this process was given when it started
    command.close_on_exec_all()  # what the runner does before its first command
    r, w = os.pipe()  # as every descriptor the daemon opens: not inheritable
    try:
        code = ("import os\nfor fd in range(256):\n"
                "    try: os.fstat(fd)\n    except OSError: continue\n    print(fd)")
        result = await runner.run([sys.executable, "-c", code], timeout=30)
    finally:
        for fd in (given, r, w):
            os.close(fd)
    assert result.stdout.split() == ["0", "1", "2"]


async def test_the_child_has_default_signals_and_none_blocked(runner: CommandRunner) -> None:
    """Python ignores SIGPIPE and SIGXFSZ; a child gets them back at their defaults."""
    result = await runner.run(["cat", "/proc/self/status"], timeout=10)
    fields = dict(line.split(":\t", 1) for line in result.stdout.splitlines() if ":\t" in line)
    ignored, blocked = int(fields["SigIgn"], 16), int(fields["SigBlk"], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1))
    assert blocked == 0


async def test_a_path_given_in_env_is_searched(runner: CommandRunner, tmp_path: Path) -> None:
    tool = tmp_path / "vc-only-here"
    tool.write_text("#!/bin/sh\necho found\n")
    tool.chmod(0o755)
    result = await runner.run(["vc-only-here"], timeout=10,
                              env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert (result.rc, result.stdout) == (0, "found\n")
    with pytest.raises(errors.BackendUnavailable):
        await runner.run(["vc-only-here"], timeout=10)


async def test_command_runs_in_its_own_session_and_group(runner: CommandRunner) -> None:
    code = "import os; print(os.getpid(), os.getpgid(0), os.getsid(0))"
    result = await runner.run([sys.executable, "-c", code], timeout=30)
    pid, pgid, sid = map(int, result.stdout.split())
    assert pid == pgid == sid
    assert pgid != os.getpgid(0)


async def test_missing_command_is_backend_unavailable(runner: CommandRunner) -> None:
    with pytest.raises(errors.BackendUnavailable, match="no-such-tool-here"):
        await runner.run(["no-such-tool-here", "--x"], timeout=10)


async def test_timeout_kills_the_whole_process_group(
    runner: CommandRunner, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    script = (f"sleep 100 & echo $! >> {pids}; sleep 100 & echo $! >> {pids}; "
              f"echo $$ >> {pids}; wait")
    with pytest.raises(errors.Timeout) as info:
        await runner.run(["sh", "-c", script], timeout=1.0)
    assert not isinstance(info.value, errors.CommandStuck)
    assert "timed out after 1 s" in info.value.message
    first, second, shell = map(int, pids.read_text().split())
    assert {first, second} != {shell}
    await wait_group_gone(shell)
    for pid in (first, second, shell):
        assert pid not in live_members(shell)
    assert not runner.pending_reapers


async def test_cancel_kills_the_process_group(runner: CommandRunner, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    script = f"sleep 100 & echo $$ > {ready}.tmp; mv {ready}.tmp {ready}; wait"
    task = asyncio.create_task(runner.run(["sh", "-c", script], timeout=60))
    await until(ready.exists)
    shell = int(ready.read_text())
    assert len(live_members(shell)) == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.gather(*runner.pending_reapers)
    await wait_group_gone(shell)


async def test_timeout_is_not_stuck_when_an_escaped_descendant_holds_the_pipes(
    runner: CommandRunner, tmp_path: Path
) -> None:
    escaped = tmp_path / "escaped"
    script = f"setsid sleep 100 & echo $! > {escaped}; sleep 100"
    try:
        with pytest.raises(errors.Timeout) as info:
            await runner.run(["sh", "-c", script], timeout=0.5)
        assert not isinstance(info.value, errors.CommandStuck)
        assert not runner.pending_reapers
    finally:
        os.kill(int(escaped.read_text()), 9)


async def test_group_not_reaped_within_grace_is_stuck_with_reaper_task() -> None:
    runner = CommandRunner(grace=0.0)  # no time to reap: the stuck path, with a real process
    try:
        with pytest.raises(StuckCommand) as info:
            await runner.run(["sleep", "100"], timeout=0.2)
        stuck = info.value
        assert isinstance(stuck, errors.CommandStuck)
        assert stuck.code == errors.Timeout.code
        assert "sleep 100" in stuck.message
        assert stuck.reaped in runner.pending_reapers
        async with asyncio.timeout(10):
            assert await stuck.reaped == -9
        assert not runner.pending_reapers
    finally:
        await runner.close()


# --- secrets -------------------------------------------------------------------------------


def test_mask_argv_hides_every_secret_form() -> None:
    argv: list[str | Secret] = [
        "mount", "-o", f"soft,password={SECRET},user=u", "--token", SECRET, f"--auth-key={SECRET}",
        "-n", "node.session.auth.password", "-v", SECRET, "-v", "plain", Secret(SECRET), "x=1",
    ]
    assert mask_argv(argv) == (
        "mount", "-o", f"soft,password={MASK},user=u", "--token", MASK, f"--auth-key={MASK}",
        "-n", "node.session.auth.password", "-v", MASK, "-v", "plain", MASK, "x=1",
    )


async def test_secrets_never_shown_in_result_log_or_stderr(
    runner: CommandRunner, caplog: pytest.LogCaptureFixture
) -> None:
    script = 'echo "$1 $2" >&2; echo "$1"; exit 5'
    argv: list[str | Secret] = ["sh", "-c", script, "sh", Secret(SECRET), f"rw,password={SECRET}x"]
    with caplog.at_level(logging.DEBUG, logger="vdsmconn.host.command"):
        result = await runner.run(argv, timeout=10)
    assert result.rc == 5
    assert result.stdout == f"{SECRET}\n"  # the data, for parsers
    assert SECRET not in result.stderr
    assert result.stderr == f"{MASK} rw,password={MASK}\n"
    assert result.argv[-2:] == (MASK, f"rw,password={MASK}")
    assert SECRET not in repr(result.argv)
    assert "RUN argv=" in caplog.text and "rc=5" in caplog.text
    assert MASK in caplog.text
    assert SECRET not in caplog.text


async def test_secret_not_in_failure_or_timeout_messages(
    runner: CommandRunner, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="vdsmconn.host.command"):
        with pytest.raises(errors.GeneralError) as failed:
            await runner.run(["sh", "-c", 'echo "no: $0" >&2; exit 1', Secret(SECRET)],
                             timeout=10, check=True)
        with pytest.raises(errors.Timeout) as timed_out:
            await runner.run(["sh", "-c", "sleep 100", "sh", Secret(SECRET), f"key={SECRET}"],
                             timeout=0.1)
    assert "no: " + MASK in failed.value.message
    assert f"'sleep 100' sh '{MASK}' 'key={MASK}'" in timed_out.value.message
    for text in (failed.value.message, str(failed.value), timed_out.value.message,
                 caplog.text):
        assert SECRET not in text
    assert "TIMEOUT argv=" in caplog.text


# --- the fake runner -----------------------------------------------------------------------


async def test_fake_runner_records_revealed_argv_and_answers_in_order() -> None:
    fake = FakeRunner()
    fake.expect(["iscsiadm", "-m", "session"], rc=21, stderr="No active sessions.", times=1)
    fake.expect(["iscsiadm", "-m", "session"], stdout="tcp: [1] 10.0.0.1:3260,1 iqn.x")
    fake.expect(["mount"], prefix=True)
    first = await fake.run(["iscsiadm", "-m", "session"], timeout=5)
    second = await fake.run(["iscsiadm", "-m", "session"], timeout=5)
    mounted = await fake.run(["mount", "-o", f"password={SECRET}", Secret(SECRET)], timeout=7)
    assert (first.rc, first.stderr) == (21, "No active sessions.")
    assert (second.rc, second.stdout) == (0, "tcp: [1] 10.0.0.1:3260,1 iqn.x")
    assert mounted.argv == ("mount", "-o", f"password={MASK}", MASK)
    assert fake.argvs == [
        ("iscsiadm", "-m", "session"),
        ("iscsiadm", "-m", "session"),
        ("mount", "-o", f"password={SECRET}", SECRET),
    ]
    assert fake.calls[2].timeout == 7


async def test_fake_runner_simulates_timeout_and_check() -> None:
    fake = FakeRunner()
    fake.expect(["umount", "/mnt/x"], timeout=True)
    fake.expect(["umount", "/mnt/y"], rc=32, stderr="target is busy")
    with pytest.raises(errors.Timeout, match="umount /mnt/x"):
        await fake.run(["umount", "/mnt/x"], timeout=3)
    with pytest.raises(errors.GeneralError, match="target is busy"):
        await fake.run(["umount", "/mnt/y"], timeout=3, check=True)


async def test_fake_runner_rejects_unexpected_command() -> None:
    fake = FakeRunner()
    fake.expect(["mount", "a"])
    with pytest.raises(UnexpectedCommand):
        await fake.run(["mount", "a", "b"], timeout=3)
    assert fake.unexpected == [("mount", "a", "b")]


async def test_fake_stuck_reaper_finishes_on_release() -> None:
    fake = FakeRunner()
    fake.expect(["umount", "/mnt/a"], stuck=True)
    with pytest.raises(StuckCommand) as info:
        await fake.run(["umount", "/mnt/a"], timeout=3)
    await asyncio.sleep(0)
    assert not info.value.reaped.done()
    assert info.value.reaped in fake.pending_reapers
    fake.release()
    async with asyncio.timeout(5):
        assert await info.value.reaped == 0
    assert not fake.pending_reapers


async def test_close_cancels_pending_reapers() -> None:
    fake = FakeRunner()
    fake.expect(["umount", "/mnt/b"], stuck=True)
    with pytest.raises(StuckCommand) as info:
        await fake.run(["umount", "/mnt/b"], timeout=3)
    await fake.close()
    assert info.value.reaped.cancelled()
    assert not fake.pending_reapers
