"""The engine's whole flow over STOMP, in the test guest: the real daemon with its TLS listener,
spoken to by stomp.py (the third-party client of tests/integration/test_stomp.py, carried into
the guest with the project's virtualenv) as the engine speaks: CONNECT with accept-version:1.2
and heart-beat:0,15000, the engine's certificate, a subscription to the reply destination and
one to jms.queue.events, JSON-RPC requests SENT with reply-to and content-length.

For NFS (the kernel client against nfs-kernel-server) and iSCSI (the kernel initiator against
an LIO target): `StoragePool.connectStorageServer` with the engine's own dicts → status 0 and
the mount or session there when the reply arrives; an outage of the server → an event
`|storage|connection_state|<key>` leaving `connected`; the server back → an event back to
`connected`, with no request from the client in between (only status reads); then
`StoragePool.disconnectStorageServer` → status 0 with the mount gone or the session logged
out when the reply arrives, and the key's teardown event.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import stomp  # type: ignore[import-untyped]

from tests import daemon as daemon_module
from tests.daemon import Daemon, mounted
from tests.guest.fixtures import IscsiTarget, IscsiTargetFactory, NfsExport, sh
from tests.tlscerts import Pki, make_pki

pytestmark = pytest.mark.guest

REQUESTS = "jms.topic.vdsm_requests"
REPLIES = "jms.topic.vdsm_responses"
EVENTS = "jms.queue.events"
NFS, ISCSI = 1, 3  # VDSM's storage domain types
# Generous bounds: the guest is emulated. connect/disconnect wait up to 150 s in the daemon.
CALL_TIMEOUT = 300.0
OUTAGE_TIMEOUT = 120.0  # outage -> event leaving connected
REPAIR_TIMEOUT = 300.0  # server back -> event back to connected
EVENT_TIMEOUT = 60.0  # anything else that should come soon
# Start-up imports (pyroute2, ...) read from the 9p share under emulation on a busy host:
# seen taking more than the 30 s tests/daemon.py allows.
READY_TIMEOUT = 180.0


def report(what: str, **figures: Any) -> None:
    """Observed figures, for the issue's notes (pytest -s or the guest's output file)."""
    print(f"OBSERVED {what}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


# --- the engine's side: stomp.py over mutual TLS ---------------------------------------------


@dataclass(frozen=True)
class Event:
    """One MESSAGE of jms.queue.events, with the time it arrived."""

    received: float
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = self.body["params"]
        return params

    @property
    def key(self) -> str:
        return str(self.params["key"])

    @property
    def old(self) -> str | None:
        return self.params["oldState"]  # type: ignore[no-any-return]

    @property
    def new(self) -> str | None:
        return self.params["newState"]  # type: ignore[no-any-return]

    def __str__(self) -> str:
        error = self.params.get("lastError") or {}
        return f"{self.old}->{self.new}" + (f" ({error.get('code')})" if error else "")


class Engine(stomp.ConnectionListener):  # type: ignore[misc]
    """A STOMP session as the engine opens it: heart-beat:0,15000 (the daemon sends, the
    client does not), a reply subscription and an event subscription with UUID ids."""

    def __init__(self, port: int, pki: Pki) -> None:
        self.reply_sub, self.event_sub = str(uuid.uuid4()), str(uuid.uuid4())
        self._cond = threading.Condition()
        self._hooks: dict[str, Callable[[], Any]] = {}
        self.replies: dict[str, tuple[dict[str, Any], Any]] = {}
        self.events: list[Event] = []
        self.errors: list[str] = []
        self.connected_headers: dict[str, str] = {}
        self.disconnected = threading.Event()
        self.conn = stomp.Connection12([("127.0.0.1", port)], heartbeats=(0, 15000),
                                       reconnect_attempts_max=1, timeout=EVENT_TIMEOUT)
        self.conn.set_ssl(for_hosts=[("127.0.0.1", port)], key_file=pki.path("engine.key"),
                          cert_file=pki.path("engine.pem"), ca_certs=pki.path("engine-ca.pem"))
        self.conn.set_listener("engine", self)
        self.conn.connect(wait=True, with_connect_command=True)
        self.conn.subscribe(REPLIES, id=self.reply_sub, ack="auto")
        self.conn.subscribe(EVENTS, id=self.event_sub, ack="auto")

    # stomp.py's callbacks (its receiver thread)

    def on_connected(self, frame: Any) -> None:
        self.connected_headers = dict(frame.headers)

    def on_message(self, frame: Any) -> None:
        body = json.loads(frame.body)
        with self._cond:
            if frame.headers["subscription"] == self.event_sub:
                self.events.append(Event(time.monotonic(), dict(frame.headers), body))
            elif frame.headers["subscription"] == self.reply_sub:
                request_id = str(body.get("id"))
                # What the host looks like the moment the reply arrives, before anything
                # else can happen: taken here, in the thread that received it.
                hook = self._hooks.pop(request_id, None)
                self.replies[request_id] = (body, hook() if hook is not None else None)
            else:
                self.errors.append(f"MESSAGE for an unknown subscription: {frame.headers}")
            self._cond.notify_all()

    def on_error(self, frame: Any) -> None:
        with self._cond:
            self.errors.append(f"ERROR {frame.headers} {frame.body}")
            self._cond.notify_all()

    def on_disconnected(self) -> None:
        with self._cond:
            self.disconnected.set()
            self._cond.notify_all()

    # requests

    def call(self, method: str, params: dict[str, Any], timeout: float = EVENT_TIMEOUT,
             at_reply: Callable[[], Any] | None = None) -> tuple[Any, Any]:
        """The result of `method`, and what `at_reply` saw when the reply arrived."""
        request_id = str(uuid.uuid4())
        if at_reply is not None:
            self._hooks[request_id] = at_reply
        request = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        # stomp.py adds content-length (auto_content_length).
        self.conn.send(REQUESTS, json.dumps(request), content_type="application/json",
                       headers={"reply-to": REPLIES})
        deadline = time.monotonic() + timeout
        with self._cond:
            while request_id not in self.replies:
                left = deadline - time.monotonic()
                assert left > 0, f"no reply to {method} within {timeout:.0f} s"
                assert not self.disconnected.is_set(), f"disconnected: {self.errors}"
                self._cond.wait(min(left, 1.0))
            reply, seen = self.replies.pop(request_id)
        assert "error" not in reply, f"{method}: {reply['error']}"
        return reply["result"], seen

    def status(self, cid: str) -> dict[str, Any]:
        found, _ = self.call("getStorageServerList", {"connectionIDs": [cid]})
        return found[cid]  # type: ignore[no-any-return]

    # events

    def wait_event(self, what: str, check: Callable[[Event], bool], after: int,
                   timeout: float) -> tuple[int, Event]:
        """The first event from index `after` on that passes `check`, and its index."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(after, len(self.events)):
                    if check(self.events[i]):
                        return i, self.events[i]
                left = deadline - time.monotonic()
                assert left > 0, f"no event {what} within {timeout:.0f} s: " + ", ".join(
                    str(e) for e in self.events[after:])
                assert not self.disconnected.is_set(), f"disconnected: {self.errors}"
                self._cond.wait(min(left, 1.0))

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.disconnect(receipt="bye")
        self.disconnected.wait(EVENT_TIMEOUT)


