"""Host names, addresses and ports as text: `host:port`, IPv6 addresses in brackets.

The one place that knows how a server is written: `10.0.0.1:3260`, `[fd00::1]:3260`,
`server:/export`, `[fd00::1]:/export`. Pure: no lookups.
"""

from __future__ import annotations

import ipaddress


def bracket(host: str) -> str:
    """`fd00::1` -> `[fd00::1]`; names, IPv4 addresses and bracketed text as they are."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def unbracket(host: str) -> str:
    """`[fd00::1]` -> `fd00::1`; anything else as it is."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def join(host: str, port: int) -> str:
    """`host:port`, an IPv6 address in brackets."""
    return f"{bracket(host)}:{port}"


def split(text: str, default_port: int | None = None) -> tuple[str, int]:
    """`host:port` or `[fd00::1]:port` -> (host without brackets, port); the last colon
    separates the port, so an IPv6 address without brackets works too (`::1:9917`).
    `host:` is `default_port` when one is given; ValueError for anything else."""
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit():
        return unbracket(host), int(port)
    if sep and not port and default_port is not None:
        return unbracket(host), default_port
    raise ValueError(f"expected HOST:PORT, got {text!r}")


def split_remote(text: str) -> tuple[str | None, str]:
    """`server:/path` -> (`server` as written, brackets kept, `/path`).

    The server part ends at the first `:/` (after the closing bracket of an IPv6 address), so
    `server:6789:/path` keeps its port and `a:6789,b:6789:/path` its list. Text without a
    server part (a path, a device name) -> (None, text).
    """
    start = 0
    if text.startswith("["):
        start = max(text.find("]"), 0)
    idx = text.find(":/", start)
    if idx == -1:
        return None, text
    return text[:idx], text[idx + 1 :]


def same_host(a: str, b: str) -> bool:
    """Whether two hosts are one: addresses compared as addresses (`[FD00:0::1]` is
    `fd00::1`), names without case or a trailing dot."""
    a, b = unbracket(a), unbracket(b)
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a.lower().rstrip(".") == b.lower().rstrip(".")
