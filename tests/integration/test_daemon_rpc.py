"""Every bad input of SPEC 3/4 gets its error from the real daemon, which keeps serving."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon

TMPFS = {"type": "posixfs", "connection": "vc-rpc", "vfs_type": "tmpfs"}


class Raw:
    """A raw line-oriented connection, to send what the CLI never would."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data + b"\n")

    def reply(self) -> Any:
        return json.loads(self.file.readline())

    def call(self, method: str, params: Any, id_: Any = 1) -> Any:
        self.send(json.dumps({"jsonrpc": "2.0", "id": id_, "method": method,
                              "params": params}).encode())
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def raw(daemon: Daemon) -> Any:
    r = Raw(daemon.socket)
    yield r
    r.close()


BAD_CALLS: list[tuple[str, Any, int, str]] = [
    ("manageStorageServer", {"connectionID": "c"}, -32602, "connection"),
    ("manageStorageServer", {"connectionID": "c", "connection": TMPFS, "x": 1}, -32602, "x"),
    ("manageStorageServer", {"connectionID": 5, "connection": TMPFS}, -32602, "connectionID"),
    ("manageStorageServer", {"connectionID": "a/b", "connection": TMPFS}, 1000, "connectionID"),
    ("manageStorageServer", {"connectionID": "", "connection": TMPFS}, 1000, "connectionID"),
    ("manageStorageServer", {"connectionID": "c", "connection": {"type": "nfs"}}, -32602,
     "connection.connection"),
    ("manageStorageServer", {"connectionID": "c", "connection": "nfs://u:p@h/x"}, 1000,
     "connection"),
    ("manageStorageServer", ["c", TMPFS, "extra"], -32602, ""),
    ("unmanageStorageServer", {}, -32602, "connectionID"),
    ("unmanageStorageServer", {"connectionID": "c", "prefix": "c"}, -32602, "connectionID"),
    ("unmanageStorageServer", {"connectionID": "never"}, 479, ""),
    ("waitStorageServer", {"connectionIDs": ["never"], "timeout": 1}, 479, ""),
    ("waitStorageServer", {"connectionIDs": ["c"], "timeout": -1}, 1000, "timeout"),
    ("waitStorageServer", {"connectionIDs": "c", "timeout": 1}, -32602, "connectionIDs"),
    ("waitStorageServer", {"connectionIDs": ["c"], "timeout": 1, "until": "x"}, 1000, "until"),
    ("updateStorageServer", {"connectionID": "never", "connection": TMPFS}, 479, ""),
    ("getStorageServerList", {"includeUnmanaged": "yes"}, -32602, "includeUnmanaged"),
    ("subscribe", {"events": ["nope"]}, 1000, "events[0]"),
    ("noSuchVerb", {}, -32601, ""),
]


@pytest.mark.root
@pytest.mark.parametrize(("method", "params", "code", "field"), BAD_CALLS)
def test_bad_calls_get_their_error(raw: Raw, method: str, params: Any, code: int,
                                   field: str) -> None:
    reply = raw.call(method, params, id_="x")
    assert reply["id"] == "x" and "result" not in reply
    assert reply["error"]["code"] == code, reply
    if field:
        assert field in reply["error"]["message"]
    assert "Traceback" not in json.dumps(reply)
    # The same connection keeps being served.
    assert raw.call("getHostInfo", {}, id_=2)["result"]["version"]


@pytest.mark.root
def test_protocol_faults_keep_connection(raw: Raw) -> None:
    raw.send(b"{not json")
    assert raw.reply()["error"]["code"] == -32700
    raw.send(b"\xff\xfe")
    assert raw.reply()["error"]["code"] == -32700
    raw.send(b"[]")
    assert raw.reply()["error"]["code"] == -32600
    raw.send(b'{"jsonrpc": "2.0", "method": "getHostInfo"}')  # a notification: no reply
    raw.send(b'[{"jsonrpc": "2.0", "method": "getHostInfo", "id": [1]}, '
             b'{"jsonrpc": "2.0", "method": "getHostInfo", "id": 7.5}]')
    replies = raw.reply()
    assert sorted(str(r["id"]) for r in replies) == ["7.5", "None"]
    assert raw.call("getHostInfo", [], id_=None)["result"]["keys"] == 0


@pytest.mark.root
def test_oversized_message_is_refused_and_connection_closed(raw: Raw) -> None:
    raw.send(b'{"jsonrpc": "2.0", "id": 1, "method": "getHostInfo", "params": {"x": "'
             + b"a" * (1024 * 1024 + 10) + b'"}}')
    reply = raw.reply()
    assert reply["error"]["code"] == -32600
    assert raw.file.readline() == b""


@pytest.mark.root
def test_ownership_errors(daemon: Daemon) -> None:
    daemon.call("manageStorageServer", connectionID="o1", connection=TMPFS)
    assert daemon.call("manageStorageServer", connectionID="o1",
                       connection=TMPFS)["connectionID"] == "o1"
    other = dict(TMPFS, connection="vc-rpc-other")
    assert daemon.error("manageStorageServer", connectionID="o1", connection=other).code == 478
    conflicting = dict(TMPFS, mnt_options="size=1m")
    err = daemon.error("manageStorageServer", connectionID="o2", connection=conflicting)
    assert err.code == 453
    assert list(daemon.call("getStorageServerList", includeUnmanaged=False)) == ["o1"]
    assert daemon.call("unmanageStorageServer", prefix="zz") == {"connectionIDs": []}
    daemon.call("waitStorageServer", connectionIDs=["o1"], timeout=20)
    daemon.call("unmanageStorageServer", connectionID="o1")
    daemon.wait_gone(f"{daemon.mount_root}/vc-rpc")


@pytest.mark.root
def test_acknowledged_manage_survives_kill9(daemon: Daemon) -> None:
    with daemon.client() as c:
        for n in range(30):
            c.call("manageStorageServer", {"connectionID": f"d{n}", "connection": TMPFS})
    daemon.kill9()
    daemon.start()
    listing = daemon.call("getStorageServerList", includeUnmanaged=False)
    assert sorted(listing) == sorted(f"d{n}" for n in range(30))
    daemon.call("unmanageStorageServer", prefix="d")
    daemon.wait_gone(f"{daemon.mount_root}/vc-rpc")


@pytest.mark.root
def test_state_files_are_private(daemon: Daemon) -> None:
    state = Path(daemon.settings["state_dir"])
    assert state.stat().st_mode & 0o777 == 0o700
    assert (state / "vdsmconn.db").stat().st_mode & 0o777 == 0o600
    assert Path(daemon.socket).stat().st_mode & 0o777 == 0o660


def test_show_config_and_bad_config(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("mount_root: /srv/vc\n")
    out = subprocess.run([sys.executable, "-m", "vdsmconn", "--show-config", "-c", str(good)],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert "mount_root: /srv/vc" in out and "backoff_max: 60.0" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("supervisor:\n  probe_timout: 3\n")
    proc = subprocess.run([sys.executable, "-m", "vdsmconn", "-c", str(bad)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "supervisor.probe_timout" in proc.stderr and "unknown key" in proc.stderr
