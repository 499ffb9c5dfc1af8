"""Frozen value types: connection specs per type, their keys, states, secrets.

Nothing here does I/O. A spec is built only from validated input (rpc/params.py) or from the
store, and knows its key, its mount point name and its wire form (without secrets).
"""

from __future__ import annotations

import abc
import enum
import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar, overload

from vdsmconn.host import address

SECRET_WORDS = ("pass", "secret", "key", "token", "auth")
MASK = "********"


def is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in SECRET_WORDS)


def may_hold_secret(text: str) -> bool:
    """Whether client text might carry a credential (`user:pw@`, `password=...`), so that an
    error must not quote it."""
    return "@" in text or is_secret_name(text)


class Secret:
    """A value that must never be shown: its repr and str are a mask."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return MASK

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class State(enum.StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DEGRADED = "degraded"
    FAILED = "failed"
    STUCK = "stuck"
    DISCONNECTING = "disconnecting"
    UNCERTAIN = "uncertain"


# --- spec normalization (SPEC 4) -------------------------------------------------------------

_SLASHES = re.compile(r"/{2,}")


def normalize_path(path: str) -> str:
    """Collapse repeated slashes and drop a trailing one (but keep a lone "/")."""
    path = _SLASHES.sub("/", path)
    if len(path) > 1 and path.endswith("/"):
        path = path.rstrip("/") or "/"
    return path


def normalize_remote(spec: str) -> str:
    """Normalize `server:/export` forms: `server:/a/`, `server:/a//` and `server://a` agree.

    The remote part is everything after the last ":" that is followed by "/" (so
    `server:6789:/path` keeps its port and `[fe80::1]:/x` its brackets). A spec with no such
    colon is a local path or a device name and is normalized as a path.
    """
    host, path = address.split_remote(spec)
    if host is None:
        if spec.startswith("//"):  # a CIFS share, //server/share: keep its two slashes
            return "/" + normalize_path(spec[1:])
        return normalize_path(spec) if spec.startswith("/") else spec
    return f"{host}:{normalize_path(path)}"


def escape_mount_name(spec: str) -> str:
    """The mount point's file name for a normalized spec: `_` → `__`, `/` → `_`."""
    return spec.replace("_", "__").replace("/", "_")


S = TypeVar("S")
T = TypeVar("T")


class _cached(Generic[S, T]):
    """functools.cached_property without its lock: Python 3.11's takes an RLock at each
    first read, and a new spec's key and mount name are read once per request."""

    def __init__(self, fn: Callable[[S], T]) -> None:
        self._fn = fn
        self._name = fn.__name__
        self.__doc__ = fn.__doc__

    @overload
    def __get__(self, obj: None, owner: type[S] | None = None) -> _cached[S, T]: ...

    @overload
    def __get__(self, obj: S, owner: type[S] | None = None) -> T: ...

    def __get__(self, obj: S | None, owner: type[S] | None = None) -> T | _cached[S, T]:
        if obj is None:
            return self
        value = obj.__dict__[self._name] = self._fn(obj)  # read from there from now on
        return value


# --- keys --------------------------------------------------------------------------------------


class ConnectionKey(NamedTuple):
    """Identity of one real connection. `kind` says which namespace the name lives in.

    File connections (nfs, posixfs, localfs) share the namespace of mount point names under
    the mount root, so two connections that would use one mount point have one key.

    A tuple: a key is looked up in several tables per request, each time made anew from
    the client's spec, and a frozen dataclass hashed and compared itself in Python there.
    """

    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"

    @classmethod
    def parse(cls, text: str) -> ConnectionKey:
        kind, sep, name = text.partition(":")
        if not sep or not name:
            raise ValueError(f"not a connection key: {text!r}")
        return cls(kind, name)


# --- specs ---------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class ConnectionSpec(abc.ABC):
    """Base of the typed connection specs. Subclasses are frozen dataclasses declared with
    `repr=False`, so that the repr below (secrets masked) is theirs too.

    `engine_id` is the engine's UUID for the connection (its `id`): kept and stored, but no
    part of the key or of equality, so a new id never makes a different connection.
    """

    TYPE: ClassVar[str] = ""
    engine_id: str | None = field(default=None, compare=False, kw_only=True,
                                  metadata={"wire": "id", "store_only": True})

    @property
    @abc.abstractmethod
    def key(self) -> ConnectionKey:
        """The identity of the real connection this spec describes."""

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.to_wire().items() if k != "type"}
        if self.engine_id is not None:
            shown["engine_id"] = self.engine_id
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def to_wire(self) -> dict[str, Any]:
        """The connection as the client sent it (normalized), secrets masked. The engine's id
        is not in it (a status shows it as `engineID`)."""
        out: dict[str, Any] = {"type": self.TYPE}
        for name, wire, store_only, omit_default, default in _fields(type(self)):
            value = getattr(self, name)
            if value is None or store_only or (omit_default and value == default):
                continue
            if isinstance(value, Secret):
                value = MASK
            elif isinstance(value, tuple):
                value = list(value)
            out[wire] = value
        return out

    def to_store(self) -> dict[str, Any]:
        """The connection with its secrets, for the state database only."""
        out: dict[str, Any] = {"type": self.TYPE}
        for name, wire in _stored_fields(type(self)):
            value = getattr(self, name)
            if value is None:
                continue
            if value.__class__ is not str:  # most are
                if isinstance(value, Secret):
                    value = value.reveal()
                elif isinstance(value, tuple):
                    value = list(value)
            out[wire] = value
        return out


