"""Mount connectors: what is adopted at a mount point and what is a conflict (a real tmpfs
mounted there with another source or type: 453, failed, never unmounted), and every command
past its deadline surfacing as 480 (the fake runner)."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_supervisor import World
from tests.wait import eventually as until
from vdsmconn import config, errors
from vdsmconn.connectors import mount
from vdsmconn.connectors.base import Connected, HostContext
from vdsmconn.connectors.gluster import GlusterConnector
from vdsmconn.connectors.mount import PosixConnector, same_fstype, unmount
from vdsmconn.connectors.nfs import NfsConnector
from vdsmconn.host import mountinfo
from vdsmconn.host.fakerunner import FakeRunner
from vdsmconn.model import GlusterSpec, NfsSpec, PosixSpec, State
from vdsmconn.rpc import params
from vdsmconn.state.actual import HostState


class Host:
    """Connectors on the fake runner (no command may run unless expected), reading the real
    mount table."""

    def __init__(self, tmp: Path) -> None:
        self.config = config.local(str(tmp))
        self.runner = FakeRunner()
        self.state = HostState()
        context = HostContext(config.host_settings(self.config), self.runner, self.state)
        self.posix = PosixConnector(context)
        self.nfs = NfsConnector(context)

    def read_mounts(self) -> None:
        """The mount table, read as the daemon's watcher does after a change."""
        self.state.mounts = {m.mountpoint: m for m in mountinfo.read()}


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def mounted(path: str) -> mountinfo.Mount | None:
    return {m.mountpoint: m for m in mountinfo.read()}.get(path)


@contextlib.contextmanager
def tmpfs(path: str, source: str, fstype: str = "tmpfs") -> Iterator[None]:
    """A real mount of `fstype` from `source` at `path`, made behind the daemon's back."""
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", fstype, source, path], check=True, timeout=30)
    try:
        yield
    finally:
        subprocess.run(["umount", path], check=False, timeout=30)


@pytest.mark.root
@pytest.mark.parametrize(("source", "fstype"), [
    ("vc-other", "tmpfs"),  # another source
    ("vc-want", "ramfs"),  # the source asked for, another type
])  # fmt: skip
async def test_foreign_mount_at_the_mount_point_is_453_and_left_alone(
        host: Host, source: str, fstype: str) -> None:
    spec = PosixSpec(connection="vc-want", vfs_type="tmpfs")
    path = host.posix.mountpoint(spec)
    with tmpfs(path, source, fstype):
        before = mounted(path)
        host.read_mounts()
        assert host.posix.present(spec) is None  # not adopted
        with pytest.raises(errors.ConnectionConflict) as raised:
            await host.posix.connect(spec)
        assert raised.value.code == 453
        assert raised.value.message == (f"{path} is already mounted from {source} ({fstype}), "
                                        "not vc-want (tmpfs); left alone")
        await host.posix.disconnect(spec)  # not ours: not unmounted
        assert mounted(path) == before
        assert host.runner.argvs == []


@pytest.mark.root
async def test_own_mount_at_the_mount_point_is_adopted(host: Host) -> None:
    spec = PosixSpec(connection="vc-want", vfs_type="tmpfs")
    path = host.posix.mountpoint(spec)
    with tmpfs(path, "vc-want"):
        host.read_mounts()
        assert host.posix.present(spec) == Connected(path=path)
        assert await host.posix.connect(spec) == Connected(path=path)
        assert host.runner.argvs == []  # nothing mounted over it


@pytest.mark.root
async def test_nfs_mount_point_holding_a_tmpfs_is_453(host: Host) -> None:
    spec = params.parse_connection({"type": "nfs", "connection": "srv:/exports/a"})
    assert isinstance(spec, NfsSpec)
    path = host.nfs.mountpoint(spec)
    with tmpfs(path, "srv:/exports/a"):  # the right source, but no NFS
        with pytest.raises(errors.ConnectionConflict, match="mounted from srv:/exports/a "
                           r"\(tmpfs\), not srv:/exports/a \(nfs\)"):
            await host.nfs.connect(spec)
        await host.nfs.disconnect(spec)
        assert mounted(path) is not None and host.runner.argvs == []


@pytest.mark.root
async def test_supervisor_reports_the_conflict_as_failed_and_never_unmounts(
        tmp_path: Path) -> None:
    world = World(tmp_path)
    spec = PosixSpec(connection="vc-want", vfs_type="tmpfs")
    path = world.connectors["posixfs"].mountpoint(spec)  # type: ignore[attr-defined]
    try:
        with tmpfs(path, "vc-squatter"):
            key = world.manage("c", spec)
            await until(lambda: world.actual.get(key) and world.status(key).last_error, "")
            st = world.status(key)
            assert st.state == State.FAILED and st.last_error is not None
            assert st.last_error.code == 453 and "from vc-squatter (tmpfs)" in st.last_error.message
            world.unmanage("c")
            await until(lambda: world.actual.get(key) is None, "")
            assert mounted(path) is not None and mounted(path).source == "vc-squatter"  # type: ignore[union-attr]
            assert world.runner.argvs == []
    finally:
        await world.rec.close()
        await world.runner.close()


