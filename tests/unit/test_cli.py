"""The `vdsmconn` client against a tiny real JSON-RPC responder on a unix socket."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vdsmconn import cli, display

SECRET = "s3cret-Pa55"


class FakeDaemon:
    """Answers requests with canned replies by method name and records every request."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.replies: dict[str, dict[str, Any]] = {}
        self.silent: set[str] = set()
        self.before_reply: list[dict[str, Any]] = []
        self.after_subscribe: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen()
        self._listener.settimeout(0.05)
        self._thread = threading.Thread(target=self._serve)
        self._thread.start()

    @property
    def methods(self) -> list[str]:
        return [r["method"] for r in self.requests]

    def params(self, method: str) -> Any:
        return next(r.get("params") for r in self.requests if r["method"] == method)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        for line in conn.makefile("rb"):
            request = json.loads(line)
            self.requests.append(request)
            if request["method"] in self.silent:
                continue
            for note in self.before_reply:
                _send(conn, {"jsonrpc": "2.0", **note})
            reply = self.replies.get(request["method"], {"result": {}})
            _send(conn, {"jsonrpc": "2.0", "id": request["id"], **reply})
            if request["method"] == "subscribe":
                for note in self.after_subscribe:
                    _send(conn, {"jsonrpc": "2.0", **note})
                return


def _send(conn: socket.socket, msg: dict[str, Any]) -> None:
    conn.sendall(json.dumps(msg).encode() + b"\n")


@pytest.fixture
def sockdir() -> Iterator[str]:
    # Short path: AF_UNIX socket paths are limited to 107 bytes.
    path = tempfile.mkdtemp(prefix="vdsmconn-cli-")
    yield path
    shutil.rmtree(path)


@pytest.fixture
def daemon(sockdir: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDaemon]:
    fake = FakeDaemon(os.path.join(sockdir, "vdsmconn.sock"))
    monkeypatch.setenv(cli.SOCKET_ENV, fake.path)
    yield fake
    fake.close()


def status(
    state: str = "connected",
    *,
    type: str = "nfs",
    path: str | None = "/mnt/x",
    error: dict[str, Any] | None = None,
    refs: int = 1,
) -> dict[str, Any]:
    return {
        "managed": True,
        "connected": state == "connected",
        "state": state,
        "key": f"{type}:k",
        "refs": refs,
        "connection": {"type": type},
        "lastError": error,
        "since": 1.0,
        "attempts": 0,
        "nextRetry": None,
        "path": path,
        "paths": [],
        "lastCheck": None,
    }


