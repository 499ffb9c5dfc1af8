"""VDSM's storage verbs on managed connections (SPEC 5.1), for the engine's flows that still
call them: VDSM's names, parameters and result shapes, over the same service as our verbs.

`StoragePool.connectStorageServer` manages each of the engine's dicts under the CID
`vdsm:<id>` and waits until each is connected or has failed once; a failed one stays managed
and is retried until `disconnectStorageServer` unmanages it. These CIDs share keys and
refcounts with those of `manageStorageServer`. `ISCSIConnection.discoverSendTargets`,
`Host.getStorageDomains` and `Host.getDeviceList` answer from the discovery and inventory
code, in the shapes the engine reads (vdsm-api.yml; the engine's GetDeviceListVDSCommand).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from vdsmconn import errors, model
from vdsmconn.host import address, lvm
from vdsmconn.host.iscsi_parse import Target, read_sessions
from vdsmconn.inventory import DomainEntry, Lun
from vdsmconn.rpc import params
from vdsmconn.rpc.jsonrpc import Method, Session
from vdsmconn.service import Service

log = logging.getLogger(__name__)

CID_PREFIX = "vdsm:"
BLANK_UUID = "00000000-0000-0000-0000-000000000000"
DEVTYPE = "iSCSI"  # VDSM's BlockDeviceType of a device reached through iSCSI sessions
PVS_FIELDS = "pv_name,pv_uuid,pv_size,vg_uuid"


@dataclass(frozen=True)
class DomainType:
    """One of VDSM's storage domain types (lib/vdsm/storage/sd.py)."""

    number: int
    name: str  # as VDSM's StorageDomainType names it
    kind: str | None  # our connection type; None: nothing to connect


DOMAIN_TYPES = (
    DomainType(1, "NFS", "nfs"), DomainType(2, "FCP", None), DomainType(3, "ISCSI", "iscsi"),
    DomainType(4, "LOCALFS", "localfs"), DomainType(6, "POSIXFS", "posixfs"),
    DomainType(7, "GLUSTERFS", "glusterfs"),
)
DOMAIN_CLASSES = {1: "Data", 2: "Iso", 3: "Backup"}  # VDSM's domain classes (metadata CLASS)
TYPE_NAMES = {t.number: t.name for t in DOMAIN_TYPES} | {5: "CIFS"}


def _number_or_name(value: Any, path: str) -> int | str:
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value.strip().upper()
    raise params.bad_type(path, "a number or a name", value)


def domain_type(value: Any, path: str = "domainType") -> DomainType:
    """A VDSM storage domain type, by number (3) or name ("ISCSI", any case)."""
    wanted = _number_or_name(value, path)
    for t in DOMAIN_TYPES:
        if wanted in (t.number, t.name):
            return t
    known = ", ".join(f"{t.number} {t.name}" for t in DOMAIN_TYPES)
    raise params.bad_value(path, f"unknown storage domain type {value!r} (one of {known})")


@dataclass(frozen=True)
class EngineConnection:
    """One dict of `connectionParams`: its id, our CID for it, and what it asks for (None
    for FCP, which has nothing to connect), or why it cannot be used."""

    id: str
    cid: str
    spec: model.ConnectionSpec | None = None
    error: errors.Error | None = None


def engine_connections(value: Any, kind: str | None, parse: bool,
                       path: str = "connectionParams") -> list[EngineConnection]:
    """The engine's dicts. A dict without a usable `id` fails the call (it has no status to
    report under); a dict that is not a valid connection gets its own error (its status)."""
    if not isinstance(value, list):
        raise params.bad_type(path, "a list of connection objects", value)
    out = []
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(item, dict):
            raise params.bad_type(where, "a connection object", item)
        if item.get("id") in (None, ""):
            raise params.bad_value(f"{where}.id", "missing: the engine's connection UUID")
        id_ = params.get_text(item["id"], f"{where}.id", max_len=255 - len(CID_PREFIX))
        cid = params.get_cid(CID_PREFIX + id_, f"{where}.id")
        if not parse or kind is None:
            out.append(EngineConnection(id_, cid))
            continue
        try:
            if item.get("type", kind) != kind:
                raise params.bad_value(f"{where}.type", f"must be {kind} for this domainType")
            spec = params.parse_connection({**item, "type": kind}, where)
        except errors.Error as e:
            log.warning("VDSM connection id=%s refused: %s", id_, e.message)
            out.append(EngineConnection(id_, cid, error=e))
            continue
        out.append(EngineConnection(id_, cid, spec))
    return out


