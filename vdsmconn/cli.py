"""The `vdsmconn` client: JSON-RPC 2.0 over the daemon's unix socket (SPEC 11).

Exit status: 0 success; 1 the daemon returned an error (or a test/wait did not succeed);
2 usage error; 3 the daemon cannot be reached or the connection to it failed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from vdsmconn.display import (
    WatchTable,
    format_devices,
    format_domains,
    format_event,
    format_list,
    format_mapping,
    format_targets,
    format_test,
    format_unmanaged,
    text,
)

DEFAULT_SOCKET = "/run/vdsmconn/vdsmconn.sock"
SOCKET_ENV = "VDSMCONN_SOCKET"
DEFAULT_TIMEOUT = 60.0
DEFAULT_WAIT = 30.0
STATE_EVENT = "storageServerStateChanged"
CLEAR = "\033[H\033[2J"  # cursor home, clear screen
DEFAULT_KEEPALIVE = 60.0  # well under the daemon's default idle_timeout (600 s)


class UsageError(Exception):
    """Bad command line input found after argparse (exit 2)."""


class TransportError(Exception):
    """The daemon cannot be reached, or the connection to it failed (exit 3)."""


class RpcError(Exception):
    """The daemon answered with a JSON-RPC error object (exit 1)."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"error {code}: {message}")
        self.code = code
        self.message = message
        self.data = data


class Client:
    """A blocking JSON-RPC client for one newline-delimited unix stream connection."""

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        # While waiting for notifications, send a harmless message this often, so the
        # daemon's idle_timeout (default 600 s) never drops a quiet subscriber.
        self.keepalive: float | None = None
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._next_id = 1
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._events: list[str] = []

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as e:
            sock.close()
            reason = e.strerror or str(e)
            raise TransportError(f"cannot connect to daemon at {self.path}: {reason}") from None
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._buffer.clear()

    def send(self, method: str, params: dict[str, Any] | None = None,
             notification: bool = False) -> int | None:
        """Send one request (or notification); returns its id."""
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        request: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        request_id = None
        if not notification:
            request_id, self._next_id = self._next_id, self._next_id + 1
            request["id"] = request_id
        if params is not None:
            request["params"] = params
        if method == "subscribe" and params is not None:
            self._events = list(params.get("events", []))
        try:
            self._sock.sendall(json.dumps(request, ensure_ascii=False).encode() + b"\n")
        except OSError as e:
            raise TransportError(f"cannot send to daemon: {e.strerror or e}") from None
        return request_id

    def call(
        self, method: str, params: dict[str, Any] | None = None, wait: float = 0.0,
        expect: type = dict, on_notification: Callable[[dict[str, Any]], None] | None = None,
    ) -> Any:
        """Return the result (of type `expect`); the reply may take `wait` s longer.
        Notifications that come meanwhile go to `on_notification`, or are kept for
        `notifications()`."""
        request_id = self.send(method, params)
        assert self._sock is not None
        self._sock.settimeout(self.timeout + wait)
        while (msg := self._receive()) is not None:
            if "id" not in msg:
                if on_notification is not None:
                    on_notification(msg)
                else:
                    self._pending.append(msg)
            elif msg["id"] == request_id or (msg["id"] is None and "error" in msg):
                error = msg.get("error")
                if not isinstance(error, dict):
                    return self._result(method, msg.get("result"), expect)
                code = error.get("code")
                message = str(error.get("message", "unknown error"))
                raise RpcError(code if isinstance(code, int) else 0, message, error.get("data"))
        raise TransportError("the daemon closed the connection without replying")

    @staticmethod
    def _result(method: str, result: Any, expect: type) -> Any:
        if not isinstance(result, expect):
            raise TransportError(f"unexpected result from daemon for {method}: {result!r:.80}")
        return result

    def notifications(self) -> Iterator[dict[str, Any]]:
        """Yield notifications ({method, params}) until the daemon closes the connection.
        With `keepalive` set, a quiet connection is kept open by re-sending the last
        subscribe as a notification (no reply, no effect) every `keepalive` seconds."""
        while True:
            if self._pending:
                yield self._pending.popleft()
                continue
            if self._sock is None:
                return
            self._sock.settimeout(self.keepalive)
            try:
                msg = self._receive(raise_timeout=self.keepalive is not None)
            except TimeoutError:
                self.send("subscribe", {"events": self._events}, notification=True)
                continue
            if msg is None:
                return
            if "id" not in msg:
                yield msg

    def _receive(self, raise_timeout: bool = False) -> dict[str, Any] | None:
        """Return the next JSON object from the connection, None at end of stream."""
        assert self._sock is not None
        while True:
            end = self._buffer.find(b"\n")
            if end != -1:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                if not line.strip():
                    continue
                break
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                if raise_timeout:
                    raise
                timeout = self._sock.gettimeout()
                raise TransportError(f"no reply from daemon within {timeout:g} s") from None
            except OSError as e:
                raise TransportError(f"connection to daemon failed: {e.strerror or e}") from None
            if not chunk:
                if self._buffer.strip():
                    raise TransportError("malformed message from daemon")
                return None
            self._buffer += chunk
        try:
            msg = json.loads(line.decode())
        except (UnicodeDecodeError, ValueError):
            msg = None
        if not isinstance(msg, dict):
            raise TransportError("malformed message from daemon")
        return msg


