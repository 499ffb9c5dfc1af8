"""Untrusted connection JSON and URIs -> specs: normalization, keys, errors naming fields."""

from __future__ import annotations

from typing import Any

import pytest

from vdsmconn import errors
from vdsmconn.model import MASK, IscsiSpec, ManagedSpec, NfsSpec, PosixSpec, escape_mount_name
from vdsmconn.rpc import params


@pytest.mark.parametrize(("spec", "name"), [
    ("server:/a/", "server:_a"),
    ("server:/a//b", "server:_a_b"),
    ("server:/a/b_c", "server:_a_b__c"),
    ("server:/", "server:_"),
    ("server:6789:/path", "server:6789:_path"),
    ("server://a", "server:_a"),
    ("[fe80::1]:/x//y/", "[fe80::1]:_x_y"),
])
def test_mount_point_names(spec: str, name: str) -> None:
    parsed = params.parse_connection({"type": "posixfs", "connection": spec})
    assert isinstance(parsed, PosixSpec)
    assert parsed.mount_name == name
    assert escape_mount_name(parsed.connection) == name


def test_equivalent_exports_share_a_key() -> None:
    keys = {params.parse_connection({"type": "nfs", "connection": c}).key
            for c in ("server:/a/", "server:/a//", "server://a", "server:/a")}
    assert len(keys) == 1


def test_nfs_and_posix_on_one_mount_point_share_a_key() -> None:
    nfs = params.parse_connection({"type": "nfs", "connection": "s:/e"})
    posix = params.parse_connection({"type": "posixfs", "connection": "s:/e", "vfs_type": "nfs"})
    assert nfs.key == posix.key and nfs != posix


@pytest.mark.parametrize(("uri", "expected"), [
    ("nfs://server/export?protocol_version=4.2",
     {"type": "nfs", "connection": "server:/export", "protocol_version": "4.2",
      "timeout": 100, "retrans": 3}),
    ("glusterfs://server/volume", {"type": "glusterfs", "connection": "server:/volume"}),
    ("posixfs:///dev/sdb1?vfs_type=xfs",
     {"type": "posixfs", "connection": "/dev/sdb1", "vfs_type": "xfs"}),
    ("localfs:///srv/data", {"type": "localfs", "connection": "/srv/data"}),
    ("nfs://[fe80::1]/x",
     {"type": "nfs", "connection": "[fe80::1]:/x", "protocol_version": "3", "timeout": 100,
      "retrans": 3}),
    ("iscsi://host:3260/iqn.2003-01.org.example:t1?tpgt=1&netIfaceName=eth1",
     {"type": "iscsi", "connection": "host", "iqn": "iqn.2003-01.org.example:t1",
      "port": 3260, "tpgt": 1, "netIfaceName": "eth1"}),
    ("iscsi://h/iqn.2003-01.org.example:t1?netIfaceNames=eth1,eth2",
     {"type": "iscsi", "connection": "h", "iqn": "iqn.2003-01.org.example:t1", "port": 3260,
      "netIfaceNames": ["eth1", "eth2"]}),
])
def test_uri_shorthand(uri: str, expected: dict[str, Any]) -> None:
    assert params.parse_connection(uri).to_wire() == expected


