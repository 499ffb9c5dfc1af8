"""Block storage domains on given devices, read-only: `lvm vgs`/`lvs` through the runner.

A block domain is a VG tagged `RHAT_storage_domain` and named by its sdUUID. Its metadata is
in `MDT_` VG tags (older formats) or at the start of its `metadata` LV (V4/V5), which is read
from the PV without activating anything: the byte offset of the LV's first extent comes from
`lvs --segments`. LVM looks only at the given devices (a `--config` filter), never at the
host's own disks, and reads without locks (`--readonly`).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from vdsmconn import errors
from vdsmconn.host import sdmeta
from vdsmconn.host.command import CommandRunner, check_result, show, tail
from vdsmconn.host.probe import Probes

log = logging.getLogger(__name__)

DOMAIN_TAG = "RHAT_storage_domain"
METADATA_LV = "metadata"
METADATA_SIZE = 64 * 1024
MISSING_PV = "[unknown]"  # how LVM names a PV it cannot see
REPORT_OPTIONS = ("--readonly", "--reportformat", "json", "--units", "b", "--nosuffix")
VGS_FIELDS = ("vg_name,vg_uuid,vg_size,vg_free,vg_tags,vg_extent_size,vg_missing_pv_count,"
              "pv_name,pe_start")
LVS_FIELDS = "vg_name,lv_name,seg_start,seg_pe_ranges"
_REGEX_SPECIAL = frozenset("\\.*+?()[]{}^$")


@dataclass(frozen=True)
class BlockDomain:
    sd_uuid: str  # MDT_SDUUID / SDUUID of the metadata when it is a UUID, else the VG name
    vg_name: str
    vg_uuid: str
    pvs: tuple[str, ...]  # PVs seen through the given devices
    missing_pvs: int  # PVs of the VG not seen through them
    size: int  # bytes
    free: int
    tags: tuple[str, ...]
    metadata: dict[str, str]  # from MDT_ tags, else from the metadata LV, else {}
    metadata_error: str | None  # why metadata could not be read


@dataclass
class Vg:
    """A VG merged from `vgs` rows (one row per PV)."""

    name: str
    uuid: str
    size: int
    free: int
    extent_size: int
    missing: int
    tags: tuple[str, ...]
    pe_start: dict[str, int] = field(default_factory=dict)  # visible PV -> first PE offset


def filter_config(devices: Sequence[str]) -> str:
    """The `--config` that lets LVM see exactly `devices` (no devices file, no hints, no udev
    device list). `ValueError` for a path that is not absolute or contains `|` or `"`."""
    accept = []
    for device in devices:
        if not device.startswith("/") or "|" in device or '"' in device:
            raise ValueError(f"unusable device path {device!r}")
        escaped = "".join("\\" + c if c in _REGEX_SPECIAL else c for c in device)
        accept.append(f'"a|^{escaped}$|"')
    rules = "[" + ",".join([*accept, '"r|.*|"']) + "]"
    return (f"devices {{ use_devicesfile=0 filter={rules} global_filter={rules} "
            f'hints="none" obtain_device_list_from_udev=0 }}')


def vgs_argv(devices: Sequence[str], lvm: str = "lvm") -> list[str]:
    return [lvm, "vgs", *REPORT_OPTIONS, "-o", VGS_FIELDS, "--config", filter_config(devices)]


def lvs_argv(devices: Sequence[str], vg_names: Sequence[str], lvm: str = "lvm") -> list[str]:
    """The first-extent segments of the `metadata` LVs of `vg_names`."""
    return [lvm, "lvs", *REPORT_OPTIONS, "--segments", "--select", f"lv_name={METADATA_LV}",
            "-o", LVS_FIELDS, "--config", filter_config(devices), *vg_names]


def parse_report(stdout: str, kind: str) -> list[dict[str, str]]:
    """The rows of `kind` ("vg", "seg") in LVM's JSON report. LVM may print a message line
    (e.g. "Retrying metadata scan.") into the middle of it; such lines are dropped first.
    `ValueError` if there is no such report."""
    lines = [line for line in stdout.splitlines() if line.strip()[:1] in tuple('{}[]",')]
    try:
        doc = json.loads("\n".join(lines))
        reports = [r[kind] for r in doc["report"] if kind in r]
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"no {kind} report in LVM's output: {e}") from None
    if not reports or not all(isinstance(rows, list) for rows in reports):
        raise ValueError(f"no {kind} report in LVM's output")
    return [row for rows in reports for row in rows]


def parse_vgs(rows: list[dict[str, str]]) -> list[Vg]:
    """Rows of `vgs` (one per PV) merged into VGs, in the order LVM printed them;
    `ValueError` for a row without the fields asked for."""
    vgs: dict[str, Vg] = {}
    try:
        for row in rows:
            vg = vgs.get(row["vg_uuid"])
            if vg is None:
                tags = tuple(t for t in row["vg_tags"].split(",") if t)
                vg = vgs[row["vg_uuid"]] = Vg(
                    row["vg_name"], row["vg_uuid"], int(row["vg_size"]), int(row["vg_free"]),
                    int(row["vg_extent_size"]), int(row["vg_missing_pv_count"]), tags)
            if row["pv_name"] and row["pv_name"] != MISSING_PV:
                vg.pe_start[row["pv_name"]] = int(row["pe_start"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"unexpected vgs row: {e!r}") from None
    return list(vgs.values())


def metadata_location(vg: Vg, segments: list[dict[str, str]]) -> tuple[str, int]:
    """(PV, byte offset on it) of the start of the VG's metadata LV, or `ValueError`."""
    first = [s for s in segments if s.get("vg_name") == vg.name and s.get("seg_start") == "0"]
    if not first:
        raise ValueError("no MDT_ tags and no metadata LV")
    ranges = str(first[0].get("seg_pe_ranges", "")).split()
    pv, _, extents = ranges[0].rpartition(":") if ranges else ("", "", "")
    if pv == MISSING_PV:
        raise ValueError("the metadata LV starts on a missing PV")
    if pv not in vg.pe_start:
        raise ValueError(f"the metadata LV starts on an unexpected PV {pv!r}")
    try:
        first_pe = int(extents.partition("-")[0])
    except ValueError:
        raise ValueError(f"unexpected seg_pe_ranges {ranges[0]!r}") from None
    return pv, vg.pe_start[pv] + first_pe * vg.extent_size