def status_of(error: errors.Error) -> int:
    """The status code of a refused connection: VDSM reports invalid dicts as 1000."""
    return errors.InvalidParameter.code if error.code < 0 else error.code


@dataclass(frozen=True)
class ConnectionStatus:
    """One entry of VDSM's statuslist: the engine's connection id and its status code."""

    id: str
    status: int

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status}


def statuslist(conns: list[EngineConnection], codes: list[int]) -> list[ConnectionStatus]:
    return [ConnectionStatus(c.id, code) for c, code in zip(conns, codes, strict=True)]


# --- connect / disconnect --------------------------------------------------------------------


async def _ensure(service: Service, conn: EngineConnection) -> bool:
    """Manage `conn` under its CID (nothing to do if it already is), or move the CID to it
    in place. True if its connection changed on the same key: the old one, still up for a
    moment, must not count as connected."""
    assert conn.spec is not None
    try:
        await service.manage(conn.cid, conn.spec)
        return False
    except errors.ConnectionIdInUse:
        old = service.desired.get(conn.cid)
        await service.update(conn.cid, conn.spec)
        return old is not None and old.key == conn.spec.key


async def connect(service: Service, pool: str | None, kind: DomainType,
                  conns: list[EngineConnection]) -> list[ConnectionStatus]:
    since = service.clock.time()
    log.info("VDSM CONNECT pool=%s type=%s ids=%s", pool, kind.name, [c.id for c in conns])
    if kind.kind is None:
        return statuslist(conns, [0] * len(conns))  # FCP: nothing to connect
    codes: list[int | None] = [None] * len(conns)
    remade: set[str] = set()

    async def one(i: int, conn: EngineConnection) -> None:
        if conn.error is not None:
            codes[i] = status_of(conn.error)
            return
        try:
            if await _ensure(service, conn):
                remade.add(conn.cid)
        except errors.Error as e:
            log.warning("VDSM CONNECT id=%s refused code=%s: %s", conn.id, e.code, e.message)
            codes[i] = status_of(e)

    async with asyncio.TaskGroup() as tg:
        for i, conn in enumerate(conns):
            tg.create_task(one(i, conn))
    waiting = [c.cid for c, code in zip(conns, codes, strict=True) if code is None]
    settled = await service.wait_settled(waiting, since, service.config.vdsm.connect_timeout,
                                         remade)
    result = [settled[c.cid] if code is None else code
              for c, code in zip(conns, codes, strict=True)]
    log.info("VDSM CONNECTED %s", {c.id: code for c, code in zip(conns, result, strict=True)})
    return statuslist(conns, result)


async def disconnect(service: Service, pool: str | None, kind: DomainType,
                     conns: list[EngineConnection]) -> list[ConnectionStatus]:
    """Unmanage each `vdsm:<id>` and wait for the teardown of the keys they left alone. An
    id that is not managed has nothing to disconnect: 0."""
    since = service.clock.time()
    log.info("VDSM DISCONNECT pool=%s type=%s ids=%s", pool, kind.name, [c.id for c in conns])
    keys: dict[str, model.ConnectionKey] = {}
    for conn in conns:
        entry = service.desired.get(conn.cid)
        if kind.kind is None or entry is None or conn.cid in keys:
            continue
        try:
            await service.unmanage(conn.cid, None)
        except errors.ConnectionIdNotFound:
            continue  # unmanaged meanwhile by someone else
        keys[conn.cid] = entry.key
    gone = await service.wait_torn_down(sorted(set(keys.values())), since,
                                        service.config.vdsm.disconnect_timeout)
    result = [gone[keys[c.cid]] if c.cid in keys else 0 for c in conns]
    log.info("VDSM DISCONNECTED %s", {c.id: code for c, code in zip(conns, result, strict=True)})
    return statuslist(conns, result)


# --- discovery and inventory -----------------------------------------------------------------


def send_target(found: Target) -> str:
    """A discovered target as VDSM prints it: `<host>:<port>,<tpgt> <iqn>`."""
    tpgt = 1 if found.tpgt is None else found.tpgt  # iscsi.DEFAULT_TPGT
    return f"{found.portal},{tpgt} {found.iqn}"


