"""Durable desired state (SPEC 7): SQLite in the state directory, one writer thread, group commit.

All SQLite work runs in one thread fed by a queue; nothing blocks the event loop. `commit` returns
once its ops are committed and synced (WAL, synchronous=FULL). The writer commits every call
waiting in its queue in one transaction; if that fails it commits each call alone, so a bad call
fails only itself. Connection JSON may hold secrets: no repr, log line or error message shows it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import orjson

from vdsmconn.errors import GeneralError
from vdsmconn.state.actual import Attachment

log = logging.getLogger(__name__)

DB_NAME = "vdsmconn.db"
MAX_GROUP = 256  # commit calls per transaction

# MIGRATIONS[n] takes the schema from version n to n + 1, in one transaction.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE cids (cid TEXT PRIMARY KEY, key TEXT NOT NULL,"
        " connection TEXT NOT NULL, created REAL, updated REAL)",
        "CREATE TABLE attachments (volume_id TEXT PRIMARY KEY, record TEXT NOT NULL, updated REAL)",
    ),
    (
        # Keys whose last CID is gone but whose real connection may still be up: a daemon
        # killed before the disconnect finishes it after the restart, instead of leaving it
        # behind as an unmanaged connection.
        "CREATE TABLE teardowns (key TEXT PRIMARY KEY, connection TEXT NOT NULL, updated REAL)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_PUT_ROWS = "INSERT INTO cids (cid, key, connection, created, updated) VALUES {}"
_PUT_CONFLICT = (
    " ON CONFLICT (cid) DO UPDATE SET key = excluded.key, connection = excluded.connection,"
    " updated = excluded.updated"
)
# Rows of one INSERT: 5 parameters each, within SQLite's oldest limit of 999 parameters.
PUTS_PER_STATEMENT = 128
_PUT_ATTACHMENT = (
    "INSERT INTO attachments (volume_id, record, updated) VALUES (?, ?, ?)"
    " ON CONFLICT (volume_id) DO UPDATE SET record = excluded.record, updated = excluded.updated"
)
_PUT_TEARDOWN = (
    "INSERT INTO teardowns (key, connection, updated) VALUES (?, ?, ?)"
    " ON CONFLICT (key) DO UPDATE SET connection = excluded.connection,"
    " updated = excluded.updated"
)


@dataclass(frozen=True)
class Row:
    cid: str
    key: str
    connection: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class Put:
    cid: str
    key: str
    connection: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class Delete:
    cid: str


@dataclass(frozen=True)
class PutAttachment:
    volume_id: str
    record: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class DeleteAttachment:
    volume_id: str


@dataclass(frozen=True)
class PutTeardown:
    key: str
    connection: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class DeleteTeardown:
    key: str


Op: TypeAlias = Put | Delete | PutAttachment | DeleteAttachment | PutTeardown | DeleteTeardown


@dataclass
class _Request:
    """Work for the writer thread; its outcome goes back to the caller's loop."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]

    def settle(self, result: Any = None, exc: BaseException | None = None) -> None:
        _settle_all([(self, result, exc)])

    def resolve(self, result: Any, exc: BaseException | None) -> None:
        """Set the outcome; on the caller's loop."""
        if self.future.done():  # the caller gave up waiting
            return
        if exc is None:
            self.future.set_result(result)
        else:
            self.future.set_exception(exc)


_Outcome: TypeAlias = tuple[_Request, Any, BaseException | None]


