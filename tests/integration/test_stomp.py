"""STOMP 1.2 against the real daemon (SPEC 3.2): stomp.py (a third-party client from PyPI)
over mutual TLS, and raw frames the way the engine's client sends them over the unix socket.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import stomp  # type: ignore[import-untyped]

from tests.daemon import Daemon
from tests.tlscerts import HAVE_OPENSSL, Pki, make_pki
from tests.unit.test_metrics_collector import free_port
from vdsmconn import config

pytestmark = pytest.mark.skipif(not HAVE_OPENSSL, reason="openssl missing")

REQUESTS = "jms.topic.vdsm_requests"
EVENTS = "jms.queue.events"
REPLIES = "jms.topic.vdsm_responses"
DEADLINE = 20.0  # generous bound for anything that should happen soon


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def stomp_daemon(tmp_path: Path, pki: Pki) -> Iterator[tuple[Daemon, int]]:
    port = free_port()
    d = Daemon(tmp_path)
    d.settings["rpc"]["tcp"] = pki.tcp_settings(port)
    try:
        d.start()
        yield d, port
    finally:
        d.cleanup()


# --- stomp.py ------------------------------------------------------------------------------


class Recorder(stomp.ConnectionListener):  # type: ignore[misc]
    """What a stomp.py connection received."""

    def __init__(self) -> None:
        self.messages: dict[str, queue.Queue[Any]] = {"replies": queue.Queue(),
                                                      "events": queue.Queue()}
        self.errors: list[Any] = []
        self.receipts: list[str] = []
        self.heartbeats = 0
        self.disconnected = threading.Event()

    def on_message(self, frame: Any) -> None:
        self.messages[frame.headers["subscription"]].put(frame)

    def on_error(self, frame: Any) -> None:
        self.errors.append(frame)

    def on_receipt(self, frame: Any) -> None:
        self.receipts.append(frame.headers["receipt-id"])

    def on_heartbeat(self) -> None:
        self.heartbeats += 1

    def on_disconnected(self) -> None:
        self.disconnected.set()


class Client:
    """A stomp.py connection over TLS with the engine's certificate, subscribed to the reply
    destination `replies`."""

    def __init__(self, port: int, pki: Pki, *, connect_command: bool = True,
                 heartbeats: tuple[int, int] = (0, 0), replies: str = REPLIES) -> None:
        self.conn = stomp.Connection12([("127.0.0.1", port)], heartbeats=heartbeats,
                                       reconnect_attempts_max=1, timeout=DEADLINE)
        self.conn.set_ssl(for_hosts=[("127.0.0.1", port)], key_file=pki.path("engine.key"),
                          cert_file=pki.path("engine.pem"), ca_certs=pki.path("engine-ca.pem"))
        self.recorder = Recorder()
        self.conn.set_listener("recorder", self.recorder)
        self.conn.connect(wait=True, with_connect_command=connect_command)
        self.replies = replies
        self.conn.subscribe(replies, id="replies", ack="auto")
        self.pending: dict[Any, dict[str, Any]] = {}

    def send(self, method: str, params: Any = None, request_id: Any = 1) -> None:
        request: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            request["params"] = params
        self.conn.send(REQUESTS, json.dumps(request), content_type="application/json",
                       headers={"reply-to": self.replies})

    def reply(self, request_id: Any) -> dict[str, Any]:
        """The reply with `request_id` (others received meanwhile are kept)."""
        deadline = time.monotonic() + DEADLINE
        while request_id not in self.pending:
            frame = self.recorder.messages["replies"].get(
                timeout=max(0.1, deadline - time.monotonic()))
            assert frame.headers["content-type"] == "application/json"
            message = json.loads(frame.body)
            self.pending[message.get("id")] = message
        return self.pending.pop(request_id)

    def call(self, method: str, params: Any = None, request_id: Any = 1) -> Any:
        self.send(method, params, request_id)
        reply = self.reply(request_id)
        if "error" in reply:
            raise AssertionError(f"{method}: {reply['error']}")
        return reply["result"]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.disconnect(receipt="bye")
        self.recorder.disconnected.wait(DEADLINE)


@contextlib.contextmanager
def client(port: int, pki: Pki, **kwargs: Any) -> Iterator[Client]:
    c = Client(port, pki, **kwargs)
    try:
        yield c
    finally:
        c.close()


@pytest.mark.parametrize("connect_command", [True, False], ids=["CONNECT", "STOMP"])
def test_stomp_py_client_calls_over_mutual_tls(stomp_daemon: tuple[Daemon, int], pki: Pki,
                                               connect_command: bool) -> None:
    d, port = stomp_daemon
    with client(port, pki, connect_command=connect_command) as c:
        assert c.call("getHostInfo")["version"]
        c.send("nope", request_id="x")
        assert c.reply("x")["error"]["code"] == -32601
        c.conn.send(REQUESTS, "{not json", headers={"reply-to": REPLIES})
        assert c.reply(None)["error"]["code"] == -32700  # as on the other transports
        c.conn.send(REQUESTS, json.dumps([{"jsonrpc": "2.0", "id": 7, "method": "getHostInfo"},
                                          {"jsonrpc": "2.0", "method": "getHostInfo"}]),
                    headers={"reply-to": REPLIES})
        batch = c.recorder.messages["replies"].get(timeout=DEADLINE)
        assert [r["id"] for r in json.loads(batch.body)] == [7]
    assert c.recorder.receipts == ["bye"] and not c.recorder.errors
    command = "CONNECT" if connect_command else "STOMP"
    assert "STOMP CONNECTED peer=tcp=127.0.0.1:" in d.log()
    assert f"cn=engine command={command} heart-beat=0,0" in d.log()


@pytest.mark.root
def test_events_of_an_outage_and_its_repair(stomp_daemon: tuple[Daemon, int], pki: Pki) -> None:
    d, port = stomp_daemon
    with client(port, pki) as c:
        c.conn.subscribe(EVENTS, id="events", ack="auto")
        tmpfs = {"type": "posixfs", "connection": "vc-stomp", "vfs_type": "tmpfs"}
        managed = c.call("manageStorageServer", {"connectionID": "S1", "connection": tmpfs})
        key = managed["key"]
        status = c.call("waitStorageServer", {"connectionIDs": ["S1"], "timeout": DEADLINE})
        assert status["S1"]["state"] == "connected"
        subprocess.run(["umount", status["S1"]["path"]], check=True, timeout=60)
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + DEADLINE
        while not any(e["params"]["oldState"] == "connected" for e in events) or \
                events[-1]["params"]["newState"] != "connected":
            frame = c.recorder.messages["events"].get(
                timeout=max(0.1, deadline - time.monotonic()))
            assert frame.headers["destination"] == EVENTS
            assert frame.headers["message-id"]
            assert int(frame.headers["content-length"]) == len(frame.body.encode())
            events.append(json.loads(frame.body))
        for event in events:
            assert event["method"] == f"|storage|connection_state|{key}"
            assert "id" not in event and event["jsonrpc"] == "2.0"
            params = event["params"]
            assert params["connectionIDs"] == ["S1"] and params["key"] == key
            assert isinstance(params["notify_time"], int) and params["notify_time"] > 2**31 - 1
        times = [e["params"]["notify_time"] for e in events]
        assert times == sorted(times)
        lost = next(e for e in events if e["params"]["oldState"] == "connected")
        assert lost["params"]["newState"] != "connected"
        d.wait_mounted(status["S1"]["path"])
        c.call("unmanageStorageServer", {"connectionID": "S1"})
    d.wait_gone(status["S1"]["path"])


def test_heartbeats_keep_a_quiet_connection_up(stomp_daemon: tuple[Daemon, int],
                                               pki: Pki) -> None:
    _, port = stomp_daemon
    with client(port, pki, heartbeats=(1000, 1000)) as c:
        time.sleep(5)  # five intervals with nothing but heart-beats both ways
        assert c.conn.is_connected() and not c.recorder.disconnected.is_set()
        assert c.recorder.heartbeats >= 2
        assert c.call("getHostInfo")["version"]


def test_replies_never_reach_another_connection(stomp_daemon: tuple[Daemon, int],
                                                pki: Pki) -> None:
    _, port = stomp_daemon
    with client(port, pki) as a, client(port, pki) as b:
        for n in range(20):
            a.send("getHostInfo", request_id=f"a{n}")
            b.send("getHostInfo", request_id=f"b{n}")
        for n in range(20):
            assert a.reply(f"a{n}")["result"]["version"]
            assert b.reply(f"b{n}")["result"]["version"]
        a.call("getHostInfo", request_id="a-last")
        b.call("getHostInfo", request_id="b-last")
        time.sleep(0.5)
        assert a.recorder.messages["replies"].empty() and b.recorder.messages["replies"].empty()
        assert not a.pending and not b.pending


def test_frame_exchange_of_stomp_py(stomp_daemon: tuple[Daemon, int], pki: Pki) -> None:
    """Prints the frames of one session as stomp.py logs them (run with -s to see them)."""
    _, port = stomp_daemon
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("stomp.py")
    handler, level = Capture(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with client(port, pki, connect_command=True, heartbeats=(0, 15000)) as c:
            c.call("getHostInfo", request_id=1)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    frames = [line for line in lines if line.startswith(("sending frame", "received frame"))]
    print("\n".join(frames))
    assert any("CONNECT" in f and "accept-version" in f for f in frames)
    assert any("'CONNECTED'" in f and "'heart-beat': '15000,0'" in f for f in frames)
    assert any("'MESSAGE'" in f and "'subscription': 'replies'" in f for f in frames)
    assert any("'RECEIPT'" in f for f in frames)


# --- raw frames ----------------------------------------------------------------------------


class Raw:
    """Frames written by hand and read back without any STOMP library."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        sock.settimeout(DEADLINE)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _more(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        self.buf += chunk
        return bool(chunk)

    def frame(self) -> tuple[str, dict[str, str], bytes] | None:
        """The next frame (heart-beats skipped), or None at end of input."""
        while True:
            self.buf = self.buf.lstrip(b"\r\n")
            head_end = self.buf.find(b"\n\n")
            if head_end >= 0:
                command, *lines = self.buf[:head_end].decode().split("\n")
                headers = dict(line.split(":", 1) for line in reversed(lines))
                start = head_end + 2
                if "content-length" in headers:
                    end = start + int(headers["content-length"])
                    if len(self.buf) > end:
                        assert self.buf[end:end + 1] == b"\0"
                        body, self.buf = self.buf[start:end], self.buf[end + 1:]
                        return command, headers, body
                elif (end := self.buf.find(b"\0", start)) >= 0:
                    body, self.buf = self.buf[start:end], self.buf[end + 1:]
                    return command, headers, body
            if not self._more():
                return None

    def closed(self) -> bool:
        """Whether the server closes the connection (after any frames it still sends)."""
        while self._more():
            pass
        return True


