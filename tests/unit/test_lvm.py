"""Block storage domains from `lvm vgs`/`lvs` output captured on this kind of host (see
data/lvm/README), through the FakeRunner: exact argv, partial reports, failures, and the
metadata LV read from a file standing in for the PV."""

from __future__ import annotations

from pathlib import Path

import pytest

from vdsmconn import errors
from vdsmconn.host import lvm, sdmeta
from vdsmconn.host.fakerunner import FakeRunner

DATA = Path(__file__).parent / "data" / "lvm"
SD0 = "59327f16-197b-43c3-a61b-ff2d65ffd1f6"  # on loop0: metadata LV at PE 4
SD2 = "b5a220c9-f657-4d4a-9403-1be04e2c3c7a"  # on loop2 + loop3: MDT_ tags in vgs-three
MB = 1024 * 1024
METADATA_OFFSET = 1 * MB + 4 * 4 * MB  # pe_start + first PE * extent size


def out(name: str, *, rename: dict[str, str] | None = None) -> str:
    text = (DATA / f"{name}.out").read_text()
    for old, new in (rename or {}).items():
        text = text.replace(f'"{old}"', f'"{new}"').replace(f'"{old}:', f'"{new}:')
    return text


def err(name: str) -> str:
    path = DATA / f"{name}.err"
    return path.read_text() if path.exists() else ""


@pytest.fixture
def pv0(tmp_path: Path) -> str:
    """A file standing in for /dev/loop0: the domain metadata where its metadata LV starts."""
    image = tmp_path / "loop0.img"
    with open(image, "wb") as f:
        f.truncate(64 * MB)
        f.seek(METADATA_OFFSET)
        f.write((DATA / "metadata-v5.txt").read_bytes())
    return str(image)


# --- the filter -------------------------------------------------------------------------------


def test_filter_config_shows_lvm_only_the_devices() -> None:
    assert lvm.filter_config(["/dev/sdb", "/dev/mapper/mpatha"]) == (
        'devices { use_devicesfile=0 '
        'filter=["a|^/dev/sdb$|","a|^/dev/mapper/mpatha$|","r|.*|"] '
        'global_filter=["a|^/dev/sdb$|","a|^/dev/mapper/mpatha$|","r|.*|"] '
        'hints="none" obtain_device_list_from_udev=0 }')


def test_filter_config_escapes_regex_characters() -> None:
    device = "/dev/disk/by-path/ip-10.0.0.1:3260-iscsi-iqn.2003-01.org:t+1(a)-lun-0"
    config = lvm.filter_config([device])
    assert ('"a|^/dev/disk/by-path/ip-10\\.0\\.0\\.1:3260-iscsi-iqn\\.2003-01\\.org:'
            't\\+1\\(a\\)-lun-0$|"') in config


@pytest.mark.parametrize("device", ["sdb", "", "dev/sdb", "/dev/a|b", '/dev/a"b'])
def test_filter_config_rejects_unusable_paths(device: str) -> None:
    with pytest.raises(ValueError, match="unusable device path"):
        lvm.filter_config(["/dev/sdc", device])


def test_exact_vgs_and_lvs_argv() -> None:
    config = lvm.filter_config(["/dev/sdb"])
    assert lvm.vgs_argv(["/dev/sdb"], "/usr/sbin/lvm") == [
        "/usr/sbin/lvm", "vgs", "--readonly", "--reportformat", "json", "--units", "b",
        "--nosuffix", "-o", "vg_name,vg_uuid,vg_size,vg_free,vg_tags,vg_extent_size,"
        "vg_missing_pv_count,pv_name,pe_start", "--config", config]
    assert lvm.lvs_argv(["/dev/sdb"], [SD0, SD2]) == [
        "lvm", "lvs", "--readonly", "--reportformat", "json", "--units", "b", "--nosuffix",
        "--segments", "--select", "lv_name=metadata", "-o",
        "vg_name,lv_name,seg_start,seg_pe_ranges", "--config", config, SD0, SD2]


# --- block_domains ----------------------------------------------------------------------------


async def test_no_devices_runs_nothing() -> None:
    fake = FakeRunner()
    assert await lvm.block_domains(fake, [], 10) == []
    assert fake.calls == []


