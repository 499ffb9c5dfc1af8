"""What the kernel can do, read from fake /proc, /sys and module trees."""

from __future__ import annotations

import os
from pathlib import Path

from vdsmconn.host.kernel import Kernel


def kernel(tmp_path: Path, filesystems: str = "", loaded: tuple[str, ...] = (),
           dep: str = "", builtin: str = "") -> Kernel:
    k = Kernel(proc=str(tmp_path / "proc"), sys=str(tmp_path / "sys"),
               modules=str(tmp_path / "lib"))
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "filesystems").write_text(filesystems)
    for name in loaded:
        (tmp_path / "sys" / "module" / name).mkdir(parents=True)
    tree = tmp_path / "lib" / os.uname().release
    tree.mkdir(parents=True)
    (tree / "modules.dep").write_text(dep)
    (tree / "modules.builtin").write_text(builtin)
    return k


def test_registered_filesystem_is_there(tmp_path: Path) -> None:
    k = kernel(tmp_path, filesystems="nodev\tfuse\n\text4\nnodev\tnfs\n")
    assert k.missing_filesystem("nfs", "NFS client") is None
    assert k.has_filesystem("ext4") and not k.has_filesystem("xfs")


def test_loadable_module_counts(tmp_path: Path) -> None:
    k = kernel(tmp_path, dep="kernel/fs/nfs/nfs.ko.xz: kernel/net/sunrpc/sunrpc.ko.xz\n"
                             "kernel/drivers/scsi/iscsi_tcp.ko: kernel/drivers/scsi/libiscsi.ko\n")
    assert k.has_filesystem("nfs")
    assert k.missing_module("iscsi_tcp", "iSCSI initiator transport") is None
    assert not k.has_module("sunrpc_x")


def test_loaded_or_builtin_module_counts(tmp_path: Path) -> None:
    k = kernel(tmp_path, loaded=("iscsi_tcp",), builtin="kernel/fs/fuse/fuse.ko\n")
    assert k.has_module("iscsi_tcp") and k.has_filesystem("fuse")


def test_missing_pieces_say_what_and_why(tmp_path: Path) -> None:
    k = kernel(tmp_path, filesystems="nodev\ttmpfs\n")
    release = os.uname().release
    assert k.missing_filesystem("nfs", "NFS client") == (
        f"no NFS client in this kernel (nfs is neither registered nor a module of {release})")
    assert k.missing_module("iscsi_tcp", "iSCSI initiator transport") == (
        "no iSCSI initiator transport in this kernel (iscsi_tcp is neither loaded nor a module"
        f" of {release})")


def test_no_module_tree_means_nothing_loadable(tmp_path: Path) -> None:
    k = Kernel(proc=str(tmp_path), sys=str(tmp_path), modules=str(tmp_path / "none"))
    assert not k.has_module("nfs") and not k.has_filesystem("nfs")