ENGINE_CONNECT = (b"SUBSCRIBE\ndestination:jms.topic.vdsm_responses\nid:r-1\nack:auto\n\n\0"
                  b"SUBSCRIBE\ndestination:jms.queue.events\nid:e-1\nack:auto\n\n\0"
                  b"CONNECT\naccept-version:1.2\nhost:engine\nheart-beat:0,15000\n\n\0")


def send_frame(body: bytes, reply_to: str = REPLIES, extra: bytes = b"") -> bytes:
    return (b"SEND\r\ndestination:jms.topic.vdsm_requests\r\nreply-to:" + reply_to.encode()
            + b"\r\ncontent-length:%d\r\n" % len(body) + extra + b"\r\n" + body + b"\0")


def unix(d: Daemon) -> Raw:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(d.socket)
    return Raw(sock)


def test_unix_socket_speaks_stomp_as_the_engine_does(daemon: Daemon) -> None:
    raw = unix(daemon)
    with raw.sock:
        raw.send(ENGINE_CONNECT)
        assert raw.frame() == ("CONNECTED", {"version": "1.2", "heart-beat": "15000,0",
                                             "server": "vdsmconn/0.1.0"}, b"")
        body = b'{"jsonrpc":"2.0","id":"u1","method":"getHostInfo"}'
        raw.send(send_frame(body, extra=b"receipt:s1\n"))
        frames = [raw.frame(), raw.frame()]
        assert frames[0] == ("RECEIPT", {"receipt-id": "s1"}, b"")
        command, headers, reply = frames[1] or ("", {}, b"")
        assert command == "MESSAGE"
        assert headers["subscription"] == "r-1" and headers["destination"] == REPLIES
        assert headers["content-type"] == "application/json" and headers["message-id"]
        assert json.loads(reply)["id"] == "u1"
        assert daemon.call("getHostInfo")["version"]  # newline JSON-RPC on the same socket
        raw.send(b"UNSUBSCRIBE\nid:r-1\n\n\0" + send_frame(body) + b"DISCONNECT\nreceipt:9\n\n\0")
        assert raw.frame() == ("RECEIPT", {"receipt-id": "9"}, b"")  # the reply had no taker
        assert raw.frame() is None