# Verbs.


def _output(args: argparse.Namespace, result: Any, formatter: Callable[[Any], str]) -> None:
    print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else formatter(result))


def _read_password() -> str:
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise UsageError("no password on standard input")
    return password


def parse_connection(text: str, password_stdin: bool = False) -> Any:
    """A URI passes through unchanged; a JSON object text or @FILE is parsed."""
    if text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise UsageError(f"cannot read {text[1:]}: {e.strerror or e}") from None
    elif text.lstrip()[:1] not in ("{", "["):
        if password_stdin:
            raise UsageError("--password-stdin needs a JSON object connection, not a URI")
        return text
    try:
        connection = json.loads(text)
    except ValueError as e:
        raise UsageError(f"connection is not valid JSON: {e}") from None
    if not isinstance(connection, dict):
        raise UsageError("connection must be a JSON object or a URI")
    if password_stdin:
        connection["password"] = _read_password()
    return connection


def _cmd_manage(args: argparse.Namespace, client: Client) -> int:
    connection = parse_connection(args.connection, args.password_stdin)
    method = "updateStorageServer" if args.verb == "update" else "manageStorageServer"
    result = client.call(method, {"connectionID": args.cid, "connection": connection})
    _output(args, result, lambda r: f"{text(r.get('connectionID'))}  key={text(r.get('key'))}")
    return 0


def _cmd_unmanage(args: argparse.Namespace, client: Client) -> int:
    if args.prefix == "":
        raise UsageError("an empty --prefix would unmanage every connection ID")
    params = {"prefix": args.prefix} if args.prefix is not None else {"connectionID": args.cid}
    result = client.call("unmanageStorageServer", params)
    _output(args, result, format_unmanaged)
    return 0


def _cmd_list(args: argparse.Namespace, client: Client) -> int:
    params: dict[str, Any] = {"includeUnmanaged": not args.no_unmanaged}
    if args.cids:
        params["connectionIDs"] = args.cids
    if args.prefix is not None:
        params["prefix"] = args.prefix
    result = client.call("getStorageServerList", params)
    _output(args, result, format_list)
    return 0


def _cmd_wait(args: argparse.Namespace, client: Client) -> int:
    params = {"connectionIDs": args.cids, "timeout": args.wait_timeout, "until": args.until}
    show = args.progress if args.progress is not None else (
        not args.json and sys.stderr.isatty())
    on_event = _progress(client, args.cids) if show else None
    try:
        result = client.call("waitStorageServer", params, wait=args.wait_timeout,
                             on_notification=on_event)
    except RpcError as e:
        if e.code != 480 or not isinstance(e.data, dict):
            raise
        _output(args, e.data, format_list)
        raise
    _output(args, result, format_list)
    if args.until == "connected":
        connected = {c for c, s in result.items() if isinstance(s, dict) and s.get("connected")}
        if down := sorted(set(result) - connected):
            print(f"vdsmconn: not connected: {', '.join(down)}", file=sys.stderr)
            return 1
    return 0