@contextlib.contextmanager
def engine(port: int, pki: Pki) -> Iterator[Engine]:
    client = Engine(port, pki)
    try:
        yield client
    finally:
        client.close()


# --- the daemon --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def slow_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon_module, "READY_TIMEOUT", READY_TIMEOUT)


@contextlib.contextmanager
def tls_daemon(tmp_path: Path, pki: Pki, **supervisor: float) -> Iterator[tuple[Daemon, int]]:
    """The real daemon with its TLS listener on 127.0.0.1 (the engine's CA trusted)."""
    port = free_port()
    d = Daemon(tmp_path, supervisor=supervisor)
    d.settings["rpc"]["tcp"] = pki.tcp_settings(port)
    try:
        d.start()
        yield d, port
    except BaseException:
        print("--- the daemon's log, last lines ---\n" + d.log()[-12000:])
        raise
    finally:
        d.cleanup()


def no_crash(daemon: Daemon) -> None:
    """The daemon logged no traceback (a supervisor that crashed reports 100, a bug)."""
    text = daemon.log_file.read_text(errors="replace")
    at = text.find("Traceback")
    assert at < 0, text[max(0, at - 2000):at + 6000]


def pool_params(kind: int, conn: dict[str, Any]) -> dict[str, Any]:
    return {"storagepoolID": str(uuid.uuid4()), "domainType": kind, "connectionParams": [conn]}


