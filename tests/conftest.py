"""Fixtures shared by every test, and the leak checks every test passes through."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, running
from vdsmconn.host import mountinfo

pytest_plugins = ["tests.guest.plugin"]

IS_ROOT = os.geteuid() == 0


def _children() -> set[int]:
    me = str(os.getpid())
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            found.add(int(entry))
    return found


def _mounts(under: str) -> set[tuple[int, str]]:
    return {(m.mount_id, m.mountpoint) for m in mountinfo.read()
            if m.mountpoint.startswith(under)}


def _loop_devices(under: str) -> set[str]:
    """Loop devices backed by files under `under`."""
    try:
        out = subprocess.run(["losetup", "-a", "-n", "-O", "NAME,BACK-FILE"],
                             capture_output=True, text=True, timeout=10, check=False).stdout
    except OSError:
        return set()
    return {line.split()[0] for line in out.splitlines()
            if len(line.split()) > 1 and line.split(None, 1)[1].startswith(under)}


@pytest.fixture(autouse=True)
def no_host_leaks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fail a test that leaves a child process, a mount (in this run's temporary folders,
    where every test mounts) or a loop device behind."""
    base = str(tmp_path_factory.getbasetemp()) + "/"
    children, mounts, loops = _children(), _mounts(base), _loop_devices(base)
    yield
    left = []
    if extra := _children() - children:
        left.append(f"child processes {sorted(extra)}")
    if extra_mounts := _mounts(base) - mounts:
        left.append(f"mounts {sorted(p for _, p in extra_mounts)}")
    if extra_loops := _loop_devices(base) - loops:
        left.append(f"loop devices {sorted(extra_loops)}")
    if left:
        pytest.fail("test left behind: " + "; ".join(left))


@pytest.fixture(autouse=True)
async def no_task_leaks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks running."""
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)
    current = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() - before if t is not current and not t.done()]
    for task in left:
        task.cancel()
    if left:
        pytest.fail(f"test left asyncio tasks running: {[t.get_name() for t in left]}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("root") and not IS_ROOT:
            item.add_marker(pytest.mark.skip(reason="needs root (mounts, loop devices)"))


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A running daemon; torn down with everything it mounted."""
    with running(tmp_path) as d:
        yield d


@pytest.fixture
def loop_xfs(tmp_path: Path) -> Iterator[str]:
    """A loop device with a fresh XFS file system on it."""
    image = tmp_path / "xfs.img"
    with open(image, "wb") as f:
        f.truncate(320 * 1024 * 1024)
    device = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True,
                            text=True, check=True, timeout=30).stdout.strip()
    try:
        subprocess.run(["mkfs.xfs", "-q", "-f", device], check=True, timeout=60)
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False, timeout=30)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """In CI every package is installed and every test runs as root: a skip there means a
    missing install step, so it fails instead of passing quietly."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where nothing may skip: {reason}"