def read_area(path: str, offset: int, size: int = METADATA_SIZE) -> bytes:
    """BLOCKING: up to `size` bytes at `offset` of a device, bypassing the page cache (another
    host may have written them) where the device allows it."""
    try:
        return _direct_read(path, offset, size)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    return _buffered_read(path, offset, size)  # no O_DIRECT there, or an unaligned offset


def _direct_read(path: str, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
    try:
        with mmap.mmap(-1, size) as buf:  # page aligned, as O_DIRECT wants
            n = os.preadv(fd, [buf], offset)
            return buf[:n]
    finally:
        os.close(fd)


def _buffered_read(path: str, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


async def block_domains(runner: CommandRunner, devices: list[str], timeout: float,
                        lvm: str = "lvm", probes: Probes | None = None) -> list[BlockDomain]:
    """The block domains on `devices`, found within `timeout` seconds in all. Errors of
    `vgs` are raised (`errors.Timeout`, `errors.GeneralError`...); a domain whose metadata
    cannot be read is still listed, with `metadata_error` set. Metadata reads go through
    `probes` (one thread per device, however often it hangs)."""
    if not devices:
        return []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    argv = vgs_argv(devices, lvm)
    try:
        vgs = [vg for vg in parse_vgs(await _report(runner, argv, timeout, "vg"))
               if DOMAIN_TAG in vg.tags]
    except ValueError as e:
        raise errors.GeneralError(f"Command {show(argv)}: {e}") from None
    found: dict[str, tuple[dict[str, str], str | None]] = {}
    for vg in vgs:
        meta = sdmeta.metadata_from_tags(list(vg.tags))
        if meta is not None:
            found[vg.uuid] = (meta, None)
    need_lv = [vg for vg in vgs if vg.uuid not in found]
    if need_lv:
        found.update(await _lv_metadata(runner, devices, need_lv, deadline, lvm,
                                        probes or Probes()))
    return sorted((_domain(vg, *found[vg.uuid]) for vg in vgs), key=lambda d: d.vg_name)


def _domain(vg: Vg, meta: dict[str, str], error: str | None) -> BlockDomain:
    sd_uuid = meta.get("SDUUID", "")
    return BlockDomain(
        sd_uuid=sd_uuid if sdmeta.is_uuid(sd_uuid) else vg.name, vg_name=vg.name,
        vg_uuid=vg.uuid, pvs=tuple(vg.pe_start), missing_pvs=vg.missing, size=vg.size,
        free=vg.free, tags=vg.tags, metadata=meta, metadata_error=error)


async def _report(runner: CommandRunner, argv: list[str], timeout: float,
                  kind: str) -> list[dict[str, str]]:
    """The report rows; a failing LVM that still reported some rows (exit 5 when some VG
    could not be processed) is only logged."""
    result = await runner.run(argv, timeout=timeout)
    try:
        rows = parse_report(result.stdout, kind)
    except ValueError as e:
        check_result(result)
        raise errors.GeneralError(f"Command {show(result.argv)}: {e}") from None
    if result.rc != 0:
        if not rows:
            check_result(result)
        log.warning("LVM partial report argv=%s rc=%d err=%r",
                    show(result.argv), result.rc, tail(result.stderr, 200))
    return rows


async def _lv_metadata(runner: CommandRunner, devices: list[str], vgs: list[Vg],
                       deadline: float, lvm: str,
                       probes: Probes) -> dict[str, tuple[dict[str, str], str | None]]:
    loop = asyncio.get_running_loop()
    try:
        argv = lvs_argv(devices, [vg.name for vg in vgs], lvm)
        segments = await _report(runner, argv, max(deadline - loop.time(), 0.0), "seg")
    except errors.Error as e:
        return {vg.uuid: ({}, e.message) for vg in vgs}
    async with asyncio.TaskGroup() as tg:
        tasks = {vg.uuid: tg.create_task(_read_metadata(vg, segments, deadline, probes))
                 for vg in vgs}
    return {uuid: task.result() for uuid, task in tasks.items()}


async def _read_metadata(vg: Vg, segments: list[dict[str, str]], deadline: float,
                         probes: Probes) -> tuple[dict[str, str], str | None]:
    try:
        pv, offset = metadata_location(vg, segments)
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise errors.Timeout("no time left to read the metadata LV")
        data = await probes.run(pv, lambda: read_area(pv, offset), f"read {vg.name}/metadata",
                                left)
        try:
            return sdmeta.parse_metadata_bytes(data), None
        except ValueError as e:
            raise ValueError(f"metadata LV: {e}") from None
    except (errors.Error, OSError, ValueError) as e:
        reason = e.message if isinstance(e, errors.Error) else str(e)
        log.warning("DOMAIN vg=%s metadata unreadable: %s", vg.name, reason)
        return {}, reason
