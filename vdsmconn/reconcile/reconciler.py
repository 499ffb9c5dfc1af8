"""Drives actual state toward desired state: owns one supervisor task per key."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from vdsmconn import errors
from vdsmconn.clock import Clock
from vdsmconn.config import Config
from vdsmconn.connectors.base import Connector
from vdsmconn.connectors.mount import read_mounts
from vdsmconn.host.mountinfo import Mount
from vdsmconn.model import ConnectionKey, ConnectionSpec, State
from vdsmconn.reconcile.limits import Limits
from vdsmconn.reconcile.supervisor import Supervisor
from vdsmconn.reconcile.sweep import Sweep
from vdsmconn.state.actual import ActualState, ErrorInfo
from vdsmconn.state.desired import DesiredState

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(
        self, config: Config, desired: DesiredState, actual: ActualState,
        connectors: dict[str, Connector[Any]], clock: Clock,
    ) -> None:
        self.config = config
        self.desired = desired
        self.actual = actual
        self.connectors = connectors
        self.clock = clock
        # Connects, disconnects and recoveries run in a slot of their server's bucket and a
        # host-wide one: a start-up with a thousand keys does not fork a thousand mounts,
        # and keys on a dead server cannot take the slots of the others.
        sup = config.supervisor
        self.limits = Limits(sup.max_operations, sup.max_operations_per_server)
        # The periodic probes of connected keys whose probe is one check, in rounds.
        self.sweep = Sweep(clock, sup.probe_interval)
        self._supervisors: dict[ConnectionKey, Supervisor] = {}
        self._unseen: set[ConnectionKey] = set()  # connected since the last table read
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        # Told when a key's real connection is gone (the service drops its teardown record).
        self.on_torn_down: Callable[[ConnectionKey], Awaitable[None]] | None = None

    def start(
        self, mounts: dict[str, Mount], teardowns: dict[ConnectionKey, ConnectionSpec],
    ) -> None:
        """Supervise every desired key, adopting what the host already shows, and finish
        the teardowns of keys whose last CID went before the daemon could disconnect them."""
        self.actual.set_mounts(mounts)
        for key in self.desired.all_keys():
            self._spawn(key, adopt=True)
        for key, spec in teardowns.items():
            if self.desired.refs(key) == 0:
                self._spawn(key, adopt=False, spec=spec)

    def kick(self, key: ConnectionKey, suspect: bool = False) -> None:
        """Desired state of `key` changed, or an event concerns it: look again soon
        (`suspect`: an event says its connection may have changed: check it now)."""
        sup = self._supervisors.get(key)
        if sup is None:
            self._spawn(key, adopt=False)
        else:
            sup.kick(suspect=suspect)

    def supervises(self, key: ConnectionKey) -> bool:
        return key in self._supervisors

    def on_mounts(self, mounts: dict[str, Mount]) -> None:
        """The mount table changed: wake every connected key whose mount is gone."""
        old = self.actual.mounts
        self.actual.set_mounts(mounts)
        # Only a mount that went or was replaced can take a key's connection away, and only
        # the key found at that path; most changes are mounts that came (a thousand connects
        # read the table a thousand times). A key connected since the last read may have
        # lost its mount before this one saw it.
        keys, self._unseen = self._unseen, set()
        for path, mount in old.items():
            if (now := mounts.get(path)) is not mount and now != mount and \
                    (key := self.actual.key_at(path)) is not None:
                keys.add(key)
        self._wake_vanished(keys)

    def on_devices(self) -> None:
        """A block device came or went: wake every connected key whose device is gone."""
        self._wake_vanished()

    def connected(self, key: ConnectionKey) -> None:
        """`key` connected: the next mount table read must show it, or it vanished."""
        self._unseen.add(key)

    def _wake_vanished(self, keys: Collection[ConnectionKey] | None = None) -> None:
        """Wake the connected keys (of `keys`; all by default) that the host no longer shows."""
        for key in self._supervisors if keys is None else keys:
            sup = self._supervisors.get(key)
            if sup is None:
                continue
            status = self.actual.get(key)
            spec = sup.spec
            if spec is None or status is None or not status.connected:
                continue
            if self.connectors[spec.TYPE].present(spec) is None:
                log.info("VANISHED key=%s", key)
                sup.kick(suspect=True)

    async def refresh_mounts(self, notify: bool = True) -> bool:
        """Read the mount table now (the watcher's copy may trail the host)."""
        mounts = await read_mounts()
        if notify:
            self.on_mounts(mounts)
        else:
            self.actual.set_mounts(mounts)
        return True

    def forget(self, sup: Supervisor) -> None:
        if self._supervisors.get(sup.key) is sup:
            del self._supervisors[sup.key]

    def _spawn(self, key: ConnectionKey, adopt: bool, spec: ConnectionSpec | None = None) -> None:
        if self._closing:
            return
        sup = Supervisor(key, self, adopt)
        sup.spec = spec
        self._supervisors[key] = sup
        task = asyncio.get_running_loop().create_task(self._run(sup), name=f"supervise {key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, sup: Supervisor) -> None:
        try:
            await sup.run()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # A bug, not a storage failure: keep the key visible and supervise it again.
            log.exception("supervisor of key=%s crashed", sup.key)
            self.forget(sup)
            self.actual.set_state(
                sup.key, State.FAILED, self.clock.time(),
                last_error=ErrorInfo(errors.GeneralError.code, f"internal error: {e}",
                                     self.clock.time()),
            )
            await self.clock.sleep(self.config.supervisor.backoff_max)
            if sup.key not in self._supervisors:
                self._spawn(sup.key, adopt=True)

    async def close(self) -> None:
        """Stop supervising. Connections stay as they are on the host."""
        self._closing = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.sweep.close()
        self._supervisors.clear()