def _progress(client: Client, cids: list[str]) -> Callable[[dict[str, Any]], None]:
    """Subscribe, print where the CIDs stand, and return the printer of their changes
    (to standard error: standard output keeps the result)."""
    client.call("subscribe", {"events": [STATE_EVENT]}, expect=object)
    statuses = client.call("getStorageServerList",
                           {"connectionIDs": cids, "includeUnmanaged": False})
    wanted = set(cids)
    now = ", ".join(
        f"{cid} {text(statuses[cid].get('state')) if isinstance(statuses.get(cid), dict) else '?'}"
        for cid in cids)
    print(f"waiting: {now}", file=sys.stderr, flush=True)

    def show(msg: dict[str, Any]) -> None:
        params = msg.get("params")
        if msg.get("method") != STATE_EVENT or not isinstance(params, dict):
            return
        mine = [c for c in params.get("connectionIDs") or [] if c in wanted]
        if mine:
            print(format_event({**params, "connectionIDs": mine}), file=sys.stderr, flush=True)
    return show


def _cmd_test(args: argparse.Namespace, client: Client) -> int:
    params: dict[str, Any] = {
        "connection": parse_connection(args.connection, args.password_stdin)
    }
    if args.test_timeout is not None:
        params["timeout"] = args.test_timeout
    result = client.call("testStorageServer", params, wait=args.test_timeout or 0.0)
    _output(args, result, format_test)
    return 0 if result.get("ok") else 1


def _cmd_discover(args: argparse.Namespace, client: Client) -> int:
    params: dict[str, Any] = {"host": args.host, "port": args.port}
    if args.user is not None:
        params["user"] = args.user
    if args.password_stdin:
        params["password"] = _read_password()
    result = client.call("discoverSendTargets", params, expect=list)
    _output(args, result, format_targets)
    return 0


def _cmd_inventory(args: argparse.Namespace, client: Client) -> int:
    method, formatter = {"devices": ("getDeviceList", format_devices),
                         "domains": ("getStorageDomainList", format_domains)}[args.verb]
    result = client.call(method, {"connectionIDs": args.cids} if args.cids else {})
    _output(args, result, formatter)
    return 1 if result.get("errors") else 0


def _cmd_info(args: argparse.Namespace, client: Client) -> int:
    method = "getConnectorInfo" if args.verb == "connector-info" else "getHostInfo"
    result = client.call(method)
    _output(args, result, format_mapping)
    return 0


def _cmd_watch(args: argparse.Namespace, client: Client) -> int:
    client.keepalive = args.keepalive
    live = not args.json and sys.stdout.isatty()
    try:
        client.call("subscribe", {"events": [STATE_EVENT]}, expect=object)
        table = None
        if live:
            table = WatchTable(client.call("getStorageServerList", {"includeUnmanaged": False}))
            _redraw(table, args.socket)
        for msg in client.notifications():
            params = msg.get("params")
            if msg.get("method") != STATE_EVENT or not isinstance(params, dict):
                continue
            if table is None:
                line = json.dumps(params, ensure_ascii=False) if args.json \
                    else format_event(params)
                print(line, flush=True)
                continue
            unknown = table.apply(params)
            if unknown:
                found = client.call("getStorageServerList",
                                    {"connectionIDs": unknown, "includeUnmanaged": False})
                table.rows.update({c: st for c, st in found.items() if isinstance(st, dict)})
            _redraw(table, args.socket)
    except KeyboardInterrupt:
        return 0
    print("vdsmconn: the daemon closed the connection", file=sys.stderr)
    return 3


def _redraw(table: WatchTable, socket_path: str) -> None:
    now = time.strftime("%H:%M:%S")
    title = (f"vdsmconn watch  {socket_path}  {now}  {len(table.rows)} connection IDs"
             "  (Ctrl-C quits)")
    sys.stdout.write(CLEAR + table.render(title))
    sys.stdout.flush()


