#!/usr/bin/env python3
"""slowfs: a passthrough FUSE file system, spoken straight to /dev/fuse, whose fsync is slow.

    slowfs.py [--fsync-delay SECONDS] BACKING MOUNTPOINT

Mounts (fstype fuse.slowfs, source BACKING) and serves, in this process, every file and
directory of BACKING at MOUNTPOINT; prints `ready` on stdout once the mount is there, exits
when the connection goes (unmount, abort). fsync, fdatasync and a directory's fsync are done
on the backing file at once, and answered `--fsync-delay` seconds later (default 0.002) while
the other requests go on being served: a disk whose cache flush takes that long.

Enough of POSIX for SQLite in WAL mode (including its shared-memory file, mapped through the
page cache) and for the daemon's state directory: lookup, getattr, setattr (mode, owner, size,
times), create, mknod, mkdir, unlink, rmdir, rename, open, read, write, flush, release, fsync,
opendir, readdir, releasedir, fsyncdir, statfs, access. No links, no extended attributes, no
locks of its own (the kernel keeps POSIX locks locally). Node ids are never reused while
mounted. Only the standard library: it runs under the system python3 as well as in the venv.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import heapq
import os
import select
import stat
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr (88 bytes)
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid nsec nsec
ATTR_OUT = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
OPEN_OUT = struct.Struct("<QII")  # fh open_flags padding
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")  # valid pad fh size lock_owner a/m/ctime ...
READ_IN = struct.Struct("<QQII")  # fh offset size flags (write_in starts alike)
RW_IN_SIZE = 40
DIRENT = struct.Struct("<QQII")  # ino off namelen type

LOOKUP, FORGET, GETATTR, SETATTR, MKNOD, MKDIR, UNLINK, RMDIR, RENAME = 1, 2, 3, 4, 8, 9, 10, 11, 12
OPEN, READ, WRITE, STATFS, RELEASE, FSYNC, FLUSH, INIT = 14, 15, 16, 17, 18, 20, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, ACCESS, CREATE = 27, 28, 29, 30, 34, 35
INTERRUPT, DESTROY, BATCH_FORGET, RENAME2 = 36, 38, 42, 45
NO_REPLY = {FORGET, INTERRUPT, BATCH_FORGET}

FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1, 2, 4, 8
FATTR_ATIME, FATTR_MTIME, FATTR_FH, FATTR_ATIME_NOW, FATTR_MTIME_NOW = 16, 32, 64, 128, 256
GETATTR_FH = 1
FSYNC_DATASYNC = 1
ROOT = 1
VALID = 1  # seconds the kernel may keep names and attributes: every change comes through us


class Reply(Exception):
    """An error answer (errno) to the request being served."""

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.err = err


def cstr(payload: bytes, start: int = 0) -> tuple[str, int]:
    """The NUL-terminated name at `start`, and the offset after its NUL."""
    end = payload.index(b"\0", start)
    return os.fsdecode(payload[start:end]), end + 1


def pack_attr(ino: int, st: os.stat_result) -> bytes:
    return ATTR.pack(ino, st.st_size, st.st_blocks, int(st.st_atime), int(st.st_mtime),
                     int(st.st_ctime), st.st_atime_ns % 10**9, st.st_mtime_ns % 10**9,
                     st.st_ctime_ns % 10**9, st.st_mode, st.st_nlink, st.st_uid, st.st_gid,
                     st.st_rdev & 0xFFFFFFFF, 4096, 0)


@dataclass
class Handle:
    fd: int
    names: list[tuple[str, int, int]] | None = None  # directories: (name, ino, type)


class PassFs:
    """Requests in, replies out; the backing tree is addressed by paths relative to it."""

    def __init__(self, fuse_fd: int, backing: str, fsync_delay: float) -> None:
        self.fuse_fd = fuse_fd
        self.backing = os.path.abspath(backing)
        self.fsync_delay = fsync_delay
        self.paths: dict[int, str] = {ROOT: ""}
        self.nodes: dict[str, int] = {"": ROOT}
        self.next_node = ROOT + 1
        self.handles: dict[int, Handle] = {}
        self.next_fh = 1
        self.due: list[tuple[float, int]] = []  # (time, unique) of fsync replies held back
        self.handlers: dict[int, Callable[[int, bytes], bytes]] = {
            LOOKUP: self.lookup, GETATTR: self.getattr, SETATTR: self.setattr,
            MKNOD: self.mknod, MKDIR: self.mkdir, UNLINK: self.unlink, RMDIR: self.rmdir,
            RENAME: self.rename, RENAME2: self.rename2, OPEN: self.open, READ: self.read,
            WRITE: self.write, STATFS: self.statfs, RELEASE: self.release, FLUSH: self.flush,
            OPENDIR: self.opendir, READDIR: self.readdir, RELEASEDIR: self.release,
            ACCESS: self.access, CREATE: self.create, INIT: self.init, DESTROY: self.flush,
        }

    # --- names and nodes -----------------------------------------------------------------

    def real(self, node: int, name: str | None = None) -> str:
        try:
            path = self.paths[node]
        except KeyError:
            raise Reply(errno.ESTALE) from None
        if name is not None:
            if "/" in name or name in (".", ".."):
                raise Reply(errno.EINVAL)
            path = f"{path}/{name}" if path else name
        return path

    def full(self, path: str) -> str:
        return os.path.join(self.backing, path) if path else self.backing

    def node_of(self, path: str) -> int:
        node = self.nodes.get(path)
        if node is None:
            node, self.next_node = self.next_node, self.next_node + 1
            self.nodes[path] = node
            self.paths[node] = path
        return node

    def forget_path(self, path: str) -> None:
        """`path` and everything below it are gone: their nodes go stale."""
        for p in [p for p in self.nodes if p == path or p.startswith(path + "/")]:
            del self.paths[self.nodes.pop(p)]

    def move(self, old: str, new: str) -> None:
        self.forget_path(new)
        for p in [p for p in self.nodes if p == old or p.startswith(old + "/")]:
            node = self.nodes.pop(p)
            moved = new + p[len(old):]
            self.nodes[moved] = node
            self.paths[node] = moved

    def entry(self, path: str) -> bytes:
        st = os.lstat(self.full(path))
        node = self.node_of(path)
        return ENTRY_OUT.pack(node, 0, VALID, VALID, 0, 0) + pack_attr(node, st)

    def fd_of(self, fh: int) -> int:
        try:
            return self.handles[fh].fd
        except KeyError:
            raise Reply(errno.EBADF) from None

    def new_handle(self, handle: Handle) -> int:
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        self.handles[fh] = handle
        return fh

    # --- requests ------------------------------------------------------------------------

    def init(self, node: int, payload: bytes) -> bytes:
        _major, minor, readahead, _flags = struct.unpack_from("<IIII", payload)
        return struct.pack("<IIIIHHIIHHI28x", 7, min(minor, 31), readahead, 0, 16, 12,
                           131072, 1, 0, 0, 0)

    def lookup(self, node: int, payload: bytes) -> bytes:
        name, _ = cstr(payload)
        return self.entry(self.real(node, name))

    def getattr(self, node: int, payload: bytes) -> bytes:
        flags, _, fh = struct.unpack_from("<IIQ", payload)
        if flags & GETATTR_FH and fh in self.handles:
            st = os.fstat(self.handles[fh].fd)
        else:
            st = os.lstat(self.full(self.real(node)))
        return ATTR_OUT.pack(VALID, 0, 0) + pack_attr(node, st)

    def setattr(self, node: int, payload: bytes) -> bytes:
        (valid, _, fh, size, _owner, atime, mtime, _ctime, atimens, mtimens, _ctimens, mode,
         _, uid, gid, _) = SETATTR_IN.unpack_from(payload)
        path = self.full(self.real(node))
        fd = self.fd_of(fh) if valid & FATTR_FH else None
        target: int | str = path if fd is None else fd
        if valid & FATTR_MODE:
            os.chmod(target, stat.S_IMODE(mode))
        if valid & (FATTR_UID | FATTR_GID):
            os.chown(target, uid if valid & FATTR_UID else -1, gid if valid & FATTR_GID else -1)
        if valid & FATTR_SIZE:
            os.truncate(target, size)
        if valid & (FATTR_ATIME | FATTR_MTIME):
            st = os.stat(target)
            now = time.time_ns()
            a = st.st_atime_ns
            m = st.st_mtime_ns
            if valid & FATTR_ATIME:
                a = now if valid & FATTR_ATIME_NOW else atime * 10**9 + atimens
            if valid & FATTR_MTIME:
                m = now if valid & FATTR_MTIME_NOW else mtime * 10**9 + mtimens
            os.utime(target, ns=(a, m))
        st = os.fstat(fd) if fd is not None else os.lstat(path)
        return ATTR_OUT.pack(VALID, 0, 0) + pack_attr(node, st)

    def mknod(self, node: int, payload: bytes) -> bytes:
        mode, rdev, umask, _ = struct.unpack_from("<IIII", payload)
        name, _ = cstr(payload, 16)
        path = self.real(node, name)
        os.mknod(self.full(path), mode & ~umask, rdev)
        return self.entry(path)

    def mkdir(self, node: int, payload: bytes) -> bytes:
        mode, umask = struct.unpack_from("<II", payload)
        name, _ = cstr(payload, 8)
        path = self.real(node, name)
        os.mkdir(self.full(path), mode & ~umask & 0o7777)
        return self.entry(path)

    def unlink(self, node: int, payload: bytes) -> bytes:
        path = self.real(node, cstr(payload)[0])
        os.unlink(self.full(path))
        self.forget_path(path)
        return b""

    def rmdir(self, node: int, payload: bytes) -> bytes:
        path = self.real(node, cstr(payload)[0])
        os.rmdir(self.full(path))
        self.forget_path(path)
        return b""

    def rename(self, node: int, payload: bytes, start: int = 8) -> bytes:
        (newdir,) = struct.unpack_from("<Q", payload)
        old, after = cstr(payload, start)
        new, _ = cstr(payload, after)
        old_path, new_path = self.real(node, old), self.real(newdir, new)
        os.rename(self.full(old_path), self.full(new_path))
        self.move(old_path, new_path)
        return b""

    def rename2(self, node: int, payload: bytes) -> bytes:
        _newdir, flags = struct.unpack_from("<QI", payload)
        if flags:
            raise Reply(errno.EINVAL)
        return self.rename(node, payload, 16)

    def _open_backing(self, path: str, flags: int, create_mode: int | None = None) -> int:
        # Every handle may serve the kernel's reads and writebacks: open read-write when the
        # caller asked for any writing, never with O_APPEND (writes come with their offset).
        keep = flags & ~(os.O_ACCMODE | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_TRUNC
                         | os.O_NOCTTY | os.O_DIRECT)
        access = os.O_RDONLY if flags & os.O_ACCMODE == os.O_RDONLY else os.O_RDWR
        if create_mode is not None:
            keep |= os.O_CREAT | (flags & (os.O_EXCL | os.O_TRUNC))
            return os.open(self.full(path), access | keep | os.O_CLOEXEC, create_mode)
        return os.open(self.full(path), access | keep | os.O_CLOEXEC)

    def open(self, node: int, payload: bytes) -> bytes:
        (flags,) = struct.unpack_from("<I", payload)
        fd = self._open_backing(self.real(node), flags)
        return OPEN_OUT.pack(self.new_handle(Handle(fd)), 0, 0)

    def create(self, node: int, payload: bytes) -> bytes:
        flags, mode, umask, _ = struct.unpack_from("<IIII", payload)
        name, _ = cstr(payload, 16)
        path = self.real(node, name)
        fd = self._open_backing(path, flags, stat.S_IMODE(mode) & ~umask)
        try:
            entry = self.entry(path)
        except OSError:
            os.close(fd)
            raise
        return entry + OPEN_OUT.pack(self.new_handle(Handle(fd)), 0, 0)

    def read(self, node: int, payload: bytes) -> bytes:
        fh, offset, size, _ = READ_IN.unpack_from(payload)
        return os.pread(self.fd_of(fh), size, offset)

    def write(self, node: int, payload: bytes) -> bytes:
        fh, offset, size, _ = READ_IN.unpack_from(payload)
        data = payload[RW_IN_SIZE:RW_IN_SIZE + size]
        fd = self.fd_of(fh)
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
        return struct.pack("<II", done, 0)

    def statfs(self, node: int, payload: bytes) -> bytes:
        s = os.statvfs(self.backing)
        return struct.pack("<QQQQQIII4x24x", s.f_blocks, s.f_bfree, s.f_bavail, s.f_files,
                           s.f_ffree, s.f_bsize, s.f_namemax, s.f_frsize)

    def release(self, node: int, payload: bytes) -> bytes:
        (fh,) = struct.unpack_from("<Q", payload)
        handle = self.handles.pop(fh, None)
        if handle is not None:
            os.close(handle.fd)
        return b""

    def flush(self, node: int, payload: bytes) -> bytes:
        return b""

    def access(self, node: int, payload: bytes) -> bytes:
        (mask,) = struct.unpack_from("<I", payload)
        if not os.access(self.full(self.real(node)), mask):
            raise Reply(errno.EACCES)
        return b""

    def opendir(self, node: int, payload: bytes) -> bytes:
        path = self.real(node)
        fd = os.open(self.full(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        names = [(".", node, stat.S_IFDIR), ("..", ROOT, stat.S_IFDIR)]
        try:
            with os.scandir(self.full(path)) as it:
                for e in it:
                    kind = stat.S_IFMT(e.stat(follow_symlinks=False).st_mode)
                    names.append((e.name, e.inode(), kind))
        except OSError:
            os.close(fd)
            raise
        return OPEN_OUT.pack(self.new_handle(Handle(fd, names)), 0, 0)

    def readdir(self, node: int, payload: bytes) -> bytes:
        fh, offset, size, _ = READ_IN.unpack_from(payload)
        handle = self.handles.get(fh)
        if handle is None or handle.names is None:
            raise Reply(errno.EBADF)
        out = bytearray()
        for i in range(offset, len(handle.names)):
            name, ino, kind = handle.names[i]
            raw = os.fsencode(name)
            record = DIRENT.pack(ino, i + 1, len(raw), kind >> 12) + raw
            record += b"\0" * (-len(record) % 8)
            if len(out) + len(record) > size:
                break
            out += record
        return bytes(out)

    def fsync(self, unique: int, payload: bytes) -> None:
        """Sync the backing file now; answer `fsync_delay` seconds later."""
        fh, flags = struct.unpack_from("<QI", payload)
        try:
            fd = self.fd_of(fh)
            (os.fdatasync if flags & FSYNC_DATASYNC else os.fsync)(fd)
        except Reply as e:
            self.send(unique, -e.err, b"")
            return
        except OSError as e:
            self.send(unique, -(e.errno or errno.EIO), b"")
            return
        heapq.heappush(self.due, (time.monotonic() + self.fsync_delay, unique))

    # --- the loop ------------------------------------------------------------------------

    def send(self, unique: int, error: int, body: bytes) -> None:
        with contextlib.suppress(OSError):  # the caller was interrupted, or the mount is gone
            os.write(self.fuse_fd, OUT_HEADER.pack(OUT_HEADER.size + len(body), error, unique)
                     + body)

    def answer_due(self) -> float | None:
        """Send the held-back fsync replies whose time has come; seconds to the next one."""
        while self.due:
            at, unique = self.due[0]
            left = at - time.monotonic()
            if left > 0:
                return left
            heapq.heappop(self.due)
            self.send(unique, 0, b"")
        return None

    def serve_one(self, data: bytes) -> bool:
        """Serve one request; False once the file system is being torn down."""
        header: tuple[int, ...] = IN_HEADER.unpack_from(data)
        opcode, unique, node = header[1], header[2], header[3]
        payload = data[IN_HEADER.size:]
        if opcode in NO_REPLY:
            return True
        if opcode in (FSYNC, FSYNCDIR):
            self.fsync(unique, payload)
            return True
        handler = self.handlers.get(opcode)
        if handler is None:
            self.send(unique, -errno.ENOSYS, b"")
            return True
        try:
            body = handler(node, payload)
        except Reply as e:
            self.send(unique, -e.err, b"")
        except OSError as e:
            self.send(unique, -(e.errno or errno.EIO), b"")
        else:
            self.send(unique, 0, body)
        return opcode != DESTROY

    def serve(self) -> None:
        while True:
            timeout = self.answer_due()
            ready, _, _ = select.select([self.fuse_fd], [], [], timeout)
            if not ready:
                continue
            try:
                data = os.read(self.fuse_fd, (1 << 17) + 4096)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                    continue
                return  # ENODEV: unmounted or aborted
            if not self.serve_one(data):
                return


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fsync-delay", type=float, default=0.002, metavar="SECONDS")
    parser.add_argument("backing")
    parser.add_argument("mountpoint")
    args = parser.parse_args(argv[1:])
    backing = os.path.abspath(args.backing)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    libc = ctypes.CDLL(None, use_errno=True)
    options = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
    if libc.mount(backing.encode(), args.mountpoint.encode(), b"fuse.slowfs", 0, options) != 0:
        err = ctypes.get_errno()
        print(f"slowfs: mount failed: {os.strerror(err)}", file=sys.stderr)
        return 32
    print("ready", flush=True)
    PassFs(fd, backing, args.fsync_delay).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
