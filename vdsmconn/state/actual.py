"""Actual state: what the host shows for each key, as the supervisors observe it. Pure."""

from __future__ import annotations

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
    paths: list[dict[str, Any]] | None = None
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

    def set_state(self, key: ConnectionKey, state: State, now: float, **changes: Any) -> KeyStatus:
        """Record a state (and other fields); listeners hear of state changes and errors.

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
        for name, value in changes.items():
            setattr(status, name, value)
        if status.last_error is not None:
            status.last_failure = status.last_error
        if state in CONNECTED_STATES:
            status.last_error = None
            status.attempts = 0
        if old != state or "last_error" in changes:
            self._emit(Change(key, old, state, status, now))
        return status

    def update(self, key: ConnectionKey, **changes: Any) -> None:
        """Change fields that are not the state (no event)."""
        status = self._keys.get(key)
        if status is not None:
            for name, value in changes.items():
                setattr(status, name, value)

    def remove(self, key: ConnectionKey, now: float) -> None:
        status = self._keys.pop(key, None)
        if status is not None:
            self._emit(Change(key, status.state, None, None, now))

    def _emit(self, change: Change) -> None:
        for listener in list(self._listeners):
            listener(change)