Handler = Callable[[argparse.Namespace, Client], int]


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text}")
    return value


def _add_password_stdin(p: argparse.ArgumentParser) -> None:
    p.add_argument("--password-stdin", action="store_true",
                   help="read a password from standard input (first line)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vdsmconn", description="vdsmconn daemon client")
    parser.add_argument("--socket", default=os.environ.get(SOCKET_ENV, DEFAULT_SOCKET),
                        help=f"daemon socket (${SOCKET_ENV}, default {DEFAULT_SOCKET})")
    parser.add_argument("--json", action="store_true", help="print raw results as JSON")
    parser.add_argument("--timeout", dest="rpc_timeout", type=_seconds, default=DEFAULT_TIMEOUT,
                        metavar="S", help=f"reply timeout (default {DEFAULT_TIMEOUT:g} s)")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    conn_help = "URI, JSON object, or @FILE holding a JSON object"
    for name, about in (("manage", "manage a connection under a CID"),
                        ("update", "change the connection of a managed CID")):
        p = verb(name, _cmd_manage, about)
        p.add_argument("cid", metavar="CID")
        p.add_argument("connection", metavar="CONNECTION", help=conn_help)
        _add_password_stdin(p)

    p = verb("unmanage", _cmd_unmanage, "unmanage a CID, or every CID with a prefix")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("cid", metavar="CID", nargs="?")
    group.add_argument("--prefix", metavar="P")

    p = verb("list", _cmd_list, "show the status of connections")
    p.add_argument("cids", metavar="CID", nargs="*")
    p.add_argument("--prefix", metavar="P")
    p.add_argument("--no-unmanaged", action="store_true", help="hide unmanaged connections")

    p = verb("wait", _cmd_wait, "wait until CIDs are connected (or one fails)")
    p.add_argument("cids", metavar="CID", nargs="+")
    p.add_argument("--timeout", dest="wait_timeout", type=_seconds, default=DEFAULT_WAIT,
                   metavar="S", help=f"seconds to wait (default {DEFAULT_WAIT:g})")
    p.add_argument("--until", choices=["connected", "error"], default="connected")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="print state changes of the CIDs to standard error while waiting "
                        "(default: when standard error is a terminal and without --json)")

    p = verb("test", _cmd_test, "test connectivity without managing anything")
    p.add_argument("connection", metavar="CONNECTION", help=conn_help)
    p.add_argument("--timeout", dest="test_timeout", type=_seconds, metavar="S")
    _add_password_stdin(p)

    p = verb("discover", _cmd_discover, "iSCSI sendtargets discovery")
    p.add_argument("host", metavar="HOST")
    p.add_argument("--port", type=int, default=3260)
    p.add_argument("--user", metavar="U")
    _add_password_stdin(p)

    for name, about in (("devices", "block devices behind managed iSCSI connections and "
                                    "managed volumes"),
                        ("domains", "storage domains found on managed connections")):
        p = verb(name, _cmd_inventory, about)
        p.add_argument("cids", metavar="CID", nargs="*", help="only these (default: all)")

    verb("connector-info", _cmd_info, "show os-brick connector properties")
    verb("info", _cmd_info, "show daemon and host information")
    p = verb("watch", _cmd_watch, "show connections live (a table on a terminal, one line per "
             "state change otherwise, JSON objects with --json)")
    p.add_argument("--keepalive", type=_seconds, default=DEFAULT_KEEPALIVE, metavar="S",
                   help="re-subscribe every S seconds of silence so the daemon's idle_timeout "
                        f"does not drop the watch (default {DEFAULT_KEEPALIVE:g})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 2
    handler: Handler = args.handler
    try:
        with Client(args.socket, args.rpc_timeout) as client:
            return handler(args, client)
    except RpcError as e:
        print(f"vdsmconn: error {e.code}: {e.message}", file=sys.stderr)
        return 1
    except UsageError as e:
        print(f"vdsmconn: {e}", file=sys.stderr)
        return 2
    except TransportError as e:
        print(f"vdsmconn: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