def domain_matches(domain: DomainEntry, pool: str | None, domain_class: str | None,
                   storage_type: str | None, remote_path: str | None) -> bool:
    """VDSM's filters of getStorageDomainsList on one of our domain entries."""
    meta = domain.metadata
    if pool not in (None, "", BLANK_UUID) and pool not in meta.get("POOL_UUID", "").split(","):
        return False
    if domain_class is not None and meta.get("CLASS", "").upper() != domain_class.upper():
        return False
    if storage_type is not None and meta.get("TYPE", "").upper() != storage_type:
        return False
    if remote_path:
        # VDSM compares the mount point's name (the escaped remote path): so do we.
        wanted = model.escape_mount_name(model.normalize_remote(remote_path))
        names = {os.path.basename(os.path.dirname(p)) for p in domain.paths}
        return wanted in names
    return True


def _filter(value: Any, path: str, names: dict[int, str]) -> str | None:
    """A filter given by number or name, as its name; 0, null or "": no filter."""
    if value in (None, "", 0, "0"):
        return None
    wanted = _number_or_name(value, path)
    if isinstance(wanted, int):
        if wanted not in names:
            raise params.bad_value(path, f"unknown value {wanted}")
        return names[wanted]
    return wanted


def domain_class(value: Any) -> str | None:
    return _filter(value, "domainClass", DOMAIN_CLASSES)


def storage_type(value: Any) -> str | None:
    return _filter(value, "storageType", TYPE_NAMES)


async def storage_domains(service: Service, pool: str | None, cls: str | None,
                          kind: str | None, remote: str | None) -> list[str]:
    found = await service.inventory.domains(None)
    for problem in found.missing:
        log.warning("VDSM DOMAINS %s not scanned: %s", problem.key or problem.path,
                    problem.error.message)
    return sorted(d.sd_uuid for d in found.domains if domain_matches(d, pool, cls, kind, remote))


@dataclass(frozen=True)
class PathFacts:
    """What VDSM reports of one path (a SCSI disk) beyond what the inventory reads."""

    name: str
    state: str  # "active" while the SCSI device is running, else "failed"
    size: int
    lun: str
    fwrev: str
    serial: str  # as `scsi_id --page=0x80 --whitelisted --replace-whitespace` gives it
    discard_max_bytes: int
    used: bool  # partitions on it, or something holding its multipath map


def _text(path: str, raw: bool = False) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(4096)
    except OSError:
        return ""
    text = data.decode("ascii", "replace")
    return text.rstrip("\n") if raw else text.strip()


def read_path(name: str, sysfs: str, dm: str | None) -> PathFacts:
    """Facts of /sys/block/<name> (blocking: run it in a thread)."""
    block = os.path.join(sysfs, "block", name)
    device = os.path.join(block, "device")
    hbtl = os.path.basename(os.path.realpath(device)).split(":")
    unit = b""
    with contextlib.suppress(OSError):  # no unit serial page: the serial is left empty
        with open(os.path.join(device, "vpd_pg80"), "rb") as f:
            page = f.read(260)
        unit = page[4:4 + page[3]] if len(page) > 4 else b""
    serial = ""
    if unit.strip():
        raw = ("S" + _text(os.path.join(device, "vendor"), raw=True)[:8].ljust(8)
               + _text(os.path.join(device, "model"), raw=True)[:16].ljust(16)
               + unit.decode("ascii", "replace"))
        serial = re.sub(r"\s+", "_", raw.strip())
    parts = any(e.startswith(name) for e in os.listdir(block))
    holders = bool(dm) and bool(os.listdir(os.path.join(sysfs, "block", dm or "", "holders")))
    discard = _text(os.path.join(block, "queue", "discard_max_bytes"))
    return PathFacts(
        name=name, state="active" if _text(os.path.join(device, "state")) == "running"
        else "failed", size=int(_text(os.path.join(block, "size")) or 0) * 512,
        lun=hbtl[-1] if len(hbtl) == 4 and hbtl[-1].isdigit() else "0",
        fwrev=_text(os.path.join(device, "rev")), serial=serial,
        discard_max_bytes=int(discard) if discard.isdigit() else 0, used=parts or holders)


