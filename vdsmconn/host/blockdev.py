"""Facts about block devices, read from sysfs and /dev without ever opening a device.

Blocking: the `getDeviceList` verb runs each call in a thread under a deadline. Layout read
(Linux 6.1): `/sys/block/sdX` links into the SCSI device tree, through `sessionN` for iSCSI;
`device/{vendor,model,wwid}` describe the SCSI device; `holders/dm-N` and `dm-N/slaves/sdX`
tie paths to their device-mapper maps, `dm-N/dm/{name,uuid}` name them; udev's
`/dev/disk/by-id` links carry scsi_id's serial, the WWID multipath uses ("mpath-<wwid>").
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from typing import Any

SECTOR = 512  # /sys/block/X/size counts 512-byte sectors whatever the logical block size
MPATH = "mpath-"  # dm uuid prefix of a multipath map: "mpath-<wwid>"
_SESSION = re.compile(r"session(\d+)")
# scsi_id's ID_SERIAL starts with the designator type it came from: 3 NAA, 2 EUI-64,
# 1 T10 vendor id, 8 SCSI name string, 0 vendor specific, S unit serial (page 0x80).
_SERIAL_RANK = ("3", "2", "1", "8", "0", "S")


@dataclass(frozen=True)
class MultipathMap:
    name: str  # "mpatha", from dm-N/dm/name
    dm: str  # "dm-0"
    uuid: str  # "mpath-3600...", from dm-N/dm/uuid

    @property
    def path(self) -> str:
        return f"/dev/mapper/{self.name}"

    @property
    def wwid(self) -> str:
        return self.uuid[len(MPATH):]

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "dm": self.dm, "uuid": self.uuid}


@dataclass(frozen=True)
class BlockDevice:
    name: str  # kernel name: "sdb", "dm-0"
    wwid: str | None  # scsi_id style: "36001405..."
    vendor: str | None
    product: str | None
    size: int  # bytes
    logical_block_size: int
    physical_block_size: int
    sid: int | None  # iSCSI session the SCSI device hangs under
    multipath: MultipathMap | None  # the map holding this path, or the map itself
    by_id: tuple[str, ...]  # names of the /dev/disk/by-id links pointing here, sorted

    @property
    def path(self) -> str:
        return f"/dev/{self.name}"

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "wwid": self.wwid,
            "vendor": self.vendor,
            "product": self.product,
            "size": self.size,
            "logicalBlockSize": self.logical_block_size,
            "physicalBlockSize": self.physical_block_size,
            "sid": self.sid,
            "multipath": None if self.multipath is None else self.multipath.to_wire(),
            "byId": list(self.by_id),
        }


def kernel_name(path: str, dev: str = "/dev") -> str:
    """The kernel name ("sdb", "dm-0") of a device node, a udev link to one, or a bare name.

    Relative paths are taken under `dev`. The resolved node must sit directly in `dev`:
    anything else (outside it, or a directory such as /dev/disk) is a ValueError.
    """
    root = os.path.realpath(dev)
    real = os.path.realpath(os.path.join(dev, path))  # an absolute path replaces dev
    if os.path.dirname(real) != root or os.path.isdir(real):
        raise ValueError(f"{path!r} does not resolve to a device node in {dev}")
    return os.path.basename(real)


def read_device(name: str, sysfs: str = "/sys", dev: str = "/dev") -> BlockDevice:
    """Facts about /sys/block/<name>; FileNotFoundError naming it if there is no such device.

    Optional attributes that are missing (or unreadable) are None; a missing size or block
    size (a device vanishing while read) raises the OSError naming the attribute.
    """
    block = _block_dir(name, sysfs)
    own_map = multipath_map(name, sysfs)
    holder = own_map or _holder_map(block, sysfs)
    by_id = _by_id(name, dev)
    device = os.path.join(block, "device")
    return BlockDevice(
        name=name,
        wwid=holder.wwid if holder else _wwid(block, by_id),
        vendor=_read(os.path.join(device, "vendor")),
        product=_read(os.path.join(device, "model")),
        size=_read_int(block, "size") * SECTOR,
        logical_block_size=_read_int(block, "queue/logical_block_size"),
        physical_block_size=_read_int(block, "queue/physical_block_size"),
        sid=_sid(block, sysfs),
        multipath=holder,
        by_id=by_id,
    )


def map_members(dm: str, sysfs: str = "/sys") -> list[str]:
    """The devices under map `dm` (a multipath map's paths: sdX), sorted."""
    return _names(os.path.join(_block_dir(dm, sysfs), "slaves"))


def _block_dir(name: str, sysfs: str) -> str:
    if not name or name in (".", "..") or "/" in name:
        raise ValueError(f"invalid block device name {name!r}")
    path = os.path.join(sysfs, "block", name)
    if not os.path.isdir(path):
        raise FileNotFoundError(errno.ENOENT, f"no block device {name!r}", path)
    return path


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
    except OSError:
        return None
    return text or None


def _read_int(block: str, attr: str) -> int:
    path = os.path.join(block, attr)
    with open(path, encoding="ascii", errors="replace") as f:  # OSError names the path
        text = f.read().strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}: not an integer: {text!r}") from None


