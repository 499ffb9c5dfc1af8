"""Run a mount helper inside a transient systemd scope, so FUSE daemons outlive us (SPEC 6, 8).

A FUSE mount helper (mount.glusterfs, sshfs...) leaves a daemon process behind that serves
the mount. Started from vdsmconnd it would sit in vdsmconnd's cgroup, and `systemctl restart
vdsmconn` would kill it and break the mount. So, when systemd is PID 1, the helper is moved
into a transient scope unit of its own (`StartTransientUnit` on org.freedesktop.systemd1
over the system bus, with dbus-fast) *before* it runs:

1. the runner starts a tiny shell gate that writes its pid to a FIFO and waits on another;
2. the scope is created with that pid, and we wait for systemd's `JobRemoved` of the job;
3. the gate is told to go and execs the real command, now inside the scope, so every
   process it forks is in the scope too.

If the scope cannot be created the command still runs (a warning is logged): a mount that
does not survive a restart is better than no mount. When systemd is not PID 1 the command
runs plainly; `unavailable()` says why, for getHostInfo.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from vdsmconn.host.command import Arg, CommandRunner, Result

log = logging.getLogger(__name__)

SYSTEMD_RUNTIME = "/run/systemd/system"
BUS_NAME = "org.freedesktop.systemd1"
OBJECT_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT_EXISTS = "org.freedesktop.systemd1.UnitExists"
SCOPE_TIMEOUT = 10.0  # creating a scope is quick; a systemd that does not answer is not

# The gate: report our pid, wait for the word, become the command (same pid, in the scope).
_GATE = 'echo $$ >"$1" || exit 125; read -r go <"$2"; [ "$go" = go ] || exit 125; ' \
        'shift 2; exec "$@"'

_UNIT_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.")
_MAX_UNIT = 255


class ScopeError(Exception):
    """systemd refused or did not finish the scope; `name` is the D-Bus error name if any."""

    def __init__(self, message: str, name: str = "") -> None:
        super().__init__(message)
        self.name = name


def unavailable(runtime_dir: str = SYSTEMD_RUNTIME) -> str | None:
    """None if commands can run in transient scopes here, else why not (for getHostInfo)."""
    if not os.path.isdir(runtime_dir):
        return "systemd is not PID 1: FUSE mount helpers run in the daemon's own cgroup"
    try:
        import dbus_fast  # noqa: F401
    except ImportError:
        return "dbus-fast is not installed: FUSE mount helpers run in the daemon's own cgroup"
    return None


def describe(slice_: str) -> dict[str, Any]:
    """What getHostInfo shows: whether FUSE mount helpers get scopes, and in which slice."""
    reason = unavailable()
    return {"available": reason is None, "reason": reason, "slice": slice_}


def escape(path: str) -> str:
    """A path as `systemd-escape --path` writes it: `/a/b-c` -> `a-b\\x2dc`."""
    trimmed = "/".join(p for p in path.split("/") if p)
    if not trimmed:
        return "-"
    out = []
    for i, ch in enumerate(trimmed):
        if ch == "/":
            out.append("-")
        elif ch in _UNIT_SAFE and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def unit_name(mountpoint: str, prefix: str = "vdsmconn-mount") -> str:
    """`vdsmconn-mount-<escaped mount point>.scope`, shortened (keeping the end) if needed."""
    name = f"{prefix}-{escape(mountpoint)}"
    room = _MAX_UNIT - len(".scope")
    if len(name) > room:
        import hashlib

        digest = hashlib.sha256(mountpoint.encode()).hexdigest()[:16]
        name = f"{prefix}-{digest}-{name[-(room - len(prefix) - 18):]}"
    return f"{name}.scope"


async def start_scope(
    unit: str,
    pids: Sequence[int],
    slice_: str,
    description: str,
    *,
    bus_address: str | None = None,
    timeout: float = SCOPE_TIMEOUT,
) -> str:
    """Create transient scope `unit` holding `pids`; the job's result ("done") when finished.

    `bus_address` None means the system bus (DBUS_SYSTEM_BUS_ADDRESS or its default path).
    """
    from dbus_fast import BusType, Message, MessageType, Variant
    from dbus_fast.aio import MessageBus

    props = [
        ("PIDs", Variant("au", list(pids))),
        ("Slice", Variant("s", slice_)),
        ("Description", Variant("s", description)),
        ("CollectMode", Variant("s", "inactive-or-failed")),
    ]
    loop = asyncio.get_running_loop()
    removed: dict[str, asyncio.Future[str]] = {}

    def job(path: str) -> asyncio.Future[str]:
        return removed.setdefault(path, loop.create_future())

    def on_message(msg: Any) -> None:
        if (msg.message_type == MessageType.SIGNAL and msg.interface == MANAGER
                and msg.member == "JobRemoved" and len(msg.body) == 4):
            fut = job(str(msg.body[1]))
            if not fut.done():
                fut.set_result(str(msg.body[3]))

    async def call(member: str, signature: str = "", body: list[Any] | None = None,
                   destination: str = BUS_NAME, path: str = OBJECT_PATH,
                   interface: str = MANAGER) -> Any:
        reply = await bus.call(Message(destination=destination, path=path, interface=interface,
                                       member=member, signature=signature, body=body or []))
        if reply is None or reply.message_type == MessageType.ERROR:
            detail = reply.body[0] if reply is not None and reply.body else ""
            name = reply.error_name if reply is not None else "no reply"
            raise ScopeError(f"{member} failed: {name}: {detail}".rstrip(": "), name or "")
        return reply.body

    try:
        async with asyncio.timeout(timeout):
            bus = await MessageBus(bus_address=bus_address, bus_type=BusType.SYSTEM).connect()
    except Exception as e:  # OSError, timeout, dbus-fast's AuthError...: no scope, say why
        raise ScopeError(f"cannot connect to the system bus: {str(e) or type(e).__name__}") \
            from None
    try:
        async with asyncio.timeout(timeout):
            bus.add_message_handler(on_message)
            rule = (f"type='signal',sender='{BUS_NAME}',path='{OBJECT_PATH}',"
                    f"interface='{MANAGER}',member='JobRemoved'")
            await call("AddMatch", "s", [rule], "org.freedesktop.DBus", "/org/freedesktop/DBus",
                       "org.freedesktop.DBus")
            await call("Subscribe")
            body = await call("StartTransientUnit", "ssa(sv)a(sa(sv))",
                              [unit, "fail", props, []])
            result = await job(str(body[0]))
    except TimeoutError:
        raise ScopeError(f"systemd did not finish scope {unit} within {timeout:g} s") from None
    finally:
        bus.disconnect()
        with contextlib.suppress(Exception):
            await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
    if result != "done":
        raise ScopeError(f"scope {unit} job ended with result {result!r}")
    return result


async def run_in_scope(
    runner: CommandRunner,
    argv: Sequence[Arg],
    *,
    unit: str,
    slice_: str,
    description: str,
    timeout: float,
    bus_address: str | None = None,
) -> Result:
    """Run `argv` through `runner` as the first process of a new scope `unit` (see above)."""
    workdir = await asyncio.to_thread(tempfile.mkdtemp, prefix="vdsmconn-scope-")
    pid_fifo, go_fifo = os.path.join(workdir, "pid"), os.path.join(workdir, "go")
    for fifo in (pid_fifo, go_fifo):
        os.mkfifo(fifo, 0o600)
    # O_RDWR: neither open ever blocks, and neither end sees EOF while we hold it.
    pid_fd = os.open(pid_fifo, os.O_RDWR | os.O_NONBLOCK)
    go_fd = os.open(go_fifo, os.O_RDWR | os.O_NONBLOCK)
    started = time.monotonic()
    task = asyncio.ensure_future(runner.run(
        ["/bin/sh", "-c", _GATE, "vdsmconn-scope", pid_fifo, go_fifo, *argv], timeout=timeout
    ))
    word = b"no\n"
    try:
        pid = await _read_pid(pid_fd, task, timeout)
        if pid is not None:
            left = max(0.1, min(SCOPE_TIMEOUT, timeout - (time.monotonic() - started)))
            try:
                try:
                    await start_scope(unit, [pid], slice_, description,
                                      bus_address=bus_address, timeout=left)
                except ScopeError as e:
                    if e.name != UNIT_EXISTS:
                        raise
                    # The scope of an earlier mount still holds a process (one stuck in D
                    # state, say): this mount gets a scope of its own next to it.
                    unit = f"{unit.removesuffix('.scope')}-{pid}.scope"
                    await start_scope(unit, [pid], slice_, description,
                                      bus_address=bus_address, timeout=left)
                log.info("SCOPE unit=%s slice=%s pid=%d", unit, slice_, pid)
            except ScopeError as e:
                log.warning("SCOPE unit=%s failed, running outside a scope: %s", unit, e)
            word = b"go\n"
    finally:
        with contextlib.suppress(OSError):
            os.write(go_fd, word)
        try:
            result = await task
        finally:
            os.close(pid_fd)
            os.close(go_fd)
            await asyncio.to_thread(shutil.rmtree, workdir, True)
    return result


async def _read_pid(fd: int, task: asyncio.Future[Result], timeout: float) -> int | None:
    """The gate's pid, or None if the gate ended or did not write it in time (the task
    then tells why). Woken by the loop when the FIFO is readable, never polled."""
    loop = asyncio.get_running_loop()
    line = loop.create_future()
    data = b""

    def readable() -> None:
        nonlocal data
        try:
            data += os.read(fd, 64)
        except OSError as e:
            if e.errno != errno.EAGAIN and not line.done():
                line.set_exception(e)
            return
        if data.endswith(b"\n") and not line.done():
            try:
                line.set_result(int(data))
            except ValueError as e:
                line.set_exception(e)

    loop.add_reader(fd, readable)
    try:
        await asyncio.wait({line, task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_reader(fd)
    if line.done():
        pid: int = line.result()
        return pid
    line.cancel()
    return None