@dataclass
class Flow:
    """The figures of one flow, filled in as it goes."""

    connect_s: float = 0.0
    outage_cmd_s: float = 0.0
    outage_to_event_s: float = 0.0
    restore_cmd_s: float = 0.0
    restore_to_event_s: float = 0.0
    disconnect_s: float = 0.0


def check_event(event: Event, key: str, cid: str) -> None:
    """An event as the engine reads it: VDSM's method name, our storageServerStateChanged
    params, VDSM's notify_time."""
    assert event.headers["destination"] == EVENTS
    assert event.headers["content-type"] == "application/json"
    assert event.body["jsonrpc"] == "2.0" and "id" not in event.body
    assert event.body["method"] == f"|storage|connection_state|{key}"
    assert event.key == key and event.params["connectionIDs"] == [cid]
    assert isinstance(event.params["notify_time"], int)
    assert event.params["notify_time"] > 2**31 - 1


def outage_and_repair(client: Engine, key: str, cid: str, flow: Flow,
                      outage: Callable[[], None], restore: Callable[[], None],
                      while_away: Callable[[], None]) -> tuple[Event, Event]:
    """Break the server, wait for the event leaving `connected`, mend it, wait for the event
    back to `connected`. Between the two the client sends no request but status reads."""
    mark = client.mark()
    started = time.monotonic()
    outage()
    flow.outage_cmd_s = time.monotonic() - started
    at, lost = client.wait_event("leaving connected",
                                 lambda e: e.key == key and e.old == "connected",
                                 mark, OUTAGE_TIMEOUT)
    flow.outage_to_event_s = lost.received - started
    assert lost.new != "connected"
    status = client.status(cid)
    assert status["state"] != "connected" and not status["connected"], status
    while_away()

    repair_mark = client.mark()
    # Nothing claimed `connected` while the server was away.
    away = client.events[at:repair_mark]
    assert not [e for e in away if e.key == key and e.new == "connected"], [
        str(e) for e in away]
    started = time.monotonic()
    restore()
    flow.restore_cmd_s = time.monotonic() - started
    _, back = client.wait_event("back to connected",
                                lambda e: e.key == key and e.new == "connected",
                                repair_mark, REPAIR_TIMEOUT)
    flow.restore_to_event_s = back.received - started
    between = [e for e in client.events[at:] if e.key == key and e.received <= back.received]
    # The engine is told why: some event of the outage carries the error.
    assert any(e.params["lastError"] for e in between), [str(e) for e in between]
    for event in between:
        check_event(event, key, cid)
    times = [e.params["notify_time"] for e in between]
    assert times == sorted(times)
    return lost, back


def teardown_event(client: Engine, key: str, after: int) -> Event:
    """The event of the key's end (newState null), sent to the engine after its disconnect."""
    _, gone = client.wait_event("of the teardown", lambda e: e.key == key and e.new is None,
                                after, EVENT_TIMEOUT)
    assert gone.old == "disconnecting" and gone.params["lastError"] is None, gone.params
    return gone


# --- NFS ---------------------------------------------------------------------------------------


def engine_nfs(export: NfsExport) -> dict[str, Any]:
    """An NFS connection as the engine sends it to VDSM (numbers as text; the retransmission
    settings an admin may set on the domain, short so that the outage shows at once)."""
    return {"id": str(uuid.uuid4()), "connection": export.remote, "port": "", "iqn": "",
            "user": "", "password": "", "ipv6_enabled": "false", "tpgt": None,
            "ifaceName": None, "netIfaceName": None, "protocol_version": "4.2",
            "timeout": "5", "retrans": "1", "mnt_options": "", "vfs_type": ""}