def _names(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _sid(block: str, sysfs: str) -> int | None:
    """N of the `sessionN` component of the device's real sysfs path, if any."""
    real = os.path.relpath(os.path.realpath(block), os.path.realpath(sysfs))
    for part in real.split(os.sep):
        m = _SESSION.fullmatch(part)
        if m is not None:
            return int(m.group(1))
    return None


def multipath_map(name: str, sysfs: str = "/sys") -> MultipathMap | None:
    """`name` as a multipath map, or None if it is not one (not dm, or LVM, kpartx...)."""
    dm = os.path.join(sysfs, "block", name, "dm")
    uuid = _read(os.path.join(dm, "uuid"))
    map_name = _read(os.path.join(dm, "name"))
    if uuid is None or not uuid.startswith(MPATH) or map_name is None:
        return None
    return MultipathMap(map_name, name, uuid)


def _holder_map(block: str, sysfs: str) -> MultipathMap | None:
    for holder in _names(os.path.join(block, "holders")):
        found = multipath_map(holder, sysfs)
        if found is not None:
            return found
    return None


def _by_id(name: str, dev: str) -> tuple[str, ...]:
    base = os.path.join(dev, "disk", "by-id")
    target = os.path.join(os.path.realpath(dev), name)
    return tuple(link for link in _names(base)
                 if os.path.realpath(os.path.join(base, link)) == target)


def _wwid(block: str, by_id: tuple[str, ...]) -> str | None:
    """The WWID of a device outside multipath: scsi_id's NAA serial from a `scsi-3...` link,
    else the kernel's designator in sysfs, else the best other `scsi-` link. (A multipath
    member takes its map's WWID instead: multipath's udev rules move the `scsi-3...` link to
    the map, leaving the member only the other forms, e.g. `scsi-1LIO-ORG_...`.)"""
    serials = sorted((link[5:] for link in by_id if link.startswith("scsi-") and len(link) > 5),
                     key=lambda s: (_rank(s), s))
    if serials and serials[0].startswith("3"):
        return serials[0]
    raw = _read(os.path.join(block, "device", "wwid")) or _read(os.path.join(block, "wwid"))
    if raw is not None:
        return _serial_from_sysfs(raw)
    return serials[0] if serials else None


def _rank(serial: str) -> int:
    kind = serial[0]
    return _SERIAL_RANK.index(kind) if kind in _SERIAL_RANK else len(_SERIAL_RANK)


def _serial_from_sysfs(wwid: str) -> str:
    """The kernel's `naa.`/`eui.`/`t10.` form as scsi_id writes it; other forms as they are."""
    kind, sep, value = wwid.partition(".")
    if not sep or not value:
        return wwid
    if kind == "naa":
        return "3" + value.lower()
    if kind == "eui":
        return "2" + value.lower()
    if kind == "t10":
        return "1" + "_".join(value.split())
    return wwid