@pytest.mark.parametrize(("value", "code", "field"), [
    ("nfs://user:pw@server/x", 1000, "connection"),
    ("nfs://server:2049/x", 1000, "connection"),
    ("ftp://server/x", 1000, "connection"),
    ("nfs://server/x?bogus=1", -32602, "connection.bogus"),
    ({"type": "nfs", "connection": "s:/a", "extra": 1}, -32602, "connection.extra"),
    ({"connection": "s:/a"}, -32602, "connection.type"),
    ({"type": 7}, -32602, "connection.type"),
    ({"type": "zfs"}, 1000, "connection.type"),
    ({"type": "nfs"}, -32602, "connection.connection"),
    ({"type": "nfs", "connection": "noexport"}, 1000, "connection.connection"),
    ({"type": "nfs", "connection": "-oo:/x"}, 1000, "connection.connection"),
    ({"type": "nfs", "connection": "s:/a\nb"}, 1000, "connection.connection"),
    ({"type": "nfs", "connection": "s:/a", "timeout": 0}, 1000, "connection.timeout"),
    ({"type": "nfs", "connection": "s:/a", "timeout": 6001}, 1000, "connection.timeout"),
    ({"type": "nfs", "connection": "s:/a", "retrans": -1}, 1000, "connection.retrans"),
    ({"type": "nfs", "connection": "s:/a", "timeout": [1]}, -32602, "connection.timeout"),
    ({"type": "nfs", "connection": "s:/a", "protocol_version": "5"}, 1000,
     "connection.protocol_version"),
    ({"type": "nfs", "connection": "s:/a", "mnt_options": "a b"}, 1000,
     "connection.mnt_options"),
    ({"type": "posixfs", "connection": "/dev/x", "vfs_type": "-t"}, 1000, "connection.vfs_type"),
    ({"type": "localfs", "connection": "relative"}, 1000, "connection.connection"),
    ({"type": "localfs", "connection": "/"}, 1000, "connection.connection"),
    ({"type": "localfs", "connection": "/a/../etc"}, 1000, "connection.connection"),
    ({"type": "iscsi", "connection": "h", "iqn": "bad"}, 1000, "connection.iqn"),
    ({"type": "iscsi", "connection": "h"}, -32602, "connection.iqn"),
    ({"type": "iscsi", "connection": "h", "iqn": "iqn.2003-01.org.x:t", "port": 70000}, 1000,
     "connection.port"),
    ({"type": "iscsi", "connection": "h", "iqn": "iqn.2003-01.org.x:t",
      "netIfaceNames": ["a", "a"]}, 1000, "connection.netIfaceNames"),
    ({"type": "managed", "volumeID": "v", "connection_info": {"data": {}}}, -32602,
     "connection.connection_info.driver_volume_type"),
    ({"type": "managed", "volumeID": "a/b", "connection_info": {}}, 1000,
     "connection.volumeID"),
    (42, -32602, "connection"),
])
def test_bad_connections_name_the_field(value: Any, code: int, field: str) -> None:
    with pytest.raises(errors.Error) as e:
        params.parse_connection(value)
    assert e.value.code == code
    assert e.value.data == {"field": field}
    assert e.value.message.startswith(field)


@pytest.mark.parametrize(("cid", "ok"), [
    ("ENGINE_FLOW101_CON1", True), ("x" * 255, True), ("ünï cödé", True),
    ("", False), ("x" * 256, False), ("a/b", False), ("a\x00b", False), ("a\tb", False),
    ("a\x7fb", False), ("a\x80b", False), ("a\x85b", False), ("a\x9fb", False),
    ("\u0085", False), ("a\xa0b", True),
])
def test_cid_rules(cid: str, ok: bool) -> None:
    if ok:
        assert params.get_cid(cid) == cid
    else:
        with pytest.raises(errors.InvalidParameter):
            params.get_cid(cid)


def test_numbers_as_engine_strings() -> None:
    spec = params.parse_connection({"type": "nfs", "connection": "s:/a", "timeout": "600",
                                    "retrans": "6", "protocol_version": 4.1})
    assert isinstance(spec, NfsSpec)
    assert (spec.timeout, spec.retrans, spec.protocol_version) == (600, 6, "4.1")


def test_secrets_are_masked_in_wire_form_and_kept_for_the_store() -> None:
    spec = params.parse_connection({"type": "iscsi", "connection": "h",
                                    "iqn": "iqn.2003-01.org.x:t", "user": "u",
                                    "password": "s3cret"})
    assert isinstance(spec, IscsiSpec)
    assert spec.to_wire()["password"] == MASK
    assert "s3cret" not in repr(spec) and "s3cret" not in str(spec.to_wire())
    assert spec.to_store()["password"] == "s3cret"
    assert params.parse_connection(spec.to_store()) == spec


def test_managed_connection_info_secrets_masked() -> None:
    info = {"driver_volume_type": "rbd", "data": {"name": "v", "auth_password": "pw",
                                                  "keyring": "k", "hosts": ["a"]}}
    spec = params.parse_connection({"type": "managed", "volumeID": "vol-1",
                                    "connection_info": info})
    assert isinstance(spec, ManagedSpec)
    wire = spec.to_wire()["connection_info"]["data"]
    assert wire == {"name": "v", "auth_password": MASK, "keyring": MASK, "hosts": ["a"]}
    assert spec.info() == info
    assert params.parse_connection(spec.to_store()) == spec


