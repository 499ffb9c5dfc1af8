"""slowfs (tests/fusefs/slowfs.py): a passthrough FUSE file system whose fsync answers late.
The benchmark puts the daemon's state directory and its SQLite baseline on it."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fusefs import slowfs
from vdsmconn.host import mountinfo

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts)"),
              pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")]

DELAY = 0.02


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    with slowfs(backing, mnt, DELAY):
        yield backing, mnt


def test_files_and_directories_pass_through(fs: tuple[Path, Path]) -> None:
    backing, mnt = fs
    (mnt / "d").mkdir(mode=0o700)
    (mnt / "d" / "f").write_text("hello")
    assert (backing / "d" / "f").read_text() == "hello"
    assert (backing / "d").stat().st_mode & 0o777 == 0o700
    os.rename(mnt / "d" / "f", mnt / "d" / "g")
    assert sorted(os.listdir(mnt / "d")) == ["g"]
    assert (mnt / "d" / "g").read_text() == "hello"
    os.chmod(mnt / "d" / "g", 0o600)
    os.truncate(mnt / "d" / "g", 2)
    assert (backing / "d" / "g").read_bytes() == b"he"
    assert (backing / "d" / "g").stat().st_mode & 0o777 == 0o600
    os.unlink(mnt / "d" / "g")
    os.rmdir(mnt / "d")
    assert os.listdir(backing) == []


def test_fsync_answers_after_the_delay(fs: tuple[Path, Path]) -> None:
    _, mnt = fs
    fd = os.open(mnt / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"x")
        for sync in (os.fsync, os.fdatasync):
            t0 = time.monotonic()
            sync(fd)
            assert time.monotonic() - t0 >= DELAY
        t0 = time.monotonic()
        os.pwrite(fd, b"y", 1)
        assert time.monotonic() - t0 < DELAY  # only syncs are slow
    finally:
        os.close(fd)


def test_sqlite_wal_commits_on_it(fs: tuple[Path, Path]) -> None:
    _, mnt = fs
    conn = sqlite3.connect(mnt / "db", isolation_level=None)
    try:
        assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE t (v TEXT)")
        t0 = time.monotonic()
        for i in range(5):
            conn.execute("INSERT INTO t VALUES (?)", (str(i),))
        assert time.monotonic() - t0 >= 5 * DELAY  # each commit waits for its sync
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 5
    finally:
        conn.close()


def test_leaving_unmounts_and_ends_the_server(tmp_path: Path) -> None:
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    with slowfs(backing, mnt, DELAY) as pid:
        assert str(mnt) in {m.mountpoint for m in mountinfo.read()}
    assert str(mnt) not in {m.mountpoint for m in mountinfo.read()}
    assert not os.path.exists(f"/proc/{pid}")
