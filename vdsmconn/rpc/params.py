"""Untrusted JSON -> typed values and connection specs. The only place client input is checked.

Wrong types and unknown names are InvalidParams (-32602) naming the field; well-typed values
that are not acceptable are InvalidParameter (1000), also naming the field.

Error texts are built so that they cannot carry a secret (SPEC 4): a secret-bearing value is
never quoted, and other client text only when it cannot hold a credential (`_shown`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import urllib.parse
from collections.abc import Callable
from typing import Any

from vdsmconn import errors
from vdsmconn.host import address
from vdsmconn.model import (
    NFS_VERSIONS,
    SPEC_TYPES,
    ConnectionSpec,
    GlusterSpec,
    IscsiSpec,
    LocalSpec,
    ManagedSpec,
    NfsSpec,
    PosixSpec,
    Secret,
    is_secret_name,
    may_hold_secret,
    normalize_path,
    normalize_remote,
)

# C0, DEL and C1 control characters, and lone surrogates (not encodable, so never usable).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# What a mount source may hold: host names, IPv6 in brackets, paths, LABEL=/UUID= forms.
# Never white space, commas (they separate mount options) or shell metacharacters.
_SOURCE = re.compile(r"^[A-Za-z0-9._:/@+=%~\[\]-]+$")
# One mount option: name or name=value; values may list hosts with ':'.
_OPTION = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.:/@+=%~-]*$")
_OPTION_NAME = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*$")
_IQN = re.compile(
    r"^(iqn\.\d{4}-\d{2}\.[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?(?::[^\s]+)?"
    r"|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16}(?:[0-9A-Fa-f]{16})?)$"
)
_HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})$")
_IPV6 = re.compile(r"^[0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.-]+)?$")
_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,63}$")


def bad_type(path: str, expected: str, value: Any) -> errors.InvalidParams:
    got = "null" if value is None else type(value).__name__
    return errors.InvalidParams(f"{path}: expected {expected}, got {got}", {"field": path})


def bad_value(path: str, why: str) -> errors.InvalidParameter:
    return errors.InvalidParameter(f"{path}: {why}", {"field": path})


def _shown(text: str) -> str:
    """Client text as an error may quote it: not at all if it might hold a credential."""
    return "(not shown: it may hold a credential)" if may_hold_secret(text) else repr(text)


# --- typed getters ---------------------------------------------------------------------------


def get_str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise bad_type(path, "a string", value)
    return value


def get_bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise bad_type(path, "true or false", value)
    return value


def get_number(value: Any, path: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_type(path, "a number", value)
    if not low <= value <= high:
        raise bad_value(path, f"must be from {low:g} to {high:g}, got {value}")
    return float(value)


def get_int(value: Any, path: str, low: int, high: int) -> int:
    """An integer, also as a decimal string (the engine sends some numbers as text)."""
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,9}", value.strip()):
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_type(path, "an integer", value)
    if not low <= value <= high:
        raise bad_value(path, f"must be from {low} to {high}, got {value}")
    return value


def get_str_list(value: Any, path: str) -> list[str]:
    if not isinstance(value, list):
        raise bad_type(path, "a list of strings", value)
    return [get_str(item, f"{path}[{i}]") for i, item in enumerate(value)]


def get_text(value: Any, path: str, max_len: int = 4096) -> str:
    """A non-empty string without control characters that cannot be taken for an option."""
    text = get_str(value, path)
    if not text:
        raise bad_value(path, "must not be empty")
    if len(text) > max_len:
        raise bad_value(path, f"longer than {max_len} characters")
    if _CONTROL.search(text):
        raise bad_value(path, "contains control characters or invalid Unicode")
    if text.startswith("-"):
        raise bad_value(path, "must not start with '-'")
    return text


def get_cid(value: Any, path: str = "connectionID") -> str:
    cid = get_str(value, path)
    if not cid:
        raise bad_value(path, "must not be empty")
    if len(cid) > 255:
        raise bad_value(path, "longer than 255 characters")
    if "/" in cid or _CONTROL.search(cid):
        raise bad_value(path, "must not contain '/', NUL, control characters or lone surrogates")
    return cid


# --- connections ---------------------------------------------------------------------------

# The keys the engine sends in its connection dicts, for every type (SPEC 4). A type takes the
# ones it uses; the others are accepted when not set (null or "").
ENGINE_KEYS = frozenset({
    "id", "connection", "tpgt", "port", "iqn", "user", "password", "ipv6_enabled", "ifaceName",
    "netIfaceName", "mnt_options", "vfs_type", "protocol_version", "timeout", "retrans",
})
_CREDENTIALS = "credentials are not accepted in a URI; send them as fields"


def parse_connection(value: Any, path: str = "connection") -> ConnectionSpec:
    if isinstance(value, str):
        value = uri_to_dict(value, path)
    if not isinstance(value, dict):
        raise bad_type(path, "an object or a URI string", value)
    if "type" not in value:
        raise errors.InvalidParams(f"{path}.type: missing", {"field": f"{path}.type"})
    kind = get_str(value["type"], f"{path}.type")
    builder = _BUILDERS.get(kind)
    if builder is None:
        raise bad_value(f"{path}.type",
                        f"unknown type {_shown(kind)} (one of {', '.join(SPEC_TYPES)})")
    fields = _Fields(value, path, kind)
    engine_id = fields.opt_text("id", max_len=255)
    if kind != "managed":
        fields.flag("ipv6_enabled")  # a discovery hint: accepted, and not needed here
    spec = builder(fields)
    fields.check_unused()
    return spec if engine_id is None else dataclasses.replace(spec, engine_id=engine_id)


class _Fields:
    """The keys of one connection object (its type taken already); every key must be taken
    by its builder, but for the engine's keys that are not set."""

    def __init__(self, data: dict[str, Any], path: str, kind: str) -> None:
        self.data = data
        self.path = path
        self.kind = kind
        self.tolerated = frozenset() if kind == "managed" else ENGINE_KEYS
        self.used = {"type"}

    def get(self, name: str) -> Any:
        """The value of `name`; None when missing, null or "" ("not set")."""
        self.used.add(name)
        value = self.data.get(name)
        return None if value is None or value == "" else value

    def field(self, name: str) -> str:
        return f"{self.path}.{name}"

    def required(self, name: str) -> Any:
        value = self.get(name)
        if value is None:
            raise errors.InvalidParams(f"{self.field(name)}: missing", {"field": self.field(name)})
        return value

    def check_unused(self) -> None:
        if self.used.issuperset(self.data):  # the usual case: every key was taken
            return
        unused = sorted(set(self.data) - self.used)
        for name in unused:
            if name not in self.tolerated:
                raise errors.InvalidParams(
                    f"{self.field(name)}: unknown key", {"field": self.field(name)}
                )
        for name in unused:
            if self.get(name) is not None:  # never quoted: it may be a password
                raise bad_value(self.field(name), f"does not apply to a {self.kind} connection")

    def opt_text(self, name: str, max_len: int = 4096) -> str | None:
        value = self.get(name)
        return None if value is None else get_text(value, self.field(name), max_len)

    def opt_int(self, name: str, low: int, high: int) -> int | None:
        value = self.get(name)
        return None if value is None else get_int(value, self.field(name), low, high)

    def flag(self, name: str) -> bool | None:
        value = self.get(name)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        return None if value is None else get_bool(value, self.field(name))

    def options(self) -> str | None:
        value = self.get("mnt_options")
        if value is None:
            return None
        name = self.field("mnt_options")
        text = get_text(value, name)
        hide = may_hold_secret(text)  # a password cut at a comma makes items of its pieces
        for i, item in enumerate(text.split(",")):
            if item:
                _check_option(item, f"item {i + 1}" if hide else repr(item), name)
        return text

    def word(self, name: str) -> str | None:
        value = self.opt_text(name)
        if value is not None and not _WORD.match(value):
            raise bad_value(self.field(name), f"not a valid name: {_shown(value)}")
        return value