async def test_finds_tagged_vgs_with_their_metadata(pv0: str) -> None:
    devices = [pv0, "/dev/loop1", "/dev/loop2"]
    fake = FakeRunner()
    fake.expect(lvm.vgs_argv(devices), stdout=out("vgs-three", rename={"/dev/loop0": pv0}),
                stderr=err("vgs-three"))
    fake.expect(lvm.lvs_argv(devices, [SD0]),
                stdout=out("lvs-three", rename={"/dev/loop0": pv0}))
    found = await lvm.block_domains(fake, devices, 30)
    assert fake.argvs == [tuple(lvm.vgs_argv(devices)), tuple(lvm.lvs_argv(devices, [SD0]))]
    assert fake.calls[0].timeout == 30
    assert 0 < fake.calls[1].timeout <= 30
    first, second = found  # othervg has no RHAT_storage_domain tag
    assert first == lvm.BlockDomain(
        sd_uuid=SD0, vg_name=SD0, vg_uuid="wMvl0r-qVVz-wdFG-TLFL-0YVd-DbdL-rI7Es7", pvs=(pv0,),
        missing_pvs=0, size=264241152, free=113246208, tags=("RHAT_storage_domain",),
        metadata=sdmeta.parse_metadata_bytes((DATA / "metadata-v5.txt").read_bytes()),
        metadata_error=None)
    assert first.metadata["TYPE"] == "ISCSI" and first.metadata["DESCRIPTION"] == "iscsi domain 1"
    assert second.sd_uuid == SD2 and second.pvs == ("/dev/loop2",) and second.missing_pvs == 1
    assert second.metadata["VERSION"] == "3" and second.metadata["CLASS"] == "Data"
    assert second.metadata["DESCRIPTION"] == "legacy:v3&block"
    assert second.metadata_error is None and "MDT_VERSION=3" in second.tags


async def test_metadata_lv_starting_on_a_missing_pv_is_reported_not_read() -> None:
    fake = FakeRunner()
    fake.expect(lvm.vgs_argv(["/dev/loop3"]), stdout=out("vgs-loop3"), stderr=err("vgs-loop3"))
    fake.expect(lvm.lvs_argv(["/dev/loop3"], [SD2]), stdout=out("lvs-loop3"),
                stderr=err("lvs-loop3"))
    (domain,) = await lvm.block_domains(fake, ["/dev/loop3"], 30)
    assert domain.sd_uuid == SD2 and domain.pvs == ("/dev/loop3",) and domain.missing_pvs == 1
    assert domain.metadata == {}
    assert domain.metadata_error == "the metadata LV starts on a missing PV"


@pytest.fixture
def blank_pv(tmp_path: Path) -> str:
    image = tmp_path / "blank.img"
    with open(image, "wb") as f:
        f.truncate(64 * MB)
    return str(image)


async def test_garbage_in_the_metadata_lv_is_a_metadata_error(blank_pv: str) -> None:
    devices = [blank_pv]
    fake = FakeRunner()
    fake.expect(lvm.vgs_argv(devices), stdout=out("vgs-partial", rename={"/dev/loop0": devices[0]}))
    fake.expect(lvm.lvs_argv(devices, [SD0]),
                stdout=out("lvs-three", rename={"/dev/loop0": devices[0]}))
    (domain,) = await lvm.block_domains(fake, devices, 30)
    assert (domain.sd_uuid, domain.metadata) == (SD0, {})
    assert domain.metadata_error == "metadata LV: no SDUUID"


async def test_vg_without_metadata_lv_or_tags() -> None:
    fake = FakeRunner()
    fake.expect(lvm.vgs_argv(["/dev/loop0"]), stdout=out("vgs-partial"))
    fake.expect(lvm.lvs_argv(["/dev/loop0"], [SD0]), stdout=out("lvs-none"))
    (domain,) = await lvm.block_domains(fake, ["/dev/loop0"], 30)
    assert domain.metadata == {} and domain.metadata_error == "no MDT_ tags and no metadata LV"


@pytest.mark.parametrize("how", ["timeout", "failure"])
async def test_lvs_failing_still_lists_the_domain(how: str) -> None:
    fake = FakeRunner()
    fake.expect(lvm.vgs_argv(["/dev/loop0"]), stdout=out("vgs-partial"))
    fake.expect(["lvm", "lvs"], prefix=True, timeout=how == "timeout", rc=5,
                stderr="  Volume group vanished\n")
    (domain,) = await lvm.block_domains(fake, ["/dev/loop0"], 30)
    assert domain.sd_uuid == SD0 and domain.metadata == {}
    assert domain.metadata_error is not None
    expected = "timed out after" if how == "timeout" else "failed with rc=5: Volume group vanished"
    assert expected in domain.metadata_error


async def test_partial_report_with_exit_5_is_used() -> None:
    fake = FakeRunner()
    fake.expect(lvm.vgs_argv(["/dev/loop0"]), rc=5, stdout=out("vgs-partial"),
                stderr=err("vgs-partial"))
    fake.expect(["lvm", "lvs"], prefix=True, rc=5)
    (domain,) = await lvm.block_domains(fake, ["/dev/loop0"], 30)
    assert domain.vg_name == SD0 and domain.pvs == ("/dev/loop0",)


