"""Finding existing storage for real, in the test guest, through the real daemon: a storage
domain on an NFS export; an iSCSI LUN (LIO) with its WWID and session in getDeviceList and
the LVM volume group on it, tagged RHAT_storage_domain, in getStorageDomainList; the same LUN
through two paths of an iSCSI bond listed once, with both sessions and its multipath map.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, running
from tests.guest.fixtures import (
    IscsiTarget,
    IscsiTargetFactory,
    Multipath,
    NfsExport,
    sh,
    wait_for,
)
from tests.guest.test_guest_iscsi import bond_links, torn_down
from tests.sdtree import metadata, write_broken, write_domain

pytestmark = pytest.mark.guest


def report(what: str, reply: Any) -> None:
    print(f"OBSERVED {what}: {json.dumps(reply, sort_keys=True)}")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with running(tmp_path, supervisor={"probe_interval": 2, "probe_timeout": 5,
                                       "command_timeout": 30}) as d:
        yield d


def test_nfs_export_holding_a_domain_is_listed(daemon: Daemon, nfs_export: NfsExport) -> None:
    sd = write_domain(nfs_export.path, "data on nfs", "NFS")
    broken = write_broken(nfs_export.path)
    daemon.call("manageStorageServer", connectionID="n", connection={
        "type": "nfs", "connection": nfs_export.remote, "protocol_version": "4.2"})
    path = daemon.call("waitStorageServer", connectionIDs=["n"], timeout=60)["n"]["path"]
    found = daemon.call("getStorageDomainList", connectionIDs=["n"])
    report("getStorageDomainList nfs", found)
    (domain,) = found["domains"]
    assert (domain["sdUUID"], domain["type"], domain["path"], domain["connectionIDs"]) == (
        sd, "file", f"{path}/{sd}", ["n"])
    assert domain["metadata"]["DESCRIPTION"] == "data on nfs"
    assert domain["metadata"]["TYPE"] == "NFS"
    assert {Path(s["path"]).name: s["reason"] for s in found["skipped"]} == broken
    daemon.call("unmanageStorageServer", connectionID="n")
    daemon.wait_gone(path, timeout=30)


# --- block storage ---------------------------------------------------------------------------


def lvm(*args: str) -> str:
    return sh("lvm", *args, timeout=120).stdout


class BlockDomain:
    """A VG named by a UUID on `device`, tagged RHAT_storage_domain, with the domain metadata
    at the start of its `metadata` LV (written, then the LV deactivated again)."""

    def __init__(self, device: str, description: str) -> None:
        self.device = device
        self.sd = str(uuid.uuid4())
        lvm("pvcreate", "-ff", "-y", device)
        lvm("vgcreate", "--addtag", "RHAT_storage_domain", self.sd, device)
        lvm("lvcreate", "-y", "-n", "metadata", "-L", "8m", self.sd)
        lv = f"/dev/{self.sd}/metadata"
        wait_for(lv, lambda: os.path.exists(lv), 30)
        fd = os.open(lv, os.O_WRONLY)
        try:
            os.write(fd, metadata(self.sd, description, "ISCSI").encode().ljust(4096, b"\0"))
            os.fsync(fd)
        finally:
            os.close(fd)
        self.deactivate()

    def deactivate(self) -> None:
        lvm("vgchange", "-an", self.sd)

    def remove(self) -> None:
        sh("lvm", "vgchange", "-an", self.sd, check=False, timeout=60)
        sh("lvm", "vgremove", "-ff", "-y", self.sd, check=False, timeout=60)
        sh("lvm", "pvremove", "-ff", "-y", self.device, check=False, timeout=60)


def lsblk_wwn(device: str) -> str:
    """The WWN udev found for `device`, as the WWID multipath uses ("3" + NAA hex)."""
    wwn = sh("lsblk", "-dno", "WWN", device).stdout.strip()
    return "3" + wwn.removeprefix("0x").removeprefix("naa.")


def check_block_domain(found: dict[str, Any], dom: BlockDomain, cids: list[str],
                       pv: str) -> None:
    (domain,) = found["domains"]
    assert (domain["sdUUID"], domain["type"], domain["vgName"], domain["pvs"],
            domain["connectionIDs"]) == (dom.sd, "block", dom.sd, [pv], cids)
    assert domain["metadata"]["SDUUID"] == dom.sd and domain["metadataError"] is None
    assert domain["metadata"]["TYPE"] == "ISCSI"
    assert domain["missingPvs"] == 0 and domain["size"] > 0


def test_iscsi_lun_with_a_block_domain(daemon: Daemon,
                                       iscsi_target: IscsiTargetFactory) -> None:
    t = iscsi_target()
    daemon.call("manageStorageServer", connectionID="i", connection={
        "type": "iscsi", "connection": "127.0.0.1", "iqn": t.iqn, "tpgt": 1})
    st = daemon.call("waitStorageServer", connectionIDs=["i"], timeout=60)["i"]
    device = str(t.device())
    found = daemon.call("getDeviceList")
    report("getDeviceList single path", found)
    (lun,) = found["devices"]
    assert lun["path"] == device and lun["devices"] == [device]
    assert lun["wwid"] == lsblk_wwn(device)
    assert lun["vendor"] == "LIO-ORG"
    assert lun["product"] == sh("lsblk", "-dno", "MODEL", device).stdout.strip() != ""
    assert lun["size"] == 64 * 1024 * 1024 and lun["logicalBlockSize"] == 512
    assert lun["multipath"] is None and lun["connectionIDs"] == ["i"]
    (session,) = lun["sessions"]
    assert (session["portal"], session["iqn"], session["iface"]) == (
        "127.0.0.1:3260", t.iqn, "default")
    assert session["sid"] == st["paths"][0]["session"]
    dom = BlockDomain(device, "block data")
    try:
        domains = daemon.call("getStorageDomainList")
        report("getStorageDomainList block", domains)
        check_block_domain(domains, dom, ["i"], device)
    finally:
        dom.remove()
    daemon.call("unmanageStorageServer", connectionID="i")
    wait_for("logout", lambda: t.sessions() == [], 30)


def the_map(multipath: Multipath) -> tuple[str, str]:
    """Name and WWID of the one multipath map (`mpatha (WWID) dm-0 VENDOR,PRODUCT`)."""
    maps = [line.split()[:2] for line in multipath.ll().splitlines()
            if line.startswith("mpath")]
    assert len(maps) == 1, maps
    return maps[0][0], maps[0][1].strip("()")


def test_lun_through_two_bond_paths_is_listed_once(
        tmp_path: Path, iscsi_target: IscsiTargetFactory, multipath: Multipath) -> None:
    t: IscsiTarget = iscsi_target(links=2)
    l0, l1 = t.links
    d = Daemon(tmp_path, supervisor={"probe_interval": 2, "probe_timeout": 5,
                                     "command_timeout": 30})
    with bond_links(t):
        try:
            d.start()
            d.call("manageStorageServer", connectionID="b", connection={
                "type": "iscsi", "connection": l0.peer_ip, "iqn": t.iqn, "tpgt": 1,
                "netIfaceNames": [l0.host, l1.host]})
            d.call("waitStorageServer", connectionIDs=["b"], timeout=60)
            multipath.wait_for_paths(2, 60)
            name, map_wwid = the_map(multipath)
            mapper = f"/dev/mapper/{name}"
            start = time.monotonic()
            found = d.call("getDeviceList", connectionIDs=["b"])
            report("getDeviceList bond", found)
            print(f"OBSERVED getDeviceList took {time.monotonic() - start:.3f} s")
            (lun,) = found["devices"]
            assert lun["path"] == mapper and lun["multipath"]["name"] == name
            # The WWID multipathd named the map with (udev's ID_SERIAL) is the LUN's, the
            # same as udev's WWN of each path (its `scsi-3...` link has moved to the map).
            assert lun["multipath"]["uuid"] == "mpath-" + map_wwid
            assert len(lun["devices"]) == 2
            assert lun["wwid"] == map_wwid == lsblk_wwn(lun["devices"][0])
            assert lsblk_wwn(lun["devices"][0]) == lsblk_wwn(lun["devices"][1])
            assert sorted((s["iface"], s["netdev"]) for s in lun["sessions"]) == sorted(
                [(l0.host, l0.host), (l1.host, l1.host)])
            assert sorted(s["device"] for s in lun["sessions"]) == sorted(lun["devices"])
            dom = BlockDomain(mapper, "block data over a bond")
            try:
                domains = d.call("getStorageDomainList", connectionIDs=["b"])
                report("getStorageDomainList bond", domains)
                check_block_domain(domains, dom, ["b"], mapper)
            finally:
                dom.remove()
            d.call("unmanageStorageServer", connectionID="b")
            wait_for("logout", lambda: t.sessions() == [], 30)
            torn_down(d)
        finally:
            d.cleanup()
