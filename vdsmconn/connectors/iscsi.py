"""iscsi: sessions of the kernel initiator through iscsiadm, one per path (iface/netdev).

- connect: node setup serial (iface created if missing and bound to its network device, a
  conflicting binding is 473; node record with the tpgt, `node.startup=manual`, a short
  initial login retry, CHAP), logins in parallel up to `iscsi.parallel_logins`; a failed login
  deletes the node record it created. Some paths up: `degraded`; none: the best error.
- present: the kernel's sessions read from sysfs (never blocks), one status per path; a path
  is down when its session is missing or not LOGGED_IN, its network link is down, or a disk
  of its session did not answer the last read (until a read through it answers again).
- probe: missing paths whose link is up are logged in again; a session FAILED for longer than
  `probe_timeout` is logged out and in again; every logged-in path's disks must answer a
  direct read within `probe_timeout` (all read at once, at most one thread per disk however
  long a read hangs: the host's `Probes`). A disk that fails is 481, one that hangs 481 and
  stuck; some paths down is `degraded`, all down fails the probe. Connect reads them too.
- disconnect: a session is logged out only when no key uses it; its node record deleted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from typing import Any

from vdsmconn import errors
from vdsmconn.connectors import iscsi_discovery
from vdsmconn.connectors.base import Connected, Connector, HostContext, StepLog
from vdsmconn.connectors.iscsi_paths import (
    DEFAULT_IFACE,
    DiskReader,
    best_error,
    netdev_up,
    node_portal,
    plan_paths,
    session_of,
    session_ref,
)
from vdsmconn.host import iscsi_parse
from vdsmconn.host.iscsi_parse import Session
from vdsmconn.host.iscsiadm import Iscsiadm
from vdsmconn.host.rpfilter import PROC_CONF, RpFilter
from vdsmconn.model import ConnectionKey, IscsiSpec
from vdsmconn.state.actual import DOWN, UP, IscsiPath, IscsiState, PathPlan

log = logging.getLogger(__name__)

SCAN_WAIT = 5.0  # seconds a connect waits for the disks of new sessions to appear


class IscsiConnector(Connector[IscsiSpec]):
    def __init__(self, host: HostContext) -> None:
        super().__init__(host)
        cfg = host.settings.iscsi
        self.sysfs = cfg.sysfs_root
        # A test tree given as sysfs_root holds the device nodes too (dev/).
        dev = "/dev" if self.sysfs == "/sys" else os.path.join(self.sysfs, "dev")
        self.disks = DiskReader(host.probes, host.settings.probe_timeout, dev,
                                host.clock)
        self.adm = Iscsiadm(host.runner, host.settings.command_timeout,
                            cfg.iscsiadm_command)
        self._logins: asyncio.Semaphore | None = None
        self._setup: asyncio.Lock | None = None
        # A test tree given as sysfs_root holds its rp_filter files too (proc-net-conf/).
        conf = PROC_CONF if self.sysfs == "/sys" else os.path.join(self.sysfs, "proc-net-conf")
        self.rp_filter = RpFilter(self.adm.runner, host.settings.command_timeout, conf,
                                  os.path.join(host.settings.run_dir, "rp_filter"))

    def available(self) -> str | None:
        if not os.path.exists(os.path.join(self.sysfs, "class", "iscsi_transport")) and \
                not _which(self.host.settings.iscsi.iscsiadm_command):
            return "iscsiadm is not installed (open-iscsi)"
        if os.path.exists(os.path.join(self.sysfs, "class", "iscsi_transport", "tcp")):
            return None
        return self.host.kernel.missing_module("iscsi_tcp", "iSCSI initiator transport")

    # --- helpers -----------------------------------------------------------------------

    @property
    def state(self) -> IscsiState:
        """Sessions, paths and who uses what: the host's, in the actual state."""
        return self.host.state.iscsi

    @property
    def logins(self) -> asyncio.Semaphore:
        if self._logins is None:
            self._logins = asyncio.Semaphore(self.host.settings.iscsi.parallel_logins)
        return self._logins

    @property
    def setup_lock(self) -> asyncio.Lock:
        if self._setup is None:
            self._setup = asyncio.Lock()
        return self._setup

    async def _resolve(self, spec: IscsiSpec) -> str:
        address = await iscsi_discovery.resolve(spec.connection,
                                           self.host.settings.probe_timeout)
        self.state.addresses[spec.key] = address
        return address

    def _address(self, spec: IscsiSpec) -> str:
        return self.state.addresses.get(spec.key, spec.connection)

    def _sessions(self) -> list[Session]:
        return iscsi_parse.read_sessions(self.sysfs)

    def _statuses(self, spec: IscsiSpec, plans: list[PathPlan]) -> dict[str, IscsiPath]:
        old = self.state.paths.get(spec.key, {})
        new = {p.iface: old.get(p.iface) or IscsiPath(p.iface, p.netdev) for p in plans}
        self.state.paths[spec.key] = new
        return new

    def _use(self, spec: IscsiSpec, address: str, iface: str) -> None:
        self.state.users.setdefault(session_ref(spec, address, iface), set()).add(spec.key)

    def users(self, spec: IscsiSpec, iface: str) -> set[ConnectionKey]:
        """The keys using the session of `spec` through `iface`."""
        return set(self.state.users.get(session_ref(spec, self._address(spec), iface), ()))

    def keys_on(self, netdev: str) -> list[ConnectionKey]:
        """Keys with a path through `netdev` (to wake on its link events)."""
        return [key for key, plans in self.state.plans.items()
                if any(p.netdev == netdev for p in plans)]

    # --- connect -------------------------------------------------------------------------

    async def connect(self, spec: IscsiSpec) -> Connected:
        """Node setup and logins; `settle` then waits for the disks and reads them."""
        address = await self._resolve(spec)
        plans = plan_paths(spec, self.sysfs)
        self.state.plans[spec.key] = plans
        statuses = self._statuses(spec, plans)
        sessions = self._sessions()
        todo = [p for p in plans if not _up(session_of(sessions, spec, address, p.iface))]
        await self._bring_up(spec, address, todo, statuses)
        return self.present(spec) or Connected()

    async def settle(self, spec: IscsiSpec, found: Connected) -> Connected:
        """Once the kernel has scanned the LUNs of new sessions, every path's disks must
        answer a read; no path up is the best error of the paths."""
        address = self._address(spec)
        plans = self.state.plans.get(spec.key) or plan_paths(spec, self.sysfs)
        statuses = self._statuses(spec, plans)
        now = await self._scanned(spec)
        if now is not None:
            await self._check_paths(spec, address, plans, statuses)
            now = self.present(spec)
        if now is None or not any(s.state == UP for s in statuses.values()):
            failures = [s.last_error for s in statuses.values() if s.last_error is not None]
            raise best_error(failures) if failures else errors.IscsiSetupError(
                f"no session to {spec.iqn} at {spec.portal} after login")
        return now

    async def _scanned(self, spec: IscsiSpec) -> Connected | None:
        """What is present once the kernel has scanned the LUNs of the new sessions (it does
        so after the login returns: a udev event tells), or after SCAN_WAIT seconds (a
        target may have none)."""
        clock = self.host.clock
        deadline = clock.monotonic() + SCAN_WAIT
        while True:
            found = self.present(spec)
            left = deadline - clock.monotonic()
            if found is None or any(p.devices for p in found.paths or ()) or left <= 0:
                return found  # a down path's disks count: they are there
            await self.host.devices.wait(clock, left)

    async def _bring_up(self, spec: IscsiSpec, address: str, plans: list[PathPlan],
                        statuses: dict[str, IscsiPath]) -> None:
        """Node setup one path at a time, then the logins in parallel (bounded)."""
        ready: list[tuple[PathPlan, bool]] = []
        async with self.setup_lock:
            for plan in plans:
                if (spec.key, plan.iface) in self.state.set_up:  # a relogin: the login at once
                    ready.append((plan, False))
                    continue
                try:
                    ready.append((plan, await self._setup_node(spec, address, plan)))
                except errors.Error as e:
                    log.warning("ISCSI key=%s iface=%s setup failed: %s", spec.key, plan.iface,
                                e.message)
                    statuses[plan.iface].fail(e, self.host.clock.time())
        await asyncio.gather(*(self._login(spec, address, plan, created, statuses[plan.iface])
                               for plan, created in ready))

    async def _setup_node(self, spec: IscsiSpec, address: str, plan: PathPlan) -> bool:
        """Iface and node record ready for login; True if the node record was created."""
        if plan.iface != DEFAULT_IFACE:
            await self._ensure_iface(spec, plan)
        if plan.netdev is not None:
            await self.rp_filter.loosen(plan.netdev, address)
        portal = node_portal(spec, address)
        created = not await self.adm.node_exists(spec.iqn, portal, plan.iface)
        if created:
            await self.adm.node_new(spec.iqn, portal, plan.iface)
        try:
            cfg = self.host.settings.iscsi
            settings: list[tuple[str, Any]] = [
                ("node.startup", "manual"),
                ("node.session.initial_login_retry_max", str(cfg.login_retries)),
                ("node.conn[0].timeo.login_timeout", str(cfg.login_timeout)),
            ]
            if spec.user is not None and spec.password is not None:
                settings += [("node.session.auth.authmethod", "CHAP"),
                             ("node.session.auth.username", spec.user),
                             ("node.session.auth.password", spec.password)]
                if spec.user_in is not None and spec.password_in is not None:
                    settings += [("node.session.auth.username_in", spec.user_in),
                                 ("node.session.auth.password_in", spec.password_in)]
            else:
                settings.append(("node.session.auth.authmethod", "None"))
            for name, value in settings:
                await self.adm.node_update(spec.iqn, portal, plan.iface, name, value)
        except errors.Error:
            if created:
                await self._delete_node(spec, portal, plan.iface)
            raise
        return created

    async def _ensure_iface(self, spec: IscsiSpec, plan: PathPlan) -> None:
        """The iface exists and is bound to `plan.netdev`; never rebind an existing one."""
        ifaces = {i.name: i for i in await self.adm.iface_list()}
        existing = ifaces.get(plan.iface)
        if existing is None:
            await self.adm.iface_new(plan.iface)
            try:
                if plan.netdev is not None:
                    await self.adm.iface_update(plan.iface, "iface.net_ifacename", plan.netdev)
                if spec.initiatorName is not None:
                    await self.adm.iface_update(plan.iface, "iface.initiatorname",
                                                spec.initiatorName)
            except errors.Error:
                await self.adm.iface_delete(plan.iface)
                raise
            log.info("ISCSI iface=%s created netdev=%s", plan.iface, plan.netdev)
            return
        if plan.netdev is not None and existing.net_ifacename != plan.netdev:
            raise errors.IscsiIfaceError(
                f"iface {plan.iface} is bound to {existing.net_ifacename or 'no interface'}, "
                f"not {plan.netdev}; not rebinding it", {"iface": plan.iface})
        if spec.initiatorName is not None and existing.initiatorname != spec.initiatorName:
            raise errors.IscsiIfaceError(
                f"iface {plan.iface} logs in as {existing.initiatorname or 'the host'}, not "
                f"{spec.initiatorName}; not changing it", {"iface": plan.iface})

    async def _login(self, spec: IscsiSpec, address: str, plan: PathPlan, created: bool,
                     status: IscsiPath) -> None:
        portal = node_portal(spec, address)
        try:
            async with self.logins:
                await self.adm.login(spec.iqn, portal, plan.iface)
        except errors.Error as e:
            log.warning("LOGIN key=%s iface=%s failed code=%s: %s", spec.key, plan.iface, e.code,
                        e.message)
            status.fail(e, self.host.clock.time())
            self.state.set_up.discard((spec.key, plan.iface))  # set it up again next time
            if created:
                await self._delete_node(spec, portal, plan.iface)
            return
        status.state, status.last_error = UP, None
        self.state.set_up.add((spec.key, plan.iface))
        self._use(spec, address, plan.iface)
        log.info("LOGIN key=%s iface=%s netdev=%s", spec.key, plan.iface, plan.netdev)

    async def _delete_node(self, spec: IscsiSpec, portal: str, iface: str) -> None:
        try:
            await self.adm.node_delete(spec.iqn, portal, iface)
        except errors.Error as e:
            log.warning("ISCSI node %s %s iface=%s not deleted: %s", spec.iqn, portal, iface,
                        e.message)

    # --- what the host shows ---------------------------------------------------------------

    def present(self, spec: IscsiSpec) -> Connected | None:
        address = self._address(spec)
        plans = self.state.plans.get(spec.key) or plan_paths(spec, self.sysfs)
        sessions = self._sessions()
        statuses = self._statuses(spec, plans)
        found = False
        for plan in plans:
            s = session_of(sessions, spec, address, plan.iface)
            status = statuses[plan.iface]
            status.session = s.sid if s else None
            status.devices = s.disks if s else ()
            if s is not None:
                found = True
                self._use(spec, address, plan.iface)
            status.state = UP if (s is not None and s.logged_in and status.usable(s.sid)
                                  and netdev_up(plan.netdev, self.sysfs)) else DOWN
        if not found:
            return None
        self.state.plans.setdefault(spec.key, plans)
        paths = tuple(statuses[p.iface].snapshot() for p in plans)
        devices = [d for p in paths if p.up for d in p.devices]
        return Connected(path=devices[0] if devices else None, paths=paths,
                         degraded=any(p.state == DOWN for p in paths))

    async def probe(self, spec: IscsiSpec) -> None:
        address = self._address(spec)
        plans = self.state.plans.get(spec.key) or plan_paths(spec, self.sysfs)
        self.state.plans[spec.key] = plans
        statuses = self._statuses(spec, plans)
        sessions = self._sessions()
        relogin: list[PathPlan] = []
        now = self.host.clock.monotonic()
        timeout = self.host.settings.probe_timeout
        for plan in plans:
            s = session_of(sessions, spec, address, plan.iface)
            ref = session_ref(spec, address, plan.iface)
            if s is not None and not s.logged_in:
                since = self.state.failed_since.setdefault(ref, now)
                if now - since > timeout and netdev_up(plan.netdev, self.sysfs):
                    log.warning("ISCSI key=%s iface=%s session %d %s for %.0fs: logging in "
                                "again", spec.key, plan.iface, s.sid, s.state, now - since)
                    await self._logout(spec, address, plan.iface)
                    relogin.append(plan)
                continue
            self.state.failed_since.pop(ref, None)
            if s is None and netdev_up(plan.netdev, self.sysfs):
                relogin.append(plan)
        if relogin:
            await self._bring_up(spec, address, relogin, statuses)
        await self._check_paths(spec, address, plans, statuses)
        if self.present(spec) is None or not any(s.state == UP for s in statuses.values()):
            failures = [s.last_error for s in statuses.values() if s.last_error is not None]
            raise best_error(failures) if failures else errors.IscsiSetupError(
                f"no path to {spec.iqn} at {spec.portal} is up")

    async def _check_paths(self, spec: IscsiSpec, address: str, plans: list[PathPlan],
                           statuses: dict[str, IscsiPath]) -> None:
        """A direct read of every disk of every logged-in path whose link is up, all at once
        (a path whose link is down is left: a read through it would wait for the session)."""
        sessions = self._sessions()
        checks = []
        for plan in plans:
            s = session_of(sessions, spec, address, plan.iface)
            if s is not None and s.logged_in and netdev_up(plan.netdev, self.sysfs):
                checks.append(self.disks.check(s, statuses[plan.iface]))
        await asyncio.gather(*checks)

    # --- disconnect ----------------------------------------------------------------------

    async def disconnect(self, spec: IscsiSpec, force: bool = False) -> None:
        """`force` (recovery of a broken key) logs nothing out: sessions in recovery are
        iscsid's to reconnect (dm-multipath queues meanwhile), a session FAILED for too long
        was already logged out by the probe; the connect that follows logs in what is
        missing."""
        if force:
            log.info("ISCSI key=%s recovery: sessions left to iscsid, missing paths next",
                     spec.key)
            return
        address = self._address(spec)
        plans = self.state.plans.get(spec.key) or plan_paths(spec, self.sysfs)
        failures: list[errors.Error] = []
        statuses = self._statuses(spec, plans)
        sessions = self._sessions()
        for plan in plans:
            ref = session_ref(spec, address, plan.iface)
            users = self.state.users.get(ref, set())
            users.discard(spec.key)
            if users:
                log.info("ISCSI key=%s iface=%s session kept: used by %s", spec.key,
                         plan.iface, ",".join(sorted(str(k) for k in users)))
                continue
            try:
                if session_of(sessions, spec, address, plan.iface) is not None:
                    await self._logout(spec, address, plan.iface)
            except errors.Error as e:
                statuses[plan.iface].fail(e, self.host.clock.time())
                users.add(spec.key)  # still ours: a retry logs it out
                failures.append(e)
                continue
            self.state.users.pop(ref, None)
            # Without the tpgt: the records of every key that shared this session go too.
            await self._delete_node(spec, node_portal(spec, address, tpgt=False), plan.iface)
        if failures:
            if isinstance(failures[0], errors.Timeout):
                raise failures[0]  # a deadline is 480, whichever command ran past it
            raise errors.IscsiLogoutError(failures[0].message, failures[0].data)
        self.state.forget(spec.key)
        in_use = self.state.netdevs_in_use()
        for plan in plans:
            if plan.netdev is not None and plan.netdev not in in_use:
                self.rp_filter.restore(plan.netdev)

    async def _logout(self, spec: IscsiSpec, address: str, iface: str) -> None:
        if await self.adm.logout(spec.iqn, node_portal(spec, address, tpgt=False), iface):
            log.info("LOGOUT key=%s iface=%s", spec.key, iface)
        self.state.failed_since.pop(session_ref(spec, address, iface), None)

    # --- events and the rest ------------------------------------------------------------

    def link_changed(self, netdev: str, up: bool) -> list[ConnectionKey]:
        """A network link went up or down: mark its paths, return the keys to wake."""
        keys = self.keys_on(netdev)
        for key in keys:
            status = self.state.paths.get(key, {}).get(netdev)
            if status is not None and not up:
                status.state = DOWN
        if keys:
            log.info("LINK netdev=%s %s keys=%s", netdev, "up" if up else "down",
                     ",".join(str(k) for k in keys))
        return keys

    def unmanaged(self, managed: list[IscsiSpec]) -> list[Session]:
        """Sessions on the host that no managed connection uses (listed, never touched)."""
        used = {session_ref(s, self._address(s), p.iface)
                for s in managed for p in self.state.plans.get(s.key) or plan_paths(s, self.sysfs)}
        return [s for s in self._sessions()
                if (s.iqn, s.address.lower(), s.port, s.iface) not in used]

    async def test(self, spec: IscsiSpec, timeout: float) -> StepLog:
        return await iscsi_discovery.ConnectivityTest(
            spec, timeout, self.host.runner, self.host.settings.iscsi.inq_command,
            self.host.clock).run()


def _up(session: Session | None) -> bool:
    return session is not None and session.logged_in


def _which(command: str) -> bool:
    return shutil.which(command) is not None