async def test_message_inside_the_json_report_is_skipped() -> None:
    devices = ["/dev/loop0", "/dev/loop4"]
    fake = FakeRunner()
    fake.expect(lvm.vgs_argv(devices), stdout=out("vgs-retry"), stderr=err("vgs-retry"))
    fake.expect(["lvm", "lvs"], prefix=True, stdout=out("lvs-none"))
    assert [d.vg_name for d in await lvm.block_domains(fake, devices, 30)] == [SD0]


async def test_no_volume_groups() -> None:
    fake = FakeRunner()
    fake.expect(lvm.vgs_argv(["/dev/loop99"]), stdout=out("vgs-none"))
    assert await lvm.block_domains(fake, ["/dev/loop99"], 30) == []
    assert len(fake.calls) == 1


@pytest.mark.parametrize(("name", "rc", "message"), [
    ("vgs-notfound", 5, 'failed with rc=5: Volume group "nosuch" not found'),
    ("vgs-badconfig", 3, "failed with rc=3: Parse error at byte 37"),
])
async def test_vgs_failure_is_a_general_error(name: str, rc: int, message: str) -> None:
    fake = FakeRunner()
    stdout = out(name) if (DATA / f"{name}.out").exists() else ""
    fake.expect(["lvm", "vgs"], prefix=True, rc=rc, stdout=stdout, stderr=err(name))
    with pytest.raises(errors.GeneralError, match=message) as raised:
        await lvm.block_domains(fake, ["/dev/loop0"], 30)
    assert raised.value.data == {"rc": rc}


@pytest.mark.parametrize("stdout", ["", "not json", '{"report": [{"lv": []}]}',
                                    '{"report": [{"vg": [{"vg_name": "x"}]}]}'])
async def test_unexpected_vgs_output_is_a_general_error(stdout: str) -> None:
    fake = FakeRunner()
    fake.expect(["lvm", "vgs"], prefix=True, stdout=stdout)
    with pytest.raises(errors.GeneralError, match="Command lvm vgs"):
        await lvm.block_domains(fake, ["/dev/loop0"], 30)


async def test_vgs_timeout_is_raised() -> None:
    fake = FakeRunner()
    fake.expect(["lvm", "vgs"], prefix=True, timeout=True)
    with pytest.raises(errors.Timeout, match="timed out after 7 s"):
        await lvm.block_domains(fake, ["/dev/loop0"], 7)


async def test_lvm_command_is_configurable() -> None:
    fake = FakeRunner()
    fake.expect(["/usr/sbin/lvm", "vgs"], prefix=True, stdout=out("vgs-none"))
    await lvm.block_domains(fake, ["/dev/loop0"], 30, lvm="/usr/sbin/lvm")
    assert fake.argvs == [tuple(lvm.vgs_argv(["/dev/loop0"], "/usr/sbin/lvm"))]


# --- pure pieces ------------------------------------------------------------------------------


def test_striped_first_segment_starts_on_the_first_stripe() -> None:
    (vg,) = lvm.parse_vgs(lvm.parse_report(out("vgs-partial"), "vg"))
    seg = {"vg_name": SD0, "lv_name": "metadata", "seg_start": "0",
           "seg_pe_ranges": "/dev/loop0:10-19 /dev/loop9:0-9"}
    assert lvm.metadata_location(vg, [seg]) == ("/dev/loop0", 1 * MB + 10 * 4 * MB)
    with pytest.raises(ValueError, match="unexpected PV '/dev/sda'"):
        lvm.metadata_location(vg, [{**seg, "seg_pe_ranges": "/dev/sda:0-9"}])
    with pytest.raises(ValueError, match="unexpected seg_pe_ranges"):
        lvm.metadata_location(vg, [{**seg, "seg_pe_ranges": "/dev/loop0:x-9"}])


def test_read_area_reads_at_the_offset(pv0: str) -> None:
    data = lvm.read_area(pv0, METADATA_OFFSET)
    assert len(data) == lvm.METADATA_SIZE
    assert data.startswith(b"ALIGNMENT=1048576\n") and data.endswith(b"\0")
    assert lvm.read_area(pv0, 64 * MB - 4096) == b"\0" * 4096  # short at the end


def test_read_area_at_an_unaligned_offset_falls_back_to_a_buffered_read(pv0: str) -> None:
    assert lvm.read_area(pv0, METADATA_OFFSET + 1, 16) == b"LIGNMENT=1048576"
