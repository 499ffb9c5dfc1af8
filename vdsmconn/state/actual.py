"""Actual state: what the host shows, as the supervisors and connectors observe it. Pure.

The one owner of host state: the status of each key (`KeyStatus`, what clients see), and
what the host shows beyond it (`HostState`): the mount table as last read, the connection
each key has (or may have) up on the host, the iSCSI sessions each key uses and the state
of their paths, and the managed volume attachments. Connectors read and write `HostState`
through their `HostContext`; the reconciler and the service read it here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vdsmconn import errors
from vdsmconn.host.mountinfo import Mount
from vdsmconn.model import ConnectionKey, ConnectionSpec, State

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
class PathPlan:
    """Which iscsiadm iface (bound to which network device) one path of a key uses."""

    iface: str
    netdev: str | None = None


@dataclass
class IscsiPath:
    """What is known of one path: its state, last error, session and disks (the status
    shows a `PathStatus` of it)."""

    iface: str
    netdev: str | None
    state: str = DOWN
    last_error: errors.Error | None = None
    error_time: float | None = None
    session: int | None = None
    devices: tuple[str, ...] = field(default_factory=tuple)
    # The session whose disk did not answer a read: the path stays down while that session
    # is the path's, until a read through it answers (a new session is a new chance).
    unanswered: int | None = None

    def fail(self, e: errors.Error, now: float) -> None:
        self.state = DOWN
        self.last_error = e
        self.error_time = now

    def not_answering(self, sid: int, e: errors.Error, now: float) -> None:
        self.fail(e, now)
        self.unanswered = sid

    def answered(self, sid: int) -> None:
        """Every disk of session `sid` answered a read."""
        if self.unanswered is not None:
            self.unanswered = None
            self.last_error = None

    def usable(self, sid: int) -> bool:
        return self.unanswered != sid

    def snapshot(self) -> PathStatus:
        error = None
        if self.last_error is not None:
            error = ErrorInfo(self.last_error.code, self.last_error.message,
                              self.error_time or 0.0)
        return PathStatus(self.iface, self.netdev, self.state, error, self.session,
                          tuple(f"/dev/{d}" for d in self.devices))


SessionRef = tuple[str, str, int, str]  # iqn, address (lower case, no brackets), port, iface


@dataclass
class IscsiState:
    """The kernel initiator's sessions as the keys use them."""

    addresses: dict[ConnectionKey, str] = field(default_factory=dict)  # portal, resolved
    plans: dict[ConnectionKey, list[PathPlan]] = field(default_factory=dict)
    paths: dict[ConnectionKey, dict[str, IscsiPath]] = field(default_factory=dict)  # by iface
    users: dict[SessionRef, set[ConnectionKey]] = field(default_factory=dict)  # who uses what
    failed_since: dict[SessionRef, float] = field(default_factory=dict)  # monotonic
    set_up: set[tuple[ConnectionKey, str]] = field(default_factory=set)  # nodes ready (iface)

    def forget(self, key: ConnectionKey) -> None:
        """`key` has no session left."""
        self.plans.pop(key, None)
        self.paths.pop(key, None)
        self.set_up = {(k, i) for k, i in self.set_up if k != key}

    def netdevs_in_use(self) -> set[str | None]:
        return {p.netdev for plans in self.plans.values() for p in plans}


@dataclass(frozen=True)
class Attachment:
    """What an os-brick attach of a managed volume did: all a detach needs to undo it.
    `connection_info` and `device_info` are os-brick's own (secrets inside: never shown)."""

    volume_id: str
    connection_info: dict[str, Any]
    device_info: dict[str, Any] | None
    path: str
    multipath: bool
    attached: float

    def to_store(self) -> dict[str, Any]:
        return {"volume_id": self.volume_id, "connection_info": self.connection_info,
                "device_info": self.device_info, "path": self.path,
                "multipath": self.multipath, "attached": self.attached}

    @classmethod
    def from_store(cls, volume_id: str, record: dict[str, Any]) -> Attachment:
        return cls(volume_id=volume_id, connection_info=record["connection_info"],
                   device_info=record.get("device_info"), path=record["path"],
                   multipath=bool(record.get("multipath")),
                   attached=float(record.get("attached") or 0.0))


@dataclass
class HostState:
    """What the host shows beyond the keys' statuses."""

    mounts: dict[str, Mount] = field(default_factory=dict)  # mount point -> mount, last read
    # What each key has (or may have) up on the host: the connection being brought up,
    # kept, or torn down (None: nothing).
    specs: dict[ConnectionKey, ConnectionSpec] = field(default_factory=dict)
    iscsi: IscsiState = field(default_factory=IscsiState)
    attachments: dict[str, Attachment] | None = None  # volume ID ->, once loaded


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
    host: HostState = field(default_factory=HostState)
    _at: dict[str, ConnectionKey] = field(default_factory=dict)  # status path -> key

    def key_at(self, path: str) -> ConnectionKey | None:
        """The key whose connection was last found at `path`."""
        return self._at.get(path)

    @property
    def mounts(self) -> dict[str, Mount]:
        """The mount table as last read."""
        return self.host.mounts

    def set_mounts(self, mounts: dict[str, Mount]) -> None:
        self.host.mounts = mounts

    def spec_on_host(self, key: ConnectionKey) -> ConnectionSpec | None:
        """The connection `key` has (or may have) up on the host."""
        return self.host.specs.get(key)

    def set_spec_on_host(self, key: ConnectionKey, spec: ConnectionSpec | None) -> None:
        if spec is None:
            self.host.specs.pop(key, None)
        else:
            self.host.specs[key] = spec

    def leaving(self, refs: Callable[[ConnectionKey], int]) -> list[
            tuple[ConnectionKey, ConnectionSpec]]:
        """Keys no CID refers to any more (`refs` of a key is 0) whose connection is still
        (or may still be) up: their teardown has not finished."""
        return [(key, spec) for key, spec in self.host.specs.items() if refs(key) == 0]

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
        if not isinstance(path, Unset) and path != status.path:
            self._unindex(status)
            status.path = path
            if path is not None:
                self._at[path] = key
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
            self._unindex(status)
            self._emit(Change(key, status.state, None, None, now))

    def _unindex(self, status: KeyStatus) -> None:
        if status.path is not None and self._at.get(status.path) == status.key:
            del self._at[status.path]

    def _emit(self, change: Change) -> None:
        for listener in list(self._listeners):
            listener(change)
