"""The engine's connection dicts pass unchanged (SPEC 4): every key it sends is accepted for
every type, null and "" mean "not set", numbers may come as text, and its `id` is kept as the
spec's `engine_id` (stored, outside the key and outside equality).

The dicts below have the shape the engine's storage connection helper builds: `id` always
(a UUID), `connection`, `port`, `iqn`, `user`, `password` always (empty for the types they do
not apply to), the rest only where set; values are text. Some carry the inapplicable keys as
null too, as other clients built on the engine's records do.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from vdsmconn import errors
from vdsmconn.model import (
    ConnectionSpec,
    GlusterSpec,
    IscsiSpec,
    LocalSpec,
    ManagedSpec,
    NfsSpec,
    PosixSpec,
    Secret,
)
from vdsmconn.rpc import params

NFS_ID = "0b6cf6e4-2b8f-4d3e-9c1a-5f2f1f1d3e01"
POSIX_ID = "5a1e9b54-6f3b-4f57-8c0b-7a3c2c9e8d02"
GLUSTER_ID = "c2f0a3a1-9d6e-4b1b-a8f4-0e5d6c7b8a03"
LOCAL_ID = "9e8d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c04"
ISCSI_ID = "7d3b1c6e-1f2a-4b5c-9d8e-3f4a5b6c7d05"

EMPTY_BLOCK_KEYS: dict[str, Any] = {"port": "", "iqn": "", "user": "", "password": ""}
NULL_REST: dict[str, Any] = {"tpgt": None, "ifaceName": None, "netIfaceName": None,
                             "ipv6_enabled": None}

ENGINE_NFS: dict[str, Any] = {
    "type": "nfs", "id": NFS_ID, "connection": "nfs1.example.com:/exports/data",
    **EMPTY_BLOCK_KEYS, "protocol_version": "4.2", "timeout": "600", "retrans": "6",
    "mnt_options": "", "vfs_type": "",
}
ENGINE_NFS_AUTO: dict[str, Any] = {
    "type": "nfs", "id": NFS_ID, "connection": "nfs1.example.com:/exports/data/",
    **EMPTY_BLOCK_KEYS, **NULL_REST, "protocol_version": "auto", "timeout": None,
    "retrans": None, "mnt_options": None, "vfs_type": None,
}
ENGINE_POSIX: dict[str, Any] = {
    "type": "posixfs", "id": POSIX_ID, "connection": "/dev/mapper/data-lv",
    **EMPTY_BLOCK_KEYS, **NULL_REST, "vfs_type": "xfs", "mnt_options": "noatime,nodiratime",
    "protocol_version": None, "timeout": "", "retrans": "",
}
ENGINE_GLUSTER: dict[str, Any] = {
    "type": "glusterfs", "id": GLUSTER_ID, "connection": "gluster1.example.com:/vmstore",
    **EMPTY_BLOCK_KEYS, "vfs_type": "glusterfs",
    "mnt_options": "backup-volfile-servers=gluster2.example.com:gluster3.example.com",
}
ENGINE_LOCAL: dict[str, Any] = {
    "type": "localfs", "id": LOCAL_ID, "connection": "/data/images", **EMPTY_BLOCK_KEYS,
    **NULL_REST, "mnt_options": "", "vfs_type": "", "protocol_version": "", "timeout": "",
    "retrans": "",
}
ENGINE_ISCSI: dict[str, Any] = {
    "type": "iscsi", "id": ISCSI_ID, "connection": "10.35.0.5", "tpgt": "1", "port": "3260",
    "iqn": "iqn.2003-01.org.linux-iscsi.storage:sn.4711", "user": "", "password": "",
    "ifaceName": "eth1", "netIfaceName": "eth1",
}
ENGINE_ISCSI_CHAP: dict[str, Any] = {
    "type": "iscsi", "id": ISCSI_ID, "connection": "storage.example.com", "port": "3260",
    "iqn": "iqn.2003-01.org.linux-iscsi.storage:sn.4712", "user": "chap-user",
    "password": "Ch@p, pa$$ \"w0rd\"!", "ifaceName": None, "netIfaceName": "",
    "tpgt": "", "ipv6_enabled": False, "mnt_options": "", "vfs_type": "",
    "protocol_version": "", "timeout": "", "retrans": "",
}

ENGINE_DICTS = [
    pytest.param(ENGINE_NFS, NfsSpec(
        connection="nfs1.example.com:/exports/data", protocol_version="4.2", timeout=600,
        retrans=6, engine_id=NFS_ID), id="nfs"),
    pytest.param(ENGINE_NFS_AUTO, NfsSpec(
        connection="nfs1.example.com:/exports/data", protocol_version="auto",
        engine_id=NFS_ID), id="nfs-nulls"),
    pytest.param(ENGINE_POSIX, PosixSpec(
        connection="/dev/mapper/data-lv", vfs_type="xfs", mnt_options="noatime,nodiratime",
        engine_id=POSIX_ID), id="posixfs"),
    pytest.param(ENGINE_GLUSTER, GlusterSpec(
        connection="gluster1.example.com:/vmstore", vfs_type="glusterfs",
        mnt_options="backup-volfile-servers=gluster2.example.com:gluster3.example.com",
        engine_id=GLUSTER_ID), id="glusterfs"),
    pytest.param(ENGINE_LOCAL, LocalSpec(connection="/data/images", engine_id=LOCAL_ID),
                 id="localfs"),
    pytest.param(ENGINE_ISCSI, IscsiSpec(
        connection="10.35.0.5", iqn="iqn.2003-01.org.linux-iscsi.storage:sn.4711", port=3260,
        tpgt=1, ifaceName="eth1", netIfaceName="eth1", engine_id=ISCSI_ID), id="iscsi"),
    pytest.param(ENGINE_ISCSI_CHAP, IscsiSpec(
        connection="storage.example.com", iqn="iqn.2003-01.org.linux-iscsi.storage:sn.4712",
        user="chap-user", password=Secret("Ch@p, pa$$ \"w0rd\"!"), engine_id=ISCSI_ID),
        id="iscsi-chap"),
]


def every_field(spec: ConnectionSpec) -> dict[str, Any]:
    """All fields, engine_id included (equality leaves it out on purpose)."""
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}


@pytest.mark.parametrize(("engine", "expected"), ENGINE_DICTS)
def test_engine_dict_is_accepted_as_sent(engine: dict[str, Any],
                                         expected: ConnectionSpec) -> None:
    spec = params.parse_connection(engine)
    assert type(spec) is type(expected)
    assert every_field(spec) == every_field(expected)


@pytest.mark.parametrize(("engine", "expected"), ENGINE_DICTS)
def test_engine_id_survives_the_store(engine: dict[str, Any],
                                      expected: ConnectionSpec) -> None:
    spec = params.parse_connection(engine)
    stored = spec.to_store()
    assert stored["id"] == engine["id"]
    again = params.parse_connection(stored)
    assert every_field(again) == every_field(spec)
    assert again.engine_id == engine["id"]


@pytest.mark.parametrize(("engine", "expected"), ENGINE_DICTS)
def test_engine_id_is_not_part_of_the_key_or_equality(engine: dict[str, Any],
                                                      expected: ConnectionSpec) -> None:
    spec = params.parse_connection(engine)
    other = params.parse_connection(dict(engine, id="11111111-2222-3333-4444-555555555555"))
    without = params.parse_connection({k: v for k, v in engine.items() if k != "id"})
    assert spec.engine_id != other.engine_id and without.engine_id is None
    assert spec == other == without
    assert spec.key == other.key == without.key and engine["id"] not in str(spec.key)
    assert hash(spec) == hash(other)
    assert "id" not in spec.to_wire()


def test_managed_spec_keeps_engine_id_too() -> None:
    conn = {"type": "managed", "id": "abc-1", "volumeID": "vol-1",
            "connection_info": {"driver_volume_type": "rbd", "data": {"name": "v"}}}
    spec = params.parse_connection(conn)
    assert isinstance(spec, ManagedSpec) and spec.engine_id == "abc-1"
    assert params.parse_connection(spec.to_store()).engine_id == "abc-1"


@pytest.mark.parametrize("cls", [NfsSpec, PosixSpec, GlusterSpec, LocalSpec, IscsiSpec,
                                 ManagedSpec])
def test_every_spec_type_has_engine_id(cls: type[ConnectionSpec]) -> None:
    assert cls().engine_id is None
    assert cls(engine_id="x").engine_id == "x"


ALL_ENGINE_KEYS = ("id", "connection", "tpgt", "port", "iqn", "user", "password",
                   "ipv6_enabled", "ifaceName", "netIfaceName", "mnt_options", "vfs_type",
                   "protocol_version", "timeout", "retrans")
MINIMAL = {
    "nfs": {"type": "nfs", "connection": "s:/e"},
    "posixfs": {"type": "posixfs", "connection": "/dev/sdb1"},
    "glusterfs": {"type": "glusterfs", "connection": "g:/v"},
    "localfs": {"type": "localfs", "connection": "/srv/d"},
    "iscsi": {"type": "iscsi", "connection": "h", "iqn": "iqn.2003-01.org.x:t"},
}


@pytest.mark.parametrize("kind", sorted(MINIMAL))
@pytest.mark.parametrize("key", ALL_ENGINE_KEYS)
@pytest.mark.parametrize("empty", ["", None])
def test_every_engine_key_empty_means_not_set(kind: str, key: str, empty: str | None) -> None:
    base = MINIMAL[kind]
    if key in base:  # a required key: "not set" is "missing", -32602 naming it
        with pytest.raises(errors.InvalidParams) as e:
            params.parse_connection(dict(base, **{key: empty}))
        assert e.value.data == {"field": f"connection.{key}"}
        return
    assert params.parse_connection(dict(base, **{key: empty})) == params.parse_connection(base)


@pytest.mark.parametrize(("kind", "key", "value"), [
    ("nfs", "iqn", "iqn.2003-01.org.x:t"),
    ("nfs", "port", "3260"),
    ("nfs", "user", "bob"),
    ("posixfs", "protocol_version", "4.2"),
    ("localfs", "mnt_options", "ro"),
    ("localfs", "vfs_type", "xfs"),
    ("iscsi", "mnt_options", "ro"),
    ("iscsi", "timeout", "600"),
    ("glusterfs", "tpgt", "1"),
])
def test_a_value_in_a_key_that_does_not_apply_is_refused(kind: str, key: str,
                                                         value: str) -> None:
    with pytest.raises(errors.InvalidParameter) as e:
        params.parse_connection(dict(MINIMAL[kind], **{key: value}))
    assert e.value.data == {"field": f"connection.{key}"}
    assert f"does not apply to a {kind} connection" in e.value.message


@pytest.mark.parametrize("flag", [True, False, "true", "false", "", None])
@pytest.mark.parametrize("kind", sorted(MINIMAL))
def test_ipv6_enabled_is_accepted_for_every_type(kind: str, flag: Any) -> None:
    assert params.parse_connection(dict(MINIMAL[kind], ipv6_enabled=flag))


def test_nfs_may_name_its_own_vfs_type() -> None:
    spec = params.parse_connection(dict(MINIMAL["nfs"], vfs_type="nfs"))
    assert spec == params.parse_connection(MINIMAL["nfs"])


@pytest.mark.parametrize(("conn", "field"), [
    (dict(ENGINE_NFS, bogus="1"), "connection.bogus"),
    (dict(ENGINE_ISCSI, bogus=""), "connection.bogus"),
    (dict(ENGINE_LOCAL, bogus=None), "connection.bogus"),
    (dict(ENGINE_NFS, ipv6_enabled="maybe"), "connection.ipv6_enabled"),
    (dict(ENGINE_NFS, id=7), "connection.id"),
    (dict(ENGINE_ISCSI, port="32x0"), "connection.port"),
    ({"type": "managed", "volumeID": "v", "iqn": "",
      "connection_info": {"driver_volume_type": "rbd", "data": {}}}, "connection.iqn"),
])
def test_keys_no_engine_sends_and_wrong_types_are_invalid_params(conn: dict[str, Any],
                                                                 field: str) -> None:
    with pytest.raises(errors.InvalidParams) as e:
        params.parse_connection(conn)
    assert e.value.code == -32602
    assert e.value.data == {"field": field}
    assert e.value.message.startswith(field)


def test_engine_id_with_control_characters_is_refused() -> None:
    with pytest.raises(errors.InvalidParameter) as e:
        params.parse_connection(dict(ENGINE_NFS, id="a\x85b"))
    assert e.value.data == {"field": "connection.id"}


@pytest.mark.parametrize(("conn", "attr", "value"), [
    (dict(ENGINE_ISCSI, port=" 3261 "), "port", 3261),
    (dict(ENGINE_ISCSI, port=3262, tpgt=2), "port", 3262),
    (dict(ENGINE_ISCSI, tpgt="0"), "tpgt", 0),
    (dict(ENGINE_NFS, timeout="1", retrans="0"), "timeout", 1),
    (dict(ENGINE_NFS, protocol_version="3"), "protocol_version", "3"),
    (dict(ENGINE_NFS, protocol_version=4), "protocol_version", "4"),
    (dict(ENGINE_ISCSI, port=""), "port", 3260),
])
def test_engine_numbers_as_text_or_numbers(conn: dict[str, Any], attr: str,
                                           value: Any) -> None:
    assert getattr(params.parse_connection(conn), attr) == value
