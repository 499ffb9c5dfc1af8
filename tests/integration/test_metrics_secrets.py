"""No secret in a reply, an event, a metric or a log line (SPEC 4): connections holding an
iSCSI CHAP password and a mount option password go through the real daemon, and every
output it produced is searched for the secret values."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon
from tests.integration.test_events import Collector
from tests.integration.test_metrics import metrics_daemon, port_of
from tests.unit.test_metrics_collector import scrape

pytestmark = pytest.mark.root
__all__ = ["metrics_daemon"]  # the fixture, imported for this module's tests

CHAP = "Chap-S3cret-4711"
MOUNT = "Mnt-S3cret-0815"
TOKEN = "Tok-S3cret-2342"
ISCSI = {"type": "iscsi", "connection": "127.0.0.2", "port": 3260,
         "iqn": "iqn.2003-01.org.example:secret-test", "user": "chap-user", "password": CHAP}
# tmpfs refuses the unknown options: the mount fails and its error is reported.
POSIX = {"type": "posixfs", "connection": "vc-secret", "vfs_type": "tmpfs",
         "mnt_options": f"size=1m,password={MOUNT},authtoken={TOKEN}"}


@pytest.fixture
def watched(metrics_daemon: Daemon) -> Iterator[tuple[Daemon, Collector]]:
    c = Collector(metrics_daemon)
    yield metrics_daemon, c
    c.close()


def exercise(d: Daemon, scrapes: list[str] | None = None) -> list[Any]:
    """Manage, list, wait, test and unmanage connections holding secrets; the replies.
    A scrape of the metrics is added to `scrapes` before the unmanage."""
    replies: list[Any] = []
    replies.append(d.call("manageStorageServer", connectionID="sec-iscsi", connection=ISCSI))
    replies.append(d.call("manageStorageServer", connectionID="sec-posix", connection=POSIX))
    replies.append(d.call("manageStorageServer", connectionID="sec-posix", connection=POSIX))
    replies.append(d.error("manageStorageServer", connectionID="sec-iscsi",
                           connection=dict(ISCSI, iqn="iqn.2003-01.org.example:other")).data)
    status = d.wait_error("sec-posix", 477)
    assert status["lastError"]["message"]  # the failure is reported
    replies.append(d.call("getStorageServerList"))
    replies.append(d.call("testStorageServer", connection=ISCSI, timeout=5))
    replies.append(d.call("testStorageServer", connection=POSIX, timeout=5))
    replies.append(d.error("waitStorageServer", connectionIDs=["sec-posix", "sec-iscsi"],
                           timeout=0.5).data)
    cli = subprocess.run([sys.executable, "-m", "vdsmconn.cli", "--socket", d.socket, "--json",
                          "list"], capture_output=True, text=True, timeout=30, check=True)
    replies.append(cli.stdout)
    time.sleep(1.5)  # a few retries, probes and log lines more
    if scrapes is not None:
        scrapes.append(scrape(port_of(d)))
    replies.append(d.call("unmanageStorageServer", prefix="sec-"))
    d.wait_gone(f"{d.mount_root}/vc-secret")
    return replies


def joined(outputs: list[Any]) -> str:
    return "\n".join(o if isinstance(o, str) else json.dumps(o) for o in outputs)


def test_no_secret_in_logs_events_or_metrics(watched: tuple[Daemon, Collector]) -> None:
    d, events = watched
    scrapes: list[str] = []
    replies = joined(exercise(d, scrapes))
    assert "sec-posix" in replies and "chap-user" in replies  # the outputs are not empty
    metrics = scrapes[0]
    log = d.log_file.read_text()
    for secret in (CHAP, MOUNT, TOKEN):
        assert secret not in log
        assert secret not in json.dumps(events.events)
        assert secret not in metrics
    assert any(e["connectionIDs"] == ["sec-posix"] and e["lastError"] for e in events.events)
    assert 'vdsmconn_connection_errors_total{reason="mount"' in metrics
    assert "password=********" in log  # the argv is logged, masked


def test_no_secret_in_replies(metrics_daemon: Daemon) -> None:
    replies = joined(exercise(metrics_daemon))
    assert CHAP not in replies
    for secret in (MOUNT, TOKEN):
        assert secret not in replies


def test_mount_failure_log_lines_mask_option_values(metrics_daemon: Daemon,
                                                    tmp_path: Path) -> None:
    d = metrics_daemon
    posix = {"type": "posixfs", "connection": "vc-secret2", "vfs_type": "tmpfs",
             "mnt_options": f"size=1m,secret={MOUNT}"}
    d.call("manageStorageServer", connectionID="m", connection=posix)
    d.wait_error("m", 477)
    log = d.log_file.read_text()
    runs = [line for line in log.splitlines() if "RUN argv=mount" in line]
    assert runs and all(MOUNT not in line for line in runs)
    assert MOUNT not in log
    d.call("unmanageStorageServer", connectionID="m")


# Distinctive secrets with the punctuation passwords have; each fragment is searched for too.
PUNCT = "Hunter2!Secret$9431"
QUOTED = 'Zq9431 "w\u00f6rd", p=x'
FRAGMENTS = ("Hunter2", "Secret$9431", "Zq9431", "w\u00f6rd")
IQN = "iqn.2003-01.org.example:bad-requests"


def bad_requests() -> list[tuple[dict[str, Any] | str, int]]:
    """(params of a manageStorageServer call, or a raw line; the error code expected)."""
    def manage(connection: Any) -> dict[str, Any]:
        return {"connectionID": "bad", "connection": connection}
    q = urllib.parse.quote
    return [
        (manage({"type": "posixfs", "connection": "//srv/share", "vfs_type": "cifs",
                 "mnt_options": f"username=u,password={PUNCT},a b"}), 1000),
        (manage({"type": "posixfs", "connection": "//srv/share",
                 "mnt_options": f"password={QUOTED}"}), 1000),
        (manage({"type": "iscsi", "connection": "h", "iqn": "bad", "user": "u",
                 "password": PUNCT}), 1000),
        (manage({"type": "iscsi", "connection": "h", "iqn": IQN, "user": "u",
                 "password": QUOTED, "port": "x"}), -32602),
        (manage({"type": "iscsi", "connection": "bad host", "iqn": IQN, "user": "u",
                 "password": QUOTED}), 1000),
        (manage({"type": "nfs", "connection": "s:/e", "password": PUNCT}), 1000),
        (manage({"type": "nfs", "connection": "s:/e", "auth_key": PUNCT}), -32602),
        (manage(f"nfs://u:{q(PUNCT, safe='')}@s/e"), 1000),
        (manage(f"nfs://s:{q(QUOTED, safe='')}/e"), 1000),
        (manage(f"ftp://u:{q(QUOTED, safe='')}@s/e"), 1000),
        (manage(f"iscsi://h/{IQN}?password={q(PUNCT, safe='')}"), 1000),
        (manage({"type": "managed", "volumeID": "v", "connection_info": {
            "driver_volume_type": 5, "data": {"auth_password": PUNCT}}}), -32602),
        ({"connectionID": "bad\u0085", "connection": {
            "type": "iscsi", "connection": "h", "iqn": IQN, "password": PUNCT}}, 1000),
        # a line cut short: a parse error, whose reply must not echo the line
        ('{"jsonrpc":"2.0","id":1,"method":"manageStorageServer","params":{"connection":'
         f'{{"password":"{PUNCT}"', -32700),
    ]


def send_lines(path: str, lines: list[str]) -> list[str]:
    """One reply line per request line, in order (each is sent after the last reply)."""
    replies = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(path)
        reader = s.makefile("rb")
        for line in lines:
            s.sendall(line.encode() + b"\n")
            replies.append(reader.readline().decode())
    return replies


def request(method: str, params: Any, request_id: Any) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})


def test_refused_requests_never_echo_a_secret(daemon: Daemon) -> None:
    cases = bad_requests()
    lines = [p if isinstance(p, str) else request("manageStorageServer", p, i)
             for i, (p, _) in enumerate(cases)]
    connections = [p["connection"] for p, _ in cases[:-2] if isinstance(p, dict)]
    # The other verbs that parse a connection refuse it the same way.
    lines += [request("updateStorageServer", {"connectionID": "bad", "connection": c}, "u")
              for c in connections]
    lines += [request("testStorageServer", {"connection": c}, "t") for c in connections]
    replies = send_lines(daemon.socket, lines)
    codes = [json.loads(r)["error"]["code"] for r in replies]
    assert codes == [code for _, code in cases] + [code for _, code in cases[:-2]] * 2
    # A mount password with punctuation is accepted (tmpfs then refuses the option: 477).
    posix = {"type": "posixfs", "connection": "vc-punct", "vfs_type": "tmpfs",
             "mnt_options": f"size=1m,password={PUNCT}"}
    replies.append(json.dumps(daemon.call("manageStorageServer", connectionID="ok",
                                          connection=posix)))
    replies.append(json.dumps(daemon.wait_error("ok", 477)))
    daemon.call("unmanageStorageServer", connectionID="ok")
    daemon.wait_gone(f"{daemon.mount_root}/vc-punct")
    log = daemon.log_file.read_text()
    assert "RUN argv=mount" in log and "password=********" in log  # the log is not empty
    for text in (*replies, log):
        for secret in (PUNCT, QUOTED, *FRAGMENTS):
            assert secret not in text
