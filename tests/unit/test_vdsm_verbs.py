"""VDSM's verbs, their parameters and result shapes: domain types by number or name, the
engine's dicts (each its own status when refused), discovery lines, the filters of
getStorageDomains, and getDeviceList's BlockDeviceInfo built on the inventory (fake sysfs
trees of test_inventory.py, `lvm pvs` from the fake runner)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from tests.unit.test_blockdev import NAA, FakeHost
from tests.unit.test_inventory import IQN, inventory
from tests.unit.test_iscsi_connector import netdev
from tests.unit.test_iscsi_parse import write_session
from vdsmconn import config, errors
from vdsmconn.host.fakerunner import FakeRunner
from vdsmconn.host.iscsi_parse import Target
from vdsmconn.inventory import DomainEntry
from vdsmconn.model import IscsiSpec, NfsSpec, PosixSpec
from vdsmconn.rpc import vdsm
from vdsmconn.service import Service

ID = "5a1e9b54-6f3b-4f57-8c0b-7a3c2c9e8d02"
ID2 = "0b8f5b1c-3d6e-4a51-9a0c-1f2e3d4c5b6a"


def engine(**fields: Any) -> dict[str, Any]:
    """A dict as the engine's StorageConnectionHelper builds it (for every type)."""
    return {"id": ID, "connection": "", "port": "", "iqn": "", "user": "", "password": "",
            "ipv6_enabled": "false", **fields}


# --- domain types ----------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "name", "kind"), [
    (1, "NFS", "nfs"), ("1", "NFS", "nfs"), ("nfs", "NFS", "nfs"), (2, "FCP", None),
    (3, "ISCSI", "iscsi"), ("iSCSI", "ISCSI", "iscsi"), (4, "LOCALFS", "localfs"),
    ("LOCALFS", "LOCALFS", "localfs"), (6, "POSIXFS", "posixfs"), (" 6 ", "POSIXFS", "posixfs"),
    (7, "GLUSTERFS", "glusterfs"), ("GlusterFS", "GLUSTERFS", "glusterfs"),
])
def test_domain_type_by_number_or_name(value: Any, name: str, kind: str | None) -> None:
    found = vdsm.domain_type(value)
    assert (found.name, found.kind) == (name, kind)


@pytest.mark.parametrize("value", [0, 5, 8, "CIFS", "SHAREDFS", "nope", ""])
def test_unknown_domain_type_is_1000(value: Any) -> None:
    with pytest.raises(errors.InvalidParameter) as e:
        vdsm.domain_type(value)
    assert e.value.data == {"field": "domainType"} and "6 POSIXFS" in e.value.message


@pytest.mark.parametrize("value", [True, None, 1.5, [1]])
def test_domain_type_of_another_type_is_invalid_params(value: Any) -> None:
    with pytest.raises(errors.InvalidParams):
        vdsm.domain_type(value)


# --- the engine's dicts ----------------------------------------------------------------------


def test_engine_dicts_take_their_type_from_domain_type() -> None:
    posix, nfs, iscsi = (
        vdsm.engine_connections([engine(connection="vc-x", vfs_type="tmpfs",
                                        mnt_options="size=1m")], "posixfs", parse=True),
        vdsm.engine_connections([engine(connection="srv:/exp", protocol_version="4.2",
                                        timeout="600", retrans="6")], "nfs", parse=True),
        vdsm.engine_connections([engine(connection="10.0.0.1", port="3260", tpgt="1",
                                        iqn=IQN)], "iscsi", parse=True))
    (p,), (n,), (i,) = posix, nfs, iscsi
    assert p.cid == f"vdsm:{ID}" and p.id == ID and p.error is None
    assert p.spec == PosixSpec(connection="vc-x", vfs_type="tmpfs", mnt_options="size=1m")
    assert p.spec is not None and p.spec.engine_id == ID
    assert n.spec == NfsSpec(connection="srv:/exp", protocol_version="4.2", timeout=600,
                             retrans=6)
    assert i.spec == IscsiSpec(connection="10.0.0.1", iqn=IQN, port=3260, tpgt=1)


def test_a_refused_dict_has_its_own_error_and_the_others_pass() -> None:
    conns = vdsm.engine_connections([
        engine(connection="vc-a", vfs_type="tmpfs"),
        engine(id=ID2, connection="vc-b", vfs_type="tmpfs", bogus="1"),
        engine(id="third", connection="vc-c", type="nfs"),
        engine(id="fourth", connection="vc-d", mnt_options="a,b;rm"),
    ], "posixfs", parse=True)
    assert [c.spec is not None for c in conns] == [True, False, False, False]
    codes = [None if c.error is None else vdsm.status_of(c.error) for c in conns]
    assert codes == [None, 1000, 1000, 1000]
    assert conns[1].error is not None and "connectionParams[1].bogus" in conns[1].error.message
    assert conns[2].error is not None and "must be posixfs" in conns[2].error.message


