"""The NFS connector against the fake command runner: the exact mount argv for every option
rule of SPEC 8, mount failures, and adoption of what the kernel shows in mountinfo."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from vdsmconn import config, errors
from vdsmconn.connectors.base import Connected, HostContext
from vdsmconn.connectors.nfs import NfsConnector, same_export, split_remote
from vdsmconn.host import mountinfo
from vdsmconn.host.fakerunner import FakeRunner
from vdsmconn.model import NfsSpec
from vdsmconn.rpc import params
from vdsmconn.state.actual import HostState


def nfs(**fields: Any) -> NfsSpec:
    spec = params.parse_connection({"type": "nfs", "connection": "srv:/exports/a", **fields})
    assert isinstance(spec, NfsSpec)
    return spec


class Host:
    def __init__(self, tmp: Path) -> None:
        base = config.local(str(tmp))
        self.config = dataclasses.replace(base, mount_command="/usr/local/bin/my-mount")
        self.runner = FakeRunner()
        self.table: dict[str, mountinfo.Mount] = {}
        self.connector = NfsConnector(HostContext(config.host_settings(self.config), self.runner,
                                                  HostState(mounts=self.table)))

    def mountpoint(self, spec: NfsSpec) -> str:
        return f"{self.config.mount_root}/{spec.mount_name}"

    async def mount_argv(self, spec: NfsSpec) -> tuple[str, ...]:
        self.runner.expect([self.config.mount_command], prefix=True)
        found = await self.connector.connect(spec)
        assert found == Connected(path=self.mountpoint(spec))
        assert await asyncio.to_thread(os.path.isdir, self.mountpoint(spec))
        assert len(self.runner.argvs) == 1
        return self.runner.argvs[0]


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


DEFAULTS = "soft,nosharecache,timeo=100,retrans=3"


@pytest.mark.parametrize(("fields", "options"), [
    ({}, f"{DEFAULTS},nfsvers=3,nolock"),
    ({"protocol_version": "3"}, f"{DEFAULTS},nfsvers=3,nolock"),
    ({"protocol_version": 3}, f"{DEFAULTS},nfsvers=3,nolock"),
    ({"protocol_version": "4"}, f"{DEFAULTS},nfsvers=4"),
    ({"protocol_version": "4.0"}, f"{DEFAULTS},nfsvers=4,minorversion=0"),
    ({"protocol_version": "4.1"}, f"{DEFAULTS},nfsvers=4,minorversion=1"),
    ({"protocol_version": 4.2}, f"{DEFAULTS},nfsvers=4,minorversion=2"),
    ({"protocol_version": "auto"}, f"{DEFAULTS},nolock"),
    ({"protocol_version": "3", "mnt_options": "lock"}, f"{DEFAULTS},nfsvers=3,lock"),
    ({"protocol_version": "3", "mnt_options": "nolock"}, f"{DEFAULTS},nfsvers=3,nolock"),
    ({"protocol_version": "auto", "mnt_options": "lock"}, f"{DEFAULTS},lock"),
    ({"protocol_version": "4.2", "mnt_options": "nolock"},
     f"{DEFAULTS},nfsvers=4,minorversion=2,nolock"),
    ({"mnt_options": ",noatime,,sec=sys,"}, f"{DEFAULTS},nfsvers=3,nolock,noatime,sec=sys"),
    ({"mnt_options": ""}, f"{DEFAULTS},nfsvers=3,nolock"),
    ({"timeout": 7, "retrans": 0}, "soft,nosharecache,timeo=7,retrans=0,nfsvers=3,nolock"),
    ({"timeout": 6000, "retrans": 32767, "protocol_version": "4.1"},
     "soft,nosharecache,timeo=6000,retrans=32767,nfsvers=4,minorversion=1"),
    # User options come after the defaults, so mount.nfs lets the user's win.
    ({"protocol_version": "4.2", "mnt_options": "timeo=600,hard,rsize=65536"},
     f"{DEFAULTS},nfsvers=4,minorversion=2,timeo=600,hard,rsize=65536"),
])  # fmt: skip
async def test_mount_argv_follows_spec_8(host: Host, fields: dict[str, Any],
                                         options: str) -> None:
    spec = nfs(**fields)
    argv = await host.mount_argv(spec)
    assert argv == ("/usr/local/bin/my-mount", "-t", "nfs", "-o", options, "srv:/exports/a",
                    host.mountpoint(spec))


async def test_mount_argv_normalizes_export_and_keeps_ipv6_brackets(host: Host) -> None:
    spec = nfs(connection="[fd00::5]://exports//b_c/")
    argv = await host.mount_argv(spec)
    assert argv[-2:] == ("[fd00::5]:/exports/b_c",
                         f"{host.config.mount_root}/[fd00::5]:_exports_b__c")


async def test_mount_failure_is_477_with_mounts_message(host: Host) -> None:
    host.runner.expect([host.config.mount_command], prefix=True, rc=32,
                       stderr="mount.nfs: Connection refused\n")
    with pytest.raises(errors.MountError) as raised:
        await host.connector.connect(nfs())
    assert raised.value.code == 477
    assert raised.value.message == "mount of srv:/exports/a failed: mount.nfs: Connection refused"


async def test_mount_past_its_deadline_is_480(host: Host) -> None:
    host.runner.expect([host.config.mount_command], prefix=True, timeout=True)
    with pytest.raises(errors.Timeout) as raised:
        await host.connector.connect(nfs())
    assert raised.value.code == 480
    assert raised.value.message.startswith("Command /usr/local/bin/my-mount -t nfs ")
    assert raised.value.message.endswith("timed out after 60 s")


def mount(source: str, mountpoint: str, fstype: str = "nfs4") -> mountinfo.Mount:
    line = (f"231 29 0:52 / {mountpoint} rw,relatime shared:130 - {fstype} {source} "
            "rw,vers=4.2,soft,proto=tcp,timeo=100,retrans=3,sec=sys")
    m = mountinfo.parse_line(line)
    assert m is not None
    return m


@pytest.mark.parametrize(("connection", "shown"), [
    ("srv:/exports/a", "srv:/exports/a"),
    ("srv:/exports/a", "srv://exports/a"),  # NFSv4 as the kernel may show it
    ("srv:/exports/a", "SRV:/exports/a/"),
    ("[fd00::5]:/x", "[fd00:0:0::5]:/x"),
    ("[fd00::5]:/x", "[FD00::5]://x"),
    ("10.1.2.3:/", "10.1.2.3:/"),
])  # fmt: skip
def test_present_matches_kernel_forms_of_the_source(host: Host, connection: str,
                                                    shown: str) -> None:
    spec = nfs(connection=connection)
    path = host.mountpoint(spec)
    assert host.connector.present(spec) is None
    host.table[path] = mount(shown, path)
    assert host.connector.present(spec) == Connected(path=path)


@pytest.mark.parametrize(("shown", "fstype"), [
    ("other:/exports/a", "nfs4"),
    ("srv:/exports/b", "nfs"),
    ("srv:/exports/a", "tmpfs"),
    ("[fd00::6]:/exports/a", "nfs"),
])  # fmt: skip
def test_present_refuses_a_foreign_mount_on_the_mount_point(host: Host, shown: str,
                                                            fstype: str) -> None:
    spec = nfs()
    host.table[host.mountpoint(spec)] = mount(shown, host.mountpoint(spec), fstype)
    assert host.connector.present(spec) is None


def test_same_export_and_split_remote() -> None:
    assert split_remote("[fd00::1]://a//b/") == ("[fd00::1]", "/a/b")
    assert split_remote("host.example:/") == ("host.example", "/")
    assert same_export("h:/a", "h://a/")
    assert same_export("Host.Example.:/a", "host.example:/a")
    assert same_export("[::ffff:10.0.0.1]:/a", "[::FFFF:a00:1]:/a")
    assert not same_export("h:/a", "h:/a/b")
    assert not same_export("h1:/a", "h2:/a")
    assert not same_export("10.0.0.1:/a", "10.0.0.2:/a")