@functools.cache
def _fields(cls: type[ConnectionSpec]) -> tuple[tuple[str, str, bool, bool, Any], ...]:
    """(name, wire name, store only, omitted at its default, default) of each field of a
    spec class, read once: a list of 10,000 statuses looked them up for every one."""
    return tuple((f.name, f.metadata.get("wire", f.name), bool(f.metadata.get("store_only")),
                  bool(f.metadata.get("omit_default")), f.default) for f in fields(cls))


@functools.cache
def _stored_fields(cls: type[ConnectionSpec]) -> tuple[tuple[str, str], ...]:
    """(name, wire name) of each field of a spec class, for to_store."""
    return tuple((name, wire) for name, wire, *_ in _fields(cls))


def _wire(name: str) -> Any:
    return field(default=None, metadata={"wire": name})


@dataclass(frozen=True, repr=False)
class MountSpec(ConnectionSpec):
    """A connection that is a mount under the mount root."""

    connection: str = ""
    vfs_type: str | None = None
    mnt_options: str | None = None

    SUBDIR: ClassVar[str] = ""

    @_cached
    def mount_name(self) -> str:
        name = escape_mount_name(self.connection)
        return f"{self.SUBDIR}/{name}" if self.SUBDIR else name

    @_cached
    def key(self) -> ConnectionKey:
        return ConnectionKey("file", self.mount_name)

    def to_wire(self) -> dict[str, Any]:
        out = super().to_wire()
        if self.mnt_options:
            out["mnt_options"] = mask_options(self.mnt_options)
        return out

    def options(self) -> list[str]:
        """Mount options in order, empty items dropped."""
        if not self.mnt_options:
            return []
        return [opt for opt in self.mnt_options.split(",") if opt]


@dataclass(frozen=True, repr=False)
class PosixSpec(MountSpec):
    TYPE: ClassVar[str] = "posixfs"


NFS_VERSIONS = ("3", "4", "4.0", "4.1", "4.2", "auto")


@dataclass(frozen=True, repr=False)
class NfsSpec(MountSpec):
    TYPE: ClassVar[str] = "nfs"
    protocol_version: str = "3"
    timeout: int = 100
    retrans: int = 3

    def options(self) -> list[str]:
        user = super().options()
        opts = ["soft", "nosharecache", f"timeo={self.timeout}", f"retrans={self.retrans}"]
        version = self.protocol_version
        if version != "auto":
            major, _, minor = version.partition(".")
            opts.append(f"nfsvers={major}")
            if minor:
                opts.append(f"minorversion={minor}")
        if version in ("3", "auto") and not {"lock", "nolock"} & set(user):
            opts.append("nolock")
        return opts + user


@dataclass(frozen=True, repr=False)
class GlusterSpec(MountSpec):
    TYPE: ClassVar[str] = "glusterfs"
    SUBDIR: ClassVar[str] = "glusterSD"


@dataclass(frozen=True, repr=False)
class LocalSpec(ConnectionSpec):
    TYPE: ClassVar[str] = "localfs"
    connection: str = ""

    @_cached
    def mount_name(self) -> str:
        return escape_mount_name(self.connection)

    @_cached
    def key(self) -> ConnectionKey:
        return ConnectionKey("file", self.mount_name)


@dataclass(frozen=True, repr=False)
class IscsiSpec(ConnectionSpec):
    TYPE: ClassVar[str] = "iscsi"
    connection: str = ""
    iqn: str = ""
    port: int = 3260
    tpgt: int | None = None
    user: str | None = None
    password: Secret | None = None
    user_in: str | None = None
    password_in: Secret | None = None
    ifaceName: str | None = None
    netIfaceName: str | None = None
    netIfaceNames: tuple[str, ...] | None = None
    initiatorName: str | None = None

    @property
    def portal(self) -> str:
        return address.join(self.connection, self.port)

    @_cached
    def key(self) -> ConnectionKey:
        tpgt = "*" if self.tpgt is None else str(self.tpgt)
        if self.netIfaceNames:
            via = "+".join(self.netIfaceNames)
        else:
            via = self.ifaceName or self.netIfaceName or "default"
        return ConnectionKey("iscsi", f"{self.portal},{tpgt},{self.iqn},{via}")


@dataclass(frozen=True, repr=False)
class ManagedSpec(ConnectionSpec):
    TYPE: ClassVar[str] = "managed"
    volumeID: str = ""
    connection_info: Secret | None = None  # JSON text; may hold array credentials

    @_cached
    def key(self) -> ConnectionKey:
        return ConnectionKey("managed", self.volumeID)

    def info(self) -> dict[str, Any]:
        """The connection info with its secrets, for os-brick."""
        return json.loads(self.connection_info.reveal()) if self.connection_info else {}

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "volumeID": self.volumeID,
                "connection_info": mask_secrets(self.info())}

    def to_store(self) -> dict[str, Any]:
        out = {"type": self.TYPE, "volumeID": self.volumeID, "connection_info": self.info()}
        if self.engine_id is not None:
            out["id"] = self.engine_id
        return out


def mask_options(options: str) -> str:
    """Mount options with the values of secret-named options masked."""
    items = []
    for item in options.split(","):
        name, sep, _ = item.partition("=")
        items.append(f"{name}={MASK}" if sep and is_secret_name(name) else item)
    return ",".join(items)


def mask_secrets(value: Any) -> Any:
    """A copy of a JSON value with the values of secret-named keys masked."""
    if isinstance(value, dict):
        return {k: MASK if is_secret_name(k) else mask_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    return value


SPEC_TYPES: dict[str, type[ConnectionSpec]] = {
    cls.TYPE: cls for cls in (NfsSpec, PosixSpec, GlusterSpec, LocalSpec, IscsiSpec, ManagedSpec)
}
