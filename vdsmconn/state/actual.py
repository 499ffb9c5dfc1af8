"""Actual state: what the host shows for each key, as the supervisors observe it. Pure."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vdsmconn.model import ConnectionKey, State

CONNECTED_STATES = (State.CONNECTED, State.DEGRADED)


@dataclass(frozen=True)
class ErrorInfo:
    code: int
    message: str
    time: float

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "time": self.time}


UP, DOWN = "up", "down"  # states of one path


@dataclass(frozen=True)
class PathStatus:
    """One path of a block connection (an iSCSI session through one iface), as the status
    shows it (`paths` entries)."""

    iface: str
    netdev: str | None
    state: str = DOWN
    last_error: ErrorInfo | None = None
    session: int | None = None
    devices: tuple[str, ...] = ()  # /dev/sdX

    @property
    def up(self) -> bool:
        return self.state == UP

    def to_wire(self) -> dict[str, Any]:
        return {"iface": self.iface, "netdev": self.netdev, "state": self.state,
                "lastError": self.last_error.to_wire() if self.last_error else None,
                "session": self.session, "devices": list(self.devices)}


@dataclass(frozen=True)
class ForeignMount:
    """A mount (or a localfs link, `vfs_type` None) under the mount root that no key owns."""

    type: str
    connection: str
    path: str
    vfs_type: str | None = None

    def to_wire(self) -> dict[str, Any]:
        shown = {"type": self.type, "connection": self.connection}
        if self.vfs_type is not None:
            shown["vfs_type"] = self.vfs_type
        return shown


class Unset(enum.Enum):
    """A keyword not given: the field keeps its value."""

    UNSET = 0


UNSET = Unset.UNSET


@dataclass
class KeyStatus:
    key: ConnectionKey
    state: State
    since: float
    last_error: ErrorInfo | None = None  # None while connected
    last_failure: ErrorInfo | None = None  # the last error, kept after recovery
    attempts: int = 0  # since the last success
    next_retry: float | None = None
    path: str | None = None
    paths: tuple[PathStatus, ...] | None = None
    last_check: float | None = None

    @property
    def connected(self) -> bool:
        return self.state in CONNECTED_STATES


@dataclass(frozen=True)
class Change:
    key: ConnectionKey
    old: State | None
    new: State | None  # None: the key is gone
    status: KeyStatus | None
    time: float


Listener = Callable[[Change], None]


@dataclass
class ActualState:
    _keys: dict[ConnectionKey, KeyStatus] = field(default_factory=dict)
    _listeners: list[Listener] = field(default_factory=list)

    def get(self, key: ConnectionKey) -> KeyStatus | None:
        return self._keys.get(key)

    def items(self) -> list[tuple[ConnectionKey, KeyStatus]]:
        return list(self._keys.items())

    def listen(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def set_state(
        self, key: ConnectionKey, state: State, now: float, *,
        last_error: ErrorInfo | Unset | None = UNSET, attempts: int | Unset = UNSET,
        next_retry: float | Unset | None = UNSET, path: str | Unset | None = UNSET,
        paths: tuple[PathStatus, ...] | Unset | None = UNSET,
        last_check: float | Unset | None = UNSET,
    ) -> KeyStatus:
        """Record a state (and the fields given); listeners hear of state changes and errors.

        A connected key has no current error (the last one stays as `last_failure`) and
        no attempts since its last success."""
        status = self._keys.get(key)
        old = status.state if status else None
        if status is None:
            status = KeyStatus(key=key, state=state, since=now)
            self._keys[key] = status
        elif status.state != state:
            status.state = state
            status.since = now
        if not isinstance(last_error, Unset):
            status.last_error = last_error
        if not isinstance(attempts, Unset):
            status.attempts = attempts
        if not isinstance(next_retry, Unset):
            status.next_retry = next_retry
        if not isinstance(path, Unset):
            status.path = path
        if not isinstance(paths, Unset):
            status.paths = paths
        if not isinstance(last_check, Unset):
            status.last_check = last_check
        if status.last_error is not None:
            status.last_failure = status.last_error
        if state in CONNECTED_STATES:
            status.last_error = None
            status.attempts = 0
        if old != state or not isinstance(last_error, Unset):
            self._emit(Change(key, old, state, status, now))
        return status

    def set_next_retry(self, key: ConnectionKey, when: float | None) -> None:
        """When the next attempt is due (None: none is waiting); no event."""
        status = self._keys.get(key)
        if status is not None:
            status.next_retry = when

    def remove(self, key: ConnectionKey, now: float) -> None:
        status = self._keys.pop(key, None)
        if status is not None:
            self._emit(Change(key, status.state, None, None, now))

    def _emit(self, change: Change) -> None:
        for listener in list(self._listeners):
            listener(change)
