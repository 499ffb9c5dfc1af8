"""What already lives on managed connections, for importing existing storage: the block
devices behind iSCSI connections and managed volumes (`getDeviceList`), and the storage
domains on file and block connections (`getStorageDomainList`).

Everything is read off the event loop with a deadline: sysfs facts of each device in its
own abandonable thread, a file share's top directory in another (a dead NFS server makes
that one connection report 480 while the others answer), LVM through the command runner
with a filter that shows it only the devices found here, never the host's own disks. While
a read hangs, calls that need the same read get 480 at once: hung threads do not pile up
(the connectors' `Probes`: one thread per mount point, directory or device, whoever asks).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from vdsmconn import errors
from vdsmconn.config import Config
from vdsmconn.connectors.base import Connector
from vdsmconn.connectors.mount import STALE_ERRNOS
from vdsmconn.host import blockdev, lvm, sdmeta
from vdsmconn.host.command import CommandRunner
from vdsmconn.host.iscsi_parse import Session, read_sessions
from vdsmconn.host.probe import Probes
from vdsmconn.model import (
    ConnectionKey,
    ConnectionSpec,
    IscsiSpec,
    LocalSpec,
    ManagedSpec,
    MountSpec,
)
from vdsmconn.state.actual import ActualState
from vdsmconn.state.desired import DesiredState

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Problem:
    """Why a connection or a device is missing from a reply: `{code, message}` of SPEC 3.1."""

    code: int
    message: str

    @classmethod
    def of(cls, e: BaseException, what: str) -> Problem:
        if isinstance(e, errors.Error):
            return cls(e.code, e.message)
        if isinstance(e, OSError):
            code = errors.StaleMount.code if e.errno in STALE_ERRNOS else \
                errors.GeneralError.code
            return cls(code, f"{what}: {e.strerror or e}")
        return cls(errors.GeneralError.code, f"{what}: {e}")

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class LunSession:
    """One session reaching a LUN, through one of its disks."""

    sid: int
    portal: str
    iqn: str
    iface: str
    netdev: str | None
    device: str  # /dev/sdX

    def to_wire(self) -> dict[str, Any]:
        return {"sid": self.sid, "portal": self.portal, "iqn": self.iqn, "iface": self.iface,
                "netdev": self.netdev, "device": self.device}


@dataclass
class Lun:
    """One logical unit, however many paths (sdX) and sessions reach it."""

    devices: list[blockdev.BlockDevice] = field(default_factory=list)
    sessions: list[LunSession] = field(default_factory=list)
    cids: set[str] = field(default_factory=set)

    @property
    def first(self) -> blockdev.BlockDevice:
        return self.devices[0]

    @property
    def path(self) -> str:
        first = self.first
        return first.multipath.path if first.multipath else f"/dev/{first.name}"

    def to_wire(self) -> dict[str, Any]:
        first = self.first
        return {
            "path": self.path, "wwid": first.wwid, "vendor": first.vendor,
            "product": first.product, "size": first.size,
            "logicalBlockSize": first.logical_block_size,
            "physicalBlockSize": first.physical_block_size,
            "multipath": first.multipath.to_wire() if first.multipath else None,
            "devices": [f"/dev/{d.name}" for d in self.devices],
            "sessions": [s.to_wire() for s in sorted(self.sessions,
                                                     key=lambda s: (s.sid, s.device))],
            "connectionIDs": sorted(self.cids), "error": None,
        }


@dataclass(frozen=True)
class Unreadable:
    """A device found behind a connection that could not be read (a `devices` entry)."""

    path: str
    cids: list[str]
    error: Problem

    def to_wire(self) -> dict[str, Any]:
        return {"path": self.path, "connectionIDs": self.cids, "error": self.error.to_wire()}


@dataclass(frozen=True)
class Missing:
    """A connection (`key`), or a device of one (`path`), left out of a reply (`errors`)."""

    key: str | None
    cids: list[str]
    error: Problem
    path: str | None = None

    def to_wire(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"key": self.key}
        if self.path is not None:
            shown["path"] = self.path
        shown["connectionIDs"] = self.cids
        shown["error"] = self.error.to_wire()
        return shown


@dataclass(frozen=True)
class DeviceReport:
    """getDeviceList: the LUNs found, devices that could not be read, what was missing."""

    luns: list[Lun]
    unreadable: list[Unreadable]
    missing: list[Missing]

    def to_wire(self) -> dict[str, Any]:
        return {"devices": [lun.to_wire() for lun in self.luns]
                + [u.to_wire() for u in self.unreadable],
                "errors": [m.to_wire() for m in self.missing]}


@dataclass
class DomainEntry:
    """A storage domain found on the selected connections, file or block."""

    sd_uuid: str
    metadata: dict[str, str]
    cids: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)  # file domains: their directories
    block: lvm.BlockDomain | None = None

    @property
    def type(self) -> str:
        return "file" if self.block is None else "block"

    def to_wire(self) -> dict[str, Any]:
        if self.block is None:
            return {"sdUUID": self.sd_uuid, "type": "file", "path": self.paths[0],
                    "paths": self.paths, "connectionIDs": self.cids,
                    "metadata": self.metadata}
        d = self.block
        return {"sdUUID": self.sd_uuid, "type": "block", "vgName": d.vg_name,
                "vgUUID": d.vg_uuid, "pvs": list(d.pvs), "missingPvs": d.missing_pvs,
                "size": d.size, "free": d.free, "connectionIDs": self.cids,
                "metadata": self.metadata, "metadataError": d.metadata_error}


@dataclass(frozen=True)
class SkippedDomain:
    path: str
    reason: str
    cids: list[str]

    def to_wire(self) -> dict[str, Any]:
        return {"path": self.path, "reason": self.reason, "connectionIDs": self.cids}


@dataclass(frozen=True)
class DomainReport:
    """getStorageDomainList: the domains, directories skipped, what was missing."""

    domains: list[DomainEntry]
    skipped: list[SkippedDomain]
    missing: list[Missing]

    def to_wire(self) -> dict[str, Any]:
        return {"domains": [d.to_wire() for d in self.domains],
                "skipped": [s.to_wire() for s in self.skipped],
                "errors": [m.to_wire() for m in self.missing]}


class Inventory:
    def __init__(self, config: Config, desired: DesiredState, actual: ActualState,
                 connectors: dict[str, Connector[Any]], runner: CommandRunner,
                 dev: str = "/dev") -> None:
        self.config = config
        self.dev = dev
        self.desired = desired
        self.actual = actual
        self.connectors = connectors
        self.runner = runner
        # The connectors' registry: a scan of a mount waits for (or reports) their probe of
        # it, so a dead server holds one thread, not one per caller.
        self.probes = next((c.host.probes for c in connectors.values()), None) or Probes()

    @property
    def _timeout(self) -> float:
        return self.config.supervisor.probe_timeout

    async def _read(self, target: str, what: str, fn: Callable[[], T]) -> T:
        """`fn` in a thread of its own, with the probe deadline; never a second thread for
        `target` while one has not returned."""
        return await self.probes.run(target, fn, what, self._timeout)

    def _selected(self, cids: list[str] | None) -> dict[ConnectionKey, tuple[ConnectionSpec,
                                                                             set[str]]]:
        """key -> (spec, the selected CIDs referring to it); an unknown CID is 479."""
        if cids is None:
            cids = sorted(e.cid for e in self.desired)
        selected: dict[ConnectionKey, tuple[ConnectionSpec, set[str]]] = {}
        for cid in cids:
            entry = self.desired.get(cid)
            if entry is None:
                raise errors.ConnectionIdNotFound(f"connection ID {cid!r} is not managed",
                                                  {"connectionID": cid})
            selected.setdefault(entry.key, (entry.spec, set()))[1].add(cid)
        return selected

    # --- devices ---------------------------------------------------------------------------

    async def devices(self, cids: list[str] | None) -> DeviceReport:
        """The LUNs found, devices that could not be read, connections without devices."""
        sysfs = self.config.iscsi.sysfs_root
        sessions = {s.sid: s for s in read_sessions(sysfs)}
        wanted: dict[str, tuple[set[str], list[LunSession]]] = {}  # name -> cids, sessions
        missing: list[Missing] = []
        for key, (spec, users) in self._selected(cids).items():
            try:
                disks = self._device_names(spec, sessions)
            except (errors.Error, OSError, ValueError) as e:  # ValueError: not under /dev
                missing.append(Missing(str(key), sorted(users), Problem.of(e, str(key))))
                continue
            for name, session in disks:
                found = wanted.setdefault(name, (set(), []))
                found[0].update(users)
                if session is not None:
                    found[1].append(session)
        names = sorted(wanted)
        results = await asyncio.gather(
            *(self._read(os.path.join(sysfs, "block", n), f"reading /sys of {n}",
                         functools.partial(blockdev.read_device, n, sysfs, self.dev))
              for n in names),
            return_exceptions=True)
        luns: dict[str, Lun] = {}
        unreadable = []
        for name, result in zip(names, results, strict=True):
            users, on = wanted[name]
            if isinstance(result, BaseException):
                if not isinstance(result, (errors.Error, OSError, ValueError)):
                    raise result
                log.warning("DEVICES %s unreadable: %s", name, result)
                unreadable.append(Unreadable(f"/dev/{name}", sorted(users),
                                             Problem.of(result, f"/dev/{name}")))
                continue
            group = result.multipath.uuid if result.multipath else (result.wwid or name)
            lun = luns.setdefault(group, Lun())
            if result not in lun.devices:
                lun.devices.append(result)
            lun.sessions.extend(on)
            lun.cids.update(users)
        return DeviceReport(sorted(luns.values(), key=lambda lun: lun.path), unreadable,
                            missing)

    def _device_names(self, spec: ConnectionSpec, sessions: dict[int, Session]) -> list[
            tuple[str, LunSession | None]]:
        """Kernel names of the disks behind one connection, each with its session if any."""
        if isinstance(spec, IscsiSpec):
            found = self.connectors["iscsi"].present(spec)
            if found is None or not found.paths:
                raise errors.ConnectError(f"{spec.key} has no session on this host")
            out: list[tuple[str, LunSession | None]] = []
            for p in found.paths:
                s = sessions.get(p.session) if p.session is not None else None
                for device in p.devices:
                    name = os.path.basename(device)  # "/dev/" + the kernel's name
                    out.append((name, None if s is None else LunSession(
                        s.sid, s.portal, s.iqn, s.iface, p.netdev, f"/dev/{name}")))
            return out
        if isinstance(spec, ManagedSpec):
            found = self.connectors["managed"].present(spec)
            if found is None or found.path is None:
                raise errors.ConnectError(f"{spec.key} is not attached on this host")
            sysfs = self.config.iscsi.sysfs_root
            name = blockdev.kernel_name(found.path, self.dev)
            if blockdev.multipath_map(name, sysfs) is None:
                return [(name, None)]
            return [(m, None) for m in blockdev.map_members(name, sysfs)] or [(name, None)]
        return []  # file storage has no block devices

    # --- storage domains -----------------------------------------------------------------

    async def domains(self, cids: list[str] | None) -> DomainReport:
        selected = self._selected(cids)
        domains: dict[tuple[str, str], DomainEntry] = {}
        skipped: list[SkippedDomain] = []
        missing: list[Missing] = []
        files = [(key, spec, users) for key, (spec, users) in selected.items()
                 if isinstance(spec, (MountSpec, LocalSpec))]
        scans = await asyncio.gather(*(self._scan_files(key, spec) for key, spec, _ in files),
                                     return_exceptions=True)
        for (key, _spec, users), scan in zip(files, scans, strict=True):
            if isinstance(scan, BaseException):
                if not isinstance(scan, (errors.Error, OSError)):
                    raise scan
                log.warning("DOMAINS key=%s scan failed: %s", key, scan)
                missing.append(Missing(str(key), sorted(users), Problem.of(scan, str(key))))
                continue
            found, passed = scan
            for d in found:
                entry = domains.setdefault(("file", d.sd_uuid),
                                           DomainEntry(d.sd_uuid, d.metadata))
                entry.cids = sorted(set(entry.cids) | users)
                entry.paths = sorted(set(entry.paths) | {d.path})
            skipped += [SkippedDomain(s.path, s.reason, sorted(users)) for s in passed]
        block = [c for spec, refs in selected.values()
                 if isinstance(spec, (IscsiSpec, ManagedSpec)) for c in refs]
        if block:
            await self._block_domains(block, domains, missing)
        return DomainReport(sorted(domains.values(), key=lambda d: (d.type, d.sd_uuid)),
                            skipped, missing)

    async def _scan_files(self, key: ConnectionKey, spec: MountSpec | LocalSpec) -> tuple[
            list[sdmeta.FileDomain], list[sdmeta.Skipped]]:
        status = self.actual.get(key)
        if status is None or not status.connected or not status.path:
            raise errors.ConnectError(f"{key} is not connected")
        # The target the connector probes: the mount point, or the local directory.
        target = spec.connection if isinstance(spec, LocalSpec) else status.path
        return await self._read(target, f"scanning {status.path}",
                                functools.partial(sdmeta.scan_file_domains, status.path))

    async def _block_domains(self, cids: list[str], domains: dict[tuple[str, str], DomainEntry],
                             missing: list[Missing]) -> None:
        report = await self.devices(cids)
        # A device that could not be read is not shown to LVM: say so, the list may lack it.
        missing += report.missing + [Missing(None, u.cids, u.error, path=u.path)
                                     for u in report.unreadable]
        owners = {lun.path: lun.cids for lun in report.luns}
        try:
            found = await lvm.block_domains(self.runner, sorted(owners),
                                            self.config.supervisor.command_timeout,
                                            self.config.lvm_command, self.probes)
        except errors.Error as e:
            users = sorted({c for lun in report.luns for c in lun.cids})
            missing.append(Missing(None, users, Problem.of(e, "lvm")))
            return
        for d in found:
            seen = {c for pv in d.pvs for c in owners.get(pv, ())}
            entry = domains.setdefault(("block", d.sd_uuid),
                                       DomainEntry(d.sd_uuid, d.metadata, block=d))
            entry.cids = sorted(set(entry.cids) | seen)
