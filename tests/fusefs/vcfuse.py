#!/usr/bin/env python3
"""vcfuse: a tiny FUSE file system, spoken straight to /dev/fuse, that fails on command.

    mount -t fuse '/path/vcfuse.py#CTL' MOUNTPOINT

mount.fuse runs `vcfuse.py CTL MOUNTPOINT -o OPTS`; this mounts (fstype fuse.vcfuse, source
CTL), forks a server and exits 0 once the mount is there. The server serves an empty root
directory and, before answering each request, reads CTL/mode:

- `serve` (or no file): answer;
- `hang`: read requests and never answer them until the mode changes (callers then sleep
  uninterruptibly: the trap of TESTING.md);
- `eio`: answer every request but INIT with EIO.

The server writes its pid to CTL/pid and exits when the connection goes (unmount, abort).
Only the standard library: it runs under the system python3 as well as in the venv.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import stat
import struct
import sys
import time

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique

LOOKUP, FORGET, GETATTR, STATFS, INIT, OPENDIR, READDIR, RELEASEDIR = 1, 2, 3, 17, 26, 27, 28, 29
INTERRUPT, DESTROY, BATCH_FORGET = 36, 38, 42
NO_REPLY = {FORGET, INTERRUPT, BATCH_FORGET}


def attr(ino: int, mode: int) -> bytes:
    now = int(time.time())
    # ino size blocks atime mtime ctime atimens mtimens ctimens mode nlink uid gid rdev blksize
    # flags
    return struct.pack("<QQQQQQIIIIIIIIII", ino, 0, 0, now, now, now, 0, 0, 0, mode, 2, 0, 0,
                       0, 4096, 0)


def reply_for(opcode: int, payload: bytes) -> tuple[int, bytes]:
    if opcode == INIT:
        _major, minor, readahead, _flags = struct.unpack_from("<IIII", payload)
        body = struct.pack("<IIIIHHIIHHI28x", 7, min(minor, 31), readahead, 0, 16, 12, 131072,
                           1, 0, 0, 0)
        return 0, body
    if opcode == GETATTR:
        return 0, struct.pack("<QII", 0, 0, 0) + attr(1, stat.S_IFDIR | 0o755)
    if opcode == STATFS:
        return 0, struct.pack("<QQQQQIII4x24x", 1024, 512, 512, 100, 50, 4096, 255, 4096)
    if opcode == LOOKUP:
        return -errno.ENOENT, b""
    if opcode == OPENDIR:
        return 0, struct.pack("<QII", 1, 0, 0)
    if opcode in (READDIR, RELEASEDIR, DESTROY):
        return 0, b""
    return -errno.ENOSYS, b""


def mode(ctl: str) -> str:
    try:
        with open(os.path.join(ctl, "mode")) as f:
            return f.read().strip() or "serve"
    except FileNotFoundError:
        return "serve"


def send(fd: int, unique: int, error: int, body: bytes) -> None:
    with contextlib.suppress(OSError):  # the caller was interrupted, or the mount is gone
        os.write(fd, OUT_HEADER.pack(OUT_HEADER.size + len(body), error, unique) + body)


def serve(fd: int, ctl: str) -> None:
    held: list[tuple[int, int, bytes]] = []
    while True:
        current = mode(ctl)
        if held and current != "hang":
            for unique, opcode, payload in held:
                error, body = (-errno.EIO, b"") if current == "eio" else reply_for(opcode,
                                                                                    payload)
                send(fd, unique, error, body)
            held.clear()
        ready, _, _ = select.select([fd], [], [], 0.1)
        if not ready:
            continue
        try:
            data = os.read(fd, (1 << 17) + 4096)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                continue
            return  # ENODEV: unmounted or aborted
        _len, opcode, unique, _node, *_ = IN_HEADER.unpack_from(data)
        payload = data[IN_HEADER.size:]
        if opcode in NO_REPLY:
            continue
        current = mode(ctl)
        if opcode != INIT and current == "hang":
            held.append((unique, opcode, payload))
            continue
        if opcode != INIT and current == "eio":
            send(fd, unique, -errno.EIO, b"")
            continue
        error, body = reply_for(opcode, payload)
        send(fd, unique, error, body)
        if opcode == DESTROY:
            return


def main(argv: list[str]) -> int:
    ctl, mountpoint = argv[1], argv[2]
    fd = os.open("/dev/fuse", os.O_RDWR)
    libc = ctypes.CDLL(None, use_errno=True)
    options = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
    if libc.mount(ctl.encode(), mountpoint.encode(), b"fuse.vcfuse", 0, options) != 0:
        err = ctypes.get_errno()
        print(f"vcfuse: mount failed: {os.strerror(err)}", file=sys.stderr)
        return 32
    if os.fork():
        return 0
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    log = os.open(os.path.join(ctl, "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for std, target in ((0, null), (1, null), (2, log)):
        os.dup2(target, std)
    with open(os.path.join(ctl, "pid"), "w") as f:
        f.write(f"{os.getpid()}\n")
    serve(fd, ctl)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
