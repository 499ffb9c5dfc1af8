"""The state store against real SQLite in temporary directories."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from vdsmconn.errors import GeneralError
from vdsmconn.state import store as store_module
from vdsmconn.state.store import (
    DB_NAME,
    SCHEMA_VERSION,
    Delete,
    DeleteAttachment,
    Put,
    PutAttachment,
    Row,
    Store,
)

SECRET = "s3cret-chap-password"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def put(cid: str, **connection: Any) -> Put:
    return Put(cid, f"key-{cid}", {"cid": cid, **connection})


@contextmanager
def write_locked(db: Path) -> Iterator[None]:
    """Hold the database's write lock from another connection, so commits queue up."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


@pytest.fixture(autouse=True)
def no_thread_left() -> Iterator[None]:
    yield
    assert not [t for t in threading.enumerate() if t.name == "vdsmconn-store"]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(tmp_path / "state")
    await s.open()
    yield s
    await s.close()


async def reopened(state_dir: Path) -> tuple[list[Row], dict[str, dict[str, Any]]]:
    s = Store(state_dir)
    await s.open()
    try:
        return await s.load(), await s.load_attachments()
    finally:
        await s.close()


async def test_load_returns_committed_rows_after_reopen(tmp_path: Path) -> None:
    s = Store(tmp_path / "state")
    await s.open()
    await s.commit([Put("b", "nfs:server:/b", {"password": SECRET, "n": [1, 2]})])
    await s.commit([Put("a", "nfs:server:/a", {"spec": "a"})])
    await s.close()
    rows, attachments = await reopened(tmp_path / "state")
    assert rows == [
        Row("a", "nfs:server:/a", {"spec": "a"}),
        Row("b", "nfs:server:/b", {"password": SECRET, "n": [1, 2]}),
    ]
    assert attachments == {}


async def test_state_dir_and_database_files_are_private(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o755)
    (state_dir / DB_NAME).touch(mode=0o644)
    s = Store(state_dir)
    await s.open()
    try:
        await s.commit([put("a")])
        assert mode(state_dir) == 0o700
        for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"):
            assert mode(state_dir / name) == 0o600, name
    finally:
        await s.close()


async def test_missing_parents_are_created(tmp_path: Path) -> None:
    s = Store(tmp_path / "var" / "lib" / "vdsmconn")
    await s.open()
    await s.close()
    assert mode(tmp_path / "var" / "lib" / "vdsmconn") == 0o700


async def test_put_replaces_and_delete_removes(store: Store) -> None:
    await store.commit([put("a", v=1), put("b", v=1)])
    await store.commit([Put("a", "other-key", {"v": 2}), Delete("b"), Delete("missing")])
    assert await store.load() == [Row("a", "other-key", {"v": 2})]


async def test_records_keep_text_and_numbers_exactly(store: Store, tmp_path: Path) -> None:
    record = {"path": "/rhev/data-center/mnt/sérveur:_données", "n": -1, "ratio": 0.1,
              "flags": [True, None], "nested": {"emoji": "\U0001f600"}}
    big = {**record, "big": 2**70}  # beyond 64 bits
    await store.commit([Put("a", "k", record), Put("b", "k", big), PutAttachment("v", big)])
    await store.close()
    rows, attachments = await reopened(tmp_path / "state")
    assert rows == [Row("a", "k", record), Row("b", "k", big)] and attachments == {"v": big}


async def test_attachments_round_trip(store: Store, tmp_path: Path) -> None:
    await store.commit([PutAttachment("vol-1", {"path": "/dev/sdb"}), PutAttachment("vol-2", {})])
    await store.commit([PutAttachment("vol-1", {"path": "/dev/sdc"}), DeleteAttachment("vol-2")])
    assert await store.load_attachments() == {"vol-1": {"path": "/dev/sdc"}}
    await store.close()
    assert (await reopened(tmp_path / "state"))[1] == {"vol-1": {"path": "/dev/sdc"}}


async def test_ops_of_one_call_are_all_or_nothing(store: Store) -> None:
    await store.commit([put("old")])
    with pytest.raises(GeneralError):
        await store.commit([Delete("old"), put("a"), PutAttachment("v", {"bad": {1, 2}})])
    assert await store.load() == [Row("old", "key-old", {"cid": "old"})]
    assert await store.load_attachments() == {}


async def test_failed_call_fails_only_itself_in_a_group(store: Store) -> None:
    with write_locked(store.path):
        tasks = [
            asyncio.create_task(store.commit([put(f"c{i}", x={1, 2} if i == 5 else i)]))
            for i in range(16)
        ]
        await asyncio.sleep(0.1)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[5], GeneralError)
    assert [r for i, r in enumerate(results) if i != 5] == [None] * 15
    assert [row.cid for row in await store.load()] == sorted(f"c{i}" for i in range(16) if i != 5)
    assert max(store.group_sizes) > 1


