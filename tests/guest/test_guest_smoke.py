"""Smoke tests of the test guest and its fixtures: each proves one fixture really works."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from tests.guest.fixtures import (
    Bond,
    IscsiTargetFactory,
    Multipath,
    NfsExport,
    SystemdUnitFactory,
    sh,
    wait_for,
)

pytestmark = pytest.mark.guest


def mountinfo_entry(target: Path) -> tuple[str, str, str]:
    """(fstype, source, super options) of the mount on target, from /proc/self/mountinfo."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(target):
            sep = fields.index("-")
            return fields[sep + 1], fields[sep + 2], fields[sep + 3]
    raise AssertionError(f"{target} is not in /proc/self/mountinfo")


def test_runs_under_systemd_in_guest() -> None:
    assert os.environ.get("VDSMCONN_IN_GUEST") == "1"
    assert Path("/proc/1/comm").read_text().strip() == "systemd"


@pytest.mark.parametrize(("version", "fstype"), [("3", "nfs"), ("4.2", "nfs4")])
def test_nfs_mount_shows_in_mountinfo(
    nfs_export: NfsExport, tmp_path: Path, version: str, fstype: str
) -> None:
    (nfs_export.path / "hello").write_text("from the server\n")
    target = nfs_export.mount(tmp_path / "mnt", version=version)
    kind, source, options = mountinfo_entry(target)
    assert (kind, source) == (fstype, nfs_export.remote)
    assert f"vers={version}" in options.split(",")
    assert (target / "hello").read_text() == "from the server\n"
    (target / "written").write_text("from the client\n")
    assert (nfs_export.path / "written").read_text() == "from the client\n"


def test_nfs_reexport_with_new_fsid_makes_handles_stale(
    nfs_export: NfsExport, tmp_path: Path
) -> None:
    (nfs_export.path / "dir").mkdir()
    target = nfs_export.mount(tmp_path / "mnt", version="3", options="noac,lookupcache=none")
    assert os.listdir(target) == ["dir"]
    nfs_export.reexport()
    with pytest.raises(OSError) as raised:
        os.listdir(target / "dir")
    assert raised.value.errno == errno.ESTALE


def test_nfs_stop_and_start(nfs_export: NfsExport, tmp_path: Path) -> None:
    nfs_export.stop()
    assert sh("systemctl", "is-active", "nfs-server", check=False).stdout.strip() != "active"
    nfs_export.start()
    target = nfs_export.mount(tmp_path / "mnt", version="4.2")
    assert mountinfo_entry(target)[0] == "nfs4"


def test_iscsi_discovery_login_logout(iscsi_target: IscsiTargetFactory) -> None:
    target = iscsi_target(luns=1, size_mb=32)
    assert any(target.iqn in line for line in target.discover())
    target.login()
    device = target.device()
    assert device.name.startswith("sd")
    size = int(Path(f"/sys/class/block/{device.name}/size").read_text()) * 512
    assert size == 32 * 1024 * 1024
    target.logout()
    assert target.sessions() == []
    wait_for(f"{device} to go away", lambda: not device.exists())


def test_iscsi_chap_refuses_wrong_secret(iscsi_target: IscsiTargetFactory) -> None:
    target = iscsi_target(chap=("vdsmuser", "vdsmsecret12"))
    with pytest.raises(RuntimeError, match="exited with 24"):
        target.login(chap=("vdsmuser", "wrongsecret12"))
    target.login()
    assert target.device().exists()


def test_multipath_joins_two_sessions(
    multipath: Multipath, iscsi_target: IscsiTargetFactory
) -> None:
    target = iscsi_target(luns=1, links=2)
    for portal in target.portals:
        target.login(portal)
    devices = {target.device(portal) for portal in target.portals}
    assert len(devices) == 2
    listing = multipath.wait_for_paths(2)
    maps = [line for line in listing.splitlines() if line.startswith("mpath")]
    assert len(maps) == 1, listing
    target.links[0].down()
    wait_for("a failed path", lambda: "failed faulty" in multipath.ll(), timeout=30)
    target.links[0].up()
    multipath.wait_for_paths(2, timeout=60)


def test_bond_up_and_fails_over(bond: Bond) -> None:
    wait_for("bond up", lambda: bond.operstate() == "up")
    first = bond.active_slave()
    assert first in bond.slaves
    sh("ip", "link", "set", first, "down")
    wait_for("failover", lambda: bond.active_slave() not in ("", first))


NOTIFY_SERVICE = """\
import os, socket, time
address = os.environ["NOTIFY_SOCKET"]
if address.startswith("@"):
    address = "\\0" + address[1:]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.connect(address)
time.sleep(0.5)
sock.send(b"READY=1\\nSTATUS=ready for tests")
time.sleep(3600)
"""


def test_notify_service_reaches_active(systemd_unit: SystemdUnitFactory, tmp_path: Path) -> None:
    script = tmp_path / "notify.py"
    script.write_text(NOTIFY_SERVICE)
    unit = systemd_unit(
        "vdsmconn-notify-test.service",
        f"[Service]\nType=notify\nExecStart=/usr/bin/python3 {script}\nTimeoutStartSec=60\n",
    )
    unit.start()  # returns only once READY=1 arrived
    assert unit.is_active() == "active"
    assert unit.show("StatusText") == "ready for tests"
    unit.restart()
    assert unit.is_active() == "active"
    unit.stop()
    assert unit.is_active() == "inactive"
    assert subprocess.run(["systemctl", "is-active", unit.name], check=False).returncode != 0
