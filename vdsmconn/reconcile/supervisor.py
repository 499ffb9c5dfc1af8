"""One supervisor per key: the only place operations on a real connection start.

A supervisor runs one operation at a time (connect, probe, disconnect). Requests that come
in meanwhile only set its wake flag; when the running operation ends the supervisor looks at
the desired state again, so nothing runs in parallel and nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from vdsmconn import errors
from vdsmconn.clock import Clock
from vdsmconn.config import Config
from vdsmconn.connectors.base import Connected, Connector
from vdsmconn.host.command import StuckCommand
from vdsmconn.model import ConnectionKey, ConnectionSpec, MountSpec, State
from vdsmconn.reconcile.backoff import Backoff
from vdsmconn.reconcile.limits import Limits
from vdsmconn.reconcile.sweep import Sweep
from vdsmconn.state.actual import (
    UNSET,
    ActualState,
    ErrorInfo,
    KeyStatus,
    PathStatus,
    Unset,
)
from vdsmconn.state.desired import DesiredState

log = logging.getLogger(__name__)

# Probe intervals (plus one probe timeout: a check that hangs is given up on by then)
# without a sweep check before a supervisor probes its key itself.
SWEEP_GRACE = 3


class Owner(Protocol):
    """What a supervisor needs of the reconciler that owns it."""

    @property
    def config(self) -> Config: ...
    @property
    def desired(self) -> DesiredState: ...
    @property
    def actual(self) -> ActualState: ...
    @property
    def connectors(self) -> Mapping[str, Connector[Any]]: ...
    @property
    def clock(self) -> Clock: ...
    @property
    def limits(self) -> Limits: ...
    @property
    def sweep(self) -> Sweep: ...
    @property
    def on_torn_down(self) -> Callable[[ConnectionKey], Awaitable[None]] | None: ...

    async def refresh_mounts(self, notify: bool = True) -> bool: ...

    def connected(self, key: ConnectionKey) -> None: ...

    def forget(self, sup: Supervisor) -> None: ...


class Supervisor:
    def __init__(self, key: ConnectionKey, rec: Owner, adopt: bool) -> None:
        self.key = key
        self.rec = rec
        self.adopt = adopt
        self.wake = asyncio.Event()
        sup = rec.config.supervisor
        self.backoff = Backoff(sup.backoff_initial, sup.backoff_max)
        # Recoveries of a connection that connects but keeps failing its probe (a server that
        # hangs again at once) back off too; a probe that passes resets this.
        self.recoveries = Backoff(sup.backoff_initial, sup.backoff_max)
        self.suspect = False  # an event says the connection may be gone: check it now

    def kick(self, suspect: bool = False) -> None:
        self.suspect = self.suspect or suspect
        self.wake.set()

    # --- helpers -----------------------------------------------------------------------

    @property
    def spec(self) -> ConnectionSpec | None:
        """What is (or may be) up on the host for this key (kept in the actual state)."""
        return self.rec.actual.spec_on_host(self.key)

    @spec.setter
    def spec(self, spec: ConnectionSpec | None) -> None:
        self.rec.actual.set_spec_on_host(self.key, spec)

    @property
    def status(self) -> KeyStatus | None:
        return self.rec.actual.get(self.key)

    def _connector(self, spec: ConnectionSpec) -> Connector[Any]:
        return self.rec.connectors[spec.TYPE]

    def _set(
        self, state: State, *, last_error: ErrorInfo | Unset | None = UNSET,
        attempts: int | Unset = UNSET, next_retry: float | Unset | None = UNSET,
        last_check: float | Unset | None = UNSET, found: Connected | None = None,
        paths: tuple[PathStatus, ...] | Unset | None = UNSET,
    ) -> None:
        """Record `state` and the fields given; `found`: what a connect or adoption found
        (its path and paths, and no retry pending)."""
        old = self.status
        now = self.rec.clock.time()
        if old is None or old.state != state:
            code = last_error.code if isinstance(last_error, ErrorInfo) else None
            log.info(
                "STATE key=%s %s->%s%s", self.key, old.state if old else "none", state,
                f" code={code}" if code else "",
            )
        path: str | Unset | None = UNSET
        if found is not None:
            path, paths, next_retry = found.path, found.paths, None
        self.rec.actual.set_state(self.key, state, now, last_error=last_error,
                                  attempts=attempts, next_retry=next_retry, path=path,
                                  paths=paths, last_check=last_check)

    def _error(self, e: errors.Error) -> ErrorInfo:
        return ErrorInfo(e.code, e.message, self.rec.clock.time())

    async def _pause(self, seconds: float) -> bool:
        """Sleep, cut short by a kick; True if a kick ended it."""
        if self.wake.is_set():
            self.wake.clear()
            return True
        await self.rec.clock.sleep_or(seconds, self.wake)
        woken = self.wake.is_set()
        self.wake.clear()
        return woken

    async def _fail(self, state: State, e: errors.Error) -> None:
        """Record a failure and wait out the backoff (a kick cuts it short)."""
        if isinstance(e, StuckCommand):
            self._set(State.STUCK, last_error=self._error(e), next_retry=None)
            log.warning("STUCK key=%s waiting for a command that will not die", self.key)
            await e.reaped
        delay = self.backoff.next_delay()
        self._set(state, last_error=self._error(e), next_retry=self.rec.clock.time() + delay)
        await self._pause(delay)
        self.rec.actual.set_next_retry(self.key, None)

    # --- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            desired = self.rec.desired.spec_of(self.key)
            if desired is None and self.rec.desired.held(self.key):
                # Its last CID is going, not yet durably: the change kicks us when it is.
                await self._pause(self.rec.config.supervisor.probe_interval)
                continue
            if desired is None:
                gone = self.spec is None or await self._teardown(self.spec)
                # No await between this check and leaving the table: a kick that comes
                # after it starts a new supervisor.
                if gone and self.rec.desired.spec_of(self.key) is None:
                    self.rec.actual.remove(self.key, self.rec.clock.time())
                    self.rec.forget(self)
                    return
                continue
            if self.spec is not None and self.spec != desired:
                log.info("UPDATE key=%s parameters changed, reconnecting", self.key)
                if not await self._teardown(self.spec):
                    continue
            status = self.status
            if status is None or status.state not in (State.CONNECTED, State.DEGRADED):
                await self._bring_up(desired)
            else:
                await self._watch(desired)

    async def _bring_up(self, spec: ConnectionSpec) -> None:
        connector = self._connector(spec)
        self.spec = spec
        if self.adopt:
            self.adopt = False
            found = connector.present(spec)
            if found is not None:
                self._set(State.UNCERTAIN, found=found)
                log.info("ADOPT key=%s path=%s", self.key, found.path)
                await self._check(spec)
                return
        status = self.status
        attempts = status.attempts + 1 if status else 1  # 0 once connected
        self._set(State.CONNECTING, attempts=attempts)
        try:
            async with self.rec.limits.slot(spec):
                found = await connector.connect(spec)
            # Waiting for the kernel (an iSCSI LUN scan) holds no slot.
            found = await connector.settle(spec, found)
        except errors.Error as e:
            log.warning("CONNECT key=%s failed code=%s: %s", self.key, e.code, e.message)
            await self._fail(State.FAILED, e)
            return
        self.backoff.reset()
        self._set(State.DEGRADED if found.degraded else State.CONNECTED,
                  last_check=self.rec.clock.time(), found=found)
        self.rec.connected(self.key)

    async def _watch(self, spec: ConnectionSpec) -> None:
        """Connected: wait for the probe interval or an event, then check. A key whose probe
        is one blocking check is probed by the sweep meanwhile, and checked here only when
        that fails or an event says so."""
        interval = self.rec.config.supervisor.probe_interval
        check = self._connector(spec).quick_check(spec)
        if check is not None:
            status = self.status
            last = status.last_check if status and status.last_check else self.rec.clock.time()
            ticket = self.rec.sweep.enlist(self, check, last + interval)
            grace = SWEEP_GRACE * interval + check.timeout
            try:
                # A look every few intervals: should the sweep ever stall, the key is
                # probed here as if there were none.
                woken = await self._pause(grace)
            finally:
                ticket.cancel()
            # One operation at a time: a check of the sweep still out ends first.
            await check.probes.idle(check.target, check.timeout)
            status = self.status
            if not woken and status is not None and status.last_check is not None and \
                    self.rec.clock.time() - status.last_check < grace:
                return  # the sweep probed it meanwhile: enlist again
            if not woken:
                log.warning("PROBE key=%s not checked by the sweep for %g s; probing here",
                            self.key, grace)
        else:
            woken = await self._pause(interval)
        if self.rec.desired.spec_of(self.key) != spec or (woken and not self.suspect):
            return
        fresh, self.suspect = self.suspect, False
        await self._check(spec, fresh)

    async def _check(self, spec: ConnectionSpec, fresh: bool = False) -> None:
        """Probe; `fresh`: an event just showed the host without it (no second look)."""
        connector = self._connector(spec)
        if connector.present(spec) is None and (
                fresh or (await self.rec.refresh_mounts(notify=False)
                          and connector.present(spec) is None)):
            # Gone: nothing to tear down; the loop brings it up again at once.
            gone = errors.MountError if isinstance(spec, MountSpec) else errors.ConnectError
            e = gone(f"{self.key} disappeared from the host")
            log.warning("PROBE key=%s failed code=%s: %s", self.key, e.code, e.message)
            self._set(State.FAILED, last_error=self._error(e), last_check=self.rec.clock.time())
            return
        try:
            await connector.probe(spec)
        except errors.Error as e:
            state = State.STUCK if isinstance(e, errors.MountHung) else State.FAILED
            log.warning("PROBE key=%s failed code=%s: %s", self.key, e.code, e.message)
            found = connector.present(spec)  # which paths the probe found down
            self._set(state, last_error=self._error(e), last_check=self.rec.clock.time(),
                      paths=found.paths if found is not None and found.paths else UNSET)
            await self._recover(spec)
            return
        self.recoveries.reset()
        found = connector.present(spec)
        if found is not None and found.paths is not None:  # paths may go down and come back
            self._set(State.DEGRADED if found.degraded else State.CONNECTED,
                      last_check=self.rec.clock.time(), found=found)
            return
        status = self.status
        state = status.state if status and status.state != State.UNCERTAIN else State.CONNECTED
        self._set(state, last_check=self.rec.clock.time())

    def probed(self, now: float) -> None:
        """The sweep's check of this key passed."""
        self.recoveries.reset()
        status = self.status
        if status is not None and status.connected:
            self._set(status.state, last_check=now)

    async def _recover(self, spec: ConnectionSpec) -> None:
        """Tear a broken connection down by force; the loop then brings it up again: at once
        the first time, after a growing pause when it keeps breaking right after."""
        try:
            async with self.rec.limits.slot(spec):
                await self._connector(spec).disconnect(spec, force=True)
        except errors.Error as e:
            log.warning("RECOVER key=%s disconnect failed: %s", self.key, e.message)
            await self._fail(State.FAILED, e)
            return
        if self.recoveries.failures:
            delay = self.recoveries.next_delay()
            self.rec.actual.set_next_retry(self.key, self.rec.clock.time() + delay)
            await self._pause(delay)
            self.rec.actual.set_next_retry(self.key, None)
        else:
            self.recoveries.next_delay()

    async def _teardown(self, spec: ConnectionSpec) -> bool:
        """Disconnect; True when it is gone, False after a failure (and its backoff)."""
        self._set(State.DISCONNECTING, next_retry=None)
        try:
            async with self.rec.limits.slot(spec):
                await self._connector(spec).disconnect(spec)
        except errors.Error as e:
            log.warning("DISCONNECT key=%s failed code=%s: %s", self.key, e.code, e.message)
            await self._fail(State.DISCONNECTING, e)
            return False
        log.info("DISCONNECTED key=%s", self.key)
        self.spec = None
        if self.rec.on_torn_down is not None and self.rec.desired.refs(self.key) == 0:
            try:
                await self.rec.on_torn_down(self.key)
            except errors.Error as e:  # kept on disk: the next start disconnects again
                log.warning("TEARDOWN key=%s record not cleared: %s", self.key, e.message)
        self.backoff.reset()
        if self.rec.desired.refs(self.key) == 0:
            self.rec.actual.remove(self.key, self.rec.clock.time())
        # else an update in place: the key stays listed while it comes up again
        return True

