"""The os-brick helper: one request as JSON on stdin, one reply as JSON on stdout.

Run as ``python -m vdsmconn.host.brick_helper`` by the managed-volume connector, always under
a deadline: os-brick blocks, sleeps and retries, and must never run in the daemon's process.

Request::

    {"op": "connect" | "disconnect" | "connector_info",
     "protocol": "ISCSI", "connection_properties": {...}, "device_info": {...} | null,
     "multipath": false, "enforce_multipath": false, "force": false,
     "lock_path": "/var/lib/vdsmconn/brick-locks", "my_ip": "10.0.0.1" | null}

Reply: ``{"ok": true, "result": ...}`` or ``{"ok": false, "kind": K, "error": CLASS,
"message": TEXT}`` where K is ``missing`` (os-brick cannot be imported), ``unsupported``
(os-brick has no connector for the protocol, or its answer is not JSON), ``bad_request`` or
``failed`` (os-brick raised). Messages have every secret of the request masked.

The daemon runs as root, so privsep runs in-process (client mode off: no sudo, no
privsep-helper), and os-brick's lock path is the one given (inside the daemon's state dir).
Anything os-brick or its children print goes to stderr; stdout carries the reply only.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from typing import Any

from vdsmconn.model import MASK, is_secret_name

OPS = ("connect", "disconnect", "connector_info")


class BadRequest(Exception):
    """The request on stdin is not one this helper understands."""


def secret_values(value: Any, named: bool = False) -> list[str]:
    """String values under secret-named keys, longest first."""
    found: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            found += secret_values(v, named or is_secret_name(str(k)))
    elif isinstance(value, list):
        for v in value:
            found += secret_values(v, named)
    elif named and isinstance(value, str | int) and not isinstance(value, bool):
        text = str(value)
        if len(text) >= 3:  # a one- or two-character secret would mask half the message
            found.append(text)
    return sorted(set(found), key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    for value in secrets:
        text = text.replace(value, MASK)
    return text


def my_ip() -> str:
    """The source address this host would use toward the outside (no packet is sent)."""
    # No route: fall back to the host name below.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
        s.connect(("192.0.2.1", 9))  # TEST-NET-1
        address: str = s.getsockname()[0]
        return address
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _setup(lock_path: str) -> None:
    """Configure oslo and privsep for a root process without sudo."""
    import os_brick
    from os_brick import privileged
    from oslo_concurrency import lockutils
    from oslo_config import cfg

    os.makedirs(lock_path, 0o700, exist_ok=True)
    cfg.CONF([], project="vdsmconn", default_config_files=[], default_config_dirs=[])
    lockutils.set_defaults(lock_path)
    os_brick.setup(cfg.CONF)
    cfg.CONF.set_override("lock_path", lock_path, group="os_brick")
    for name in ("default", "brick_privsep_hide_output"):
        context = getattr(privileged, name, None)
        if context is not None:
            context.set_client_mode(False)


def _connector(request: dict[str, Any]) -> Any:
    from os_brick import exception
    from os_brick.initiator import connector

    protocol = request["protocol"]
    kwargs: dict[str, Any] = {}
    if protocol.upper() == "RBD":
        kwargs["do_local_attach"] = True  # a block device, not a Python file object
    try:
        return connector.InitiatorConnector.factory(
            protocol, None, use_multipath=request["multipath"], device_scan_attempts=3,
            **kwargs,
        )
    except exception.InvalidConnectorProtocol as e:
        raise Unsupported(str(e)) from None


class Unsupported(Exception):
    """os-brick has no connector for this protocol, or it returned no block device."""


def handle(request: dict[str, Any]) -> Any:
    op = request.get("op")
    if op not in OPS:
        raise BadRequest(f"unknown op {op!r}")
    if not isinstance(request.get("lock_path"), str) or not request["lock_path"]:
        raise BadRequest("lock_path is required")
    request.setdefault("multipath", False)
    _setup(request["lock_path"])
    if op == "connector_info":
        from os_brick.initiator import connector

        return connector.get_connector_properties(
            None, request.get("my_ip") or my_ip(), request["multipath"],
            bool(request.get("enforce_multipath", False)), host=request.get("host"),
        )
    if not isinstance(request.get("protocol"), str):
        raise BadRequest("protocol is required")
    props = request.get("connection_properties")
    if not isinstance(props, dict):
        raise BadRequest("connection_properties must be an object")
    brick = _connector(request)
    if request.get("check_only"):
        return {"connector": type(brick).__name__}
    if op == "connect":
        return brick.connect_volume(props)
    brick.disconnect_volume(props, request.get("device_info") or None,
                            force=bool(request.get("force", False)))
    return None


def serve(raw: str) -> dict[str, Any]:
    try:
        request = json.loads(raw)
        if not isinstance(request, dict):
            raise BadRequest("the request must be a JSON object")
    except (ValueError, BadRequest) as e:
        return {"ok": False, "kind": "bad_request", "error": type(e).__name__, "message": str(e)}
    secrets = secret_values(request)
    try:
        result = handle(request)
        text = json.dumps({"ok": True, "result": result})
    except BadRequest as e:
        return _failure("bad_request", e, secrets)
    except ImportError as e:
        return _failure("missing", e, secrets)
    except Unsupported as e:
        return _failure("unsupported", e, secrets)
    except (TypeError, ValueError) as e:
        if "JSON" in str(e) or "serializable" in str(e):
            return _failure("unsupported", e, secrets)
        return _failure("failed", e, secrets)
    except Exception as e:
        return _failure("failed", e, secrets)
    reply: dict[str, Any] = json.loads(text)
    return reply


def _failure(kind: str, e: BaseException, secrets: list[str]) -> dict[str, Any]:
    message = str(e) or type(e).__name__
    with contextlib.suppress(ImportError):  # without oslo, scrub() below still masks
        from oslo_utils import strutils

        message = strutils.mask_password(message, secret=MASK)
    return {"ok": False, "kind": kind, "error": type(e).__name__,
            "message": scrub(message, secrets)}


def main() -> int:
    # The reply goes to the original stdout; everything else (os-brick's children, stray
    # prints) to stderr, so the reply is the only thing on stdout.
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    reply = serve(sys.stdin.read())
    with os.fdopen(reply_fd, "w", encoding="utf-8") as out:
        json.dump(reply, out)
        out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
