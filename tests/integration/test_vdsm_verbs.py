"""VDSM's verbs through the real daemon, with the engine's own dicts (its StorageConnectionHelper
mapping: `id`, `connection`, empty `port`/`iqn`/`user`/`password`, `ipv6_enabled`, and the
type's keys), on tmpfs mounts and local directories: CIDs `vdsm:<id>` that share keys with
`manageStorageServer`'s, "try once" statuses, teardowns waited for, domains found."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, mounted, running
from tests.integration.test_iscsi_tgtd import Tgtd, tgtd  # noqa: F401 (a fixture)
from tests.sdtree import write_domain

pytestmark = pytest.mark.root

POSIXFS, LOCALFS, FCP = 6, 4, 2


def engine_posix(name: str, options: str = "size=1m", vfs: str = "tmpfs",
                 id_: str | None = None) -> dict[str, Any]:
    """A POSIX connection as the engine sends it to VDSM."""
    return {"id": id_ or str(uuid.uuid4()), "connection": name, "port": "", "iqn": "",
            "user": "", "password": "", "ipv6_enabled": False, "vfs_type": vfs,
            "mnt_options": options}


def connect(daemon: Daemon, kind: int | str, *conns: dict[str, Any]) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = daemon.call(
        "StoragePool.connectStorageServer", storagepoolID=str(uuid.uuid4()), domainType=kind,
        connectionParams=list(conns))
    return result


def disconnect(daemon: Daemon, kind: int | str, *conns: dict[str, Any]) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = daemon.call(
        "StoragePool.disconnectStorageServer", storagepoolID=str(uuid.uuid4()),
        domainType=kind, connectionParams=list(conns))
    return result


def listed(daemon: Daemon) -> dict[str, Any]:
    found: dict[str, Any] = daemon.call("getStorageServerList")
    return found


def test_connect_shares_the_key_and_disconnect_leaves_it_to_the_other_cid(
        daemon: Daemon) -> None:
    conn = engine_posix("vc-vd1")
    cid = f"vdsm:{conn['id']}"
    path = f"{daemon.mount_root}/vc-vd1"
    assert connect(daemon, POSIXFS, conn) == [{"id": conn["id"], "status": 0}]
    first = mounted(path)  # connected when the call returns: no waiting here
    assert first is not None and "size=1024k" in first.super_options
    status = listed(daemon)[cid]
    assert status["engineID"] == conn["id"] and status["state"] == "connected"
    assert status["connection"] == {"type": "posixfs", "connection": "vc-vd1",
                                    "vfs_type": "tmpfs", "mnt_options": "size=1m"}

    # The same id and connection again: nothing to do (the very same mount).
    assert connect(daemon, "POSIXFS", conn) == [{"id": conn["id"], "status": 0}]
    again = mounted(path)
    assert again is not None and again.mount_id == first.mount_id

    # The same id with another connection: updated in place, remounted before the reply.
    changed = {**conn, "mnt_options": "size=2m"}
    assert connect(daemon, POSIXFS, changed) == [{"id": conn["id"], "status": 0}]
    remade = mounted(path)
    assert remade is not None and "size=2048k" in remade.super_options
    assert listed(daemon)[cid]["connection"]["mnt_options"] == "size=2m"

    # manageStorageServer on the same connection: one key, two references.
    daemon.call("manageStorageServer", connectionID="flow1",
                connection={"type": "posixfs", "connection": "vc-vd1", "vfs_type": "tmpfs",
                            "mnt_options": "size=2m"})
    assert listed(daemon)["flow1"]["refs"] == 2

    assert disconnect(daemon, POSIXFS, changed) == [{"id": conn["id"], "status": 0}]
    found = listed(daemon)
    assert cid not in found and found["flow1"]["refs"] == 1 and found["flow1"]["connected"]
    still = mounted(path)
    assert still is not None and still.mount_id == remade.mount_id

    daemon.call("unmanageStorageServer", connectionID="flow1")
    daemon.wait_gone(path)
    daemon.wait_nothing_listed()


def test_a_failed_connection_reports_its_code_and_stays_managed(tmp_path: Path) -> None:
    # Retries 30 s apart: a call that waited for the next one on its own would take that long.
    with running(tmp_path, supervisor={"backoff_initial": 30, "backoff_max": 60}) as daemon:
        good = engine_posix("vc-vd-good")
        bad = engine_posix("vc-vd-bad", vfs="nosuchfs")
        statuses = connect(daemon, POSIXFS, good, bad)
        assert statuses == [{"id": good["id"], "status": 0}, {"id": bad["id"], "status": 477}]
        bad_cid = f"vdsm:{bad['id']}"
        first = listed(daemon)[bad_cid]
        assert first["managed"] and first["state"] == "failed" and first["attempts"] == 1
        assert first["nextRetry"] is not None  # kept and retried, though the call returned
        assert first["engineID"] == bad["id"]

        # Asked again: tried again at once, and that new failure (not the old one) answers.
        started = time.monotonic()
        assert connect(daemon, POSIXFS, bad) == [{"id": bad["id"], "status": 477}]
        assert time.monotonic() - started < 20  # not the 30 s backoff
        second = listed(daemon)[bad_cid]
        assert second["attempts"] == 2
        assert second["lastError"]["time"] > first["lastError"]["time"]

        # Disconnect waits for the teardown: the mount is gone when it returns.
        good_path = f"{daemon.mount_root}/vc-vd-good"
        assert mounted(good_path) is not None
        assert disconnect(daemon, POSIXFS, good, bad) == [
            {"id": good["id"], "status": 0}, {"id": bad["id"], "status": 0}]
        assert mounted(good_path) is None
        found = listed(daemon)
        assert bad_cid not in found and f"vdsm:{good['id']}" not in found
        daemon.wait_nothing_listed()


def slow_umount(tmp_path: Path) -> tuple[str, Path]:
    """An umount that takes a second, and fails (busy) while the returned flag file exists."""
    flag = tmp_path / "umount-fails"
    script = tmp_path / "umount-stand-in"
    script.write_text(f"#!/bin/sh\nsleep 1\nif [ -e {flag} ]; then\n"
                      "  echo 'umount: target is busy.' >&2; exit 32\nfi\n"
                      'exec umount "$@"\n')
    script.chmod(0o755)
    return str(script), flag


def test_disconnect_waits_for_the_teardown_and_reports_its_failure(tmp_path: Path) -> None:
    umount, flag = slow_umount(tmp_path)
    with running(tmp_path, umount_command=umount) as daemon:
        conn = engine_posix("vc-vd-slow")
        path = f"{daemon.mount_root}/vc-vd-slow"
        assert connect(daemon, POSIXFS, conn) == [{"id": conn["id"], "status": 0}]
        assert disconnect(daemon, POSIXFS, conn) == [{"id": conn["id"], "status": 0}]
        assert mounted(path) is None  # unmounted (a second's work) before the reply

        assert connect(daemon, POSIXFS, conn) == [{"id": conn["id"], "status": 0}]
        flag.touch()
        assert disconnect(daemon, POSIXFS, conn) == [{"id": conn["id"], "status": 477}]
        assert mounted(path) is not None
        (leaving,) = listed(daemon).values()  # unmanaged, its teardown retried
        assert leaving["managed"] is False and leaving["state"] == "disconnecting"
        assert leaving["lastError"]["code"] == 477
        flag.unlink()
        daemon.wait_gone(path)
        daemon.wait_nothing_listed()


def test_invalid_dicts_empty_lists_and_unknown_ids(daemon: Daemon) -> None:
    good = engine_posix("vc-vd-inv")
    unknown_key = {**engine_posix("vc-vd-other"), "bogus": 1}
    wrong_type = {**engine_posix("vc-vd-third"), "type": "nfs"}
    assert connect(daemon, POSIXFS, good, unknown_key, wrong_type) == [
        {"id": good["id"], "status": 0}, {"id": unknown_key["id"], "status": 1000},
        {"id": wrong_type["id"], "status": 1000}]
    assert set(listed(daemon)) == {f"vdsm:{good['id']}"}  # the refused ones manage nothing

    no_id = {k: v for k, v in engine_posix("vc-vd-noid").items() if k != "id"}
    e = daemon.error("StoragePool.connectStorageServer", storagepoolID="", domainType=6,
                     connectionParams=[good, no_id])
    assert e.code == 1000 and "connectionParams[1].id" in e.message
    e = daemon.error("StoragePool.connectStorageServer", storagepoolID="", domainType=6,
                     connectionParams=[])
    assert e.code == 1000 and "connectionParams" in e.message
    e = daemon.error("StoragePool.connectStorageServer", storagepoolID="", domainType=5,
                     connectionParams=[good])
    assert e.code == 1000 and "domainType" in e.message

    assert disconnect(daemon, POSIXFS) == []
    never = str(uuid.uuid4())
    assert disconnect(daemon, POSIXFS, {"id": never}, good) == [
        {"id": never, "status": 0}, {"id": good["id"], "status": 0}]
    daemon.wait_nothing_listed()


def test_fcp_has_nothing_to_connect(daemon: Daemon) -> None:
    ids = [str(uuid.uuid4()), str(uuid.uuid4())]
    conns = [{"id": i, "connection": "", "port": "", "iqn": "", "user": "", "password": ""}
             for i in ids]
    assert connect(daemon, FCP, *conns) == [{"id": i, "status": 0} for i in ids]
    assert connect(daemon, "FCP", *conns) == [{"id": i, "status": 0} for i in ids]
    assert listed(daemon) == {}
    assert disconnect(daemon, FCP, *conns) == [{"id": i, "status": 0} for i in ids]
    assert daemon.call("Host.getDeviceList", storageType=FCP) == []


def test_storage_domains_on_a_local_directory(daemon: Daemon, tmp_path: Path) -> None:
    data = tmp_path / "local-data"
    data.mkdir()
    sd = write_domain(data, "local data", "LOCALFS")
    conn = {"id": str(uuid.uuid4()), "connection": str(data), "port": "", "iqn": "",
            "user": "", "password": "", "ipv6_enabled": "false"}
    assert connect(daemon, "LOCALFS", conn) == [{"id": conn["id"], "status": 0}]

    def domains(**filters: Any) -> list[str]:
        found: list[str] = daemon.call("Host.getStorageDomains", **filters)
        return found

    blank = "00000000-0000-0000-0000-000000000000"
    assert domains() == [sd]
    assert domains(storagepoolID=blank, domainClass=1, storageType="4",
                   remotePath=str(data)) == [sd]
    assert domains(storageType=LOCALFS) == [sd] and domains(storageType="LOCALFS") == [sd]
    assert domains(storageType=1) == [] and domains(domainClass=2) == []
    assert domains(remotePath=str(tmp_path / "elsewhere")) == []
    assert domains(storagepoolID=str(uuid.uuid4())) == []  # the domain is in no pool
    # File storage has no block devices.
    assert daemon.call("Host.getDeviceList", checkStatus=False) == []

    assert disconnect(daemon, LOCALFS, conn) == [{"id": conn["id"], "status": 0}]
    assert not (Path(daemon.mount_root) / str(data).replace("/", "_")).exists()
    assert data.is_dir()
    daemon.wait_nothing_listed()


def test_discover_send_targets_in_vdsm_shape(daemon: Daemon, tgtd: Tgtd) -> None:  # noqa: F811
    """VDSM's `<portal>,<tpgt> <iqn>` lines; where the kernel has no iSCSI transport (these
    machines: iscsiadm cannot load iscsi_tcp), its failure as VDSM's 475."""
    call = {"host": tgtd.address, "port": "3260", "user": "", "password": "",
            "ipv6_enabled": False}
    if os.path.isdir("/sys/class/iscsi_transport/tcp"):
        found = daemon.call("ISCSIConnection.discoverSendTargets", **call)
        assert found == [f"{tgtd.address}:3260,1 {tgtd.iqn}"]
    else:
        e = daemon.error("ISCSIConnection.discoverSendTargets", **call)
        assert e.code == 475 and "iSCSI driver" in e.message
    e = daemon.error("ISCSIConnection.discoverSendTargets", host=tgtd.address)
    assert e.code == -32602 and "port" in e.message
