"""The paths of an iSCSI connection: which iscsiadm iface and network device each one uses,
how a path's session is found, and what the status shows of it.

An iSCSI bond (`netIfaceNames`) is one path per network interface, each through an iface of
the same name bound with `iface.net_ifacename`; interfaces missing on this host are skipped,
and when none is present the default iface is used. `netIfaceName` is one such path;
`ifaceName` names the iface to use (bound to `netIfaceName` when that is given too). A path
that would use the default iface but must log in as another `initiatorName` uses an iface of
its own instead, named after that initiator name.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import mmap
import os

from vdsmconn import errors
from vdsmconn.clock import Clock
from vdsmconn.host.address import join, same_host, unbracket
from vdsmconn.host.iscsi_parse import Session
from vdsmconn.host.probe import Probes
from vdsmconn.model import IscsiSpec
from vdsmconn.state.actual import IscsiPath, PathPlan, SessionRef

log = logging.getLogger(__name__)

DEFAULT_IFACE = "default"
LINK_DOWN_STATES = ("down", "lowerlayerdown", "notpresent", "dormant")


def netdev_exists(name: str, sysfs: str) -> bool:
    return os.path.exists(os.path.join(sysfs, "class", "net", name))


def netdev_up(name: str | None, sysfs: str) -> bool:
    """Whether a path's network device can carry traffic (the default iface: assumed)."""
    if name is None:
        return True
    try:
        with open(os.path.join(sysfs, "class", "net", name, "operstate")) as f:
            state = f.read().strip()
    except OSError:
        return False
    return state not in LINK_DOWN_STATES


def initiator_iface(initiator: str) -> str:
    """The iface of paths through no particular interface that log in as `initiator`."""
    return "vdsmconn-" + hashlib.sha256(initiator.encode()).hexdigest()[:12]


def plan_paths(spec: IscsiSpec, sysfs: str) -> list[PathPlan]:
    default = PathPlan(initiator_iface(spec.initiatorName) if spec.initiatorName
                       else DEFAULT_IFACE)
    if spec.netIfaceNames:
        present = [n for n in spec.netIfaceNames if netdev_exists(n, sysfs)]
        missing = [n for n in spec.netIfaceNames if n not in present]
        if missing:
            log.info("ISCSI key=%s interfaces not on this host, skipped: %s", spec.key,
                     ",".join(missing))
        if not present:
            return [default]
        return [PathPlan(n, n) for n in present]
    if spec.ifaceName:
        return [PathPlan(spec.ifaceName, spec.netIfaceName)]
    if spec.netIfaceName:
        if netdev_exists(spec.netIfaceName, sysfs):
            return [PathPlan(spec.netIfaceName, spec.netIfaceName)]
        log.info("ISCSI key=%s interface %s not on this host, default iface used", spec.key,
                 spec.netIfaceName)
    return [default]


def node_portal(spec: IscsiSpec, address: str, tpgt: bool = True) -> str:
    """The `-p` of the node record: `ip:port,tpgt`, or `ip:port` when any tpgt will do
    (or `tpgt=False`: logout and delete match the portal whatever its tpgt)."""
    portal = join(address, spec.port)
    return portal if spec.tpgt is None or not tpgt else f"{portal},{spec.tpgt}"


def session_of(sessions: list[Session], spec: IscsiSpec, address: str,
               iface: str) -> Session | None:
    """The session of one path; a logged-in one first if there are several."""
    found = [
        s for s in sessions
        if s.iqn == spec.iqn and same_host(s.address, address) and s.port == spec.port
        and (spec.tpgt is None or s.tpgt == spec.tpgt) and s.iface == iface
    ]
    found.sort(key=lambda s: not s.logged_in)
    return found[0] if found else None


def session_ref(spec: IscsiSpec, address: str, iface: str) -> SessionRef:
    return (spec.iqn, unbracket(address).lower(), spec.port, iface)


def best_error(failures: list[errors.Error]) -> errors.Error:
    """The error to report when every path failed: CHAP and iface problems say the most."""
    for kind in (errors.IscsiAuthError, errors.IscsiIfaceError):
        for e in failures:
            if isinstance(e, kind):
                return e
    return failures[0]


class DiskReader:
    """Whether a path answers: a direct read of the first block of each disk of its session,
    in a probe thread (at most one per disk, however long a read hangs). A disk that fails
    is 481; one that does not answer within the probe timeout 481 too, as a hung one."""

    def __init__(self, probes: Probes, timeout: float, dev: str = "/dev",
                 clock: Clock | None = None) -> None:
        self.probes = probes
        self.timeout = timeout
        self.dev = dev
        self.clock = clock or Clock()

    async def check(self, session: Session, status: IscsiPath) -> None:
        """Read every disk of `session` at once; the path is down while one does not answer."""
        if not session.disks:
            return
        failures = [e for e in await asyncio.gather(*(self.read(d) for d in session.disks))
                    if e is not None]
        if failures:
            if status.usable(session.sid):
                log.warning("ISCSI session %d iface=%s path down: %s", session.sid,
                            status.iface, failures[0].message)
            status.not_answering(session.sid, failures[0], self.clock.time())
        else:
            if not status.usable(session.sid):
                log.info("ISCSI session %d iface=%s path answers again", session.sid,
                         status.iface)
            status.answered(session.sid)

    async def read(self, disk: str) -> errors.Error | None:
        """Read the first block of `disk`: None if it answered, else what went wrong."""
        path, shown = os.path.join(self.dev, disk), f"/dev/{disk}"
        try:
            await self.probes.run(path, functools.partial(read_first_block, path),
                                  f"reading {shown}", self.timeout)
        except errors.Timeout as e:
            return errors.MountHung(f"{shown} does not answer: {e.message}", {"device": shown})
        except OSError as e:
            return errors.StaleMount(f"{shown} does not answer: {e.strerror or e}",
                                     {"device": shown, "errno": e.errno})
        return None


def read_first_block(path: str) -> None:
    """Blocking: one direct read of the first 4 KiB (page cache bypassed: the device must
    answer)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with mmap.mmap(-1, 4096) as buf:
            os.readv(fd, [buf])
    finally:
        os.close(fd)
