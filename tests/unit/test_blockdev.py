"""Block device facts, read from fake sysfs and /dev trees shaped like Linux 6.1's (this
machine has no iSCSI initiator or device mapper): the same directories, attribute files
written as the kernel writes them (newline, space padding) and relative symlinks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vdsmconn.host import blockdev
from vdsmconn.host.blockdev import MultipathMap

NAA = "6001405d7b3b1c0e8e24a8bb7c7a2b95"
NAA2 = "600140511f2e8e4ac5a4c7f9b2d4e6a1"
GIB = 1024**3


class FakeHost:
    """sysfs root `sys` and device root `dev`, filled by the helpers below."""

    def __init__(self, root: Path) -> None:
        self.sys = root / "sys"
        self.dev = root / "dev"
        (self.sys / "block").mkdir(parents=True)
        (self.dev / "disk" / "by-id").mkdir(parents=True)
        (self.dev / "disk" / "by-path").mkdir(parents=True)

    def scsi_disk(self, name: str, hctl: str = "3:0:0:0", session: int | None = 1, *,
                  vendor: str | None = "LIO-ORG ", model: str | None = "lun0            ",
                  wwid: str | None = f"naa.{NAA}", size: int = 2 * GIB,
                  physical: int = 512) -> Path:
        """.../host3/session1/target3:0:0/3:0:0:0/block/sdb; virtio-scsi without session."""
        h, c, t, _ = hctl.split(":")
        if session is None:
            parent = self.sys / "devices/pci0000:00/0000:00:05.0/virtio2" / f"host{h}"
        else:
            parent = self.sys / "devices/platform" / f"host{h}" / f"session{session}"
        scsi = parent / f"target{h}:{c}:{t}" / hctl
        block = scsi / "block" / name
        self._block(name, block, size, physical)
        attrs = {"vendor": vendor, "model": model, "wwid": wwid}
        for attr, value in attrs.items():
            if value is not None:
                (scsi / attr).write_text(value + "\n")
        (block / "device").symlink_to(f"../../../{hctl}")
        return block

    def dm(self, name: str, dm_name: str, uuid: str, members: list[str],
           size: int = 2 * GIB) -> Path:
        """A device-mapper map over `members`: dm/{name,uuid}, slaves/ and holders/ links."""
        block = self.sys / "devices/virtual/block" / name
        self._block(name, block, size, 512)
        (block / "dm").mkdir()
        (block / "dm" / "name").write_text(dm_name + "\n")
        (block / "dm" / "uuid").write_text(uuid + "\n")
        for member in members:
            real = (self.sys / "block" / member).resolve()
            _link(block / "slaves" / member, real)
            _link(real / "holders" / name, block)
        (self.dev / "mapper").mkdir(exist_ok=True)
        (self.dev / "mapper" / dm_name).symlink_to(f"../{name}")
        return block

    def link(self, kind: str, link: str, target: str) -> Path:
        path = self.dev / "disk" / kind / link
        path.symlink_to(f"../../{target}")
        return path

    def _block(self, name: str, block: Path, size: int, physical: int) -> None:
        (block / "queue").mkdir(parents=True)
        (block / "holders").mkdir()
        (block / "slaves").mkdir()
        (block / "size").write_text(f"{size // 512}\n")
        (block / "queue" / "logical_block_size").write_text("512\n")
        (block / "queue" / "physical_block_size").write_text(f"{physical}\n")
        _link(self.sys / "block" / name, block)
        (self.dev / name).touch()

    def read(self, name: str) -> blockdev.BlockDevice:
        return blockdev.read_device(name, sysfs=str(self.sys), dev=str(self.dev))


def _link(link: Path, target: Path) -> None:
    link.symlink_to(os.path.relpath(target, link.parent))


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path)


def test_iscsi_disk_facts(host: FakeHost) -> None:
    host.scsi_disk("sdb", "3:0:0:0", session=7, size=10 * GIB, physical=4096)
    disk = host.read("sdb")
    assert (disk.name, disk.sid, disk.vendor, disk.product) == ("sdb", 7, "LIO-ORG", "lun0")
    assert (disk.size, disk.logical_block_size, disk.physical_block_size) == (
        10 * GIB, 512, 4096)
    assert disk.multipath is None and disk.by_id == ()


def test_disk_outside_a_session_has_no_sid(host: FakeHost) -> None:
    host.scsi_disk("sda", "2:0:0:0", session=None, vendor="QEMU    ")
    disk = host.read("sda")
    assert disk.sid is None and disk.vendor == "QEMU"


def test_by_id_scsi3_link_preferred_for_wwid(host: FakeHost) -> None:
    host.scsi_disk("sdb", wwid="t10.LIO-ORG lun0 d7b3b1c0")
    host.scsi_disk("sdc", "3:0:0:1", wwid=f"naa.{NAA2}")
    for link in ("scsi-SLIO-ORG_lun0_d7b3b1c0", "scsi-1LIO-ORG_lun0_d7b3b1c0",
                 f"scsi-3{NAA}", f"wwn-0x{NAA}"):
        host.link("by-id", link, "sdb")
    host.link("by-id", f"scsi-3{NAA}-part1", "sdb1")
    host.link("by-id", f"scsi-3{NAA2}", "sdc")
    disk = host.read("sdb")
    assert disk.wwid == f"3{NAA}"
    assert disk.by_id == ("scsi-1LIO-ORG_lun0_d7b3b1c0", f"scsi-3{NAA}",
                          "scsi-SLIO-ORG_lun0_d7b3b1c0", f"wwn-0x{NAA}")
    assert host.read("sdc").by_id == (f"scsi-3{NAA2}",)


def test_by_id_other_scsi_link_taken_without_scsi3_or_sysfs(host: FakeHost) -> None:
    host.scsi_disk("sdb", wwid=None)
    host.link("by-id", "scsi-SLIO-ORG_lun0_d7b3b1c0", "sdb")
    host.link("by-id", "scsi-1LIO-ORG_lun0_d7b3b1c0", "sdb")
    assert host.read("sdb").wwid == "1LIO-ORG_lun0_d7b3b1c0"


def test_sysfs_naa_preferred_to_other_scsi_links(host: FakeHost) -> None:
    host.scsi_disk("sdb")  # device/wwid: naa.<NAA>
    host.link("by-id", "scsi-1LIO-ORG_lun0_d7b3b1c0", "sdb")
    assert host.read("sdb").wwid == f"3{NAA}"


def test_multipath_member_takes_the_maps_wwid(host: FakeHost) -> None:
    """As seen in the test guest: multipath's udev rules moved `scsi-3...` to the map; the
    member keeps `scsi-1LIO-ORG_...`, and its own sysfs designator may differ from what
    multipathd named the map."""
    host.scsi_disk("sda", "3:0:0:0", session=1, wwid="t10.LIO-ORG   lun0")
    host.scsi_disk("sdb", "4:0:0:0", session=2, wwid="t10.LIO-ORG   lun0")
    host.link("by-id", "scsi-1LIO-ORG_lun0_d7b3b1c0", "sda")
    host.dm("dm-0", "mpatha", f"mpath-3{NAA}", ["sda", "sdb"])
    host.link("by-id", f"scsi-3{NAA}", "dm-0")
    assert host.read("sda").wwid == host.read("sdb").wwid == f"3{NAA}"


@pytest.mark.parametrize("sysfs_wwid, wwid", [
    (f"naa.{NAA}", f"3{NAA}"),
    ("naa.60014055D7B3B1C0", "360014055d7b3b1c0"),
    ("eui.0025385b71b0a1c2", "20025385b71b0a1c2"),
    ("t10.LIO-ORG   lun0    d7b3b1c0-8e24  ", "1LIO-ORG_lun0_d7b3b1c0-8e24"),
    ("iqn.2003-01.org.example:lun0", "iqn.2003-01.org.example:lun0"),
])
def test_wwid_derived_from_sysfs(host: FakeHost, sysfs_wwid: str, wwid: str) -> None:
    host.scsi_disk("sdb", wwid=sysfs_wwid)
    host.link("by-id", f"wwn-0x{NAA}", "sdb")  # not a scsi- link: sysfs decides
    assert host.read("sdb").wwid == wwid


def test_multipath_member(host: FakeHost) -> None:
    host.scsi_disk("sdb", "3:0:0:0", session=1)
    host.scsi_disk("sdc", "4:0:0:0", session=2)
    host.dm("dm-0", "mpatha", f"mpath-3{NAA}", ["sdb", "sdc"])
    expected = MultipathMap("mpatha", "dm-0", f"mpath-3{NAA}")
    sdb, sdc = host.read("sdb"), host.read("sdc")
    assert sdb.multipath == expected and sdc.multipath == expected
    assert (sdb.sid, sdc.sid) == (1, 2)
    assert expected.path == "/dev/mapper/mpatha"
    assert sdb.wwid == expected.wwid == f"3{NAA}"


def test_lvm_holder_is_not_multipath(host: FakeHost) -> None:
    host.scsi_disk("sdb")
    host.dm("dm-1", "vg0-lv0", "LVM-q1w2e3r4t5y6u7i8o9p0", ["sdb"])
    assert host.read("sdb").multipath is None


def test_multipath_found_past_other_holders(host: FakeHost) -> None:
    host.scsi_disk("sdb")
    host.dm("dm-0", "vg0-lv0", "LVM-q1w2e3r4t5y6u7i8o9p0", ["sdb"])
    host.dm("dm-3", "mpathb", f"mpath-3{NAA}", ["sdb"])
    multipath = host.read("sdb").multipath
    assert multipath is not None and (multipath.name, multipath.dm) == ("mpathb", "dm-3")


def test_map_read_directly(host: FakeHost) -> None:
    host.scsi_disk("sdb")
    host.dm("dm-0", "mpatha", f"mpath-3{NAA2}", ["sdb"], size=5 * GIB)
    host.link("by-id", "dm-name-mpatha", "dm-0")
    host.link("by-id", f"dm-uuid-mpath-3{NAA2}", "dm-0")
    host.link("by-id", f"scsi-3{NAA}", "dm-0")  # udev may point scsi- links at the map
    dm = host.read("dm-0")
    assert dm.multipath == MultipathMap("mpatha", "dm-0", f"mpath-3{NAA2}")
    assert dm.wwid == f"3{NAA2}"  # the map's own uuid, not a link
    assert (dm.vendor, dm.product, dm.sid, dm.size) == (None, None, None, 5 * GIB)
    assert dm.by_id == ("dm-name-mpatha", f"dm-uuid-mpath-3{NAA2}", f"scsi-3{NAA}")


def test_lvm_map_read_directly(host: FakeHost) -> None:
    host.scsi_disk("sdb")
    host.dm("dm-1", "vg0-lv0", "LVM-q1w2e3r4t5y6u7i8o9p0", ["sdb"])
    dm = host.read("dm-1")
    assert (dm.multipath, dm.wwid, dm.vendor) == (None, None, None)


def test_map_members(host: FakeHost) -> None:
    host.scsi_disk("sdc", "4:0:0:0", session=2)
    host.scsi_disk("sdb", "3:0:0:0", session=1)
    host.dm("dm-0", "mpatha", f"mpath-3{NAA}", ["sdc", "sdb"])
    assert blockdev.map_members("dm-0", sysfs=str(host.sys)) == ["sdb", "sdc"]
    assert blockdev.map_members("sdb", sysfs=str(host.sys)) == []
    with pytest.raises(FileNotFoundError, match="dm-9"):
        blockdev.map_members("dm-9", sysfs=str(host.sys))


def test_kernel_name_resolves_links(host: FakeHost) -> None:
    host.scsi_disk("sdb")
    host.dm("dm-0", "mpatha", f"mpath-3{NAA}", ["sdb"])
    by_path = host.link("by-path", "ip-10.0.0.1:3260-iscsi-iqn.2003-01.org.x:t1-lun-0", "sdb")
    dev = str(host.dev)
    assert blockdev.kernel_name(str(by_path), dev) == "sdb"
    assert blockdev.kernel_name(str(host.dev / "mapper" / "mpatha"), dev) == "dm-0"
    assert blockdev.kernel_name(str(host.dev / "sdb"), dev) == "sdb"
    assert blockdev.kernel_name("sdb", dev) == "sdb"
    assert blockdev.kernel_name("mapper/mpatha", dev) == "dm-0"


def test_kernel_name_outside_dev_rejected(host: FakeHost, tmp_path: Path) -> None:
    outside = tmp_path / "etc" / "passwd"
    outside.parent.mkdir()
    outside.touch()
    escape = host.dev / "disk" / "by-id" / "escape"
    escape.symlink_to("../../../etc/passwd")
    dev = str(host.dev)
    for path in (str(outside), str(escape), "../etc/passwd", str(host.dev / "disk")):
        with pytest.raises(ValueError, match=path):
            blockdev.kernel_name(path, dev)


def test_missing_device_error_names_it(host: FakeHost) -> None:
    host.scsi_disk("sdb")
    with pytest.raises(FileNotFoundError, match="sdz"):
        host.read("sdz")
    with pytest.raises(ValueError, match="invalid"):
        host.read("../block")


def test_missing_optional_attributes_are_none(host: FakeHost) -> None:
    host.scsi_disk("sdb", vendor=None, model=None, wwid=None)
    disk = host.read("sdb")
    assert (disk.vendor, disk.product, disk.wwid, disk.multipath) == (None, None, None, None)
    assert disk.size == 2 * GIB and disk.sid == 1


def test_missing_size_is_an_error_naming_it(host: FakeHost) -> None:
    block = host.scsi_disk("sdb")
    (block / "size").unlink()
    with pytest.raises(FileNotFoundError, match="size"):
        host.read("sdb")


def test_to_wire(host: FakeHost) -> None:
    host.scsi_disk("sdb", session=3)
    host.dm("dm-0", "mpatha", f"mpath-3{NAA}", ["sdb"])
    host.link("by-id", f"scsi-3{NAA}", "sdb")
    assert host.read("sdb").to_wire() == {
        "name": "sdb", "path": "/dev/sdb", "wwid": f"3{NAA}", "vendor": "LIO-ORG",
        "product": "lun0", "size": 2 * GIB, "logicalBlockSize": 512, "physicalBlockSize": 512,
        "sid": 3, "byId": [f"scsi-3{NAA}"],
        "multipath": {"name": "mpatha", "path": "/dev/mapper/mpatha", "dm": "dm-0",
                      "uuid": f"mpath-3{NAA}"},
    }