def _settle_all(outcomes: list[_Outcome]) -> None:
    """Hand outcomes to their callers' loops, one wake-up per loop: settling a commit group
    call by call cost the loop a thread hop (and the writer a wait for the GIL) per call."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
    for outcome in outcomes:
        by_loop.setdefault(outcome[0].loop, []).append(outcome)
    for loop, some in by_loop.items():
        with suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(_resolve_all, some)


def _resolve_all(outcomes: list[_Outcome]) -> None:
    for request, result, exc in outcomes:
        request.resolve(result, exc)


@dataclass
class _Commit(_Request):
    ops: tuple[Op, ...]
    then: Callable[[BaseException | None], None] | None = None

    def resolve(self, result: Any, exc: BaseException | None) -> None:
        if self.then is not None:
            try:
                self.then(exc)
            except Exception:
                log.exception("STATE commit callback failed")
        super().resolve(result, exc)


@dataclass
class _Read(_Request):
    fn: Callable[[sqlite3.Connection], Any]


class Store:
    """The state database: `open` before use, `close` at shutdown."""

    def __init__(self, state_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(state_dir) / DB_NAME
        self._clock = clock
        self._queue: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._accepting = False
        self._thread: threading.Thread | None = None
        self.commit_count = 0  # transactions committed for `commit` calls
        self._group_sizes: Counter[int] = Counter()

    @property
    def group_sizes(self) -> dict[int, int]:
        """Group transactions attempted, by the number of `commit` calls in them."""
        with self._lock:
            return dict(self._group_sizes)

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        opening = _Request(loop, loop.create_future())
        thread = threading.Thread(target=self._run, args=(opening,), name="vdsmconn-store")
        thread.daemon = True
        with self._lock:
            if self._thread is not None:
                raise GeneralError("State store is already open")
            self._accepting = True
            self._thread = thread
            thread.start()
        try:
            await opening.future
        except GeneralError:
            thread.join()  # it failed to open and settled `opening` as its last act
            with self._lock:
                self._thread = None
            raise
        log.info("STATE OPEN path=%s schema=%d", self.path, len(MIGRATIONS))

    async def load(self) -> list[Row]:
        rows: list[Row] = await self._read(_load_rows)
        return rows

    async def load_attachments(self) -> dict[str, dict[str, Any]]:
        records: dict[str, dict[str, Any]] = await self._read(_load_attachments)
        return records

    # The attachment store of managed volumes (connectors.base.AttachmentStore).

    async def attachments(self) -> dict[str, Attachment]:
        return {volume: Attachment.from_store(volume, record)
                for volume, record in (await self.load_attachments()).items()}

    async def put_attachment(self, record: Attachment) -> None:
        await self.commit([PutAttachment(record.volume_id, record.to_store())])

    async def delete_attachment(self, volume_id: str) -> None:
        await self.commit([DeleteAttachment(volume_id)])

    async def load_teardowns(self) -> dict[str, dict[str, Any]]:
        """Key -> connection of every teardown not known to be finished."""
        records: dict[str, dict[str, Any]] = await self._read(_load_teardowns)
        return records

    async def commit(self, ops: Sequence[Op],
                     then: Callable[[BaseException | None], None] | None = None) -> None:
        """Commit all `ops` or none; return once they are on disk.

        A caller cancelled while waiting does not undo the commit: it may still happen.
        `then`, if given, is called on the loop with the outcome (None, or the error this
        raises) as soon as it is known: before this returns or raises, and also when the
        caller was cancelled meanwhile.
        """
        loop = asyncio.get_running_loop()
        request = _Commit(loop, loop.create_future(), tuple(ops), then)
        if not ops:
            request.resolve(None, None)
            return
        try:
            self._submit(request)
        except GeneralError as exc:
            request.resolve(None, exc)
            raise
        await request.future

    async def close(self) -> None:
        """Finish the queued work, stop the writer thread, close the database."""
        loop = asyncio.get_running_loop()
        stop = _Request(loop, loop.create_future())
        with self._lock:
            thread = self._thread
            if thread is not None and not self._accepting and not thread.is_alive():
                self._thread = thread = None  # it stopped by itself: a failed or cancelled open
            if thread is None or not self._accepting:
                return
            self._accepting = False
            self._queue.put(stop)
        await stop.future
        thread.join()  # the thread settled `stop` as its last act
        with self._lock:
            self._thread = None
        log.info("STATE CLOSED path=%s", self.path)

    async def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        loop = asyncio.get_running_loop()
        request = _Read(loop, loop.create_future(), fn)
        self._submit(request)
        return await request.future

    def _submit(self, request: _Request) -> None:
        with self._lock:
            if not self._accepting:
                raise GeneralError("State store is not open")
            self._queue.put(request)

    # --- the writer thread ---------------------------------------------------------------------

    def _run(self, opening: _Request) -> None:
        conn: sqlite3.Connection | None = None
        stop: _Request | None = None
        failure: GeneralError | None = None
        try:
            try:
                conn = _open_db(self.path, self._clock)
            except Exception as exc:
                failure = _as_error(exc, f"Cannot open state database {self.path}")
                return
            opening.settle()
            stop = self._serve(conn)
        finally:
            self._shutdown(conn, stop)
            if failure is not None:  # settled last: `open` may start a new thread at once
                opening.settle(exc=failure)

    def _serve(self, conn: sqlite3.Connection) -> _Request:
        """Run requests in queue order until a stop request, which is returned."""
        pending: _Request | None = None
        while True:
            request = self._queue.get() if pending is None else pending
            pending = None
            if isinstance(request, _Read):
                try:
                    request.settle(request.fn(conn))
                except Exception as exc:
                    request.settle(exc=_as_error(exc, "Cannot read state"))
            elif isinstance(request, _Commit):
                group = [request]
                while len(group) < MAX_GROUP and pending is None:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(more, _Commit):
                        group.append(more)
                    else:
                        pending = more
                self._commit_group(conn, group)
            else:
                return request

    def _commit_group(self, conn: sqlite3.Connection, group: list[_Commit]) -> None:
        with self._lock:
            self._group_sizes[len(group)] += 1
        try:
            self._commit_batches(conn, [call.ops for call in group])
        except Exception as exc:
            if len(group) == 1:
                group[0].settle(exc=_as_error(exc, "Cannot save state change"))
                return
            log.warning("STATE GROUP FAILED calls=%d error=%s", len(group), _describe(exc))
            for call in group:
                try:
                    self._commit_batches(conn, [call.ops])
                except Exception as exc:
                    call.settle(exc=_as_error(exc, "Cannot save state change"))
                else:
                    call.settle()
        else:
            _settle_all([(call, None, None) for call in group])

    def _commit_batches(self, conn: sqlite3.Connection, batches: list[tuple[Op, ...]]) -> None:
        now = self._clock()
        ops = [op for batch in batches for op in batch]
        puts = [op for op in ops if isinstance(op, Put)]
        if len(puts) == len(ops) <= PUTS_PER_STATEMENT:
            # One statement is a transaction of its own: the writer lets go of the GIL once
            # for the group, where BEGIN, each insert and COMMIT each made it wait for the
            # GIL again behind the busy event loop.
            _put_many(conn, puts, now)
        else:
            with _transaction(conn):
                for op in ops:
                    _apply(conn, op, now)
        self.commit_count += 1

    def _shutdown(self, conn: sqlite3.Connection | None, stop: _Request | None) -> None:
        with self._lock:
            self._accepting = False  # from now on nothing enters the queue
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error as exc:
                log.error("STATE CLOSE FAILED error=%s", _describe(exc))
        while not self._queue.empty():  # this thread is the only reader
            request = self._queue.get_nowait()
            if isinstance(request, _Commit | _Read):
                request.settle(exc=GeneralError("State store is closed"))
            else:
                request.settle()  # another stop request
        if stop is not None:
            stop.settle()


# --- SQLite work, in the writer thread only ---------------------------------------------------


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error (a failed COMMIT included)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.error("STATE ROLLBACK FAILED error=%s", _describe(exc))


def _open_db(path: Path, clock: Callable[[], float]) -> sqlite3.Connection:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    # Created 0600 by us: SQLite gives the -wal and -shm files the database file's mode.
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    os.chmod(path, 0o600)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise GeneralError(f"State database {path} cannot use WAL (journal mode {mode})")
        conn.execute("PRAGMA synchronous=FULL")
        _migrate(conn, path, clock)
        for side in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if side.exists():
                os.chmod(side, 0o600)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)  # new directory entries survive a power loss
        finally:
            os.close(dir_fd)
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection, path: Path, clock: Callable[[], float]) -> None:
    while True:
        with _transaction(conn):
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version"
                " (version INTEGER PRIMARY KEY, applied REAL NOT NULL)"
            )
            query = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version")
            version: int = query.fetchone()[0]
            if version > len(MIGRATIONS):
                raise GeneralError(
                    f"State database {path} has schema version {version}, newer than this"
                    f" vdsmconn knows ({len(MIGRATIONS)}); refusing to start"
                )
            if version == len(MIGRATIONS):
                return
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version VALUES (?, ?)", (version + 1, clock()))
        log.info("STATE MIGRATED path=%s version=%d", path, version + 1)


def _apply(conn: sqlite3.Connection, op: Op, now: float) -> None:
    match op:
        case Put():
            _put_many(conn, [op], now)
        case Delete(cid):
            conn.execute("DELETE FROM cids WHERE cid = ?", (cid,))
        case PutAttachment(volume_id, record):
            conn.execute(_PUT_ATTACHMENT, (volume_id, _dumps(record), now))
        case DeleteAttachment(volume_id):
            conn.execute("DELETE FROM attachments WHERE volume_id = ?", (volume_id,))
        case PutTeardown(key, connection):
            conn.execute(_PUT_TEARDOWN, (key, _dumps(connection), now))
        case DeleteTeardown(key):
            conn.execute("DELETE FROM teardowns WHERE key = ?", (key,))
        case _:
            raise TypeError(f"not a store op: {type(op).__name__}")


@functools.cache
def _put_statement(rows: int) -> str:
    return _PUT_ROWS.format(", ".join(["(?, ?, ?, ?, ?)"] * rows)) + _PUT_CONFLICT


def _put_many(conn: sqlite3.Connection, puts: Sequence[Put], now: float) -> None:
    """Upsert rows in order, in one statement (a CID given twice ends as the last one)."""
    conn.execute(_put_statement(len(puts)), [
        value for put in puts for value in (put.cid, put.key, _dumps(put.connection), now, now)])


def _dumps(value: dict[str, Any]) -> str:
    """A record as JSON text. orjson takes a sixteenth of json's time, time the writer holds
    the GIL while the event loop waits for it; what orjson refuses (an integer beyond 64
    bits) takes json. A float NaN, which no record holds (requests cannot carry one), would
    be stored as null."""
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(value, allow_nan=False, separators=(",", ":"))


def _load_rows(conn: sqlite3.Connection) -> list[Row]:
    cursor = conn.execute("SELECT cid, key, connection FROM cids ORDER BY cid")
    return [Row(cid, key, json.loads(connection)) for cid, key, connection in cursor]


def _load_attachments(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    cursor = conn.execute("SELECT volume_id, record FROM attachments ORDER BY volume_id")
    return {volume_id: json.loads(record) for volume_id, record in cursor}


def _load_teardowns(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    cursor = conn.execute("SELECT key, connection FROM teardowns ORDER BY key")
    return {key: json.loads(connection) for key, connection in cursor}


def _describe(exc: BaseException) -> str:
    """An error's kind without its message: a message may quote a value, a value a secret."""
    name = getattr(exc, "sqlite_errorname", None)
    return name if isinstance(name, str) else type(exc).__name__


def _as_error(exc: BaseException, what: str) -> GeneralError:
    if isinstance(exc, GeneralError):
        return exc
    log.error("STATE ERROR %s: %s", what, _describe(exc))
    return GeneralError(f"{what} ({_describe(exc)})")
