"""Changes of the desired state whose callers are cancelled while the commit is pending
(a client that hung up): the change keeps its CID until the store has answered, then takes
its full effect, or is undone if the store failed. A real store; its writer is kept waiting
by another connection holding the database's write lock."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.wait import eventually as until
from vdsmconn import config, connectors, errors
from vdsmconn.clock import FakeClock
from vdsmconn.connectors.base import HostContext
from vdsmconn.host.fakerunner import FakeRunner
from vdsmconn.model import LocalSpec, State
from vdsmconn.reconcile.reconciler import Reconciler
from vdsmconn.service import Service
from vdsmconn.state.actual import ActualState
from vdsmconn.state.desired import DesiredState
from vdsmconn.state.store import Store


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    cfg = config.local(str(tmp_path))
    runner = FakeRunner()
    desired, actual = DesiredState(), ActualState()
    host = HostContext(config.host_settings(cfg), runner, state=actual.host)
    conns = connectors.build(host)
    clock = FakeClock()
    rec = Reconciler(cfg, desired, actual, conns, clock)
    store = Store(tmp_path / "state")
    await store.open()
    svc = Service(cfg, store, desired, actual, rec, conns, clock, runner)
    yield svc
    await svc.drain(30)
    await rec.close()
    await runner.close()
    await store.close()


async def cancelled_while_committing(service: Service, cid: str, spec: LocalSpec,
                                     blocker: sqlite3.Connection) -> None:
    """Start a manage, let it reach the store (kept waiting by `blocker`), cancel it."""
    blocker.execute("BEGIN IMMEDIATE")
    task = asyncio.create_task(service.manage(cid, spec))
    await asyncio.sleep(0.3)  # the writer thread is now waiting for the write lock
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.fixture
def spec(tmp_path: Path) -> LocalSpec:
    data = tmp_path / "data"
    data.mkdir()
    return LocalSpec(connection=str(data))


@pytest.fixture
def blocker(service: Service) -> Iterator[sqlite3.Connection]:
    """Another connection to the state database, to hold its write lock."""
    conn = sqlite3.connect(service.store.path, isolation_level=None)
    yield conn
    conn.close()


async def test_a_cancelled_manage_takes_full_effect_once_durable(
        service: Service, spec: LocalSpec, blocker: sqlite3.Connection,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    await cancelled_while_committing(service, "c", spec, blocker)
    assert service.desired.get("c") is not None  # applied, not yet durable
    again = asyncio.create_task(service.manage("c", spec))
    await asyncio.sleep(0.1)
    assert not again.done()  # the CID is still held by the pending change
    assert "MANAGE cid=c" not in caplog.text
    async with asyncio.timeout(30):
        await service.drain(0.1)  # gives up waiting: the change is still in flight
    assert service.desired.get("c") is not None and not again.done()
    blocker.execute("COMMIT")
    async with asyncio.timeout(30):
        assert await again == {"connectionID": "c", "key": str(spec.key)}
        await service.drain(30)  # nothing is left in flight
    assert "MANAGE cid=c" in caplog.text
    # The reconciler was told: the key is connected without anyone asking again.
    await until(lambda: (st := service.actual.get(spec.key)) is not None
                and st.state == State.CONNECTED, "the key was not connected")
    assert [row.cid for row in await service.store.load()] == ["c"]


async def test_a_cancelled_manage_the_store_refused_is_undone(
        service: Service, spec: LocalSpec, blocker: sqlite3.Connection, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    await cancelled_while_committing(service, "c", spec, blocker)
    # The writer gives up on the lock after SQLite's busy timeout (5 s).
    async with asyncio.timeout(30):
        await service.drain(30)
    blocker.execute("ROLLBACK")
    assert service.desired.get("c") is None
    assert "MANAGE cid=c" not in caplog.text
    assert service.actual.get(spec.key) is None  # nothing was connected for it
    assert await service.store.load() == []
    # The CID is free again: a new manage goes through.
    async with asyncio.timeout(30):
        await service.manage("c", spec)
    assert [row.cid for row in await service.store.load()] == ["c"]
    with pytest.raises(errors.ConnectionIdInUse):
        await service.manage("c", LocalSpec(connection=str(tmp_path)))