@pytest.mark.parametrize(("frames", "message"), [
    (b"CONNECT\naccept-version:1.0,1.1\n\n\0", "Supported protocol versions are 1.2"),
    (b"STOMP\nhost:x\n\n\0", "Supported protocol versions are 1.2"),
    (b"CONNECT\naccept-version:1.2\nheart-beat:fast\n\n\0", "heart-beat must be"),
    (b"CONNECT\naccept-version:1.2\n\n\0SEND\ndestination:/queue/other\n\n{}\0",
     "unknown destination '/queue/other'"),
    (b"SEND\ndestination:jms.topic.vdsm_requests\n\n{}\0", "SEND before CONNECT"),
    (b"CONNECT\naccept-version:1.2\n\n\0BEGIN\ntransaction:t\n\n\0", "BEGIN is not supported"),
    (b"SUBSCRIBE\nid:1\ndestination:a\n\n\0SUBSCRIBE\nid:1\ndestination:b\n\n\0",
     "subscription id '1' is in use"),
    (b"SUBSCRIBE\nid:1\ndestination:a\nack:client\n\n\0", "only ack:auto"),
])
def test_protocol_faults_get_an_error_and_a_close(daemon: Daemon, frames: bytes,
                                                  message: str) -> None:
    raw = unix(daemon)
    with raw.sock:
        raw.send(frames)
        found = raw.frame()
        while found is not None and found[0] == "CONNECTED":
            found = raw.frame()
        assert found is not None and found[0] == "ERROR", found
        assert message in found[1]["message"].replace("\\c", ":")
        assert raw.closed()
    assert daemon.call("getHostInfo")["version"]