@pytest.mark.parametrize(("wanted", "seen", "same"), [
    (None, "xfs", True), ("auto", "ext4", True), ("tmpfs", "tmpfs", True),
    ("tmpfs", "ramfs", False), ("nfs", "nfs4", True), ("nfs4", "nfs", True),
    ("glusterfs", "fuse.glusterfs", True), ("fuse.sshfs", "fuse.sshfs", True),
    ("fuse", "fuse.vcfuse", True), ("fuse", "fuse", True), ("xfs", "fuse.xfs", True),
    ("sshfs", "fuse", False), ("xfs", "ext4", False),
])  # fmt: skip
def test_same_fstype(wanted: str | None, seen: str, same: bool) -> None:
    assert same_fstype(wanted, seen) is same


def a_file_at(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")


async def test_a_mount_point_that_cannot_be_made_is_477_and_nothing_is_mounted(
        host: Host) -> None:
    host.runner.expect(["mount"], prefix=True)
    root = Path(host.config.mount_root)
    a_file_at(root)  # the mount root is a file: no directory can be made in it
    with pytest.raises(errors.MountError) as raised:
        await host.posix.connect(PosixSpec(connection="/dev/vc-x", vfs_type="xfs"))
    assert raised.value.code == 477
    assert raised.value.message == (
        f"cannot create the mount point {root}/_dev_vc-x: Not a directory")
    assert host.runner.argvs == []


# --- deadlines are 480 -----------------------------------------------------------------------


async def test_mount_past_its_deadline_is_480(host: Host) -> None:
    host.runner.expect(["mount"], prefix=True, timeout=True)
    with pytest.raises(errors.Timeout) as raised:
        await host.posix.connect(PosixSpec(connection="/dev/vc-slow", vfs_type="xfs"))
    assert raised.value.code == 480 and "timed out after 60 s" in raised.value.message


async def test_umount_past_every_deadline_is_480(host: Host) -> None:
    host.runner.expect(["umount"], prefix=True, timeout=True)
    path = str(Path(host.config.mount_root) / "vc-slow")
    with pytest.raises(errors.Timeout) as raised:
        await unmount(host.runner, config.host_settings(host.config), path)
    assert raised.value.code == 480
    assert raised.value.message.startswith(f"umount of {path}: Command umount -c -l ")
    assert [argv[:-1] for argv in host.runner.argvs] == [
        ("umount", "-c"), ("umount", "-c", "-f"), ("umount", "-c", "-l")]


@pytest.mark.root
async def test_umount_refused_at_the_last_step_is_477(host: Host) -> None:
    path = str(Path(host.config.mount_root) / "vc-busy")
    host.runner.expect(["umount", "-c", path], timeout=True)
    host.runner.expect(["umount"], prefix=True, rc=32, stderr="umount: target is busy.")
    with tmpfs(path, "vc-busy"), pytest.raises(errors.MountError, match="target is busy"):
        await unmount(host.runner, config.host_settings(host.config), path)


@pytest.mark.parametrize(("err", "code"), [
    (errno.EACCES, 469), (errno.EPERM, 469), (errno.EROFS, 469),
    (errno.ESTALE, 481), (errno.ENOTCONN, 481), (errno.EIO, 481),
])
def test_probe_errno_says_dead_or_refused(err: int, code: int) -> None:
    """469: the storage answers but the daemon may not use it (a remount would not help);
    481: the mount is dead (recovered by unmounting and mounting again)."""
    e = mount._os_error("/mnt/x", OSError(err, os.strerror(err)))
    assert e.code == code and e.message == f"/mnt/x: {os.strerror(err)}"


@pytest.mark.root
async def test_a_mount_at_a_gluster_mount_point_is_judged_before_glusterd_is_asked(
        host: Host) -> None:
    """The backup servers are looked up (a glusterd query) only to mount: what is already
    mounted there is adopted or left alone without asking a server that may be down."""
    connector = GlusterConnector(HostContext(config.host_settings(host.config), host.runner,
                                             host.state))
    spec = params.parse_connection({"type": "glusterfs", "connection": "gsrv:/v1"})
    assert isinstance(spec, GlusterSpec)
    path = connector.mountpoint(spec)
    with tmpfs(path, "gsrv:/v1"):  # its source; a spec without vfs_type takes any type
        assert await connector.connect(spec) == Connected(path=path)
    assert host.runner.argvs == []  # neither `gluster volume info` nor mount ran
