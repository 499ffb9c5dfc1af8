"""The daemon's /metrics endpoint: scraped over HTTP, checked by promtool, and by a real
Prometheus server scraping it on loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, mounted
from tests.unit.test_metrics_collector import free_port, scrape

pytestmark = pytest.mark.root


def tmpfs(name: str) -> dict[str, Any]:
    return {"type": "posixfs", "connection": name, "vfs_type": "tmpfs", "mnt_options": "size=1m"}


@pytest.fixture
def metrics_daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, metrics={"listen": f"127.0.0.1:{free_port()}"})
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


def port_of(daemon: Daemon) -> int:
    return int(daemon.settings["metrics"]["listen"].rsplit(":", 1)[1])


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in an exposition text, None if absent."""
    want = {f'{k}="{v}"' for k, v in labels.items()}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, number = line.rpartition(" ")
            found = set(head[len(name) + 1 : -1].split(",")) if "{" in head else set()
            if want <= found:
                return float(number)
    return None


def test_scrape_shows_the_connection_and_passes_promtool(metrics_daemon: Daemon) -> None:
    d = metrics_daemon
    d.call("manageStorageServer", connectionID="ENGINE_FLOW1_CON1", connection=tmpfs("vc-m1"))
    d.call("waitStorageServer", connectionIDs=["ENGINE_FLOW1_CON1"], timeout=20)
    text = scrape(port_of(d))
    lv = {"type": "posixfs", "target": "file:vc-m1"}
    assert sample(text, "vdsmconn_connection_up", **lv) == 1
    assert sample(text, "vdsmconn_connection_state", state="connected", **lv) == 1
    assert sample(text, "vdsmconn_connection_refs", **lv) == 1
    assert sample(text, "vdsmconn_operation_duration_seconds_count", operation="connect",
                  type="posixfs", result="ok") == 1
    assert sample(text, "vdsmconn_rpc_requests_total", method="manageStorageServer",
                  code="0") == 1
    assert sample(text, "vdsmconn_build_info") == 1
    assert sample(text, "process_open_fds") is not None
    assert "ENGINE_FLOW1" not in text  # per real connection, never per CID
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "metrics"], input=text.encode(),
                               capture_output=True, timeout=30, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
    d.call("unmanageStorageServer", connectionID="ENGINE_FLOW1_CON1")
    d.wait_gone(f"{d.mount_root}/vc-m1")
    assert sample(scrape(port_of(d)), "vdsmconn_connection_up", **lv) is None


def test_external_umount_counts_an_error_and_a_reconnect(metrics_daemon: Daemon) -> None:
    d = metrics_daemon
    d.call("manageStorageServer", connectionID="c", connection=tmpfs("vc-m2"))
    d.call("waitStorageServer", connectionIDs=["c"], timeout=20)
    path = f"{d.mount_root}/vc-m2"
    assert mounted(path) is not None
    subprocess.run(["umount", path], check=True, timeout=10)
    lv = {"type": "posixfs", "target": "file:vc-m2"}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = scrape(port_of(d))
        if sample(text, "vdsmconn_connection_reconnects_total", **lv) == 1:
            break
        time.sleep(0.1)
    assert sample(text, "vdsmconn_connection_reconnects_total", **lv) == 1, text
    assert mounted(path) is not None
    assert sample(text, "vdsmconn_connection_errors_total", reason="mount", **lv) == 1
    assert (sample(text, "vdsmconn_connection_last_error_timestamp_seconds", **lv) or 0) > 0
    d.call("unmanageStorageServer", connectionID="c")
    d.wait_gone(path)


def test_metrics_listen_null_serves_nothing(daemon: Daemon) -> None:
    assert daemon.settings["metrics"]["listen"] is None
    assert "METRICS listen=" not in daemon.log()


PROMETHEUS_CONFIG = """\
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: vdsmconn
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""


def query(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as reply:
        body = json.loads(reply.read())
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="prometheus missing (Debian package prometheus)")
def test_real_prometheus_scrapes_connection_up(metrics_daemon: Daemon, tmp_path: Path) -> None:
    d = metrics_daemon
    d.call("manageStorageServer", connectionID="p", connection=tmpfs("vc-m3"))
    d.call("waitStorageServer", connectionIDs=["p"], timeout=20)
    config = tmp_path / "prometheus.yml"
    config.write_text(PROMETHEUS_CONFIG.format(port=port_of(d)))
    web = free_port()
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{web}"],
        stdout=log, stderr=log, cwd=tmp_path, start_new_session=True,
    )
    try:
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not found:
            time.sleep(0.5)
            try:
                found = query(web, 'vdsmconn_connection_up{target="file:vc-m3"}')
            except OSError:
                continue
        assert found, (tmp_path / "prometheus.log").read_text()[-3000:]
        assert found[0]["metric"]["type"] == "posixfs"
        assert found[0]["value"][1] == "1"
        assert query(web, 'up{job="vdsmconn"}')[0]["value"][1] == "1"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
        log.close()
    d.call("unmanageStorageServer", connectionID="p")
    d.wait_gone(f"{d.mount_root}/vc-m3")
