"""Connections that are a mount under the mount root: posixfs, and the base of nfs/glusterfs."""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping

from vdsmconn import errors
from vdsmconn.connectors.base import Connected, Connector, QuickCheck, StepLog
from vdsmconn.host import mountinfo, scope
from vdsmconn.host.command import CommandRunner
from vdsmconn.model import MountSpec, normalize_path, normalize_remote
from vdsmconn.settings import HostSettings
from vdsmconn.state.actual import ForeignMount

log = logging.getLogger(__name__)

# errno values that mean the mount is dead rather than merely refusing us.
STALE_ERRNOS = {errno.ESTALE, errno.ENOTCONN, errno.EIO, errno.EHOSTDOWN, errno.ETIMEDOUT,
          errno.ECONNABORTED}
# errno values that mean the storage answers but the daemon may not read or write it (469).
ACCESS_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


class _Occupied(OSError):
    """What `_prepare_mountpoint` raises when something is mounted at the mount point."""

    def __init__(self, mount: mountinfo.Mount) -> None:
        super().__init__(errno.EBUSY, "already mounted", mount.mountpoint)
        self.mount = mount


def _prepare_mountpoint(path: str) -> None:
    """Just before mount(8), in the thread that starts it: what is mounted at `path` now,
    else the mount point, created. The table is read there and not on the loop: while many
    mounts are made at once, every read comes after a change, and waits for the mounts
    being made (the kernel's lock of the mount namespace)."""
    m = mountinfo.mounted_at(path)
    if m is not None:
        raise _Occupied(m)
    os.makedirs(path, 0o755, exist_ok=True)


def _check_mountpoint(path: str) -> None:
    """Blocking: ask the file system behind `path` to answer (runs in a probe thread)."""
    os.statvfs(path)
    os.stat(path)


async def read_mounts() -> dict[str, mountinfo.Mount]:
    """The mount table now (read again only if it changed since it was last read). Read on
    the loop: /proc/self/mountinfo never blocks, not even on a hung mount, and a thread hop
    costs more than the read (docs/performance.md). What is at one path now:
    `mountinfo.mounted_at`, also on the loop, but for a connect, which looks in the thread
    that starts mount(8) (`_prepare_mountpoint`)."""
    return mountinfo.table().mounts()


