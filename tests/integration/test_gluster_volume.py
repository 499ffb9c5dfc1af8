"""glusterfs connections against a real GlusterFS volume (glusterd in a network namespace this
module creates), managed through the real daemon: mount, share, backups, and every fault the
issue lists (brick killed, FUSE client killed, link down) repaired without a human."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, failure, mounted
from tests.fusefs import glusterfs
from tests.fusefs.glusterfs import GlusterServer, client_args, client_pids
from tests.sdtree import write_domain

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(glusterfs.missing() is not None,
                                 reason=str(glusterfs.missing()))]


@pytest.fixture(scope="module")
def gluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlusterServer]:
    server = GlusterServer(tmp_path_factory.mktemp("gluster"), subnet=1)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def volume(gluster: GlusterServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A started one-brick volume (brick on the first address); its connection string."""
    name = f"v{gluster.created + 1}"
    connection = gluster.create_volume(name, gluster.hosts[:1])
    yield connection
    gluster.cli("volume", "stop", name, "force", check=False)
    gluster.cli("volume", "delete", name, check=False)
    gluster.volumes.remove(name)


def glusterfs_conn(connection: str) -> dict[str, Any]:
    return {"type": "glusterfs", "connection": connection}


def path_of(daemon: Daemon, connection: str) -> str:
    return f"{daemon.mount_root}/glusterSD/{connection.replace('_', '__').replace('/', '_')}"


def manage(daemon: Daemon, cid: str, connection: str) -> tuple[str, int]:
    daemon.call("manageStorageServer", connectionID=cid, connection=glusterfs_conn(connection))
    status = daemon.call("waitStorageServer", connectionIDs=[cid], timeout=30)[cid]
    path = path_of(daemon, connection)
    assert status["state"] == "connected" and status["path"] == path
    m = mounted(path)
    assert m is not None and m.fstype == "fuse.glusterfs" and m.source == connection
    (client,) = client_pids(path)
    return path, client


def unmanage(daemon: Daemon, cid: str, path: str) -> None:
    daemon.call("unmanageStorageServer", connectionID=cid)
    daemon.wait_gone(path, timeout=30)
    deadline = time.monotonic() + 10
    while client_pids(path) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client_pids(path) == []


def test_two_brick_volume_mounts_with_backup_servers_and_is_shared(
        daemon: Daemon, gluster: GlusterServer) -> None:
    server, backup = gluster.hosts
    name = "vtwo"
    connection = gluster.create_volume(name, (server, backup, server))
    try:
        path, client = manage(daemon, "a", connection)
        args = client_args(client)
        assert f"--volfile-server={server}" in args and f"--volfile-server={backup}" in args
        assert f"backup-volfile-servers={backup}" in daemon.log()
        Path(path, "file").write_text("data")
        daemon.call("manageStorageServer", connectionID="b",
                    connection=glusterfs_conn(connection))
        both = daemon.call("waitStorageServer", connectionIDs=["a", "b"], timeout=20)
        assert both["a"]["refs"] == 2 and both["a"]["key"] == both["b"]["key"]
        daemon.call("unmanageStorageServer", connectionID="a")
        assert client_pids(path) == [client] and Path(path, "file").read_text() == "data"
        unmanage(daemon, "b", path)
        assert not os.path.exists(path)
    finally:
        gluster.cli("volume", "stop", name, "force", check=False)
        gluster.cli("volume", "delete", name, check=False)
        gluster.volumes.remove(name)


def test_killed_brick_fails_with_481_and_recovers(daemon: Daemon, gluster: GlusterServer,
                                                  volume: str) -> None:
    path, _ = manage(daemon, "k", volume)
    name = volume.rsplit("/", 1)[1]
    for pid in gluster.brick_pids(name):
        os.kill(pid, 9)
    killed_at = time.monotonic()
    status = daemon.wait_error("k", 481)
    seen = time.monotonic() - killed_at
    assert status["state"] in ("failed", "connecting", "connected")
    assert "Transport endpoint is not connected" in failure(status)["message"]
    gluster.start_volume_force(name)
    status = daemon.call("waitStorageServer", connectionIDs=["k"], timeout=60)["k"]
    assert status["connected"] and status["attempts"] == 0
    assert failure(status)["code"] in (477, 481)  # the outage, or a remount during it
    print(f"brick killed: 481 seen after {seen:.2f} s, attempts {status['attempts']}")
    unmanage(daemon, "k", path)