def test_nfs_connect_outage_repair_disconnect_over_stomp(
        tmp_path: Path, pki: Pki, nfs_export: NfsExport, slow_start: None) -> None:
    (nfs_export.path / "hello").write_text("from the server\n")
    conn = engine_nfs(nfs_export)
    cid = f"vdsm:{conn['id']}"
    flow = Flow()
    # mount.nfs retries a dead server for 2 minutes: a short command deadline.
    with tls_daemon(tmp_path, pki, probe_interval=1, probe_timeout=3, command_timeout=10,
                    backoff_initial=0.5, backoff_max=2) as (daemon, port), \
            engine(port, pki) as client:
        assert client.connected_headers["heart-beat"] == "15000,0"
        path = f"{daemon.mount_root}/127.0.0.1:_srv_vdsmconn-nfs_{nfs_export.path.name}"
        started = time.monotonic()
        result, seen = client.call("StoragePool.connectStorageServer",
                                   pool_params(NFS, conn), CALL_TIMEOUT, lambda: mounted(path))
        flow.connect_s = time.monotonic() - started
        assert result == [{"id": conn["id"], "status": 0}]
        assert seen is not None, "not mounted when the reply arrived"
        assert (seen.fstype, seen.source) == ("nfs4", nfs_export.remote)
        assert {"vers=4.2", "soft", "timeo=5", "retrans=1"} <= set(seen.super_options)
        status = client.status(cid)
        key = status["key"]
        assert (status["state"], status["path"], status["engineID"]) == (
            "connected", path, conn["id"])
        client.wait_event("connected after connect",
                          lambda e: e.key == key and e.new == "connected", 0, EVENT_TIMEOUT)
        assert Path(path, "hello").read_text() == "from the server\n"
        first = mounted(path)
        assert first is not None

        def while_away() -> None:
            away = client.status(cid)
            report("nfs while away", state=away["state"], attempts=away["attempts"],
                   error=away["lastError"])

        lost, back = outage_and_repair(client, key, cid, flow, nfs_export.stop,
                                       nfs_export.start, while_away)
        again = mounted(path)
        assert again is not None and client.status(cid)["state"] == "connected"
        Path(path, "after").write_text("back\n")
        assert (nfs_export.path / "after").read_text() == "back\n"

        mark = client.mark()
        started = time.monotonic()
        result, seen = client.call("StoragePool.disconnectStorageServer",
                                   pool_params(NFS, conn), CALL_TIMEOUT, lambda: mounted(path))
        flow.disconnect_s = time.monotonic() - started
        assert result == [{"id": conn["id"], "status": 0}]
        assert seen is None, f"still mounted when the reply arrived: {seen}"
        listed, _ = client.call("getStorageServerList", {})
        assert cid not in listed
        gone = teardown_event(client, key, mark)
        assert client.errors == []
        assert "cn=engine command=CONNECT heart-beat=15000,0" in daemon.log()
        no_crash(daemon)
        report("nfs engine flow", connect_s=round(flow.connect_s, 2),
               outage_cmd_s=round(flow.outage_cmd_s, 2),
               outage_to_event_s=round(flow.outage_to_event_s, 2), lost=str(lost),
               restore_cmd_s=round(flow.restore_cmd_s, 2),
               restore_to_event_s=round(flow.restore_to_event_s, 2), back=str(back),
               remounted=again.mount_id != first.mount_id,
               disconnect_s=round(flow.disconnect_s, 2), teardown=str(gone),
               events=[str(e) for e in client.events if e.key == key])
    assert client.disconnected.is_set()


# --- iSCSI -------------------------------------------------------------------------------------


def engine_iscsi(target: IscsiTarget) -> dict[str, Any]:
    """An iSCSI connection as the engine sends it to VDSM (port and tpgt as text, no CHAP:
    empty user and password, no iSCSI bond)."""
    host, port = target.portals[0].rsplit(":", 1)
    return {"id": str(uuid.uuid4()), "connection": host, "port": port, "iqn": target.iqn,
            "tpgt": "1", "user": "", "password": "", "ipv6_enabled": False,
            "ifaceName": None, "netIfaceName": "", "mnt_options": "", "vfs_type": "",
            "protocol_version": "", "timeout": "", "retrans": ""}


def sysfs_sessions(iqn: str) -> dict[str, str]:
    """iface -> state of the kernel's sessions of `iqn` (reading sysfs never blocks)."""
    found = {}
    for s in Path("/sys/class/iscsi_session").glob("session*"):
        try:
            if (s / "targetname").read_text().strip() == iqn:
                found[(s / "ifacename").read_text().strip()] = (s / "state").read_text().strip()
        except OSError:
            continue
    return found


