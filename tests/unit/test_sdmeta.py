"""Storage domain metadata: the KEY=VALUE parser, the file domain scan on real directory
trees, and metadata kept in VG tags."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vdsmconn.host import sdmeta
from vdsmconn.host.sdmeta import FileDomain, Skipped

SD = "3c5b2e2a-5d6b-4c43-9a5e-5b2f0e7d1a90"
OTHER = "9F0D6C1E-2B3A-4C5D-8E7F-0A1B2C3D4E5F"

V5_NFS = f"""\
ALIGNMENT=1048576
BLOCK_SIZE=512
CLASS=Data
DESCRIPTION=my nfs domain
IOOPTIMEOUTSEC=10
LEASERETRIES=3
LEASETIMESEC=60
LOCKPOLICY=
LOCKRENEWALINTERVALSEC=5
POOL_UUID=
REMOTE_PATH=server:/export
ROLE=Regular
SDUUID={SD}
TYPE=NFS
VERSION=5
_SHA_CKSUM=2b07fbc28c5a5d5e4a7f5c0b8e2c1d3f4a5b6c7d
"""

BLOCK_V5 = (Path(__file__).parent / "data" / "lvm" / "metadata-v5.txt").read_bytes()


# --- parse_metadata ---------------------------------------------------------------------------


def test_parse_v5_file_metadata() -> None:
    meta = sdmeta.parse_metadata(V5_NFS)
    assert meta["SDUUID"] == SD and meta["VERSION"] == "5" and meta["TYPE"] == "NFS"
    assert meta["DESCRIPTION"] == "my nfs domain"
    assert meta["REMOTE_PATH"] == "server:/export"
    assert meta["LOCKPOLICY"] == "" and meta["POOL_UUID"] == ""
    assert len(meta) == 16


def test_parse_stops_at_eof_line_and_nul_padding() -> None:
    text = V5_NFS + "EOF\nJUNK=after eof\n"
    assert "JUNK" not in sdmeta.parse_metadata(text)
    padded = V5_NFS + "\0" * 4000 + "JUNK=after nul\n"
    assert sdmeta.parse_metadata(padded) == sdmeta.parse_metadata(V5_NFS)


def test_parse_block_metadata_as_read_from_the_lv() -> None:
    meta = sdmeta.parse_metadata_bytes(BLOCK_V5 + b"\0" * (64 * 1024 - len(BLOCK_V5)))
    assert meta["SDUUID"] == "59327f16-197b-43c3-a61b-ff2d65ffd1f6"
    assert meta["DESCRIPTION"] == "iscsi domain 1" and meta["TYPE"] == "ISCSI"
    assert meta["PV0"].startswith("pv:36001405a1b2c3d4e5f60718293a4b5c6,uuid:")


def test_values_keep_equal_signs_and_spaces() -> None:
    meta = sdmeta.parse_metadata(f"SDUUID={SD}\nDESCRIPTION= a = b \n")
    assert meta["DESCRIPTION"] == " a = b "


def test_upper_case_uuid_and_crlf_lines_are_accepted() -> None:
    assert sdmeta.parse_metadata(f"SDUUID={OTHER}\r\nCLASS=Data\r\n")["CLASS"] == "Data"


@pytest.mark.parametrize(("text", "reason"), [
    ("CLASS=Data\nVERSION=5\n", "no SDUUID"),
    ("SDUUID=not-a-uuid\n", "not a UUID"),
    (f"SDUUID={SD}\nthis line has no equal sign\n", "line 2 is not KEY=VALUE"),
    (f"SDUUID={SD}\n=value\n", "line 2 has no valid key"),
    (f"SDUUID={SD}\nCLASS=Da\x1bta\n", "non-printable"),
    ("", "no SDUUID"),
    (f"SDUUID={SD}\n" + "X=" + "y" * 64 * 1024 + "\n", "larger than 65536"),
])
def test_not_domain_metadata(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        sdmeta.parse_metadata(text)


def test_binary_is_not_metadata() -> None:
    with pytest.raises(ValueError, match="not text"):
        sdmeta.parse_metadata_bytes(b"\xff\xfe\x00\x01" * 100)
    with pytest.raises(ValueError, match="non-printable"):
        sdmeta.parse_metadata_bytes(bytes(range(1, 32)))


def test_is_uuid() -> None:
    assert sdmeta.is_uuid(SD) and sdmeta.is_uuid(OTHER)
    for name in ("__DIRECT_IO_TEST__", "lost+found", SD[:-1], SD + "0", f" {SD}", ""):
        assert not sdmeta.is_uuid(name)


# --- scan_file_domains ------------------------------------------------------------------------


def make_domain(root: Path, name: str, content: str | bytes | None) -> Path:
    dom_md = root / name / "dom_md"
    dom_md.mkdir(parents=True)
    if content is not None:
        data = content.encode() if isinstance(content, str) else content
        (dom_md / "metadata").write_bytes(data)
    return root / name


def test_scan_finds_a_domain_and_ignores_other_names(tmp_path: Path) -> None:
    path = make_domain(tmp_path, SD, V5_NFS)
    (path / "images").mkdir()
    (tmp_path / "__DIRECT_IO_TEST__").write_bytes(b"")
    (tmp_path / "lost+found").mkdir()
    make_domain(tmp_path, "not-a-domain", V5_NFS)
    domains, skipped = sdmeta.scan_file_domains(str(tmp_path))
    assert domains == [FileDomain(SD, str(path), sdmeta.parse_metadata(V5_NFS))]
    assert skipped == []


def test_scan_reports_what_it_skipped_sorted_by_path(tmp_path: Path) -> None:
    uuids = ["00000000-0000-0000-0000-00000000000" + str(i) for i in range(5)]
    make_domain(tmp_path, uuids[3], None)
    make_domain(tmp_path, uuids[1], b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    make_domain(tmp_path, uuids[2], V5_NFS)  # says it is SD
    make_domain(tmp_path, uuids[0], "VERSION=5\n")
    (tmp_path / uuids[4]).write_text("a file named by a UUID")
    domains, skipped = sdmeta.scan_file_domains(str(tmp_path))
    assert domains == []
    assert skipped == [
        Skipped(str(tmp_path / uuids[0]), "no SDUUID"),
        Skipped(str(tmp_path / uuids[1]), "metadata is not text"),
        Skipped(str(tmp_path / uuids[2]),
                f"SDUUID {SD} in dom_md/metadata is not the directory name {uuids[2]}"),
        Skipped(str(tmp_path / uuids[3]), "no dom_md/metadata"),
        Skipped(str(tmp_path / uuids[4]), "no dom_md/metadata"),
    ]


def test_scan_reports_a_huge_metadata_file_without_loading_it(tmp_path: Path) -> None:
    path = make_domain(tmp_path, SD, None)
    with open(path / "dom_md" / "metadata", "wb") as f:
        f.write(V5_NFS.encode())
        f.truncate(1024 * 1024 * 1024)  # sparse: reading it all would take a while
    _, skipped = sdmeta.scan_file_domains(str(tmp_path))
    assert skipped == [Skipped(str(path), "metadata larger than 65536 bytes")]


def test_scan_reports_unreadable_metadata(tmp_path: Path) -> None:
    path = make_domain(tmp_path, SD, None)
    (path / "dom_md" / "metadata").mkdir()
    _, skipped = sdmeta.scan_file_domains(str(tmp_path))
    assert skipped == [Skipped(str(path), "cannot read dom_md/metadata: Is a directory")]


def test_scan_follows_a_symlinked_root(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    make_domain(real, SD, V5_NFS)
    link = tmp_path / "localfs"
    link.symlink_to(real)
    domains, skipped = sdmeta.scan_file_domains(str(link))
    assert [(d.sd_uuid, d.path) for d in domains] == [(SD, os.path.join(link, SD))]
    assert skipped == []


def test_scan_of_a_missing_root_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        sdmeta.scan_file_domains(str(tmp_path / "gone"))


# --- metadata_from_tags -----------------------------------------------------------------------


def test_metadata_from_tags() -> None:
    tags = ["MDT_CLASS=Data", "MDT_DESCRIPTION=legacy:v3&block", "MDT_LOCKPOLICY=",
            f"MDT_SDUUID={SD}", "MDT_VERSION=3", "MDT__SHA_CKSUM=0123abcd",
            "RHAT_storage_domain"]
    assert sdmeta.metadata_from_tags(tags) == {
        "CLASS": "Data", "DESCRIPTION": "legacy:v3&block", "LOCKPOLICY": "", "SDUUID": SD,
        "VERSION": "3", "_SHA_CKSUM": "0123abcd"}


def test_no_mdt_tags_is_none() -> None:
    assert sdmeta.metadata_from_tags(["RHAT_storage_domain"]) is None
    assert sdmeta.metadata_from_tags([]) is None