def test_a_silent_peer_is_dropped_after_its_heartbeat_grace(
    stomp_daemon: tuple[Daemon, int], pki: Pki,
) -> None:
    d, port = stomp_daemon
    with pki.connect(port, timeout=DEADLINE) as sock:
        raw = Raw(sock)
        raw.send(b"CONNECT\naccept-version:1.2\nhost:h\nheart-beat:1000,0\n\n\0")
        started = time.monotonic()
        frame = raw.frame()
        assert frame is not None and frame[1]["heart-beat"] == "0,1000"
        error = raw.frame()  # then nothing from us: the daemon gives up
        silent_for = time.monotonic() - started
        assert error is not None and error[0] == "ERROR"
        assert "no heart-beat" in error[1]["message"]
        assert raw.closed()
    assert silent_for >= 1.0  # never before the interval itself
    assert "no heart-beat for 2s" in d.log()


# --- configuration -------------------------------------------------------------------------


def test_configured_destinations_are_used(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    d.settings["rpc"]["stomp"] = {"request_destinations": ["/queue/vdsm"],
                                  "event_destination": "/topic/events"}
    try:
        d.start()
        raw = unix(d)
        with raw.sock:
            raw.send(b"CONNECT\naccept-version:1.2\n\n\0"
                     b"SUBSCRIBE\nid:1\ndestination:/queue/replies\n\n\0"
                     b"SEND\ndestination:/queue/vdsm\nreply-to:/queue/replies\n\n"
                     b'{"jsonrpc":"2.0","id":3,"method":"getHostInfo"}\0')
            assert [f[0] if f else None for f in (raw.frame(), raw.frame())] == [
                "CONNECTED", "MESSAGE"]
            raw.send(b"SEND\ndestination:jms.topic.vdsm_requests\n\n{}\0")
            error = raw.frame()
            assert error is not None and error[0] == "ERROR"
            assert "requests go to /queue/vdsm" in error[1]["message"]
            assert raw.closed()
    finally:
        d.cleanup()


@pytest.mark.parametrize(("text", "named"), [
    ("rpc: {stomp: {request_destinations: []}}", "rpc.stomp.request_destinations: expected"),
    ("rpc: {stomp: {request_destinations: [a, 3]}}", "rpc.stomp.request_destinations[1]"),
    ("rpc: {stomp: {request_destinations: a}}", "expected a list of str"),
    ("rpc: {stomp: {event_destination: 'a b'}}", "rpc.stomp.event_destination: expected"),
    ("rpc: {stomp: {event_destination: x, request_destinations: [x]}}",
     "rpc.stomp.event_destination (x) is also in rpc.stomp.request_destinations"),
    ("rpc: {stomp: {events: x}}", "unknown key 'rpc.stomp.events'"),
])
def test_bad_stomp_settings_stop_start_up(text: str, named: str) -> None:
    with pytest.raises(config.ConfigError, match=re.escape(named)):
        config.check_complete(config.load_text(text, "test.yaml"))


# --- limits --------------------------------------------------------------------------------


def test_idle_rules_spare_a_peer_that_reads_our_heartbeats(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    d.settings["rpc"]["idle_timeout"] = 1.0
    try:
        d.start()
        quiet, engine = unix(d), unix(d)
        with quiet.sock, engine.sock:
            quiet.send(b"CONNECT\naccept-version:1.2\n\n\0")
            engine.send(ENGINE_CONNECT.replace(b"0,15000", b"0,1000"))
            assert quiet.frame() is not None and engine.frame() is not None
            assert quiet.closed()  # no heart-beats either way: idle_timeout applies
            time.sleep(3)  # three idle timeouts: the engine's connection stays
            engine.send(send_frame(b'{"jsonrpc":"2.0","id":5,"method":"getHostInfo"}'))
            reply = engine.frame()
            assert reply is not None and json.loads(reply[2])["id"] == 5
        assert "reason=idle" in d.log()
    finally:
        d.cleanup()


def test_a_client_over_the_cap_is_refused_in_its_protocol(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    d.settings["rpc"]["max_clients"] = 1
    try:
        d.start()
        first = unix(d)
        with first.sock:
            first.send(b"CONNECT\naccept-version:1.2\n\n\0")
            assert first.frame() is not None
            refused = unix(d)
            with refused.sock:
                refused.send(b"CONNECT\naccept-version:1.2\n\n\0")
                error = refused.frame()
                assert error is not None and error[0] == "ERROR"
                assert "Too many clients (limit 1)" in error[1]["message"]
                assert refused.closed()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as plain:
                plain.settimeout(DEADLINE)
                plain.connect(d.socket)
                plain.sendall(b'{"jsonrpc":"2.0","id":1,"method":"getHostInfo"}\n')
                line = plain.makefile("rb").readline()
                assert "Too many clients" in json.loads(line)["error"]["message"]
    finally:
        d.cleanup()


def test_jsonrpc_subscribe_over_stomp_delivers_to_the_event_destination(
    daemon: Daemon, tmp_path: Path,
) -> None:
    raw = unix(daemon)
    with raw.sock:
        raw.send(ENGINE_CONNECT + send_frame(
            b'{"jsonrpc":"2.0","id":1,"method":"subscribe",'
            b'"params":{"events":["storageServerStateChanged"]}}'))
        assert [f[0] if f else None for f in (raw.frame(), raw.frame())] == [
            "CONNECTED", "MESSAGE"]
        key = daemon.call("manageStorageServer", connectionID="L1",
                          connection=f"localfs://{tmp_path}")["key"]
        methods: set[str] = set()
        while "storageServerStateChanged" not in methods or len(methods) < 2:
            frame = raw.frame()
            assert frame is not None and frame[1]["subscription"] == "e-1"
            methods.add(json.loads(frame[2])["method"])
        assert methods == {"storageServerStateChanged", f"|storage|connection_state|{key}"}
    daemon.call("unmanageStorageServer", connectionID="L1")
