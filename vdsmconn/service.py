"""The verbs' logic, independent of the wire: desired state changes made durable, statuses.

A change is checked and applied to the desired state in memory, written to the store (group
commit), undone if the write fails, and only then handed to the reconciler and acknowledged.
Changes to one CID are serialized by a per-CID lock; different CIDs proceed concurrently.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

from vdsmconn import __version__, errors
from vdsmconn.cidlocks import CidLocks
from vdsmconn.clock import Clock
from vdsmconn.config import Config
from vdsmconn.connectors import iscsi_discovery, localfs, mount
from vdsmconn.connectors.base import Connector, StepLog
from vdsmconn.connectors.iscsi import IscsiConnector
from vdsmconn.connectors.managed import ManagedConnector
from vdsmconn.host import scope
from vdsmconn.host.command import CommandRunner
from vdsmconn.host.iscsi_parse import Target
from vdsmconn.inventory import Inventory
from vdsmconn.model import (
    ConnectionKey,
    ConnectionSpec,
    IscsiSpec,
    LocalSpec,
    MountSpec,
    Secret,
    State,
)
from vdsmconn.reconcile.reconciler import Reconciler
from vdsmconn.state.actual import CONNECTED_STATES, ActualState, Change
from vdsmconn.state.desired import DesiredState, Entry
from vdsmconn.state.store import Delete, DeleteTeardown, Op, Put, PutTeardown, Store
from vdsmconn.status import (
    ForeignSession,
    StateEvent,
    StatusView,
    foreign_mount_view,
    foreign_session_view,
    key_view,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
K = TypeVar("K", str, ConnectionKey)
BACKENDS_TTL = 10.0  # seconds getHostInfo may show a backend's availability unchanged


@dataclasses.dataclass
class _Change:
    """A change of the desired state made in memory, to be made durable."""

    ops: list[Op]
    done: Callable[[], None]  # once it is durable: log it, wake whom it concerns
    undo: Callable[[], object]  # the store failed: memory back to how it was
    held: Sequence[ConnectionKey] = ()  # keys it may leave without a CID


class Service:
    def __init__(
        self, config: Config, store: Store, desired: DesiredState, actual: ActualState,
        reconciler: Reconciler, connectors: dict[str, Connector[Any]], clock: Clock,
        runner: CommandRunner,
    ) -> None:
        self.config = config
        self.store = store
        self.desired = desired
        self.actual = actual
        self.reconciler = reconciler
        self.connectors = connectors
        self.clock = clock
        self.inventory = Inventory(config, desired, actual, connectors, runner)
        self.started = clock.time()
        self._locks = CidLocks()
        # When the backends were looked at, why each cannot work here (None: it can), and
        # whether FUSE helpers get scopes.
        self._backends_cache: tuple[float, dict[str, str | None], dict[str, Any]] | None = None
        # Set and replaced on every desired or actual change that someone waits for.
        self._changed = asyncio.Event()
        self._watched = False  # someone took `_changed` to wait for it
        self._in_flight = 0  # changes made in memory and not yet settled
        self._drained: asyncio.Future[None] | None = None  # set when none is left (drain)
        # CIDs whose going left a key without any, for its events until it is gone.
        self._departed: dict[ConnectionKey, list[str]] = {}
        actual.listen(self._on_change)
        reconciler.on_torn_down = self.torn_down

    def _next_change(self) -> asyncio.Event:
        """The event set at the next change."""
        self._watched = True
        return self._changed

    def _on_change(self, change: Change | None = None) -> None:
        if self._watched:
            self._changed.set()
            self._changed = asyncio.Event()
            self._watched = False
        if change is not None and change.new is None and change.key in self._departed:
            # Every listener hears of this change before the next turn of the loop.
            asyncio.get_running_loop().call_soon(self._departed.pop, change.key, None)

    def _left(self, cid: str, key: ConnectionKey) -> None:
        """`cid` no longer refers to `key` (durably)."""
        if not self.desired.refs(key):
            self._departed.setdefault(key, []).append(cid)

    def cids_of(self, key: ConnectionKey) -> list[str]:
        """The CIDs of `key`, or those that went with its last reference."""
        return self.desired.cids_of(key) or sorted(self._departed.get(key, ()))

    # --- changes -------------------------------------------------------------------------

    async def _change(self, cids: list[str], make: Callable[[], _Change | None]) -> None:
        """Make one change of the desired state durable, whatever happens to the caller.

        With `cids` held, `make` checks the change (raising the client's error) and applies
        it in memory, or returns None when there is nothing to change. Its commit is settled
        in a callback on the loop, which undoes the change if the store failed, else gives
        it its effects, and then lets the CIDs go: a client that hangs up (its request is
        cancelled) leaves neither memory and disk apart nor a change without its effects.
        """
        held = await self._locks.acquire(cids)
        try:
            change = make()
        except BaseException:
            self._locks.release(held)
            raise
        if change is None:
            self._locks.release(held)
            return
        self._in_flight += 1
        # The keys the change may leave without a CID are held until it is durable: their
        # supervisors must not tear them down for a change that may still be undone.
        self.desired.hold(change.held)

        def settle(exc: BaseException | None) -> None:
            try:
                if exc is not None:
                    change.undo()
                self.desired.unhold(change.held)
                if exc is None:
                    change.done()
            finally:
                self._locks.release(held)
                self._in_flight -= 1
                if not self._in_flight and self._drained is not None:
                    self._drained.set_result(None)
                    self._drained = None

        await self.store.commit(change.ops, then=settle)

    async def drain(self, timeout: float) -> None:
        """Wait for changes still in flight (their clients may be gone) before stopping."""
        if not self._in_flight:
            return
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()
        await asyncio.wait([self._drained], timeout=timeout)

    async def manage(self, cid: str, spec: ConnectionSpec) -> dict[str, str]:
        key = str(spec.key)

        def make() -> _Change | None:
            if not self.desired.check_manage(cid, spec):
                return None
            # A connected key that other CIDs already refer to has this spec and its
            # supervisor: one more reference is nothing for it to do.
            st = self.actual.get(spec.key)
            quiet = bool(self.desired.refs(spec.key) and st is not None and st.connected
                         and self.reconciler.supervises(spec.key))
            put = Put(cid, key, spec.to_store())
            # Applied first, so a concurrent manage of the same key is checked against it;
            # a supervisor seeing the extra reference early changes nothing.
            self.desired.apply_put(cid, spec)

            def done() -> None:
                log.info("MANAGE cid=%s key=%s refs=%d", cid, spec.key,
                         self.desired.refs(spec.key))
                self._departed.pop(spec.key, None)
                if not quiet:
                    self.reconciler.kick(spec.key)
                self._on_change()
            return _Change([put], done, lambda: self.desired.apply_delete(cid))

        await self._change([cid], make)
        return {"connectionID": cid, "key": key}

    async def update(self, cid: str, spec: ConnectionSpec) -> dict[str, str]:
        def make() -> _Change | None:
            old = self.desired.get(cid)
            if not self.desired.check_update(cid, spec) or old is None:
                return None
            ops: list[Op] = [Put(cid, str(spec.key), spec.to_store())]
            self.desired.apply_put(cid, spec)

            def done() -> None:
                assert old is not None
                log.info("UPDATE cid=%s key=%s->%s", cid, old.key, spec.key)
                self._departed.pop(spec.key, None)
                if old.key != spec.key:
                    self._left(cid, old.key)
                self.reconciler.kick(old.key)
                self.reconciler.kick(spec.key)
                self._on_change()
            return _Change(ops + self._teardowns([old]), done,
                           lambda: self.desired.apply_put(cid, old.spec), [old.key])

        await self._change([cid], make)
        return {"connectionID": cid, "key": str(spec.key)}

    async def unmanage(self, cid: str | None, prefix: str | None) -> dict[str, list[str]]:
        targets = [cid] if cid is not None else self.desired.with_prefix(prefix or "")
        entries: list[Entry] = []

        def make() -> _Change | None:
            if cid is not None:
                self.desired.check_unmanage(cid)
            entries.extend(e for e in (self.desired.get(c) for c in targets) if e is not None)
            if not entries:
                return None
            for entry in entries:
                self.desired.apply_delete(entry.cid)
            ops: list[Op] = [Delete(e.cid) for e in entries]

            def done() -> None:
                for entry in entries:
                    log.info("UNMANAGE cid=%s key=%s refs=%d", entry.cid, entry.key,
                             self.desired.refs(entry.key))
                    self._left(entry.cid, entry.key)
                    self.reconciler.kick(entry.key)
                self._on_change()

            def undo() -> None:
                for entry in entries:
                    self.desired.apply_put(entry.cid, entry.spec)
            return _Change(ops + self._teardowns(entries), done, undo,
                           [e.key for e in entries])

        await self._change(targets, make)
        return {"connectionIDs": [e.cid for e in entries]}

    def _teardowns(self, left: list[Entry]) -> list[Op]:
        """Records of the keys these entries left that no CID refers to any more."""
        seen: dict[ConnectionKey, ConnectionSpec] = {}
        for entry in left:
            if not self.desired.refs(entry.key):
                seen[entry.key] = entry.spec
        return [PutTeardown(str(key), spec.to_store()) for key, spec in seen.items()]

    async def torn_down(self, key: ConnectionKey) -> None:
        """The real connection of `key` is gone: its teardown record is done with."""
        await self.store.commit([DeleteTeardown(str(key))])

    # --- statuses ------------------------------------------------------------------------

    def status(self, cid: str) -> StatusView:
        entry = self.desired.get(cid)
        if entry is None:
            raise errors.ConnectionIdNotFound(f"connection ID {cid!r} is not managed",
                                              {"connectionID": cid})
        return self._status(entry.key, entry.spec)

    def _status(self, key: ConnectionKey, spec: ConnectionSpec) -> StatusView:
        return key_view(key, spec, self.actual.get(key), self.desired.refs(key),
                        self._mount_point(spec))

    async def list_status(
        self, cids: list[str] | None, prefix: str | None, include_unmanaged: bool,
    ) -> dict[str, StatusView]:
        if cids is not None:
            selected = [c for c in cids if self.desired.get(c) is not None]
        else:
            selected = sorted(e.cid for e in self.desired)
        if prefix is not None:
            selected = [c for c in selected if c.startswith(prefix)]
        by_key: dict[ConnectionKey, StatusView] = {}
        out: dict[str, StatusView] = {}
        for cid in selected:
            entry = self.desired.get(cid)
            if entry is None:
                continue
            cached = by_key.get(entry.key)
            if cached is None:
                cached = by_key[entry.key] = self.status(cid)
            out[cid] = cached
        if include_unmanaged and cids is None and prefix is None:
            for n, found in enumerate(await self.unmanaged(), start=1):
                out[f"unmanaged:{n}"] = found
        return out

    def _mount_point(self, spec: ConnectionSpec | None) -> str | None:
        """Where a file connection is (or will be) mounted; None for block connections."""
        if isinstance(spec, MountSpec | LocalSpec):
            return os.path.join(self.config.mount_root, spec.mount_name)
        return None

    def managed_paths(self) -> set[str]:
        """Mount points of managed keys and of keys still being torn down."""
        specs = [self.desired.spec_of(key) for key in self.desired.all_keys()]
        specs += [spec for _, spec in self.actual.leaving(self.desired.refs)]
        return {path for spec in specs if (path := self._mount_point(spec)) is not None}

    def _leaving(self) -> list[StatusView]:
        """Keys whose last CID went and whose teardown has not finished (a disconnect that
        failed shows here, with its error, until a retry succeeds)."""
        return [dataclasses.replace(self._status(key, spec), managed=False, refs=0)
                for key, spec in self.actual.leaving(self.desired.refs)
                if self.actual.get(key) is not None]

    async def unmanaged(self) -> list[StatusView]:
        known = self.managed_paths()
        root = self.config.mount_root
        await self.reconciler.refresh_mounts()
        found = mount.foreign_mounts(self.actual.mounts, root, known)
        found += await asyncio.to_thread(localfs.foreign_links, root, known)
        now = self.clock.time()
        return self._leaving() + self._unmanaged_sessions(now) + [
            foreign_mount_view(f, root, now) for f in found]

    def _unmanaged_sessions(self, now: float) -> list[StatusView]:
        """iSCSI sessions on the host that no managed key uses."""
        iscsi = self.connectors.get("iscsi")
        if not isinstance(iscsi, IscsiConnector):
            return []
        specs = [spec for key in self.desired.all_keys()
                 if isinstance(spec := self.desired.spec_of(key), IscsiSpec)]
        specs += [spec for _, spec in self.actual.leaving(self.desired.refs)
                  if isinstance(spec, IscsiSpec)]
        return [foreign_session_view(ForeignSession(x.address, x.port, x.tpgt, x.iqn, x.iface),
                                     x.logged_in, now)
                for x in iscsi.unmanaged(specs)]

    async def discover(self, host: str, port: int, user: str | None, password: Secret | None,
                       ipv6_enabled: bool) -> list[Target]:
        """iSCSI sendtargets discovery: `[{portal, tpgt, iqn}]`."""
        iscsi = self.connectors["iscsi"]
        if not isinstance(iscsi, IscsiConnector):
            raise errors.BackendUnavailable("the iSCSI backend is not available")
        return await iscsi_discovery.discover_send_targets(
            iscsi.adm, host, port, user, password, ipv6_enabled,
            self.config.supervisor.probe_timeout)

    async def wait(self, cids: list[str], timeout: float, until: str) -> dict[str, StatusView]:
        for cid in cids:
            self.status(cid)  # 479 for an unknown CID, before waiting

        def state(cid: str) -> State | None:
            entry = self.desired.get(cid)
            if entry is None:
                self.status(cid)  # 479: unmanaged while we waited
                return None
            st = self.actual.get(entry.key)
            return st.state if st is not None else None

        def done() -> bool:
            # Looked at on every change of any key: states only, no status views.
            states = [state(cid) for cid in cids]
            if all(s in CONNECTED_STATES for s in states):
                return True
            return until == "error" and any(s in (State.FAILED, State.STUCK) for s in states)

        try:
            async with asyncio.timeout(timeout):
                while True:
                    changed = self._next_change()
                    if done():
                        return {cid: self.status(cid) for cid in cids}
                    await changed.wait()
        except TimeoutError:
            statuses = {cid: self.status(cid) for cid in cids}
            raise errors.Timeout(
                f"not {until} within {timeout:g} s", {c: v.to_wire() for c, v in statuses.items()}
            ) from None

    async def wait_settled(self, cids: list[str], since: float, timeout: float,
                           remade: Collection[str] = ()) -> dict[str, int]:
        """Until each CID is connected (0) or has failed since `since` (its error code): "try
        once". A CID still neither at the timeout is 480; one no longer managed, 479.
        `remade`: CIDs whose connection changed in place (same key) since then: the old
        connection still up does not count, only one connected since `since`.

        A key that failed before `since` is retried now rather than after its backoff: the
        caller wants to know whether it connects today, not what went wrong earlier."""
        for key in {e.key for c in cids if (e := self.desired.get(c)) is not None}:
            st = self.actual.get(key)
            if st is not None and st.state == State.FAILED:
                self.reconciler.kick(key)

        def settled(cid: str) -> int | None:
            entry = self.desired.get(cid)
            if entry is None:
                return errors.ConnectionIdNotFound.code
            st = self.actual.get(entry.key)
            if st is None:
                return None
            if st.connected and (cid not in remade or st.since >= since):
                return 0
            for error in (st.last_error, st.last_failure):
                if error is not None and error.time >= since:
                    return error.code
            return None

        return await self._wait_codes(cids, settled, timeout)

    async def wait_torn_down(self, keys: list[ConnectionKey], since: float,
                             timeout: float) -> dict[ConnectionKey, int]:
        """Until the real connection of each key is gone (0) or its teardown has failed since
        `since` (the error code: 452, 474, 477...); 480 at the timeout. A key that a CID
        refers to (again) is not torn down: 0 at once."""

        def gone(key: ConnectionKey) -> int | None:
            st = self.actual.get(key)
            if self.desired.refs(key) or st is None:
                return 0
            error = st.last_error
            if st.state == State.DISCONNECTING and error is not None and error.time >= since:
                return error.code
            return None

        return await self._wait_codes(keys, gone, timeout)

    async def _wait_codes(self, items: list[K], code: Callable[[K], int | None],
                          timeout: float) -> dict[K, int]:
        """Wake on every change until `code` gives each item a code; Timeout's for the rest."""
        done: dict[K, int] = {}
        try:
            async with asyncio.timeout(timeout):
                while True:
                    changed = self._next_change()
                    for item in items:
                        if item not in done and (found := code(item)) is not None:
                            done[item] = found
                    if len(done) == len(set(items)):
                        return done
                    await changed.wait()
        except TimeoutError:
            return {item: done.get(item, errors.Timeout.code) for item in items}

    # --- checks and information ----------------------------------------------------------

    async def test(self, spec: ConnectionSpec, timeout: float) -> StepLog:
        # The connector's own steps say what is missing: an NFS connectivity test needs no
        # mount helper, a backend that cannot work here reports so as its first step.
        connector = self.connectors[spec.TYPE]
        try:
            async with asyncio.timeout(timeout):
                steps = await connector.test(spec, timeout)
        except TimeoutError:
            raise errors.Timeout(f"connectivity test did not finish within {timeout:g} s") \
                from None
        return steps

    async def connector_info(self, refresh: bool) -> dict[str, Any]:
        """os-brick's connector properties of this host, for arrays to export volumes to."""
        managed = self.connectors.get("managed")
        if not isinstance(managed, ManagedConnector):
            raise errors.ManagedVolumeNotSupported("managed volumes are not available")
        return await managed.connector_info(refresh)

    def host_info(self) -> dict[str, Any]:
        backends, fuse_scope = self._backends()
        counts: dict[str, int] = {str(s): 0 for s in State}
        for key in self.desired.all_keys():
            st = self.actual.get(key)
            counts[str(st.state if st else State.CONNECTING)] += 1
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(self.clock.time() - self.started, 3),
            "mountRoot": self.config.mount_root,
            "backends": {name: {"available": reason is None, "reason": reason}
                         for name, reason in backends.items()},
            "fuseScope": fuse_scope,
            "connectionIDs": len(self.desired),
            "keys": len(self.desired.all_keys()),
            "states": counts,
        }

    def _backends(self) -> tuple[dict[str, str | None], dict[str, Any]]:
        """Why each backend cannot work here (None: it can), and whether FUSE mount helpers
        get scopes: PATH lookups and stat calls, worked out at most every 10 s."""
        now = self.clock.monotonic()
        if self._backends_cache is None or now - self._backends_cache[0] > BACKENDS_TTL:
            reasons = {name: c.available() for name, c in self.connectors.items()}
            self._backends_cache = (now, reasons, scope.describe(self.config.scope_slice))
        return self._backends_cache[1], self._backends_cache[2]

    def subscribe_changes(self, listener: Callable[[StateEvent], None]) -> Callable[[], None]:
        """Call `listener` with a storageServerStateChanged event on every key change."""

        def on_change(change: Change) -> None:
            listener(StateEvent.of(change, self.cids_of(change.key)))

        return self.actual.listen(on_change)