async def test_a_group_of_puts_is_one_statement_and_keeps_their_order(store: Store) -> None:
    """Calls that only put are upserted by one INSERT, its own transaction: a CID put by
    two calls of the group ends as the later one; a row SQLite refuses (NOT NULL) fails
    only its own call."""
    with write_locked(store.path):
        tasks = [asyncio.create_task(store.commit([put(cid, n=n)]))
                 for n, cid in enumerate(["a", "b", "a", "c"])]
        bad = Put("bad", None, {})  # type: ignore[arg-type]
        tasks.append(asyncio.create_task(store.commit([bad])))
        tasks.append(asyncio.create_task(store.commit([put("d")])))
        await asyncio.sleep(0.1)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[:4] == [None] * 4 and results[5] is None
    assert isinstance(results[4], GeneralError)
    rows = {row.cid: row.connection for row in await store.load()}
    assert rows == {"a": {"cid": "a", "n": 2}, "b": {"cid": "b", "n": 1},
                    "c": {"cid": "c", "n": 3}, "d": {"cid": "d"}}
    assert max(store.group_sizes) > 1


async def test_concurrent_commits_share_transactions(store: Store) -> None:
    with write_locked(store.path):
        tasks = [asyncio.create_task(store.commit([put(f"c{i:02}")])) for i in range(64)]
        await asyncio.sleep(0.1)
    await asyncio.gather(*tasks)
    assert len(await store.load()) == 64
    assert store.commit_count < 64
    assert sum(size * count for size, count in store.group_sizes.items()) == 64


async def test_error_message_hides_connection_data(store: Store) -> None:
    op = Put("a", "k", {"password": SECRET, "bad": object()})
    assert SECRET not in repr(op)
    with pytest.raises(GeneralError) as caught:
        await store.commit([op])
    assert SECRET not in caught.value.message
    assert "object" not in caught.value.message


async def test_constraint_failure_is_general_error(store: Store) -> None:
    with pytest.raises(GeneralError, match="SQLITE_CONSTRAINT"):
        await store.commit([Put("a", None, {})])  # type: ignore[arg-type]
    await store.commit([put("a")])  # the writer goes on after a failure
    assert len(await store.load()) == 1


async def test_schema_version_is_recorded(store: Store) -> None:
    with sqlite3.connect(store.path) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_version")]
    assert versions == list(range(1, SCHEMA_VERSION + 1))


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    s = Store(tmp_path)
    await s.open()
    await s.close()
    with sqlite3.connect(s.path) as conn:
        conn.execute("INSERT INTO schema_version VALUES (?, 0)", (SCHEMA_VERSION + 1,))
    with pytest.raises(GeneralError, match="newer than this vdsmconn knows"):
        await s.open()
    with pytest.raises(GeneralError, match="not open"):
        await s.commit([put("a")])


async def test_failed_migration_leaves_no_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Store(tmp_path)
    await s.open()
    await s.close()
    broken = (*store_module.MIGRATIONS, ("CREATE TABLE extra (a TEXT)", "NOT SQL AT ALL"))
    monkeypatch.setattr(store_module, "MIGRATIONS", broken)
    with pytest.raises(GeneralError, match="Cannot open state database"):
        await s.open()
    with sqlite3.connect(s.path) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
        (version,) = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    assert "extra" not in tables
    assert version == SCHEMA_VERSION


async def test_close_finishes_queued_commits(tmp_path: Path) -> None:
    s = Store(tmp_path)
    await s.open()
    with write_locked(s.path):
        tasks = [asyncio.create_task(s.commit([put(f"c{i:02}")])) for i in range(50)]
        await asyncio.sleep(0.05)
        closing = asyncio.create_task(s.close())
        await asyncio.sleep(0.05)
        assert not closing.done()
    await closing
    assert all(t.done() and t.exception() is None for t in tasks)
    assert len((await reopened(tmp_path))[0]) == 50


async def test_closed_store_refuses_work(tmp_path: Path) -> None:
    s = Store(tmp_path)
    with pytest.raises(GeneralError, match="not open"):
        await s.load()
    await s.open()
    await s.close()
    await s.close()
    with pytest.raises(GeneralError, match="not open"):
        await s.commit([put("a")])


async def test_store_can_be_opened_again_after_close(tmp_path: Path) -> None:
    s = Store(tmp_path)
    await s.open()
    with pytest.raises(GeneralError, match="already open"):
        await s.open()
    await s.commit([put("a")])
    await s.close()
    await s.open()
    assert len(await s.load()) == 1
    await s.close()


async def test_empty_commit_is_a_no_op(store: Store) -> None:
    await store.commit([])
    assert store.commit_count == 0


async def test_cancelled_caller_does_not_undo_its_commit(store: Store) -> None:
    with write_locked(store.path):
        task = asyncio.create_task(store.commit([put("a")]))
        await asyncio.sleep(0.05)
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [row.cid for row in await store.load()] == ["a"]


async def test_commits_do_not_block_the_event_loop(store: Store) -> None:
    with write_locked(store.path):
        task = asyncio.create_task(store.commit([put("a")]))
        ticks = 0
        for _ in range(10):
            await asyncio.sleep(0.005)
            ticks += 1
        assert not task.done()
    await task
    assert ticks == 10


async def test_corrupt_database_is_refused(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).write_bytes(b"not a database at all, just text" * 100)
    with pytest.raises(GeneralError, match=r"Cannot open state database .*SQLITE_NOTADB"):
        await Store(tmp_path).open()
