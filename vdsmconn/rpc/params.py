"""Untrusted JSON -> typed values and connection specs. The only place client input is checked.

Wrong types and unknown names are InvalidParams (-32602) naming the field; well-typed values
that are not acceptable are InvalidParameter (1000), also naming the field.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Callable
from typing import Any

from vdsmconn import errors
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
    normalize_path,
    normalize_remote,
)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# What a mount source may hold: host names, IPv6 in brackets, paths, LABEL=/UUID= forms.
# Never white space, commas (they separate mount options) or shell metacharacters.
_SOURCE = re.compile(r"^[A-Za-z0-9._:/@+=%~\[\]-]+$")
# One mount option: name or name=value; values may list hosts with ':'.
_OPTION = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.:/@+=%~-]*$")
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
        raise bad_value(path, "contains control characters")
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
        raise bad_value(path, "must not contain '/', NUL or control characters")
    return cid


# --- connections ---------------------------------------------------------------------------


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
        raise bad_value(f"{path}.type", f"unknown type {kind!r} (one of {', '.join(SPEC_TYPES)})")
    fields = _Fields({k: v for k, v in value.items() if k != "type"}, path)
    spec = builder(fields)
    fields.check_unused()
    return spec


class _Fields:
    """The keys of one connection object; every key must be taken by its builder."""

    def __init__(self, data: dict[str, Any], path: str) -> None:
        self.data = data
        self.path = path
        self.used: set[str] = set()

    def get(self, name: str) -> Any:
        self.used.add(name)
        return self.data.get(name)

    def field(self, name: str) -> str:
        return f"{self.path}.{name}"

    def required(self, name: str) -> Any:
        value = self.get(name)
        if value is None:
            raise errors.InvalidParams(f"{self.field(name)}: missing", {"field": self.field(name)})
        return value

    def check_unused(self) -> None:
        for name in sorted(set(self.data) - self.used):
            raise errors.InvalidParams(
                f"{self.field(name)}: unknown key", {"field": self.field(name)}
            )

    def opt_text(self, name: str) -> str | None:
        value = self.get(name)
        return None if value is None else get_text(value, self.field(name))

    def opt_int(self, name: str, low: int, high: int) -> int | None:
        value = self.get(name)
        return None if value is None else get_int(value, self.field(name), low, high)

    def options(self) -> str | None:
        value = self.get("mnt_options")
        if value is None or value == "":
            return None
        text = get_text(value, self.field("mnt_options"))
        for item in text.split(","):
            if item and not _OPTION.match(item):
                raise bad_value(self.field("mnt_options"), f"not an acceptable option: {item!r}")
        return text

    def word(self, name: str) -> str | None:
        value = self.opt_text(name)
        if value is not None and not _WORD.match(value):
            raise bad_value(self.field(name), f"not a valid name: {value!r}")
        return value


def _source(fields: _Fields) -> str:
    """A mount source, normalized, with nothing that could act as an option or argument."""
    name = fields.field("connection")
    text = get_text(fields.required("connection"), name)
    if not _SOURCE.match(text):
        raise bad_value(name, f"contains characters not accepted in a mount source: {text!r}")
    if ".." in text.split("/"):
        raise bad_value(name, f"must not contain '..': {text!r}")
    return normalize_remote(text)


def _remote(fields: _Fields) -> str:
    """`server:/path`, IPv6 in brackets: normalized."""
    name = fields.field("connection")
    text = normalized = _source(fields)
    host, sep, rest = normalized.rpartition(":")
    host = host if sep else ""
    if not host or not rest.startswith("/"):
        raise bad_value(name, f"expected server:/path, got {text!r}")
    _check_host(host.split(":")[0] if not host.startswith("[") else host, name)
    return normalized


def _check_host(host: str, path: str) -> None:
    if host.startswith("["):
        if not host.endswith("]") or not _IPV6.match(host[1:-1]):
            raise bad_value(path, f"not a valid IPv6 address: {host!r}")
    elif not _HOSTNAME.match(host):
        raise bad_value(path, f"not a valid host name: {host!r}")


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
        raise bad_value(name, f"not an acceptable directory: {text!r}")
    return LocalSpec(connection=path)


def _iqn(f: _Fields, name: str) -> str | None:
    value = f.opt_text(name)
    if value is not None and not _IQN.match(value):
        raise bad_value(f.field(name), f"not a valid iSCSI name: {value!r}")
    return value


def _secret(f: _Fields, name: str) -> Secret | None:
    value = f.get(name)
    if value is None:
        return None
    text = get_str(value, f.field(name))
    if _CONTROL.search(text):
        raise bad_value(f.field(name), "contains control characters")
    return Secret(text)


def _iscsi(f: _Fields) -> ConnectionSpec:
    host = get_text(f.required("connection"), f.field("connection"))
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        _check_host(f"[{host}]", f.field("connection"))
    else:
        _check_host(host, f.field("connection"))
    iqn = _iqn(f, "iqn")
    if iqn is None:
        raise errors.InvalidParams(f"{f.field('iqn')}: missing", {"field": f.field("iqn")})
    names = f.get("netIfaceNames")
    net_names = None
    if names is not None:
        net_names = tuple(get_str_list(names, f.field("netIfaceNames")))
        for i, n in enumerate(net_names):
            if not _WORD.match(n) or len(n) > 15:
                raise bad_value(f"{f.field('netIfaceNames')}[{i}]", f"not an interface: {n!r}")
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
    """`nfs://server/export?protocol_version=4.2` and friends -> a connection object."""
    if _CONTROL.search(uri):
        raise bad_value(path, "contains control characters")
    try:
        parts = urllib.parse.urlsplit(uri)
        port = parts.port
    except ValueError as e:
        raise bad_value(path, f"not a valid URI: {e}") from None
    kind = parts.scheme
    if kind not in SPEC_TYPES or kind == "managed":
        raise bad_value(path, f"not a connection URI: {uri!r}")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise bad_value(path, "credentials are not accepted in a URI; send them as fields")
    out: dict[str, Any] = {"type": kind}
    for name, values in urllib.parse.parse_qs(parts.query, keep_blank_values=True).items():
        if len(values) != 1:
            raise bad_value(f"{path}.{name}", "given more than once")
        out[name] = values[0]
    if "netIfaceNames" in out:
        out["netIfaceNames"] = [n for n in out["netIfaceNames"].split(",") if n]
    host = parts.hostname or ""
    if host and ":" in host:
        host = f"[{host}]"
    target = urllib.parse.unquote(parts.path)
    if kind == "iscsi":
        out["connection"] = host
        if port is not None:
            out["port"] = port
        out["iqn"] = target.lstrip("/")
    elif kind == "localfs" or not host:
        if port is not None or host:
            raise bad_value(path, f"{kind} URI takes no host here: {uri!r}")
        out["connection"] = target
    else:
        if port is not None:
            raise bad_value(path, f"a port is not accepted in a {kind} URI")
        out["connection"] = f"{host}:{target or '/'}"
    return out
