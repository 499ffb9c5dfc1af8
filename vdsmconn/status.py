"""What a client is shown of a CID or a key: typed records built by the service from the
desired and the actual state, turned into wire dicts (`to_wire`) only at the RPC edge.

The field order of `StatusView.to_wire` is the order of SPEC 5's status object; clients and
tests compare these dicts, so it does not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vdsmconn.model import ConnectionKey, ConnectionSpec, State
from vdsmconn.state.actual import Change, ErrorInfo, ForeignMount, KeyStatus, PathStatus


@dataclass(frozen=True)
class ForeignSession:
    """An iSCSI session on the host that no managed key uses."""

    address: str
    port: int
    tpgt: int | None
    iqn: str
    iface: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": "iscsi", "connection": self.address, "port": self.port,
                "tpgt": self.tpgt, "iqn": self.iqn, "ifaceName": self.iface}


Shown = ConnectionSpec | ForeignMount | ForeignSession


@dataclass(frozen=True)
class StatusView:
    """The status of one CID (or of a key no CID refers to: leaving or unmanaged)."""

    managed: bool
    connected: bool
    state: State
    key: str
    refs: int
    connection: Shown
    engine_id: str | None = None
    last_error: ErrorInfo | None = None
    last_failure: ErrorInfo | None = None
    since: float | None = None
    attempts: int = 0
    next_retry: float | None = None
    path: str | None = None
    paths: tuple[PathStatus, ...] | None = None
    last_check: float | None = None

    @property
    def failed(self) -> bool:
        return self.state in (State.FAILED, State.STUCK)

    def to_wire(self) -> dict[str, Any]:
        return {
            "managed": self.managed,
            "connected": self.connected,
            "state": str(self.state),
            "key": self.key,
            "refs": self.refs,
            "connection": self.connection.to_wire(),
            "engineID": self.engine_id,
            "lastError": self.last_error.to_wire() if self.last_error else None,
            "lastFailure": self.last_failure.to_wire() if self.last_failure else None,
            "since": self.since,
            "attempts": self.attempts,
            "nextRetry": self.next_retry,
            "path": self.path,
            "paths": [p.to_wire() for p in self.paths] if self.paths is not None else None,
            "lastCheck": self.last_check,
        }


def key_view(key: ConnectionKey, spec: ConnectionSpec, st: KeyStatus | None, refs: int,
             mount_point: str | None) -> StatusView:
    """The status of a key a CID refers to (`refs` > 0), or of one being torn down."""
    return StatusView(
        managed=True,
        connected=bool(st and st.connected),
        state=st.state if st else State.CONNECTING,
        key=str(key),
        refs=refs,
        connection=spec,
        engine_id=spec.engine_id,
        last_error=st.last_error if st else None,
        last_failure=st.last_failure if st else None,
        since=st.since if st else None,
        attempts=st.attempts if st else 0,
        next_retry=st.next_retry if st else None,
        path=(st.path if st else None) or mount_point,
        paths=st.paths if st else None,
        last_check=st.last_check if st else None,
    )


def foreign_mount_view(found: ForeignMount, mount_root: str, now: float) -> StatusView:
    """A mount or link under the mount root that no key owns: listed, never touched."""
    return StatusView(
        managed=False, connected=True, state=State.CONNECTED,
        key="file:" + found.path[len(mount_root.rstrip("/")) + 1 :], refs=0,
        connection=found, path=found.path, last_check=now,
    )


def foreign_session_view(found: ForeignSession, logged_in: bool, now: float) -> StatusView:
    """An iSCSI session that no key uses: listed, never logged out."""
    return StatusView(
        managed=False, connected=logged_in,
        state=State.CONNECTED if logged_in else State.FAILED,
        key=f"iscsi:{found.address}:{found.port},{found.tpgt},{found.iqn},{found.iface}",
        refs=0, connection=found, last_check=now,
    )


@dataclass(frozen=True)
class StateEvent:
    """A storageServerStateChanged notification: a key changed state (or went)."""

    cids: list[str]
    key: ConnectionKey
    old: State | None
    new: State | None  # None: the key is gone
    last_error: ErrorInfo | None
    time: float

    @classmethod
    def of(cls, change: Change, cids: list[str]) -> StateEvent:
        st = change.status
        return cls(cids, change.key, change.old, change.new, st.last_error if st else None,
                   change.time)

    def to_wire(self) -> dict[str, Any]:
        return {
            "connectionIDs": self.cids,
            "key": str(self.key),
            "oldState": str(self.old) if self.old else None,
            "newState": str(self.new) if self.new else None,
            "lastError": self.last_error.to_wire() if self.last_error else None,
            "time": self.time,
        }
