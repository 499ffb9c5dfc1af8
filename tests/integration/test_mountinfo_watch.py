"""The mountinfo watcher wakes on real tmpfs mounts and unmounts."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from vdsmconn.host.mountinfo import Mount
from vdsmconn.monitors.mountinfo import MountinfoWatcher

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting tmpfs needs root"),
]

Tables = asyncio.Queue[list[Mount]]


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    """A mount point directory; anything left mounted there is unmounted afterwards."""
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    while os.path.ismount(path):
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.fixture
async def watched() -> AsyncIterator[tuple[MountinfoWatcher, Tables]]:
    """A running watcher whose tables arrive in a queue; cancelled and awaited afterwards."""
    watcher = MountinfoWatcher()
    tables: Tables = asyncio.Queue()
    task = asyncio.create_task(watcher.run(tables.put_nowait))
    yield watcher, tables
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv)
    assert await proc.wait() == 0, argv


def read_again(watcher: MountinfoWatcher, reads: int) -> Callable[[], bool]:
    return lambda: watcher.reads > reads


async def next_table(tables: Tables, predicate: Callable[[list[Mount]], bool]) -> list[Mount]:
    """The first table that satisfies `predicate` (10 s: an upper bound, not a timing)."""
    async with asyncio.timeout(10):
        while True:
            table = await tables.get()
            if predicate(table):
                return table


def mounted(table: list[Mount], path: Path) -> Mount | None:
    return next((m for m in table if m.mountpoint == str(path)), None)


async def test_first_table_is_reported_at_start(
    watched: tuple[MountinfoWatcher, Tables],
) -> None:
    _, tables = watched
    async with asyncio.timeout(10):
        first = await tables.get()
    assert any(m.mountpoint == "/" for m in first)


async def test_mount_and_umount_wake_the_watcher(
    watched: tuple[MountinfoWatcher, Tables], mnt: Path
) -> None:
    watcher, tables = watched
    await next_table(tables, lambda t: mounted(t, mnt) is None)
    await run("mount", "-t", "tmpfs", "-o", "size=1m", "vdsmconn-test", str(mnt))
    table = await next_table(tables, lambda t: mounted(t, mnt) is not None)
    m = mounted(table, mnt)
    assert m is not None
    assert (m.fstype, m.source) == ("tmpfs", "vdsmconn-test")
    assert watcher.wakes >= 1
    await run("umount", str(mnt))
    await next_table(tables, lambda t: mounted(t, mnt) is None)


async def test_a_path_with_a_space_arrives_unescaped(
    watched: tuple[MountinfoWatcher, Tables], tmp_path: Path
) -> None:
    _, tables = watched
    path = tmp_path / "a b\\c"
    path.mkdir()
    await run("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path))
    try:
        await next_table(tables, lambda t: mounted(t, path) is not None)
    finally:
        await run("umount", str(path))
    await next_table(tables, lambda t: mounted(t, path) is None)


async def test_change_that_leaves_same_table_is_still_reported(mnt: Path) -> None:
    """A mount and its umount between two reads leave the table as it was; the watcher still
    reports, so whoever mounted in between learns that its mount is gone."""
    watcher = MountinfoWatcher(debounce=0.3)
    tables: Tables = asyncio.Queue()
    task = asyncio.create_task(watcher.run(tables.put_nowait))
    try:
        first = await next_table(tables, lambda t: True)
        await run("sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mnt} && umount {mnt}")
        again = await next_table(tables, lambda t: True)
        assert mounted(again, mnt) is None
        assert {m.mount_id for m in again} == {m.mount_id for m in first}
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def watcher_fds() -> list[str]:
    """This process's descriptors that are a mountinfo file or an epoll."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return sorted(link for link in links if link.endswith("/mountinfo") or "eventpoll" in link)


async def test_cancel_removes_reader_and_closes_descriptors(mnt: Path) -> None:
    before = watcher_fds()
    watcher = MountinfoWatcher()
    tables: Tables = asyncio.Queue()
    task = asyncio.create_task(watcher.run(tables.put_nowait))
    async with asyncio.timeout(10):
        await tables.get()
    assert len(watcher_fds()) == len(before) + 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert watcher_fds() == before
    reads = watcher.reads
    await run("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt))
    await run("umount", str(mnt))
    await asyncio.sleep(0.05)  # give a leftover reader a chance to fire: it must not
    assert watcher.reads == reads
    assert tables.empty()


async def test_callback_error_ends_the_watch() -> None:
    def fail(_: list[Mount]) -> None:
        raise RuntimeError("consumer broke")

    before = watcher_fds()
    with pytest.raises(RuntimeError, match="consumer broke"):
        async with asyncio.timeout(10):
            await MountinfoWatcher().run(fail)
    assert watcher_fds() == before
