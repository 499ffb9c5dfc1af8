"""The mountinfo parser on captured and generated tables."""

from __future__ import annotations

import ctypes
import logging
import os
import select
from pathlib import Path

import pytest

from vdsmconn.host import mountinfo
from vdsmconn.host.mountinfo import Mount, normalized_source, parse, under

# Captured from a Debian 12 host with an NFSv4 and a gluster mount (ids shortened).
CAPTURED = """\
22 27 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
27 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
60 27 0:50 / /rhev/data-center/mnt/srv:_export rw,relatime shared:30 - nfs4 srv://export \
rw,vers=4.2,rsize=1048576,soft,proto=tcp,timeo=100,retrans=3,sec=sys,addr=192.0.2.1
61 27 0:51 / /rhev/data-center/mnt/glusterSD/gs:_vol1 rw,relatime shared:31 - \
fuse.glusterfs gs:/vol1 rw,user_id=0,group_id=0,default_permissions,allow_other
62 27 0:52 / /mnt/[fe80::1]:_x rw,relatime - nfs [fe80::1]:/x/ rw,vers=3,addr=fe80::1
"""


def test_captured_table_fields() -> None:
    mounts = parse(CAPTURED)
    assert [m.mount_id for m in mounts] == [22, 27, 60, 61, 62]
    proc = mounts[0]
    assert proc == Mount(
        mount_id=22,
        parent_id=27,
        major_minor="0:21",
        root="/",
        mountpoint="/proc",
        options=("rw", "nosuid", "nodev", "noexec", "relatime"),
        fstype="proc",
        source="proc",
        super_options=("rw",),
        deleted=False,
    )
    assert mounts[2].fstype == "nfs4"
    assert "soft" in mounts[2].super_options
    assert mounts[3].fstype == "fuse.glusterfs"
    assert mounts[3].mountpoint == "/rhev/data-center/mnt/glusterSD/gs:_vol1"


def test_nfs4_double_slash_source_normalizes_to_spec_form() -> None:
    nfs4 = parse(CAPTURED)[2]
    assert nfs4.source == "srv://export"
    assert normalized_source(nfs4) == "srv:/export"


def test_ipv6_source_keeps_brackets_and_drops_trailing_slash() -> None:
    v6 = parse(CAPTURED)[4]
    assert v6.source == "[fe80::1]:/x/"
    assert normalized_source(v6) == "[fe80::1]:/x"


def test_local_device_source_is_unchanged() -> None:
    assert normalized_source(parse(CAPTURED)[1]) == "/dev/vda1"


def test_octal_escapes_are_decoded_in_root_mountpoint_and_source() -> None:
    line = r"40 27 0:60 /a\040b\011c /mnt/x\134y\012z rw - tmpfs my\040src rw"
    (m,) = parse(line)
    assert m.root == "/a b\tc"
    assert m.mountpoint == "/mnt/x\\y\nz"
    assert m.source == "my src"


def test_deleted_mountpoint_is_stripped_and_flagged() -> None:
    (m,) = parse(r"40 27 0:60 / /mnt/gone\040(deleted) rw - tmpfs tmpfs rw")
    assert m.mountpoint == "/mnt/gone"
    assert m.deleted is True


def test_escaped_space_inside_name_is_not_deleted() -> None:
    (m,) = parse(r"40 27 0:60 / /mnt/a\040(deleted)x rw - tmpfs tmpfs rw")
    assert m.mountpoint == "/mnt/a (deleted)x"
    assert m.deleted is False


def test_optional_fields_are_skipped_up_to_separator() -> None:
    line = "40 27 0:60 / /mnt/p rw,relatime shared:5 master:3 propagate_from:2 unbindable - " \
        "xfs /dev/loop0 rw,attr2"
    (m,) = parse(line)
    assert (m.fstype, m.source, m.super_options) == ("xfs", "/dev/loop0", ("rw", "attr2"))
    assert m.options == ("rw", "relatime")


def test_malformed_lines_are_skipped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    good = "40 27 0:60 / /mnt/ok rw - tmpfs tmpfs rw"
    bad = [
        "",
        "garbage",
        "x 27 0:60 / /mnt/a rw - tmpfs tmpfs rw",  # id not a number
        "41 27 0:60 / /mnt/b rw tmpfs tmpfs rw",  # no separator
        "42 27 0:60 / /mnt/c rw - tmpfs tmpfs",  # no super options
        "43 27 0:60 / /mnt/d rw - tmpfs tmpfs rw extra",  # too many fields after separator
        "44 27 060 / /mnt/e rw - tmpfs tmpfs rw",  # no major:minor
        "45 27 0:60 / - tmpfs tmpfs rw",  # separator too early
    ]
    with caplog.at_level(logging.DEBUG, logger="vdsmconn.host.mountinfo"):
        mounts = parse("\n".join([bad[1], good, *bad[2:], good.replace("40", "46", 1)]))
    assert [m.mountpoint for m in mounts] == ["/mnt/ok", "/mnt/ok"]
    assert [m.mount_id for m in mounts] == [40, 46]
    assert sum("malformed" in r.getMessage() for r in caplog.records) == len(bad) - 1


def test_form_feed_in_a_path_does_not_split_the_line() -> None:
    (m,) = parse("40 27 0:60 / /mnt/a\x0cb rw - tmpfs tmpfs rw\n")
    assert m.mountpoint == "/mnt/a\x0cb"


