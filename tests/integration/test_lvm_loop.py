"""Block storage domains read by real LVM from real loop devices, through the real runner.

This kernel has no device mapper: the VGs and the `metadata` LV are created with activation
off (`global/activation=0`), and nothing is ever activated, as in production, where the
domains are read without activating them. Every LVM command of the setup sees only the test's
loop devices and writes no backup or archive files into /etc/lvm.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vdsmconn.host import lvm
from vdsmconn.host.command import CommandRunner

pytestmark = pytest.mark.root

MB = 1024 * 1024
ENV = {**os.environ, "LC_ALL": "C", "LVM_SUPPRESS_FD_WARNINGS": "1"}
METADATA_OFFSET = 1 * MB + 4 * 4 * MB  # pe_start 1 MiB; "leases" uses PE 0-3 of 4 MiB


class Loops:
    """Loop devices on sparse files, and the VGs made on them; all removed by `cleanup`."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.devices: list[str] = []
        self.vgs: list[str] = []

    def add(self) -> str:
        image = self.tmp_path / f"pv{len(self.devices)}.img"
        with open(image, "wb") as f:
            f.truncate(256 * MB)
        device = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                                capture_output=True, text=True, timeout=30).stdout.strip()
        self.devices.append(device)
        return device

    def lvm(self, *args: str) -> str:
        config = (lvm.filter_config(self.devices)
                  + " global { activation=0 } backup { backup=0 archive=0 }")
        done = subprocess.run(["lvm", *args, "--config", config], capture_output=True,
                              text=True, env=ENV, timeout=60, check=False)
        assert done.returncode == 0, f"lvm {' '.join(args)}: {done.stderr}"
        return done.stdout

    def vg(self, name: str, device: str, *tags: str) -> None:
        self.lvm("pvcreate", "--dataalignment", "1m", device)
        self.lvm("vgcreate", "--physicalextentsize", "4m",
                 *(a for t in tags for a in ("--addtag", t)), name, device)
        self.vgs.append(name)

    def cleanup(self) -> None:
        for name in self.vgs:
            subprocess.run(["lvm", "vgremove", "-f", "--config",
                            lvm.filter_config(self.devices)
                            + " global { activation=0 } backup { backup=0 archive=0 }", name],
                           capture_output=True, env=ENV, timeout=60, check=False)
        for device in self.devices:
            subprocess.run(["losetup", "-d", device], check=False, timeout=30)


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[Loops]:
    made = Loops(tmp_path)
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture
def domains(loops: Loops) -> tuple[str, str, str]:
    """A V5-like domain with a metadata LV, an untagged VG, and a V3-like domain with MDT_
    tags, each on its own loop device; their names."""
    v5, v3 = str(uuid.uuid4()), str(uuid.uuid4())
    dev0, dev1, dev2 = loops.add(), loops.add(), loops.add()
    loops.vg(v5, dev0, lvm.DOMAIN_TAG)
    for lv, size in (("leases", "16m"), ("metadata", "128m")):
        loops.lvm("lvcreate", "--activate", "n", "--zero", "n", "--name", lv, "--size", size,
                  v5)
    pe_start = loops.lvm("pvs", "--noheadings", "--units", "b", "--nosuffix", "-o",
                         "pe_start", dev0)
    assert int(pe_start) == 1 * MB
    fd = os.open(dev0, os.O_WRONLY)
    try:
        text = f"CLASS=Data\nDESCRIPTION=loop domain\nSDUUID={v5}\nTYPE=ISCSI\nVERSION=5\nEOF\n"
        os.pwrite(fd, text.encode().ljust(4096, b"\0"), METADATA_OFFSET)
        os.fsync(fd)
    finally:
        os.close(fd)
    loops.vg("plainvg", dev1)
    loops.vg(v3, dev2, lvm.DOMAIN_TAG, f"MDT_SDUUID={v3}", "MDT_VERSION=3", "MDT_CLASS=Data")
    return v5, "plainvg", v3


async def test_domain_with_metadata_lv_is_read_without_activation(
        loops: Loops, domains: tuple[str, str, str]) -> None:
    v5, _, _ = domains
    runner = CommandRunner()
    (found,) = await lvm.block_domains(runner, [loops.devices[0]], 60)
    assert (found.sd_uuid, found.vg_name) == (v5, v5)
    assert found.pvs == (loops.devices[0],) and found.missing_pvs == 0
    assert found.size == 252 * MB and found.free == (252 - 16 - 128) * MB
    assert found.metadata == {"CLASS": "Data", "DESCRIPTION": "loop domain", "SDUUID": v5,
                              "TYPE": "ISCSI", "VERSION": "5"}
    assert found.metadata_error is None


async def test_untagged_vg_is_not_a_domain(loops: Loops,
                                           domains: tuple[str, str, str]) -> None:
    assert await lvm.block_domains(CommandRunner(), [loops.devices[1]], 60) == []


async def test_only_the_given_devices_are_looked_at(loops: Loops,
                                                    domains: tuple[str, str, str]) -> None:
    v5, _, v3 = domains
    runner = CommandRunner()
    given = loops.devices[:2]
    found = await lvm.block_domains(runner, given, 60)
    assert [d.vg_name for d in found] == [v5]  # v3 is on a device not given
    assert all(pv in given for d in found for pv in d.pvs)
    (old,) = await lvm.block_domains(runner, [loops.devices[2]], 60)
    assert (old.sd_uuid, old.metadata, old.metadata_error) == (
        v3, {"SDUUID": v3, "VERSION": "3", "CLASS": "Data"}, None)


async def test_a_device_without_lvm_has_no_domains(loops: Loops) -> None:
    device = loops.add()
    assert await lvm.block_domains(CommandRunner(), [device], 60) == []