def test_killed_fuse_client_is_remounted(daemon: Daemon, volume: str) -> None:
    path, client = manage(daemon, "c", volume)
    os.kill(client, 9)
    status = daemon.wait_error("c", 481)
    assert "Transport endpoint is not connected" in failure(status)["message"]
    daemon._until("a new glusterfs client", lambda: client_pids(path) not in ([], [client]), 30)
    status = daemon.call("waitStorageServer", connectionIDs=["c"], timeout=30)["c"]
    assert status["connected"] and status["attempts"] == 0
    assert failure(status)["code"] in (477, 481)  # the outage, or a remount during it
    assert os.statvfs(path).f_bsize > 0
    unmanage(daemon, "c", path)


def test_link_down_fails_after_ping_timeout_and_link_up_recovers(
        tmp_path: Path, gluster: GlusterServer, volume: str) -> None:
    # probe_timeout above the volume's ping-timeout (5 s): the probe sees ENOTCONN, not a hang.
    daemon = Daemon(tmp_path, supervisor={"probe_timeout": 12})
    try:
        daemon.start()
        path, _ = manage(daemon, "l", volume)
        gluster.link(up=False)
        down_at = time.monotonic()
        try:
            status = daemon.wait_error("l", 481, timeout=40)
            failed_after = time.monotonic() - down_at
            assert "Transport endpoint is not connected" in failure(status)["message"]
        finally:
            gluster.link(up=True)
        status = daemon.call("waitStorageServer", connectionIDs=["l"], timeout=60)["l"]
        assert status["connected"]
        assert os.statvfs(path).f_bsize > 0
        print(f"link down: 481 after {failed_after:.2f} s (ping-timeout 5 s); "
              f"attempts {status['attempts']}")
        unmanage(daemon, "l", path)
    finally:
        gluster.link(up=True)
        daemon.cleanup()


def test_fuse_client_outlives_kill9_of_the_daemon(daemon: Daemon, volume: str) -> None:
    path, client = manage(daemon, "r", volume)
    before = mounted(path)
    daemon.kill9()
    assert client_pids(path) == [client]
    assert os.statvfs(path).f_bsize > 0
    daemon.start()
    status = daemon.call("waitStorageServer", connectionIDs=["r"], timeout=30)["r"]
    after = mounted(path)
    assert status["connected"] and before is not None and after is not None
    assert after.mount_id == before.mount_id and client_pids(path) == [client]
    assert f"ADOPT key={status['key']}" in daemon.log()
    unmanage(daemon, "r", path)


def test_test_verb_reports_each_step(daemon: Daemon, gluster: GlusterServer,
                                     volume: str) -> None:
    good = daemon.call("testStorageServer", connection=glusterfs_conn(volume))
    assert good["ok"] is True
    assert [s["step"] for s in good["steps"]] == ["resolve", "connect", "volume"]
    assert "Distribute, Started, 1 bricks" in good["steps"][2]["detail"]
    missing = daemon.call("testStorageServer",
                          connection=glusterfs_conn(f"{gluster.hosts[0]}:/nosuch"))
    assert missing["ok"] is False and missing["steps"][2]["step"] == "volume"
    assert "Volume does not exist" in missing["steps"][2]["detail"]
    refused = daemon.call("testStorageServer",
                          connection=glusterfs_conn(f"{gluster.root_ip}:/nosuch"))
    assert [(s["step"], s["ok"]) for s in refused["steps"]] == [("resolve", True),
                                                                ("connect", False)]
    assert daemon.call("getStorageServerList") == {}


def test_storage_domain_on_the_volume_is_listed(daemon: Daemon, volume: str) -> None:
    path, _ = manage(daemon, "gd", volume)
    sd = write_domain(path, "on gluster", "GLUSTERFS")
    found = daemon.call("getStorageDomainList", connectionIDs=["gd"])
    assert [(d["sdUUID"], d["type"], d["path"], d["connectionIDs"])
            for d in found["domains"]] == [(sd, "file", f"{path}/{sd}", ["gd"])]
    assert found["domains"][0]["metadata"]["TYPE"] == "GLUSTERFS"
    assert found["skipped"] == [] and found["errors"] == []
    unmanage(daemon, "gd", path)