async def _pvs(service: Service, devices: list[str]) -> dict[str, dict[str, str]] | None:
    """LVM's PVs among `devices` (path -> row); None when LVM could not tell."""
    if not devices:
        return {}
    argv = [service.config.lvm_command, "pvs", *lvm.REPORT_OPTIONS, "-o", PVS_FIELDS,
            "--config", lvm.filter_config(devices)]
    try:
        result = await service.inventory.runner.run(
            argv, timeout=service.config.supervisor.command_timeout)
        rows = lvm.parse_report(result.stdout, "pv")
    except (errors.Error, ValueError) as e:
        log.warning("VDSM DEVICES pvs failed: %s", getattr(e, "message", e))
        return None
    return {row.get("pv_name", ""): row for row in rows}


@dataclass(frozen=True)
class DeviceInfo:
    """One LUN in VDSM's BlockDeviceInfo shape (the fields the engine reads)."""

    guid: str
    capacity: int
    fwrev: str
    serial: str
    vendor: str
    product: str
    logical_block_size: int
    physical_block_size: int
    paths: list[PathFacts]
    pathlist: list[dict[str, str]]  # VDSM's per-session dicts, as they go on the wire
    pv: dict[str, str] | None  # LVM's row of the LUN if it is a PV
    status: str  # used, free or unknown

    def to_wire(self) -> dict[str, Any]:
        pv = self.pv or {}
        return {
            "GUID": self.guid, "capacity": str(self.capacity), "devtype": DEVTYPE,
            "fwrev": self.fwrev, "serial": self.serial,
            "vendorID": self.vendor, "productID": self.product,
            "logicalblocksize": str(self.logical_block_size),
            "physicalblocksize": str(self.physical_block_size),
            "pathstatus": [{"physdev": p.name, "state": p.state, "capacity": str(p.size),
                            "lun": p.lun, "type": DEVTYPE} for p in self.paths],
            "pathlist": self.pathlist,
            "pvUUID": pv.get("pv_uuid", ""), "vgUUID": pv.get("vg_uuid", ""),
            "pvsize": pv.get("pv_size", ""),
            "discard_max_bytes": min((p.discard_max_bytes for p in self.paths), default=0),
            "discard_zeroes_data": 0, "status": self.status,
        }


def device_info(lun: Lun, paths: list[PathFacts], pv: dict[str, str] | None,
                tpgts: dict[int, int | None], check: bool, known: bool) -> DeviceInfo:
    """One of our getDeviceList entries in VDSM's BlockDeviceInfo shape."""
    seen: dict[int, dict[str, str]] = {}
    for s in lun.sessions:
        host, port = address.split(s.portal)
        tpgt = tpgts.get(s.sid)
        seen.setdefault(s.sid, {
            "connection": host, "port": str(port), "iqn": s.iqn,
            "portal": str(1 if tpgt is None else tpgt), "initiatorname": s.iface})
    status = "unknown"
    if check and known:
        status = "used" if pv or any(p.used for p in paths) else "free"
    first = lun.first
    return DeviceInfo(
        guid=first.wwid or "", capacity=first.size,
        fwrev=paths[0].fwrev if paths else "", serial=paths[0].serial if paths else "",
        vendor=first.vendor or "", product=first.product or "",
        logical_block_size=first.logical_block_size,
        physical_block_size=first.physical_block_size, paths=paths,
        pathlist=[seen[sid] for sid in sorted(seen)], pv=pv, status=status)


