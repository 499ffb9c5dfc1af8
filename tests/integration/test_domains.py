"""getStorageDomainList and getDeviceList on file storage, through the real daemon: domains
on tmpfs and xfs mounts listed once with all their CIDs, broken domain directories skipped
with a reason, a hung FUSE mount reported as a timeout while the other connections answer."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon
from tests.fusefs import MOUNT_COMMAND, VcFuse
from tests.sdtree import write_broken, write_domain

pytestmark = pytest.mark.root


def tmpfs(name: str) -> dict[str, Any]:
    return {"type": "posixfs", "connection": name, "vfs_type": "tmpfs", "mnt_options": "size=4m"}


def test_file_domains_listed_once_with_all_their_cids(daemon: Daemon, loop_xfs: str) -> None:
    daemon.call("manageStorageServer", connectionID="a", connection=tmpfs("vc-dom"))
    daemon.call("manageStorageServer", connectionID="b", connection=tmpfs("vc-dom"))
    daemon.call("manageStorageServer", connectionID="x", connection={
        "type": "posixfs", "connection": loop_xfs, "vfs_type": "xfs"})
    st = daemon.call("waitStorageServer", connectionIDs=["a", "b", "x"], timeout=30)
    shared, xfs = st["a"]["path"], st["x"]["path"]
    sd1 = write_domain(shared, "on tmpfs", "POSIXFS")
    sd2 = write_domain(xfs, "on xfs", "POSIXFS")
    broken = write_broken(shared)

    found = daemon.call("getStorageDomainList")
    by_uuid = {d["sdUUID"]: d for d in found["domains"]}
    assert set(by_uuid) == {sd1, sd2}
    assert by_uuid[sd1]["connectionIDs"] == ["a", "b"]  # one key, two CIDs: listed once
    assert by_uuid[sd1]["type"] == "file" and by_uuid[sd1]["path"] == f"{shared}/{sd1}"
    assert by_uuid[sd1]["metadata"]["DESCRIPTION"] == "on tmpfs"
    assert by_uuid[sd1]["metadata"]["VERSION"] == "5"
    assert by_uuid[sd1]["metadata"]["LOCKPOLICY"] == ""
    assert by_uuid[sd2]["connectionIDs"] == ["x"]
    assert by_uuid[sd2]["metadata"]["SDUUID"] == sd2
    skipped = {Path(s["path"]).name: s for s in found["skipped"]}
    assert set(skipped) == set(broken)  # __DIRECT_IO_TEST__ and lost+found: not domains
    for name, reason in broken.items():
        assert skipped[name]["connectionIDs"] == ["a", "b"]
        assert skipped[name]["reason"] == reason
    assert found["errors"] == []

    only_x = daemon.call("getStorageDomainList", connectionIDs=["x"])
    assert [d["sdUUID"] for d in only_x["domains"]] == [sd2] and only_x["skipped"] == []
    # File storage has no block devices; an unknown CID is named.
    assert daemon.call("getDeviceList", connectionIDs=["a", "x"]) == {"devices": [],
                                                                     "errors": []}
    e = daemon.error("getStorageDomainList", connectionIDs=["x", "nosuch"])
    assert e.code == 479 and "nosuch" in e.message
    e = daemon.error("getDeviceList", connectionIDs="x")
    assert e.code == -32602 and "connectionIDs" in e.message


def test_not_connected_connection_is_an_error_entry(daemon: Daemon, tmp_path: Path) -> None:
    daemon.call("manageStorageServer", connectionID="ok", connection=tmpfs("vc-ok"))
    daemon.call("manageStorageServer", connectionID="bad", connection={
        "type": "posixfs", "connection": str(tmp_path / "missing.img"), "vfs_type": "xfs"})
    ok = daemon.call("waitStorageServer", connectionIDs=["ok"], timeout=30)["ok"]
    sd = write_domain(ok["path"], "fine")
    daemon.wait_attempts("bad", 1)
    found = daemon.call("getStorageDomainList")
    assert [d["sdUUID"] for d in found["domains"]] == [sd]
    (problem,) = found["errors"]
    assert problem["connectionIDs"] == ["bad"] and problem["error"]["code"] == 451
    assert "not connected" in problem["error"]["message"]


@pytest.fixture
def vcfuse(tmp_path: Path) -> Iterator[VcFuse]:
    fs = VcFuse(tmp_path / "ctl")
    try:
        yield fs
    finally:
        fs.set_mode("serve")
        fs.kill_servers()


@pytest.mark.skipif(not os.path.exists("/dev/fuse"),
                    reason="this kernel has no FUSE (/dev/fuse): no hung FUSE mount to make")
def test_hung_fuse_mount_times_out_while_the_others_answer(tmp_path: Path,
                                                            vcfuse: VcFuse) -> None:
    # Probes far apart: the daemon must not repair the hung mount while the scan waits on it.
    d = Daemon(tmp_path, mount_command=MOUNT_COMMAND,
               supervisor={"probe_interval": 60, "probe_timeout": 2})
    try:
        d.start()
        d.call("manageStorageServer", connectionID="fuse", connection=vcfuse.connection)
        d.call("manageStorageServer", connectionID="t", connection=tmpfs("vc-alive"))
        st = d.call("waitStorageServer", connectionIDs=["fuse", "t"], timeout=30)
        sd = write_domain(st["t"]["path"], "alive")
        vcfuse.set_mode("hang")
        start = time.monotonic()
        found = d.call("getStorageDomainList")
        seconds = time.monotonic() - start
        print(f"OBSERVED hung scan: {seconds:.2f} s, errors={found['errors']}")
        assert [x["sdUUID"] for x in found["domains"]] == [sd]
        (problem,) = found["errors"]
        assert problem["connectionIDs"] == ["fuse"] and problem["error"]["code"] == 480
        assert 2 <= seconds < 15  # the scan deadline is probe_timeout
        again = d.call("getStorageDomainList", connectionIDs=["fuse"])
        # The first scan still hangs: no second one is started, the call says so at once.
        assert "an earlier read has not returned yet" in again["errors"][0]["error"]["message"]
        assert d.proc is not None and d.call("getHostInfo")["pid"] == d.proc.pid
        vcfuse.set_mode("serve")
    finally:
        d.cleanup()