@pytest.mark.parametrize(("item", "field"), [
    ({"connection": "vc-a"}, "connectionParams[1].id"),
    ({"id": "", "connection": "vc-a"}, "connectionParams[1].id"),
    ({"id": None}, "connectionParams[1].id"),
    ({"id": "a/b"}, "connectionParams[1].id"),
])
def test_a_dict_without_a_usable_id_fails_the_call(item: dict[str, Any], field: str) -> None:
    with pytest.raises(errors.InvalidParameter) as e:
        vdsm.engine_connections([engine(connection="x"), item], "posixfs", parse=True)
    assert e.value.data == {"field": field}


def test_not_a_list_or_not_dicts_is_invalid_params() -> None:
    with pytest.raises(errors.InvalidParams):
        vdsm.engine_connections({"id": ID}, "nfs", parse=True)
    with pytest.raises(errors.InvalidParams) as e:
        vdsm.engine_connections([engine(), "nfs://x/y"], "nfs", parse=True)
    assert e.value.data == {"field": "connectionParams[1]"}


def test_fcp_and_disconnect_read_only_the_ids() -> None:
    (fcp,) = vdsm.engine_connections([engine(bogus=1)], None, parse=True)
    assert (fcp.cid, fcp.spec, fcp.error) == (f"vdsm:{ID}", None, None)
    (gone,) = vdsm.engine_connections([engine(vfs_type=7)], "posixfs", parse=False)
    assert (gone.cid, gone.spec, gone.error) == (f"vdsm:{ID}", None, None)


def test_status_codes_and_list() -> None:
    assert vdsm.status_of(errors.InvalidParams("x")) == 1000
    assert vdsm.status_of(errors.MountError("x")) == 477
    assert vdsm.status_of(errors.ConnectionConflict("x")) == 453
    conns = [vdsm.EngineConnection(ID, f"vdsm:{ID}"), vdsm.EngineConnection(ID2, f"vdsm:{ID2}")]
    assert [s.to_wire() for s in vdsm.statuslist(conns, [0, 480])] == [
        {"id": ID, "status": 0}, {"id": ID2, "status": 480}]


# --- discovery and domains -------------------------------------------------------------------


def test_send_targets_as_vdsm_prints_them() -> None:
    assert vdsm.send_target(Target("10.0.0.1", 3260, 1, IQN)) == f"10.0.0.1:3260,1 {IQN}"
    assert vdsm.send_target(Target("fd00::1", 3261, 2, IQN)) == f"[fd00::1]:3261,2 {IQN}"
    assert vdsm.send_target(Target("h", 3260, None, IQN)) == f"h:3260,1 {IQN}"


def domain(type_: str = "NFS", cls: str = "Data", pool: str = "",
           paths: tuple[str, ...] = ("/mnt/srv:_exp/sd",)) -> DomainEntry:
    return DomainEntry("sd", {"TYPE": type_, "CLASS": cls, "POOL_UUID": pool},
                       paths=list(paths))


def test_storage_domain_filters() -> None:
    d = domain(pool=f"{ID},{ID2}")
    assert vdsm.domain_matches(d, None, None, None, None)
    assert vdsm.domain_matches(d, vdsm.BLANK_UUID, None, None, "")
    assert vdsm.domain_matches(d, ID2, "Data", "NFS", "srv:/exp/")
    assert vdsm.domain_matches(d, None, "DATA", None, "srv://exp")
    assert not vdsm.domain_matches(d, "another-pool", None, None, None)
    assert not vdsm.domain_matches(d, None, "Iso", None, None)
    assert not vdsm.domain_matches(d, None, None, "POSIXFS", None)
    assert not vdsm.domain_matches(d, None, None, None, "srv:/other")
    local = domain("LOCALFS", paths=("/mnt/_srv_my__data/sd",))
    assert vdsm.domain_matches(local, None, None, "LOCALFS", "/srv/my_data")


def test_domain_class_and_storage_type_filters() -> None:
    assert [vdsm.domain_class(v) for v in (None, 0, "0", "", 1, "2", 3, "Data")] == [
        None, None, None, None, "Data", "Iso", "Backup", "DATA"]
    for bad in (vdsm.domain_class, vdsm.storage_type):
        with pytest.raises(errors.InvalidParameter):
            bad(9)
    assert [vdsm.storage_type(v) for v in (None, "", 0, 1, "3", "iscsi", 5, "FCP")] == [
        None, None, None, "NFS", "ISCSI", "ISCSI", "CIFS", "FCP"]


# --- getDeviceList ---------------------------------------------------------------------------


def scsi_facts(block: Path, rev: str = "4.0", unit: str = "0d845a10-5859", state: str = "running",
               discard: int = 8388608) -> None:
    device = block / "device"
    (device / "rev").write_text(rev + "\n")
    (device / "state").write_text(state + "\n")
    page = unit.encode()
    (device / "vpd_pg80").write_bytes(bytes([0, 0x80, 0, len(page)]) + page)
    (block / "queue" / "discard_max_bytes").write_text(f"{discard}\n")


def pvs_report(*rows: dict[str, str]) -> str:
    return json.dumps({"report": [{"pv": list(rows)}]})


