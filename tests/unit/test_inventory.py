"""getDeviceList's logic on fake sysfs trees (tests/unit/test_blockdev.py's FakeHost and the
iSCSI session tree of test_iscsi_parse.py): one entry per LUN with every session and CID, a
device whose sysfs read hangs reported with 480 while the others answer, connections
without devices named in `errors`."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_blockdev import NAA, FakeHost
from tests.unit.test_iscsi_connector import netdev
from tests.unit.test_iscsi_parse import write_session
from vdsmconn import config, errors
from vdsmconn.connectors.base import HostContext
from vdsmconn.connectors.iscsi import IscsiConnector
from vdsmconn.host.fakerunner import FakeRunner
from vdsmconn.inventory import Inventory
from vdsmconn.model import IscsiSpec, MountSpec
from vdsmconn.state.actual import ActualState
from vdsmconn.state.desired import DesiredState

IQN = "iqn.2003-01.org.vdsmconn.test:t1"
IQN2 = "iqn.2003-01.org.vdsmconn.test:t2"


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path)


def inventory(host: FakeHost, cids: dict[str, object]) -> Inventory:
    base = config.Config()
    cfg = dataclasses.replace(
        base, iscsi=dataclasses.replace(base.iscsi, sysfs_root=str(host.sys)),
        supervisor=dataclasses.replace(base.supervisor, probe_timeout=0.3))
    desired = DesiredState()
    for cid, spec in cids.items():
        desired.apply_put(cid, spec)  # type: ignore[arg-type]
    runner = FakeRunner()
    iscsi = IscsiConnector(HostContext(config.host_settings(cfg), runner))
    return Inventory(cfg, desired, ActualState(), {"iscsi": iscsi}, runner, dev=str(host.dev))


@contextlib.contextmanager
def hanging(path: Path) -> Iterator[None]:
    """`path` becomes a FIFO: reading it blocks until a writer comes, as a hung device's
    attributes may; released (and restored) at the end."""
    path.unlink()
    os.mkfifo(path)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # the reader gets EOF


def runner_calls(inv: Inventory) -> list[tuple[str, ...]]:
    assert isinstance(inv.runner, FakeRunner)
    return inv.runner.argvs


async def test_one_entry_per_lun_with_every_session_and_cid(host: FakeHost) -> None:
    for sid, (nic, disk) in enumerate((("eth1", "sdb"), ("eth2", "sdc")), start=1):
        netdev(host.sys, nic)
        write_session(host.sys, sid, IQN, "10.77.4.2", 3260, 1, nic, disk=disk)
        host.scsi_disk(disk, f"{sid + 2}:0:0:0", session=sid)
    host.dm("dm-0", "mpatha", f"mpath-3{NAA}", ["sdb", "sdc"])
    bond = IscsiSpec(connection="10.77.4.2", iqn=IQN, tpgt=1, netIfaceNames=("eth1", "eth2"))
    inv = inventory(host, {"a": bond, "b": bond})
    found = (await inv.devices(None)).to_wire()
    (lun,) = found["devices"]
    assert found["errors"] == []
    assert (lun["path"], lun["wwid"], lun["devices"], lun["connectionIDs"]) == (
        "/dev/mapper/mpatha", f"3{NAA}", ["/dev/sdb", "/dev/sdc"], ["a", "b"])
    assert lun["multipath"] == {"name": "mpatha", "path": "/dev/mapper/mpatha", "dm": "dm-0",
                                "uuid": f"mpath-3{NAA}"}
    assert [(s["sid"], s["iface"], s["netdev"], s["portal"], s["device"])
            for s in lun["sessions"]] == [(1, "eth1", "eth1", "10.77.4.2:3260", "/dev/sdb"),
                                          (2, "eth2", "eth2", "10.77.4.2:3260", "/dev/sdc")]
    assert (lun["vendor"], lun["product"], lun["size"]) == ("LIO-ORG", "lun0", 2 * 1024**3)


async def test_hung_device_is_480_while_the_others_answer(host: FakeHost) -> None:
    write_session(host.sys, 1, IQN, "10.77.4.2", 3260, 1, "default", disk="sdb")
    write_session(host.sys, 2, IQN2, "10.77.4.2", 3260, 1, "default", disk="sdc")
    host.scsi_disk("sdb", "3:0:0:0", session=1)
    block = host.scsi_disk("sdc", "4:0:0:0", session=2)
    inv = inventory(host, {"a": IscsiSpec(connection="10.77.4.2", iqn=IQN),
                           "b": IscsiSpec(connection="10.77.4.2", iqn=IQN2)})
    with hanging(block / "size"):
        start = time.monotonic()
        found = (await inv.devices(None)).to_wire()
        seconds = time.monotonic() - start
        # Asked again while the read still hangs: 480 (the message says why), no second thread.
        again = (await inv.devices(["b"])).to_wire()
        assert "an earlier read has not returned yet" in again["devices"][0]["error"]["message"]
        assert [t.name for t in threading.enumerate()].count("probe reading /sys of sdc") == 1
        # Block domains: LVM is not shown the device it could not read; the reply says so.
        domains = (await inv.domains(["b"])).to_wire()
        assert domains["domains"] == [] and runner_calls(inv) == []
        (problem,) = domains["errors"]
        assert problem["path"] == "/dev/sdc" and problem["error"]["code"] == 480
    good, hung = found["devices"]
    assert good["path"] == "/dev/sdb" and good["connectionIDs"] == ["a"]
    assert hung["path"] == "/dev/sdc" and hung["connectionIDs"] == ["b"]
    assert hung["error"]["code"] == errors.Timeout.code
    assert "/sys of sdc did not return within 0.3 s" in hung["error"]["message"]
    assert 0.3 <= seconds < 10  # the read's deadline, not the hang


async def test_connections_without_devices(host: FakeHost) -> None:
    inv = inventory(host, {"i": IscsiSpec(connection="10.77.4.2", iqn=IQN),
                           "f": MountSpec(vfs_type="tmpfs", connection="x")})
    found = (await inv.devices(None)).to_wire()
    assert found["devices"] == []
    (problem,) = found["errors"]
    assert problem["connectionIDs"] == ["i"] and problem["error"]["code"] == 451
    assert "has no session on this host" in problem["error"]["message"]
    assert (await inv.devices(["f"])).to_wire() == {"devices": [], "errors": []}
    with pytest.raises(errors.ConnectionIdNotFound):
        await inv.devices(["f", "nosuch"])
