"""README's tour with the real `vdsmconn` command against the real daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon import Daemon
from tests.sdtree import write_domain
from vdsmconn.host.kernel import Kernel

pytestmark = pytest.mark.root


def cli(daemon: Daemon, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "vdsmconn.cli", "--socket", daemon.socket,
                           *args], capture_output=True, text=True, timeout=60)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_tour(daemon: Daemon, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    cli(daemon, "manage", "FLOW1_local", f"localfs://{images}")
    scratch = json.dumps({"type": "posixfs", "connection": "vc-scratch", "vfs_type": "tmpfs",
                          "mnt_options": "size=8m"})
    cli(daemon, "manage", "FLOW1_scratch", scratch)
    cli(daemon, "manage", "FLOW2_scratch", scratch)
    cli(daemon, "wait", "FLOW1_local", "FLOW1_scratch", "FLOW2_scratch", "--timeout", "20")
    table = cli(daemon, "list").stdout.splitlines()
    assert table[0].split() == ["CID", "TYPE", "STATE", "REFS", "PATH", "ERROR"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["FLOW1_local"][1:4] == ["localfs", "connected", "1"]
    assert rows["FLOW1_scratch"][1:4] == ["posixfs", "connected", "2"]
    listing = json.loads(cli(daemon, "--json", "list").stdout)
    assert listing["FLOW2_scratch"]["path"] == f"{daemon.mount_root}/vc-scratch"

    sd = write_domain(images, "local images", "LOCALFS")
    domains = cli(daemon, "domains", "FLOW1_local").stdout.splitlines()
    assert domains[0].split() == ["SDUUID", "TYPE", "PATH/VG", "CLASS", "VERSION",
                                  "DESCRIPTION", "CIDS"]
    row = domains[1].split()
    assert row[:2] == [sd, "file"] and row[2].endswith(f"/{sd}")
    assert row[3:] == ["Data", "5", "local", "images", "FLOW1_local"]
    assert cli(daemon, "devices").stdout.splitlines()[1:] == []  # file storage only

    cli(daemon, "unmanage", "--prefix", "FLOW1_")
    assert json.loads(cli(daemon, "--json", "list").stdout).keys() == {"FLOW2_scratch"}
    cli(daemon, "unmanage", "FLOW2_scratch")
    daemon.wait_gone(f"{daemon.mount_root}/vc-scratch")

    missing = cli(daemon, "unmanage", "FLOW2_scratch", ok=False)
    assert missing.returncode == 1 and "479" in missing.stderr
    info = json.loads(cli(daemon, "--json", "info").stdout)
    assert info["backends"]["posixfs"]["available"] is True
    # A backend whose tools are here but whose kernel part is not is not available.
    kernel = Kernel()
    iscsi = info["backends"]["iscsi"]
    if os.path.exists("/sys/class/iscsi_transport/tcp") or kernel.has_module("iscsi_tcp"):
        assert iscsi["available"] is True
    else:
        assert iscsi == {"available": False, "reason": kernel.missing_module(
            "iscsi_tcp", "iSCSI initiator transport")}
    nfs = info["backends"]["nfs"]
    assert nfs["available"] is kernel.has_filesystem("nfs"), nfs
    if not nfs["available"]:
        assert nfs["reason"].startswith("no NFS client in this kernel")


def test_unavailable_backend_is_reported_not_crashed(tmp_path: Path) -> None:
    """A backend whose tool is missing on the host: lastError says so, the daemon serves on."""
    daemon = Daemon(tmp_path, mount_command="/nonexistent/mount")
    try:
        daemon.start()
        assert daemon.call("getHostInfo")["backends"]["posixfs"]["available"] is False
        daemon.call("manageStorageServer", connectionID="p",
                    connection={"type": "posixfs", "connection": "vc-none", "vfs_type": "tmpfs"})
        status = daemon.wait_error("p", 451)
        assert "/nonexistent/mount" in status["lastError"]["message"]
        assert status["state"] == "failed"
        daemon.call("unmanageStorageServer", connectionID="p")
        daemon.wait_nothing_listed()
    finally:
        daemon.cleanup()