def bonded_lun(host: FakeHost) -> Service:
    """One LUN through two sessions (tpgt 7) under multipath map dm-0."""
    for sid, (nic, disk) in enumerate((("eth1", "sdb"), ("eth2", "sdc")), start=1):
        netdev(host.sys, nic)
        write_session(host.sys, sid, IQN, "10.77.4.2", 3260, 7, nic, disk=disk)
        scsi_facts(host.scsi_disk(disk, f"{sid + 2}:0:0:5", session=sid),
                   state="running" if sid == 1 else "offline", discard=4096 * sid)
    host.dm("dm-0", "mpatha", f"mpath-3{NAA}", ["sdb", "sdc"])
    bond = IscsiSpec(connection="10.77.4.2", iqn=IQN, tpgt=7, netIfaceNames=("eth1", "eth2"))
    inv = inventory(host, {"vdsm:x": bond})
    return cast(Service, SimpleNamespace(inventory=inv, config=inv.config))


async def wire_devices(service: Service, kind: str | None, guids: list[str],
                       check: bool) -> list[dict[str, Any]]:
    """vdsm.device_list as the engine reads it."""
    return [d.to_wire() for d in await vdsm.device_list(service, kind, guids, check)]


def runner(service: Service) -> FakeRunner:
    assert isinstance(service.inventory.runner, FakeRunner)
    return service.inventory.runner


async def test_device_list_in_vdsm_shape(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    service = bonded_lun(host)
    runner(service).expect(["lvm", "pvs"], prefix=True, stdout=pvs_report(
        {"pv_name": "/dev/mapper/mpatha", "pv_uuid": "pv-1", "pv_size": "2147483648",
         "vg_uuid": "vg-1"}))
    (dev,) = await vdsm.device_list(service, None, [], check=True)
    assert dev.to_wire() == {
        "GUID": f"3{NAA}", "capacity": str(2 * 1024**3), "devtype": "iSCSI", "fwrev": "4.0",
        "serial": "SLIO-ORG_lun0_0d845a10-5859", "vendorID": "LIO-ORG", "productID": "lun0",
        "logicalblocksize": "512", "physicalblocksize": "512",
        "pathstatus": [
            {"physdev": "sdb", "state": "active", "capacity": str(2 * 1024**3), "lun": "5",
             "type": "iSCSI"},
            {"physdev": "sdc", "state": "failed", "capacity": str(2 * 1024**3), "lun": "5",
             "type": "iSCSI"}],
        "pathlist": [
            {"connection": "10.77.4.2", "port": "3260", "iqn": IQN, "portal": "7",
             "initiatorname": "eth1"},
            {"connection": "10.77.4.2", "port": "3260", "iqn": IQN, "portal": "7",
             "initiatorname": "eth2"}],
        "pvUUID": "pv-1", "vgUUID": "vg-1", "pvsize": "2147483648",
        "discard_max_bytes": 4096, "discard_zeroes_data": 0, "status": "used",
    }
    (argv,) = runner(service).argvs
    assert argv[:3] == ("lvm", "pvs", "--readonly") and "a|^/dev/mapper/mpatha$|" in argv[-1]


async def test_device_status_free_unknown_and_filters(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    service = bonded_lun(host)
    fake = runner(service)
    fake.expect(["lvm", "pvs"], prefix=True, stdout=pvs_report(), times=2)
    fake.expect(["lvm", "pvs"], prefix=True, rc=5, stderr="lvm broke")
    (free,) = await wire_devices(service, "ISCSI", [f"3{NAA}"], check=True)
    assert (free["status"], free["pvUUID"], free["vgUUID"], free["pvsize"]) == (
        "free", "", "", "")
    (unchecked,) = await wire_devices(service, None, [], check=False)
    assert unchecked["status"] == "unknown"
    (unknown,) = await wire_devices(service, None, [], check=True)  # pvs fails now
    assert unknown["status"] == "unknown" and unknown["pvUUID"] == ""
    assert await vdsm.device_list(service, None, ["3nosuchguid"], check=False) == []
    assert await vdsm.device_list(service, "FCP", [], check=False) == []
    # Something holding the map (a partition mapping, an LV): used, though not a PV here.
    (host.sys / "block" / "dm-0").resolve().joinpath("holders", "dm-1").mkdir()
    fake.expect(["lvm", "pvs"], prefix=True, stdout=pvs_report())
    fake.expectations.reverse()  # the good answer first
    (held,) = await wire_devices(service, None, [], check=True)
    assert held["status"] == "used"


# --- configuration ---------------------------------------------------------------------------


def test_vdsm_timeouts_are_configured_and_checked() -> None:
    c = config.load_text("vdsm: {connect_timeout: 100, disconnect_timeout: 30}", "t")
    assert (c.vdsm.connect_timeout, c.vdsm.disconnect_timeout) == (100.0, 30.0)
    assert config.Config().vdsm.connect_timeout == 150.0
    assert "connect_timeout: 150.0" in config.dump(config.Config())
    for bad in ("vdsm: {connect_timeout: 0}", "vdsm: {disconnect_timeout: -1}",
                "vdsm: {connect_timeout: 4000}", "vdsm: {timeout: 3}"):
        with pytest.raises(config.ConfigError, match="vdsm"):
            config.load_text(bad, "t")