@pytest.mark.parametrize(("version", "options", "expected"), [
    ("3", None, "soft,nosharecache,timeo=100,retrans=3,nfsvers=3,nolock"),
    ("4", None, "soft,nosharecache,timeo=100,retrans=3,nfsvers=4"),
    ("4.0", None, "soft,nosharecache,timeo=100,retrans=3,nfsvers=4,minorversion=0"),
    ("4.1", None, "soft,nosharecache,timeo=100,retrans=3,nfsvers=4,minorversion=1"),
    ("4.2", "sec=sys", "soft,nosharecache,timeo=100,retrans=3,nfsvers=4,minorversion=2,sec=sys"),
    ("auto", None, "soft,nosharecache,timeo=100,retrans=3,nolock"),
    ("3", "lock", "soft,nosharecache,timeo=100,retrans=3,nfsvers=3,lock"),
    ("auto", ",nolock,,ro,", "soft,nosharecache,timeo=100,retrans=3,nolock,ro"),
])
def test_nfs_mount_options(version: str, options: str | None, expected: str) -> None:
    conn: dict[str, Any] = {"type": "nfs", "connection": "s:/a", "protocol_version": version}
    if options:
        conn["mnt_options"] = options
    assert ",".join(params.parse_connection(conn).options()) == expected  # type: ignore[attr-defined]


INJECTIONS = ["-oremount", "srv:/a,rw", "srv:/a b", "srv:/a\nb", "srv:/a\x00b", "srv:/a/../b",
              "srv:/a;reboot", "srv:/$(id)", "srv:/`id`", "srv:/a|b", "srv:/a&b", "srv:/a'b",
              'srv:/a"b', "srv:/a>b", "srv:/a*"]


@pytest.mark.parametrize("kind", ["nfs", "posixfs", "glusterfs"])
@pytest.mark.parametrize("value", INJECTIONS)
def test_injection_in_mount_source_is_refused(kind: str, value: str) -> None:
    with pytest.raises(errors.InvalidParameter) as e:
        params.parse_connection({"type": kind, "connection": value})
    assert e.value.data == {"field": "connection.connection"}


@pytest.mark.parametrize("options", ["ro,-oremount", "ro,a b", "x=$(id)", "ro;reboot",
                                     "ro\nrw", "--bind", "a|b", "ro,`id`"])
def test_injection_in_mount_options_is_refused(options: str) -> None:
    with pytest.raises(errors.InvalidParameter) as e:
        params.parse_connection({"type": "posixfs", "connection": "/dev/x",
                                 "mnt_options": options})
    assert e.value.data == {"field": "connection.mnt_options"}


@pytest.mark.parametrize("source", ["UUID=0a1b-2c3d", "LABEL=data", "/dev/disk/by-id/x:y",
                                    "host:/exp/with_under-score", "[fe80::1%eth0]:/x"])
def test_legitimate_sources_pass(source: str) -> None:
    assert params.parse_connection({"type": "posixfs", "connection": source})


def test_legitimate_options_pass() -> None:
    opts = "ro,noatime,backup-volfile-servers=h1:h2,context=system_u:object_r:nfs_t:s0,,x-y.z"
    spec = params.parse_connection({"type": "posixfs", "connection": "/dev/x",
                                    "mnt_options": opts})
    assert isinstance(spec, PosixSpec) and "backup-volfile-servers=h1:h2" in spec.options()


def test_secret_mount_options_are_masked_on_the_wire() -> None:
    spec = params.parse_connection({"type": "posixfs", "connection": "//srv/share",
                                    "vfs_type": "cifs",
                                    "mnt_options": "username=u,password=pw1,ro,auth_token=t"})
    assert isinstance(spec, PosixSpec)
    assert spec.to_wire()["mnt_options"] == "username=u,password=********,ro,auth_token=********"
    assert "pw1" in ",".join(spec.options())  # the mount itself still gets them


def test_cifs_share_keeps_its_double_slash() -> None:
    spec = params.parse_connection({"type": "posixfs", "connection": "//srv//share/",
                                    "vfs_type": "cifs"})
    assert isinstance(spec, PosixSpec)
    assert spec.connection == "//srv/share" and spec.mount_name == "__srv_share"