class MountConnector(Connector[MountSpec]):
    """`mount -t <vfs_type> -o <options> <spec> <mount point>` and its inverse."""

    fstype: str | None = None  # fixed file system type (nfs, glusterfs) or None: the spec's

    def mountpoint(self, spec: MountSpec) -> str:
        return os.path.join(self.host.settings.mount_root, spec.mount_name)

    def available(self) -> str | None:
        command = self.host.settings.mount_command
        if shutil.which(command) is None:
            return f"{command} not found"
        return None

    def mount_argv(self, spec: MountSpec, target: str, extra: tuple[str, ...] = ()) -> list[str]:
        argv = [self.host.settings.mount_command]
        fstype = self.fstype or spec.vfs_type
        if fstype:
            argv += ["-t", fstype]
        options = [*extra, *spec.options()]
        if options:
            argv += ["-o", ",".join(options)]
        return [*argv, spec.connection, target]

    def is_mount_of(self, m: mountinfo.Mount, spec: MountSpec) -> bool:
        """Whether the mount `m` at the mount point of `spec` is this connection (adopted) or
        something else (a conflict: reported, never unmounted)."""
        return True

    def _conflict(self, m: mountinfo.Mount, spec: MountSpec) -> errors.ConnectionConflict:
        fstype = self.fstype or spec.vfs_type or "any type"
        return errors.ConnectionConflict(
            f"{m.mountpoint} is already mounted from {m.source} ({m.fstype}), not "
            f"{spec.connection} ({fstype}); left alone",
            {"path": m.mountpoint, "source": m.source, "vfs_type": m.fstype})

    def _found(self, m: mountinfo.Mount, spec: MountSpec) -> Connected:
        """Something is mounted at the mount point already: adopted, or left alone (453)."""
        if self.is_mount_of(m, spec):
            return Connected(path=m.mountpoint)
        raise self._conflict(m, spec)

    def present(self, spec: MountSpec) -> Connected | None:
        path = self.mountpoint(spec)
        m = self.host.state.mounts.get(path)
        if m is None:
            return None
        if not self.is_mount_of(m, spec):
            log.warning("FOREIGN %s is mounted from %s (%s), not %s", path, m.source, m.fstype,
                        spec.connection)
            return None
        return Connected(path=path)

    def is_fuse(self, spec: MountSpec) -> bool:
        """Whether the mount is served by a FUSE daemon that must live in a scope of its own."""
        fstype = self.fstype or spec.vfs_type or ""
        return fstype in ("glusterfs", "fuse", "fuseblk") or fstype.startswith(
            ("fuse.", "fuseblk."))

    async def connect(self, spec: MountSpec) -> Connected:
        path = self.mountpoint(spec)
        try:
            await self._mount(spec, path, prepare=functools.partial(_prepare_mountpoint, path))
        except _Occupied as e:
            return self._found(e.mount, spec)
        except OSError as e:  # only the mount point's creation raises it
            raise errors.MountError(f"cannot create the mount point {path}: {e.strerror}",
                                    {"path": path}) from None
        return Connected(path=path)

    async def extra_options(self, spec: MountSpec) -> tuple[str, ...]:
        """Options computed at mount time, put before the spec's own (gluster: backups)."""
        return ()

    async def _mount(self, spec: MountSpec, path: str, extra: tuple[str, ...] = (),
                     prepare: Callable[[], object] | None = None) -> None:
        """`prepare`: run just before mount(8) starts, in the thread that starts it."""
        timeout = self.host.settings.command_timeout
        argv = self.mount_argv(spec, path, (*await self.extra_options(spec), *extra))
        if self.is_fuse(spec) and scope.unavailable() is None:
            if prepare is not None:
                await asyncio.to_thread(prepare)
            result = await scope.run_in_scope(
                self.host.runner, argv, unit=scope.unit_name(path),
                slice_=self.host.settings.scope_slice,
                description=f"vdsmconn mount of {spec.connection} on {path}", timeout=timeout)
        else:
            result = await self.host.runner.run(argv, timeout=timeout, prepare=prepare)
        if result.rc != 0:
            raise errors.MountError(
                f"mount of {spec.connection} failed: {_tail(result.stderr)}",
                {"rc": result.rc},
            )

    async def disconnect(self, spec: MountSpec, force: bool = False) -> None:
        path = self.mountpoint(spec)
        mount = mountinfo.mounted_at(path)
        if mount is not None and not self.is_mount_of(mount, spec):
            log.warning("DISCONNECT %s: %s is mounted there, not this connection; left alone",
                        path, mount.source)
            return
        if mount is not None:
            if self.host.probes.running(path) and mount.fstype.startswith("fuse"):
                # Callers of a hung FUSE mount sleep uninterruptibly (our probe thread among
                # them); only aborting the connection frees them.
                await abort_fuse(self.host.runner, self.host.settings, mount)
            await unmount(self.host.runner, self.host.settings, path)
        await asyncio.to_thread(_remove_dir, path)

    def quick_check(self, spec: MountSpec) -> QuickCheck:
        path = self.mountpoint(spec)
        return QuickCheck(path, functools.partial(_check_mountpoint, path), f"probe of {path}",
                          self.host.probes, self.host.settings.probe_timeout)

    async def probe(self, spec: MountSpec) -> None:
        path = self.mountpoint(spec)
        if path not in self.host.state.mounts and mountinfo.mounted_at(path) is None:
            raise errors.MountError(f"{path} is not mounted")
        try:
            await self.host.probes.run(path, lambda: _check_mountpoint(path), f"probe of {path}",
                                       self.host.settings.probe_timeout)
        except errors.Timeout as e:
            raise errors.MountHung(f"{path} does not answer: {e.message}") from None
        except OSError as e:
            raise _os_error(path, e) from None

    async def test(self, spec: MountSpec, timeout: float) -> StepLog:
        log = StepLog(self.host.clock)
        if spec.connection.startswith("/") and not await log.run(
            "source", lambda: self._source_exists(spec.connection, timeout)
        ):
            return log
        await log.run("mount", lambda: self._test_mount(spec))
        return log

    async def _source_exists(self, source: str, timeout: float) -> str:
        try:
            exists = await self.host.probes.run(source, lambda: os.path.exists(source),
                                                f"stat {source}", timeout)
        except errors.Timeout as e:
            raise errors.StaleMount(e.message) from None
        if not exists:
            raise errors.ConnectError(f"{source} does not exist")
        return f"{source} exists"

    async def _test_mount(self, spec: MountSpec) -> str:
        """Mount read-only in a private temporary directory, then unmount."""
        base = os.path.join(self.host.settings.run_dir, "test")
        await asyncio.to_thread(os.makedirs, base, 0o700, True)
        target = await asyncio.to_thread(tempfile.mkdtemp, None, None, base)
        try:
            await self._mount(spec, target, extra=("ro",))
            await unmount(self.host.runner, self.host.settings, target)
        finally:
            if mountinfo.mounted_at(target) is not None:
                await unmount(self.host.runner, self.host.settings, target)
            await asyncio.to_thread(_remove_dir, target)
        return f"{spec.connection} mounts read-only"


