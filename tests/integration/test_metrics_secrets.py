"""No secret in a reply, an event, a metric or a log line (SPEC 4): connections holding an
iSCSI CHAP password and a mount option password go through the real daemon, and every
output it produced is searched for the secret values."""

from __future__ import annotations

import json
import subprocess
import sys
import time
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