def _check_option(item: str, shown: str, path: str) -> None:
    """One mount option, `name` or `name=value`, with nothing that could act as another
    option or argument. The value of a secret-bearing option (a password) may hold any
    printable character but a double quote, which mount(8) would take for quoting."""
    name, sep, value = item.partition("=")
    if sep and is_secret_name(name) and _OPTION_NAME.match(name):
        if '"' in value:
            raise bad_value(path, f"option {name!r}: a double quote is not accepted in its value")
        return
    if not _OPTION.match(item):
        raise bad_value(path, f"not an acceptable option: {shown}")


def _source(fields: _Fields) -> str:
    """A mount source, normalized, with nothing that could act as an option or argument."""
    name = fields.field("connection")
    text = get_text(fields.required("connection"), name)
    if not _SOURCE.match(text):
        raise bad_value(name, "contains characters not accepted in a mount source: "
                        f"{_shown(text)}")
    if ".." in text.split("/"):
        raise bad_value(name, f"must not contain '..': {_shown(text)}")
    return normalize_remote(text)


def _remote(fields: _Fields) -> str:
    """`server:/path`, IPv6 in brackets: normalized."""
    name = fields.field("connection")
    text = normalized = _source(fields)
    host, rest = address.split_remote(normalized)
    if not host or not rest.startswith("/"):
        raise bad_value(name, f"expected server:/path, got {_shown(text)}")
    _check_host(host.split(":")[0] if not host.startswith("[") else host, name)
    return normalized