def node_records(iqn: str) -> list[str]:
    out = sh("iscsiadm", "-m", "node", check=False).stdout
    return [line for line in out.splitlines() if iqn in line]


def set_tpg(target: IscsiTarget, enabled: bool) -> None:
    """Enable or disable the target's portal group through configfs: disabling it releases
    its sessions at once, and logins are refused until it is enabled again."""
    (target.configfs / "enable").write_text("1\n" if enabled else "0\n")


def test_iscsi_connect_outage_repair_disconnect_over_stomp(
        tmp_path: Path, pki: Pki, iscsi_target: IscsiTargetFactory, slow_start: None) -> None:
    t = iscsi_target()
    conn = engine_iscsi(t)
    cid = f"vdsm:{conn['id']}"
    flow = Flow()

    def host_view() -> tuple[dict[str, str], list[str]]:
        return sysfs_sessions(t.iqn), t.sessions()

    with tls_daemon(tmp_path, pki, probe_interval=1, probe_timeout=5, command_timeout=30,
                    backoff_initial=0.5, backoff_max=2) as (daemon, port), \
            engine(port, pki) as client:
        started = time.monotonic()
        result, seen = client.call("StoragePool.connectStorageServer",
                                   pool_params(ISCSI, conn), CALL_TIMEOUT, host_view)
        flow.connect_s = time.monotonic() - started
        assert result == [{"id": conn["id"], "status": 0}]
        assert seen[0] == {"default": "LOGGED_IN"}, seen
        assert len(seen[1]) == 1, seen
        status = client.status(cid)
        key = status["key"]
        assert (status["state"], status["engineID"]) == ("connected", conn["id"])
        assert status["path"] == str(t.device())
        first_session = status["paths"][0]["session"]
        client.wait_event("connected after connect",
                          lambda e: e.key == key and e.new == "connected", 0, EVENT_TIMEOUT)
        record = sh("iscsiadm", "-m", "node", "-T", t.iqn, "-p", t.portals[0] + ",1").stdout
        assert "node.startup = manual" in record

        def while_away() -> None:
            away = client.status(cid)
            report("iscsi while away", state=away["state"], attempts=away["attempts"],
                   error=away["lastError"], sessions=sysfs_sessions(t.iqn))

        try:
            lost, back = outage_and_repair(client, key, cid, flow,
                                           lambda: set_tpg(t, False), lambda: set_tpg(t, True),
                                           while_away)
        except BaseException:
            with contextlib.suppress(OSError):
                set_tpg(t, True)  # the fixture's teardown logs out and deletes the target
            raise
        assert sysfs_sessions(t.iqn) == {"default": "LOGGED_IN"}
        status = client.status(cid)
        assert status["state"] == "connected" and status["path"] == str(t.device())
        last_session = status["paths"][0]["session"]

        mark = client.mark()
        started = time.monotonic()
        result, seen = client.call("StoragePool.disconnectStorageServer",
                                   pool_params(ISCSI, conn), CALL_TIMEOUT, host_view)
        flow.disconnect_s = time.monotonic() - started
        assert result == [{"id": conn["id"], "status": 0}]
        assert seen == ({}, []), f"a session left when the reply arrived: {seen}"
        assert node_records(t.iqn) == []
        listed, _ = client.call("getStorageServerList", {})
        assert cid not in listed
        gone = teardown_event(client, key, mark)
        assert client.errors == []
        assert "cn=engine command=CONNECT heart-beat=15000,0" in daemon.log()
        no_crash(daemon)
        report("iscsi engine flow", connect_s=round(flow.connect_s, 2),
               outage_cmd_s=round(flow.outage_cmd_s, 2),
               outage_to_event_s=round(flow.outage_to_event_s, 2), lost=str(lost),
               restore_cmd_s=round(flow.restore_cmd_s, 2),
               restore_to_event_s=round(flow.restore_to_event_s, 2), back=str(back),
               sessions=f"{first_session}->{last_session}",
               disconnect_s=round(flow.disconnect_s, 2), teardown=str(gone),
               events=[str(e) for e in client.events if e.key == key])
    assert client.disconnected.is_set()