def test_generated_table_of_1000_lines() -> None:
    lines = []
    for i in range(1000):
        name = f"srv{i}:_export_{i}\\040dir" if i % 3 == 0 else f"vol_{i}"
        opt = f" shared:{i}" if i % 2 else ""
        src = f"srv{i}://export/{i}" if i % 3 == 0 else f"/dev/loop{i}"
        lines.append(f"{100 + i} 27 0:{i} / /rhev/mnt/{name} rw,relatime{opt} - "
                     f"{'nfs4' if i % 3 == 0 else 'xfs'} {src} rw,attr2")
    mounts = parse("\n".join(lines) + "\n")
    assert len(mounts) == 1000
    assert [m.mount_id for m in mounts] == list(range(100, 1100))
    m999 = mounts[999]
    assert m999.mountpoint == "/rhev/mnt/srv999:_export_999 dir"
    assert normalized_source(m999) == "srv999:/export/999"
    assert mounts[998].source == "/dev/loop998"
    assert all(m.super_options == ("rw", "attr2") for m in mounts)


def _mount(mountpoint: str, mount_id: int = 1) -> Mount:
    return Mount(mount_id, 1, "0:1", "/", mountpoint, ("rw",), "tmpfs", "tmpfs", ("rw",))


def test_under_is_path_component_aware() -> None:
    mounts = [_mount(p) for p in ("/a/b", "/a/b/c", "/a/bc", "/a/b/c/d", "/a", "/x/a/b/e")]
    assert [m.mountpoint for m in under(mounts, "/a/b")] == ["/a/b/c", "/a/b/c/d"]
    assert [m.mountpoint for m in under(mounts, "/a/b/")] == ["/a/b/c", "/a/b/c/d"]
    assert [m.mountpoint for m in under(mounts, "//a//b")] == ["/a/b/c", "/a/b/c/d"]


def test_under_root_is_everything_but_root() -> None:
    mounts = [_mount("/"), _mount("/proc"), _mount("/a/b")]
    assert [m.mountpoint for m in under(mounts, "/")] == ["/proc", "/a/b"]


def test_read_parses_this_process_table() -> None:
    mounts = mountinfo.read()
    assert mounts, "a process always has at least its root mount"
    assert any(m.mountpoint == "/proc" and m.fstype == "proc" for m in mounts)
    assert len({m.mount_id for m in mounts}) == len(mounts)


def test_mounted_at_agrees_with_the_whole_table(tmp_path: Path) -> None:
    """One path looked up in the raw table: escaped names, stacked mounts (the last is on
    top), a deleted mount point, a path that is another mount's root or a prefix of one."""
    table = CAPTURED + (
        "70 27 0:60 / /mnt/a\\040b rw - tmpfs one rw\n"
        "71 70 0:61 / /mnt/a\\040b rw - tmpfs two rw\n"
        "72 27 0:62 / /mnt/gone\\040(deleted) rw - tmpfs three rw\n"
        "73 27 253:0 /mnt/root /mnt/bind rw - ext4 /dev/vda1 rw\n"
        "74 27 0:63 / /mnt/prefixed rw - tmpfs four rw\n"
        "75 27 0:64 / /mnt/back\\134slash rw - tmpfs five rw"  # no final newline
    )
    path = tmp_path / "mountinfo"
    path.write_text(table)
    whole = {m.mountpoint: m for m in parse(table)}
    for mountpoint in ("/mnt/a b", "/mnt/gone", "/mnt/bind", "/mnt/prefixed",
                       "/mnt/back\\slash", "/rhev/data-center/mnt/srv:_export", "/proc"):
        assert mountinfo.mounted_at(mountpoint, str(path)) == whole[mountpoint]
    top = mountinfo.mounted_at("/mnt/a b", str(path))
    assert top is not None and top.source == "two"
    for absent in ("/mnt/root", "/mnt/prefix", "/mnt/a", "/mnt"):
        assert mountinfo.mounted_at(absent, str(path)) is None


def test_parser_of_successive_reads_agrees_with_parse() -> None:
    parser = mountinfo.Parser()
    first = parser.parse(CAPTURED.encode())
    assert first == parse(CAPTURED)
    grown = CAPTURED + "80 27 0:70 / /mnt/new rw - tmpfs new rw\nnot a mountinfo line\n"
    second = parser.parse(grown.encode())
    assert second == parse(grown)
    # Lines seen before are not parsed again: the same objects come back.
    assert all(a is b for a, b in zip(first, second[:len(first)], strict=True))
    shrunk = "\n".join(CAPTURED.splitlines()[1:])
    assert parser.parse(shrunk.encode()) == parse(shrunk)


def _mount_syscall(source: str, target: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), b"tmpfs", 0, None) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}")


def _umount_syscall(target: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(target.encode(), 0) != 0:
        raise OSError(ctypes.get_errno(), f"umount {target}")


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting tmpfs needs root")
def test_table_is_read_again_only_after_a_change_and_never_answers_from_before_it(
        tmp_path: Path) -> None:
    """Real mounts, made and removed by the syscalls themselves (no mount(8) in between):
    right after each, the table answers what the kernel has; while nothing changes, it
    answers from its last read. A poll of another open file (the watcher's) does not hide
    a change from it."""
    table = mountinfo.Table()
    target = str(tmp_path)
    whole = table.mounts()
    assert table.reads == 1 and target not in whole
    assert table.mounts() is whole and table.at(target) is None and table.reads == 1
    with open(mountinfo.PATH, "rb") as other:
        watcher = select.poll()
        watcher.register(other.fileno(), select.POLLPRI)
        _mount_syscall("vc-table", target)
        try:
            assert watcher.poll(0)  # the other file's flag, taken
            found = table.at(target)  # read raw, one path parsed: no whole read
            assert found is not None and found.source == "vc-table" and table.reads == 1
            now = table.mounts()
            assert now is not whole and now[target] == found and table.reads == 2
            assert table.listing() == mountinfo.read() and table.reads == 2
        finally:
            _umount_syscall(target)
    assert table.at(target) is None
    assert target not in table.mounts() and table.reads == 3