def _check_host(host: str, path: str) -> None:
    if host.startswith("["):
        if not host.endswith("]") or not _IPV6.match(host[1:-1]):
            raise bad_value(path, f"not a valid IPv6 address: {_shown(host)}")
    elif not _HOSTNAME.match(host):
        raise bad_value(path, f"not a valid host name: {_shown(host)}")


def _nfs(f: _Fields) -> ConnectionSpec:
    version = f.get("protocol_version")
    if isinstance(version, int | float) and not isinstance(version, bool):
        version = str(version)
    if version is not None:
        version = get_str(version, f.field("protocol_version"))
        if version not in NFS_VERSIONS:
            raise bad_value(
                f.field("protocol_version"), f"must be one of {', '.join(NFS_VERSIONS)}"
            )
    if f.word("vfs_type") not in (None, "nfs"):
        raise bad_value(f.field("vfs_type"), "must be nfs for an nfs connection")
    timeout = f.opt_int("timeout", 1, 6000)
    retrans = f.opt_int("retrans", 0, 32767)
    return NfsSpec(
        connection=_remote(f),
        mnt_options=f.options(),
        protocol_version=version or "3",
        timeout=100 if timeout is None else timeout,
        retrans=3 if retrans is None else retrans,
    )


def _posix(f: _Fields) -> ConnectionSpec:
    return PosixSpec(connection=_source(f), vfs_type=f.word("vfs_type"), mnt_options=f.options())


def _gluster(f: _Fields) -> ConnectionSpec:
    vfs = f.word("vfs_type")
    if vfs not in (None, "glusterfs"):
        raise bad_value(f.field("vfs_type"), "must be glusterfs")
    return GlusterSpec(connection=_remote(f), vfs_type=vfs, mnt_options=f.options())


def _local(f: _Fields) -> ConnectionSpec:
    name = f.field("connection")
    text = get_text(f.required("connection"), name)
    if not text.startswith("/"):
        raise bad_value(name, "must be an absolute path")
    path = normalize_path(text)
    if path == "/" or "/../" in f"{path}/" or "/./" in f"{path}/":
        raise bad_value(name, f"not an acceptable directory: {_shown(text)}")
    return LocalSpec(connection=path)


def _iqn(f: _Fields, name: str) -> str | None:
    value = f.opt_text(name)
    if value is not None and not _IQN.match(value):
        raise bad_value(f.field(name), f"not a valid iSCSI name: {_shown(value)}")
    return value


def _secret(f: _Fields, name: str) -> Secret | None:
    """A CHAP secret: any printable text, never quoted in an error."""
    value = f.get(name)
    if value is None:
        return None
    text = get_str(value, f.field(name))
    if _CONTROL.search(text):
        raise bad_value(f.field(name), "contains control characters or invalid Unicode")
    return Secret(text)