async def device_list(service: Service, kind: str | None, guids: list[str],
                      check: bool) -> list[DeviceInfo]:
    """The LUNs behind managed iSCSI connections (VDSM leaves managed volumes out)."""
    if kind == "FCP":
        return []
    found = await service.inventory.devices(None)
    luns = [lun for lun in found.luns if lun.sessions and lun.first.wwid
            and (not guids or lun.first.wwid in guids)]
    sysfs = service.config.iscsi.sysfs_root
    timeout = service.config.supervisor.probe_timeout

    async def facts(lun: Lun) -> list[PathFacts]:
        mpath = lun.first.multipath
        dm = mpath.dm if mpath else None
        names = [d.name for d in lun.devices]
        reads = await asyncio.gather(*(service.inventory.probes.run(
            os.path.join(sysfs, "block", n), functools.partial(read_path, n, sysfs, dm),
            f"reading /sys of {n}", timeout) for n in names), return_exceptions=True)
        out = []
        for name, read in zip(names, reads, strict=True):
            if isinstance(read, BaseException):
                if not isinstance(read, (errors.Error, OSError, ValueError)):
                    raise read
                log.warning("VDSM DEVICES %s unreadable: %s", name, read)
                continue
            out.append(read)
        return out

    async with asyncio.TaskGroup() as tg:
        pv_read = tg.create_task(_pvs(service, [lun.path for lun in luns]))
        reads = [tg.create_task(facts(lun)) for lun in luns]
    pvs = pv_read.result()
    tpgts = {s.sid: s.tpgt for s in read_sessions(sysfs)}
    return sorted((device_info(lun, r.result(), (pvs or {}).get(lun.path), tpgts, check,
                               pvs is not None) for lun, r in zip(luns, reads, strict=True)),
                  key=lambda d: d.guid)


# --- the verb table ----------------------------------------------------------------------


Handler = Callable[[dict[str, Any], Session], Awaitable[Any]]


def _method(name: str, required: tuple[str, ...],
            optional: tuple[str, ...] = ()) -> Callable[[Handler], Method]:
    def wrap(fn: Handler) -> Method:
        return Method(name=name, params=required + optional, required=frozenset(required),
                      handler=fn)
    return wrap


def _opt_str(p: dict[str, Any], name: str) -> str | None:
    value = p.get(name)
    return None if value is None else params.get_str(value, name)


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return params.get_bool(value, name)


def build(service: Service) -> list[Method]:
    @_method("StoragePool.connectStorageServer",
             ("storagepoolID", "domainType", "connectionParams"))
    async def connect_server(p: dict[str, Any], s: Session) -> Any:
        kind = domain_type(p["domainType"])
        conns = engine_connections(p["connectionParams"], kind.kind, parse=True)
        if not conns:
            raise params.bad_value("connectionParams", "must not be empty")
        return [c.to_wire() for c in
                await connect(service, _opt_str(p, "storagepoolID"), kind, conns)]

    @_method("StoragePool.disconnectStorageServer",
             ("storagepoolID", "domainType", "connectionParams"))
    async def disconnect_server(p: dict[str, Any], s: Session) -> Any:
        kind = domain_type(p["domainType"])
        conns = engine_connections(p["connectionParams"], kind.kind, parse=False)
        return [c.to_wire() for c in
                await disconnect(service, _opt_str(p, "storagepoolID"), kind, conns)]

    @_method("ISCSIConnection.discoverSendTargets", ("host", "port"),
             ("user", "password", "ipv6_enabled"))
    async def discover(p: dict[str, Any], s: Session) -> Any:
        host = params.get_text(p["host"], "host", max_len=255)
        port = params.get_int(p["port"], "port", 1, 65535)
        user = _opt_str(p, "user") or None  # VDSM: an empty user means no CHAP
        password = _opt_str(p, "password")
        secret = model.Secret(password) if user is not None and password else None
        if user is not None:
            user = params.get_text(user, "user")
        ipv6 = _flag(p.get("ipv6_enabled", False), "ipv6_enabled")
        found = await service.discover(host, port, user, secret, ipv6)
        return [send_target(t) for t in found]

    @_method("Host.getStorageDomains", (),
             ("storagepoolID", "domainClass", "storageType", "remotePath"))
    async def get_domains(p: dict[str, Any], s: Session) -> Any:
        return await storage_domains(
            service, _opt_str(p, "storagepoolID"), domain_class(p.get("domainClass")),
            storage_type(p.get("storageType")), _opt_str(p, "remotePath"))

    @_method("Host.getDeviceList", (), ("storageType", "guids", "checkStatus", "refresh"))
    async def get_devices(p: dict[str, Any], s: Session) -> Any:
        guids = params.get_str_list(p.get("guids") or [], "guids")
        check = _flag(p.get("checkStatus", True), "checkStatus")
        _flag(p.get("refresh", True), "refresh")  # sysfs is read afresh on every call
        found = await device_list(service, storage_type(p.get("storageType")), guids, check)
        return [d.to_wire() for d in found]

    return [connect_server, disconnect_server, discover, get_domains, get_devices]