def test_manage_passes_uri_unchanged(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = "nfs://server/export?protocol_version=4.2"
    daemon.replies["manageStorageServer"] = {"result": {"connectionID": "C1", "key": "nfs:k"}}
    assert cli.main(["manage", "C1", uri]) == 0
    assert daemon.params("manageStorageServer") == {"connectionID": "C1", "connection": uri}
    assert "C1" in capsys.readouterr().out


def test_manage_parses_json_object(daemon: FakeDaemon) -> None:
    text = '{"type":"posixfs","connection":"tmpfs","vfs_type":"tmpfs"}'
    assert cli.main(["manage", "C1", text]) == 0
    assert daemon.params("manageStorageServer")["connection"] == json.loads(text)


def test_manage_reads_connection_from_file(
    daemon: FakeDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conn = {
        "type": "iscsi",
        "connection": "10.0.0.1",
        "iqn": "iqn.2003-01.org.x:t1",
        "user": "u",
        "password": SECRET,
    }
    (tmp_path / "conn.json").write_text(json.dumps(conn))
    assert cli.main(["manage", "C1", f"@{tmp_path / 'conn.json'}"]) == 0
    assert daemon.params("manageStorageServer")["connection"] == conn
    out, err = capsys.readouterr()
    assert SECRET not in out + err


def test_manage_password_from_stdin_is_sent_and_never_printed(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(SECRET + "\n"))
    daemon.replies["manageStorageServer"] = {"result": {"connectionID": "C1", "key": "k"}}
    text = '{"type":"iscsi","connection":"10.0.0.1","iqn":"iqn.2003-01.org.x:t1","user":"u"}'
    assert cli.main(["--json", "manage", "C1", text, "--password-stdin"]) == 0
    assert daemon.params("manageStorageServer")["connection"]["password"] == SECRET
    out, err = capsys.readouterr()
    assert SECRET not in out + err


def test_password_stdin_with_uri_is_a_usage_error(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(SECRET + "\n"))
    assert cli.main(["manage", "C1", "nfs://server/export", "--password-stdin"]) == 2
    assert daemon.requests == []
    assert "JSON object" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_bad_json_connection_is_a_usage_error(
    daemon: FakeDaemon, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["manage", "C1", text]) == 2
    assert daemon.requests == []
    assert capsys.readouterr().err.startswith("vdsmconn: ")


def test_missing_connection_file_is_a_usage_error(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["manage", "C1", "@/nonexistent/conn.json"]) == 2
    assert "/nonexistent/conn.json" in capsys.readouterr().err


def test_update_sends_update(daemon: FakeDaemon) -> None:
    assert cli.main(["update", "C1", "localfs:///srv/data"]) == 0
    assert daemon.methods == ["updateStorageServer"]
    assert daemon.params("updateStorageServer") == {
        "connectionID": "C1",
        "connection": "localfs:///srv/data",
    }


def test_unmanage_cid_and_prefix(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["unmanageStorageServer"] = {"result": {"connectionIDs": ["F1_A", "F1_B"]}}
    assert cli.main(["unmanage", "C1"]) == 0
    assert cli.main(["unmanage", "--prefix", "F1_"]) == 0
    assert [r["params"] for r in daemon.requests] == [{"connectionID": "C1"}, {"prefix": "F1_"}]
    assert "unmanaged F1_B" in capsys.readouterr().out


def test_unmanage_needs_exactly_one_of_cid_and_prefix(daemon: FakeDaemon) -> None:
    assert cli.main(["unmanage"]) == 2
    assert cli.main(["unmanage", "C1", "--prefix", "F"]) == 2
    assert cli.main(["unmanage", "--prefix", ""]) == 2
    assert daemon.requests == []


def test_list_sends_filters(daemon: FakeDaemon) -> None:
    daemon.replies["getStorageServerList"] = {"result": {}}
    assert cli.main(["list"]) == 0
    assert cli.main(["list", "A", "B", "--prefix", "F1_", "--no-unmanaged"]) == 0
    assert [r["params"] for r in daemon.requests] == [
        {"includeUnmanaged": True},
        {"includeUnmanaged": False, "connectionIDs": ["A", "B"], "prefix": "F1_"},
    ]


def test_list_table_is_sorted_and_aligned(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    long_message = "mount.nfs: Connection timed out " * 5
    daemon.replies["getStorageServerList"] = {
        "result": {
            "zeta": status(),
            "ALPHA_LONGER_CID": status(
                "failed",
                type="iscsi",
                path=None,
                refs=2,
                error={"code": 477, "message": long_message, "time": 2.0},
            ),
            "unmanaged:0": status("connected", type="posixfs", path="/rhev/data-center/mnt/x"),
        }
    }
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["CID", "TYPE", "STATE", "REFS", "PATH", "ERROR"]
    assert [line.split()[0] for line in lines[1:]] == ["ALPHA_LONGER_CID", "unmanaged:0", "zeta"]
    for column in ("TYPE", "STATE", "REFS", "PATH"):
        start = lines[0].index(column)
        assert all(line[start - 2 : start] == "  " and line[start] != " " for line in lines[1:])
    failed = lines[1]
    assert failed.split()[1:5] == ["iscsi", "failed", "2", "-"]
    assert "477 mount.nfs: Connection timed out" in failed
    assert failed.endswith("…") and len(failed) - lines[0].index("ERROR") == display.ERROR_WIDTH


def test_json_output_is_the_raw_result(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    result = {"C1": status()}
    daemon.replies["getStorageServerList"] = {"result": result}
    assert cli.main(["--json", "list"]) == 0
    assert json.loads(capsys.readouterr().out) == result


def test_error_reply_exits_1_with_message(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.replies["unmanageStorageServer"] = {
        "error": {"code": 479, "message": "Connection ID not found: C9"}
    }
    assert cli.main(["unmanage", "C9"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "vdsmconn: error 479: Connection ID not found: C9\n"


def test_notifications_before_the_reply_are_skipped(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.before_reply = [{"method": "storageServerStateChanged", "params": {"key": "k"}}]
    daemon.replies["getHostInfo"] = {"result": {"version": "0.1.0"}}
    assert cli.main(["info"]) == 0
    assert capsys.readouterr().out == "version: 0.1.0\n"


def test_socket_option_overrides_environment(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cli.SOCKET_ENV, "/nonexistent/vdsmconn.sock")
    assert cli.main(["--socket", daemon.path, "info"]) == 0
    assert daemon.methods == ["getHostInfo"]


def test_missing_socket_exits_3_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--socket", "/nonexistent/vdsmconn.sock", "list"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("vdsmconn: cannot connect to daemon at /nonexistent/vdsmconn.sock: ")
    assert "No such file" in err and "Traceback" not in err


def test_refused_socket_exits_3(sockdir: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = os.path.join(sockdir, "dead.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)  # bound but not listening: connect() is refused
        assert cli.main(["--socket", path, "info"]) == 3
    assert "Connection refused" in capsys.readouterr().err


def test_no_reply_within_timeout_exits_3(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.silent.add("getHostInfo")
    assert cli.main(["--timeout", "0.2", "info"]) == 3
    assert "no reply from daemon within 0.2 s" in capsys.readouterr().err


def test_unexpected_result_exits_3(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["getStorageServerList"] = {"result": ["not", "a", "dict"]}
    assert cli.main(["list"]) == 3
    assert "unexpected result from daemon for getStorageServerList" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["wait"]) == 2
    assert cli.main(["--timeout", "0", "list"]) == 2
    assert cli.main(["--help"]) == 0
    assert "connector-info" in capsys.readouterr().out


def test_wait_sends_timeout_and_until(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.replies["waitStorageServer"] = {"result": {"A": status(), "B": status()}}
    assert cli.main(["wait", "A", "B", "--timeout", "5", "--until", "error"]) == 0
    assert daemon.params("waitStorageServer") == {
        "connectionIDs": ["A", "B"],
        "timeout": 5.0,
        "until": "error",
    }
    assert cli.main(["wait", "A"]) == 0
    assert daemon.requests[1]["params"]["until"] == "connected"
    assert "connected" in capsys.readouterr().out


def test_wait_returning_a_failure_exits_1(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    failed = status("failed", error={"code": 477, "message": "mount failed", "time": 1.0})
    daemon.replies["waitStorageServer"] = {"result": {"A": status(), "B": failed}}
    assert cli.main(["wait", "A", "B"]) == 1
    out, err = capsys.readouterr()
    assert "477 mount failed" in out
    assert err == "vdsmconn: not connected: B\n"


def test_wait_timeout_prints_statuses_and_fails(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    statuses = {"A": status("connecting", path=None)}
    daemon.replies["waitStorageServer"] = {
        "error": {"code": 480, "message": "Timeout waiting", "data": statuses}
    }
    assert cli.main(["wait", "A", "--timeout", "1"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[1].split()[:3] == ["A", "nfs", "connecting"]
    assert err == "vdsmconn: error 480: Timeout waiting\n"
    assert cli.main(["--json", "wait", "A"]) == 1
    assert json.loads(capsys.readouterr().out) == statuses


def test_test_prints_steps_and_exits_1_when_not_ok(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.replies["testStorageServer"] = {
        "result": {
            "ok": False,
            "steps": [
                {"step": "resolve", "ok": True, "seconds": 0.0012, "detail": "10.0.0.1"},
                {
                    "step": "tcp-connect",
                    "ok": False,
                    "seconds": 3.0,
                    "detail": "connection refused",
                },
            ],
        }
    }
    assert cli.main(["test", "nfs://server/export", "--timeout", "3"]) == 1
    assert daemon.params("testStorageServer") == {
        "connection": "nfs://server/export",
        "timeout": 3.0,
    }
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["STEP", "RESULT", "SECONDS", "DETAIL"]
    assert lines[1].split() == ["resolve", "ok", "0.001", "10.0.0.1"]
    assert lines[2].split() == ["tcp-connect", "FAILED", "3.000", "connection", "refused"]
    assert lines[3] == "FAILED"


def test_test_ok_exits_0(daemon: FakeDaemon) -> None:
    daemon.replies["testStorageServer"] = {"result": {"ok": True, "steps": []}}
    assert cli.main(["test", '{"type":"localfs","connection":"/srv"}']) == 0
    assert daemon.params("testStorageServer") == {
        "connection": {"type": "localfs", "connection": "/srv"}
    }


def test_discover_sends_credentials_and_prints_targets(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(SECRET + "\n"))
    daemon.replies["discoverSendTargets"] = {
        "result": [{"portal": "10.0.0.1:3260", "tpgt": 1, "iqn": "iqn.2003-01.org.x:t1"}]
    }
    assert cli.main(["discover", "10.0.0.1", "--user", "u", "--password-stdin"]) == 0
    assert daemon.params("discoverSendTargets") == {
        "host": "10.0.0.1",
        "port": 3260,
        "user": "u",
        "password": SECRET,
    }
    out, err = capsys.readouterr()
    assert out.splitlines()[1].split() == ["10.0.0.1:3260", "1", "iqn.2003-01.org.x:t1"]
    assert SECRET not in out + err


def test_info_indents_nested_values(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["getHostInfo"] = {
        "result": {
            "version": "0.1.0",
            "backends": {"nfs": "available", "iscsi": "no iscsiadm"},
            "states": {"connected": 2},
            "uptime": 12.5,
        }
    }
    assert cli.main(["info"]) == 0
    assert capsys.readouterr().out == (
        "version: 0.1.0\nbackends:\n  nfs: available\n  iscsi: no iscsiadm\n"
        "states:\n  connected: 2\nuptime: 12.5\n"
    )


def test_connector_info_calls_get_connector_info(daemon: FakeDaemon) -> None:
    daemon.replies["getConnectorInfo"] = {"result": {"initiator": "iqn.1994-05.com.redhat:h"}}
    assert cli.main(["connector-info"]) == 0
    assert daemon.methods == ["getConnectorInfo"]


def _event(cid: str, old: str, new: str, error: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "method": "storageServerStateChanged",
        "params": {
            "connectionIDs": [cid],
            "key": f"key-{cid}",
            "oldState": old,
            "newState": new,
            "lastError": error,
            "time": 1700000000.25,
        },
    }


def test_watch_prints_events_until_the_daemon_closes(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.after_subscribe = [
        _event("A", "connecting", "connected"),
        {"method": "somethingElse", "params": {}},
        _event("B", "connected", "failed", {"code": 481, "message": "stale", "time": 1.0}),
    ]
    assert cli.main(["watch"]) == 3
    assert daemon.params("subscribe") == {"events": ["storageServerStateChanged"]}
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("A  connecting -> connected  key=key-A")
    assert ".250  " in lines[0]
    assert lines[1].endswith("B  connected -> failed  key=key-B  error=481 stale")
    assert err == "vdsmconn: the daemon closed the connection\n"


def test_watch_json_prints_one_object_per_line(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.after_subscribe = [_event("A", "connecting", "connected")]
    cli.main(["--json", "watch"])
    out = capsys.readouterr().out
    assert json.loads(out) == _event("A", "connecting", "connected")["params"]


def test_watch_ctrl_c_exits_0(daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(self: cli.Client) -> Iterator[dict[str, Any]]:
        yield _event("A", "connecting", "connected")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.Client, "notifications", interrupted)
    assert cli.main(["watch"]) == 0


def test_format_list_tolerates_missing_fields() -> None:
    table = display.format_list(
        {"u": {"state": "connected", "connection": None, "lastError": None}})
    assert table.splitlines()[1].split() == ["u", "-", "connected", "-", "-"]


DEVICE = {
    "path": "/dev/mapper/mpatha", "wwid": "36001405abc", "vendor": "LIO-ORG", "product": "lun0",
    "size": 64 * 1024 * 1024, "logicalBlockSize": 512, "physicalBlockSize": 4096,
    "multipath": {"name": "mpatha", "path": "/dev/mapper/mpatha", "dm": "dm-0",
                  "uuid": "mpath-36001405abc"},
    "devices": ["/dev/sda", "/dev/sdb"],
    "sessions": [{"sid": 1, "portal": "10.0.0.2:3260", "iqn": "iqn.2003-01.org.x:t1",
                  "iface": "eth1", "netdev": "eth1", "device": "/dev/sda"},
                 {"sid": 2, "portal": "10.0.0.2:3260", "iqn": "iqn.2003-01.org.x:t1",
                  "iface": "eth2", "netdev": "eth2", "device": "/dev/sdb"}],
    "connectionIDs": ["i1", "i2"], "error": None,
}


def test_devices_sends_cids_and_prints_one_row_per_lun(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.replies["getDeviceList"] = {"result": {"devices": [DEVICE], "errors": []}}
    assert cli.main(["devices", "i1", "i2"]) == 0
    assert daemon.params("getDeviceList") == {"connectionIDs": ["i1", "i2"]}
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["PATH", "WWID", "MODEL", "SIZE", "BLOCKS", "SESSIONS", "CIDS",
                                "ERROR"]
    assert lines[1].split() == ["/dev/mapper/mpatha", "36001405abc", "LIO-ORG", "lun0", "64.0",
                                "MiB", "512/4096", "eth1:10.0.0.2:3260,", "eth2:10.0.0.2:3260",
                                "i1,i2"]
    assert len(lines) == 2


def test_devices_without_cids_asks_for_all_and_a_partial_result_exits_1(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.replies["getDeviceList"] = {"result": {"devices": [], "errors": [
        {"key": "iscsi:x", "connectionIDs": ["i3"],
         "error": {"code": 451, "message": "iscsi:x has no session on this host"}}]}}
    assert cli.main(["devices"]) == 1
    assert daemon.params("getDeviceList") == {}
    assert capsys.readouterr().out.splitlines()[-1] == (
        "error: i3: 451 iscsi:x has no session on this host")


def test_domains_prints_domains_skipped_and_errors(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    uuid = "0f6b5e5c-4c3a-4e8e-9d43-1f0c9b1e2a77"
    daemon.replies["getStorageDomainList"] = {"result": {
        "domains": [
            {"sdUUID": uuid, "type": "file", "path": f"/mnt/s:_e/{uuid}", "connectionIDs": ["n"],
             "metadata": {"CLASS": "Data", "VERSION": "5", "DESCRIPTION": "nfs data"}},
            {"sdUUID": "vg-uuid", "type": "block", "vgName": "vg-uuid", "connectionIDs": ["i"],
             "metadata": {}}],
        "skipped": [{"path": "/mnt/s:_e/1111", "reason": "no dom_md/metadata"}],
        "errors": []}}
    assert cli.main(["domains", "n", "i"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == [uuid, "file", f"/mnt/s:_e/{uuid}", "Data", "5", "nfs", "data",
                                "n"]
    assert lines[2].split() == ["vg-uuid", "block", "vg-uuid", "-", "-", "-", "i"]
    assert lines[3] == "skipped: /mnt/s:_e/1111: no dom_md/metadata"
    assert daemon.params("getStorageDomainList") == {"connectionIDs": ["n", "i"]}