# --- unmounting ----------------------------------------------------------------------------

UMOUNT_STEP_TIMEOUT = 10.0  # at most, per step of the ladder (and never over command_timeout)
FUSECTL = "/sys/fs/fuse/connections"


def _not_mounted(stderr: str) -> bool:
    return "not mounted" in stderr or "no mount point specified" in stderr


async def unmount(runner: CommandRunner, settings: HostSettings, path: str) -> None:
    """`umount`, then `umount -f`, then `umount -l`, each with a deadline, until `path` is no
    longer a mount point. "not mounted" is success. A step that cannot be killed raises
    `StuckCommand` (the key stays stuck); a ladder that ends with the mount still there
    raises `MountError`, or `Timeout` when its last step ran past its deadline."""
    deadline = min(UMOUNT_STEP_TIMEOUT, settings.command_timeout)
    last = "no step ran"
    timed_out: errors.Timeout | None = None
    for flags in ((), ("-f",), ("-l",)):
        # -c: no canonicalizing, which would stat the mount point and hang on a hung mount.
        argv = [settings.umount_command, "-c", *flags, path]
        try:
            result = await runner.run(argv, timeout=deadline)
        except errors.Timeout as e:  # a StuckCommand is no Timeout: it goes up, key stuck
            last, timed_out = e.message, e
            continue
        timed_out = None
        if mountinfo.mounted_at(path) is None:
            log.info("UNMOUNTED path=%s by=%s", path, " ".join(argv[:-1]))
            return
        if result.rc != 0 and _not_mounted(result.stderr):
            log.info("UNMOUNTED path=%s was not mounted", path)
            return
        last = _tail(result.stderr) if result.rc else "still mounted (another mount below?)"
    if timed_out is not None:
        raise errors.Timeout(f"umount of {path}: {last}", {"path": path})
    raise errors.MountError(f"umount of {path} failed: {last}", {"path": path})


async def abort_fuse(runner: CommandRunner, settings: HostSettings,
                     mount: mountinfo.Mount) -> None:
    """Abort the FUSE connection behind `mount` (fusectl), releasing every stuck caller."""
    minor = mount.major_minor.partition(":")[2]
    if mountinfo.mounted_at(FUSECTL) is None:
        await runner.run([settings.mount_command, "-t", "fusectl", "fusectl", FUSECTL],
                         timeout=min(UMOUNT_STEP_TIMEOUT, settings.command_timeout))
    try:
        await asyncio.to_thread(_write_abort, f"{FUSECTL}/{minor}/abort")
    except OSError as e:
        log.warning("ABORT fuse connection %s of %s failed: %s", minor, mount.mountpoint,
                    e.strerror or e)
        return
    log.warning("ABORTED fuse connection %s of hung mount %s", minor, mount.mountpoint)