def _iscsi(f: _Fields) -> ConnectionSpec:
    host = address.unbracket(get_text(f.required("connection"), f.field("connection")))
    _check_host(address.bracket(host), f.field("connection"))
    iqn = _iqn(f, "iqn")
    if iqn is None:
        raise errors.InvalidParams(f"{f.field('iqn')}: missing", {"field": f.field("iqn")})
    names = f.get("netIfaceNames")
    net_names = None
    if names is not None:
        net_names = tuple(get_str_list(names, f.field("netIfaceNames")))
        for i, n in enumerate(net_names):
            if not _WORD.match(n) or len(n) > 15:
                raise bad_value(f"{f.field('netIfaceNames')}[{i}]",
                                f"not an interface: {_shown(n)}")
        if len(set(net_names)) != len(net_names) or not net_names:
            raise bad_value(f.field("netIfaceNames"), "must be a non-empty list without repeats")
    port = f.opt_int("port", 1, 65535)
    return IscsiSpec(
        connection=host, iqn=iqn, port=3260 if port is None else port,
        tpgt=f.opt_int("tpgt", 0, 65535),
        user=f.opt_text("user"), password=_secret(f, "password"),
        user_in=f.opt_text("user_in"), password_in=_secret(f, "password_in"),
        ifaceName=f.word("ifaceName"), netIfaceName=f.word("netIfaceName"),
        netIfaceNames=net_names, initiatorName=_iqn(f, "initiatorName"),
    )


def _managed(f: _Fields) -> ConnectionSpec:
    volume = get_text(f.required("volumeID"), f.field("volumeID"), max_len=255)
    if "/" in volume:
        raise bad_value(f.field("volumeID"), "must not contain '/'")
    info = f.required("connection_info")
    path = f.field("connection_info")
    if not isinstance(info, dict):
        raise bad_type(path, "an object", info)
    unknown = set(info) - {"driver_volume_type", "data", "adapter"}
    if unknown:
        name = f"{path}.{sorted(unknown)[0]}"
        raise errors.InvalidParams(f"{name}: unknown key", {"field": name})
    get_text(info.get("driver_volume_type"), f"{path}.driver_volume_type")
    if not isinstance(info.get("data"), dict):
        raise bad_type(f"{path}.data", "an object", info.get("data"))
    text = json.dumps(info, sort_keys=True, separators=(",", ":"))
    return ManagedSpec(volumeID=volume, connection_info=Secret(text))


_BUILDERS: dict[str, Callable[[_Fields], ConnectionSpec]] = {
    "nfs": _nfs, "posixfs": _posix, "glusterfs": _gluster, "localfs": _local,
    "iscsi": _iscsi, "managed": _managed,
}


# --- URIs ------------------------------------------------------------------------------------


def uri_to_dict(uri: str, path: str = "connection") -> dict[str, Any]:
    """`nfs://server/export?protocol_version=4.2` and friends -> a connection object.

    No error quotes the URI: it may hold credentials (refused, but not to be shown)."""
    if _CONTROL.search(uri):
        raise bad_value(path, "contains control characters or invalid Unicode")
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        raise bad_value(path, "not a valid URI (unbalanced brackets)") from None
    if "@" in parts.netloc:
        raise bad_value(path, _CREDENTIALS)
    try:
        port = parts.port
    except ValueError:
        raise bad_value(path, "not a valid URI (the port is not a number from 0 to 65535)"
                        ) from None
    kind = parts.scheme
    if kind not in SPEC_TYPES or kind == "managed":
        types = ", ".join(t for t in SPEC_TYPES if t != "managed")
        raise bad_value(path, f"not a connection URI (the scheme must be one of {types})")
    out: dict[str, Any] = {"type": kind}
    for name, values in urllib.parse.parse_qs(parts.query, keep_blank_values=True).items():
        if _is_credential(name, values):
            raise bad_value(f"{path}.{name}", _CREDENTIALS)
        if len(values) != 1:
            raise bad_value(f"{path}.{name}", "given more than once")
        out[name] = values[0]
    if "netIfaceNames" in out:
        out["netIfaceNames"] = [n for n in out["netIfaceNames"].split(",") if n]
    host = address.bracket(parts.hostname or "")
    target = urllib.parse.unquote(parts.path)
    if kind == "iscsi":
        out["connection"] = host
        if port is not None:
            out["port"] = port
        out["iqn"] = target.lstrip("/")
    elif kind == "localfs" or not host:
        if port is not None or host:
            raise bad_value(path, f"a {kind} URI takes no host here")
        out["connection"] = target
    else:
        if port is not None:
            raise bad_value(path, f"a port is not accepted in a {kind} URI")
        out["connection"] = f"{host}:{target or '/'}"
    return out


def _is_credential(name: str, values: list[str]) -> bool:
    """A query item that is a credential: a user, a secret, or a mount option holding one."""
    if name in ("user", "user_in") or is_secret_name(name):
        return True
    return name == "mnt_options" and any(
        is_secret_name(item.partition("=")[0]) for value in values for item in value.split(",")
    )