def _write_abort(path: str) -> None:
    with open(path, "w") as f:
        f.write("1")


def _remove_dir(path: str) -> None:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EBUSY):
            raise


def _os_error(path: str, e: OSError) -> errors.Error:
    reason = os.strerror(e.errno) if e.errno else str(e)
    if e.errno in STALE_ERRNOS:
        return errors.StaleMount(f"{path}: {reason}", {"errno": e.errno})
    if e.errno in ACCESS_ERRNOS:  # it answers, but not to us: no remount repairs that
        return errors.AccessPermissionError(f"{path}: {reason}", {"errno": e.errno})
    return errors.StaleMount(f"{path}: {reason}", {"errno": e.errno})


def _tail(text: str, limit: int = 500) -> str:
    text = text.strip()
    return text[-limit:] if text else "no message"


class PosixConnector(MountConnector):
    """posixfs: any file system mount(8) knows, with the client's type and options."""

    def is_mount_of(self, m: mountinfo.Mount, spec: MountSpec) -> bool:
        return same_fstype(spec.vfs_type, m.fstype) and same_source(m, spec)


NFS_FSTYPES = ("nfs", "nfs4")
BIND_OPTIONS = ("bind", "rbind")


def same_fstype(wanted: str | None, seen: str) -> bool:
    """Whether a mount of type `seen` is what `mount -t wanted` makes (no type: any)."""
    if not wanted or wanted == "auto":
        return True
    if wanted in NFS_FSTYPES:
        return seen in NFS_FSTYPES
    # -t glusterfs, -t fuse.sshfs, -t fuse: the kernel shows fuse.<subtype> or fuse.
    return seen in (wanted, f"fuse.{wanted}") or (
        wanted in ("fuse", "fuseblk") and seen.startswith(f"{wanted}."))


def same_source(m: mountinfo.Mount, spec: MountSpec) -> bool:
    """Whether the mount's source is the spec's: the same text (`server:/a/` is `server:/a`),
    the same device node (/dev/disk/by-uuid/..., UUID=, LABEL=), or for a bind mount the
    same directory (the kernel shows the device below it and the directory as `root`)."""
    source = mountinfo.normalized_source(m)
    wanted = normalize_remote(spec.connection)
    if source == wanted:
        return True
    if any(o in BIND_OPTIONS for o in spec.options()) or spec.vfs_type == "none":
        root = normalize_path(m.root)
        return wanted == root or (root != "/" and wanted.endswith(root))
    device = _device_of(wanted)
    return device is not None and device == _device_of(source)


def _device_of(source: str) -> str | None:
    """The device node a source names, for sources that name one (devtmpfs: never hangs)."""
    for tag, folder in (("UUID=", "by-uuid"), ("LABEL=", "by-label")):
        if source.startswith(tag):
            source = f"/dev/disk/{folder}/{source[len(tag):]}"
    if not source.startswith("/dev/"):
        return None
    return os.path.realpath(source)


class HelperMountConnector(MountConnector):
    """A file system whose mount needs a helper program (mount.<type>) and its package."""

    package = ""

    def available(self) -> str | None:
        helper = f"mount.{self.fstype}"
        if not any(os.path.exists(f"{d}/{helper}") for d in ("/sbin", "/usr/sbin")):
            return f"{helper} not found (install {self.package})"
        return self.kernel_missing() or super().available()

    def kernel_missing(self) -> str | None:
        """Why the running kernel cannot mount this type, if it cannot."""
        return None


def foreign_mounts(
    mounts: Mapping[str, mountinfo.Mount], mount_root: str, known: set[str]
) -> list[ForeignMount]:
    """Mounts under the mount root that no managed key owns."""
    root = mount_root.rstrip("/")
    return [ForeignMount(_type_of(m.fstype), m.source, mp, m.fstype)
            for mp, m in sorted(mounts.items())
            if mp.startswith(root + "/") and mp not in known]


def _type_of(fstype: str) -> str:
    if fstype in ("nfs", "nfs4"):
        return "nfs"
    if fstype == "fuse.glusterfs":
        return "glusterfs"
    return "posixfs"
