"""Fixtures for tests that run inside the test guest (mark them ``@pytest.mark.guest``).

Registered for every test module by tests/guest/plugin.py.  They need the guest's real
kernel, systemd and servers, so they only work there; tests marked ``guest`` never set them
up on the host.

- ``guest_modules``: the kernel modules loaded (session).
- ``nfs_export``: nfs-kernel-server exporting a fresh directory (v3 and v4.x).
- ``iscsi_target``: factory of LIO targets (file-backed LUNs, optional CHAP, portals on
  127.0.0.1 or in a network namespace behind veth links); with ``dm=True`` each LUN is a
  device-mapper device that can be made to fail (``error`` table) or hang (suspended).
- ``bond``: an active-backup bonding device over veth links.
- ``multipath``: multipathd running with a test configuration.
- ``systemd_unit``: factory of transient units in /run/systemd/system.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.wait import until

MODULES = ("nfs", "nfsd", "iscsi_tcp", "target_core_mod", "iscsi_target_mod", "dm_multipath",
           "bonding")  # fmt: skip
NFS_ROOT = Path("/srv/vdsmconn-nfs")
EXPORTS = Path("/etc/exports.d/vdsmconn-test.exports")
NFS_CONF = Path("/etc/nfs.conf.d/vdsmconn-test.conf")
MULTIPATH_CONF = Path("/etc/multipath.conf")
LUN_ROOT = Path("/var/lib/vdsmconn-luns")
UNIT_DIR = Path("/run/systemd/system")
IQN_PREFIX = "iqn.2003-01.org.vdsmconn.test"

_serial = itertools.count(1)


def sh(
    *argv: str, check: bool = True, timeout: float = 60.0, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise with its output (so the test report shows it)."""
    proc = subprocess.run(
        argv, input=input, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited with {proc.returncode}\n"
            f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}"
        )
    return proc


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    until(predicate, what, timeout, interval=0.2)


def require_guest() -> None:
    if os.environ.get("VDSMCONN_IN_GUEST") != "1":
        pytest.fail("guest fixtures only work inside the test guest: mark the test 'guest'")


@pytest.fixture(scope="session")
def guest_modules() -> None:
    """The guest's baseline: kernel modules loaded (note -a: every name is a module),
    configfs, nfsd's and rpc_pipefs' file systems and /run/netns mounted.

    Session scoped, so it is set up before a test's function-scoped leak checks take their
    "before" picture: those mounts stay for the whole boot and are not a test's leak.
    """
    require_guest()
    sh("modprobe", "-a", *MODULES)
    if not os.path.ismount("/sys/kernel/config"):
        sh("mount", "-t", "configfs", "configfs", "/sys/kernel/config")
    sh("systemctl", "start", "proc-fs-nfsd.mount", "run-rpc_pipefs.mount", timeout=60)
    if not os.path.ismount("/run/netns"):  # `ip netns add` mounts it the first time
        sh("ip", "netns", "add", "vdsmconn-baseline")
        sh("ip", "netns", "del", "vdsmconn-baseline")


# --- NFS -------------------------------------------------------------------------------


@dataclass
class NfsExport:
    """A directory exported by nfs-kernel-server on 127.0.0.1 (NFSv3 and v4.x)."""

    path: Path
    fsid: int
    mounts: list[Path] = field(default_factory=list)

    @property
    def remote(self) -> str:
        """The ``server:/path`` to mount."""
        return f"127.0.0.1:{self.path}"

    def _write_exports(self) -> None:
        EXPORTS.parent.mkdir(parents=True, exist_ok=True)
        EXPORTS.write_text(
            f"{self.path} 127.0.0.0/8(rw,sync,no_subtree_check,no_root_squash,insecure,"
            f"fsid={self.fsid})\n"
        )

    def start(self) -> None:
        NFS_CONF.parent.mkdir(parents=True, exist_ok=True)
        NFS_CONF.write_text(
            "[nfsd]\ngrace-time=10\nlease-time=10\nvers3=y\nvers4=y\nvers4.1=y\nvers4.2=y\n"
        )
        self._write_exports()
        sh("systemctl", "start", "nfs-server.service", timeout=90)

    def stop(self) -> None:
        sh("systemctl", "stop", "nfs-server.service", timeout=90)

    def reexport(self, fsid: int | None = None) -> int:
        """Export again under a new fsid: clients' file handles go stale.  Returns the fsid."""
        self.fsid = fsid if fsid is not None else self.fsid + 1000
        self._write_exports()
        sh("exportfs", "-ra")
        sh("exportfs", "-f")
        return self.fsid

    def mount(self, target: Path, version: str = "4.2", options: str = "") -> Path:
        """Mount the export on target (created) with ``vers=version``; unmounted at teardown."""
        target.mkdir(parents=True, exist_ok=True)
        opts = f"vers={version},soft,timeo=50,retrans=2" + (f",{options}" if options else "")
        sh("mount", "-t", "nfs", "-o", opts, self.remote, str(target), timeout=120)
        self.mounts.append(target)
        return target

    def umount(self, target: Path) -> None:
        sh("umount", "-f", "-l", str(target), check=False)
        if target in self.mounts:
            self.mounts.remove(target)


@pytest.fixture
def nfs_export(guest_modules: None) -> Iterator[NfsExport]:
    """nfs-kernel-server exporting a fresh empty directory; see NfsExport."""
    path = NFS_ROOT / f"export{next(_serial)}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    export = NfsExport(path=path, fsid=100 + next(_serial))
    export.start()
    try:
        yield export
    finally:
        for target in list(export.mounts):
            export.umount(target)
        sh("systemctl", "stop", "nfs-server.service", check=False, timeout=90)
        EXPORTS.unlink(missing_ok=True)
        NFS_CONF.unlink(missing_ok=True)
        sh("exportfs", "-ra", check=False)
        shutil.rmtree(path, ignore_errors=True)


# --- network namespaces and veth links ---------------------------------------------------


@dataclass
class Link:
    """A veth pair: ``host`` in the root namespace, ``peer`` in ``netns`` (or root)."""

    host: str
    peer: str
    host_ip: str
    peer_ip: str
    netns: str | None

    def down(self) -> None:
        sh("ip", "link", "set", self.host, "down")

    def up(self) -> None:
        sh("ip", "link", "set", self.host, "up")


def make_links(prefix: str, count: int, netns: str | None, subnet: int) -> list[Link]:
    """count veth links; link i gets 10.77.<subnet + i>.1 (host) and .2 (peer)."""
    links = []
    for i in range(count):
        host, peer = f"{prefix}h{i}", f"{prefix}p{i}"
        host_ip, peer_ip = f"10.77.{subnet + i}.1", f"10.77.{subnet + i}.2"
        sh("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
        links.append(Link(host, peer, host_ip, peer_ip, netns))
        sh("ip", "addr", "add", f"{host_ip}/24", "dev", host)
        sh("ip", "link", "set", host, "up")
        if netns is not None:
            sh("ip", "link", "set", peer, "netns", netns)
            sh("ip", "-n", netns, "addr", "add", f"{peer_ip}/24", "dev", peer)
            sh("ip", "-n", netns, "link", "set", peer, "up")
    return links


def delete_links(links: list[Link]) -> None:
    for link in links:
        sh("ip", "link", "del", link.host, check=False)


# --- iSCSI (LIO) ---------------------------------------------------------------------------


@dataclass
class IscsiTarget:
    """An LIO iSCSI target configured with targetcli, plus initiator helpers."""

    iqn: str
    portals: list[str]  # "ip:3260"
    luns: list[Path]
    netns: str | None
    links: list[Link]
    chap: tuple[str, str] | None
    dm: list[str] = field(default_factory=list)  # device-mapper names of the LUNs (dm=True)
    size_mb: int = 64

    @property
    def backstore(self) -> str:
        return "block" if self.dm else "fileio"

    def _table(self, i: int, kind: str) -> str:
        return f"0 {self.size_mb * 2048} {kind}"

    def fail_lun(self, i: int = 0) -> None:
        """Reads of LUN i fail from now on (its device-mapper table becomes ``error``)."""
        sh("dmsetup", "reload", self.dm[i], "--table", self._table(i, "error"))
        sh("dmsetup", "resume", self.dm[i])

    def restore_lun(self, i: int = 0) -> None:
        """LUN i answers again (zeros: the ``zero`` table it was made with)."""
        sh("dmsetup", "reload", self.dm[i], "--table", self._table(i, "zero"))
        sh("dmsetup", "resume", self.dm[i])

    def suspend_lun(self, i: int = 0) -> None:
        """I/O to LUN i waits from now on (until ``resume_lun``): reads of it hang."""
        sh("dmsetup", "suspend", "--nolockfs", self.dm[i])

    def resume_lun(self, i: int = 0) -> None:
        sh("dmsetup", "resume", self.dm[i])

    def targetcli(self, commands: list[str]) -> str:
        """Feed commands to ONE targetcli process (in the portal namespace); its output."""
        prefix = ["nsenter", f"--net=/run/netns/{self.netns}"] if self.netns else []
        script = "\n".join(["set global auto_save_on_exit=false", *commands, "exit"]) + "\n"
        return sh(*prefix, "targetcli", input=script, timeout=120).stdout

    @property
    def configfs(self) -> Path:
        return Path("/sys/kernel/config/target/iscsi") / self.iqn / "tpgt_1"

    def discover(self, portal: str | None = None) -> list[str]:
        """sendtargets discovery; returns the ``portal,tpgt iqn`` lines."""
        out = sh("iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p",
                 portal or self.portals[0]).stdout  # fmt: skip
        return out.splitlines()

    def login(self, portal: str | None = None, chap: tuple[str, str] | None = None) -> None:
        """Log in through portal (discovering it first); CHAP credentials default to ours."""
        portal = portal or self.portals[0]
        self.discover(portal)
        node = ["iscsiadm", "-m", "node", "-T", self.iqn, "-p", portal]
        creds = chap or self.chap
        if creds is not None:
            for name, value in (("authmethod", "CHAP"), ("username", creds[0]),
                                ("password", creds[1])):  # fmt: skip
                sh(*node, "-o", "update", "-n", f"node.session.auth.{name}", "-v", value)
        sh(*node, "--login", timeout=90)

    def logout(self, portal: str | None = None) -> None:
        node = ["iscsiadm", "-m", "node", "-T", self.iqn]
        sh(*node, *(["-p", portal] if portal else []), "--logout", check=False, timeout=90)

    def sessions(self) -> list[str]:
        out = sh("iscsiadm", "-m", "session", check=False).stdout
        return [line for line in out.splitlines() if self.iqn in line]

    def device(self, portal: str | None = None, lun: int = 0, timeout: float = 30.0) -> Path:
        """The /dev/sdX of a logged-in LUN (waits for udev's by-path link)."""
        link = Path(f"/dev/disk/by-path/ip-{portal or self.portals[0]}-iscsi-{self.iqn}-lun-{lun}")
        wait_for(f"{link}", link.exists, timeout)
        return link.resolve()


def _create_target(target: IscsiTarget, size_mb: int) -> None:
    tpg = f"/iscsi/{target.iqn}/tpg1"
    commands = ["set global auto_add_default_portal=false", f"/iscsi create {target.iqn}"]
    for i, lun in enumerate(target.luns):
        name = f"{target.iqn.rsplit(':', 1)[1]}_lun{i}"
        if target.dm:
            sh("dmsetup", "create", target.dm[i], "--table", target._table(i, "zero"))
            commands.append(f"/backstores/block create name={name} "
                            f"dev=/dev/mapper/{target.dm[i]}")
        else:
            commands.append(f"/backstores/fileio create name={name} file_or_dev={lun} "
                            f"size={size_mb}M")
        commands.append(f"{tpg}/luns create /backstores/{target.backstore}/{name}")
    for portal in target.portals:
        ip, port = portal.rsplit(":", 1)
        commands.append(f"{tpg}/portals create {ip} {port}")
    commands.append(
        f"{tpg} set attribute generate_node_acls=1 demo_mode_write_protect=0 cache_dynamic_acls=1"
    )
    if target.chap is not None:
        commands.append(f"{tpg} set auth userid={target.chap[0]} password={target.chap[1]}")
        commands.append(f"{tpg} set attribute authentication=1")
    else:
        commands.append(f"{tpg} set attribute authentication=0")
    output = target.targetcli(commands)
    missing = [p for p in target.portals if not (target.configfs / "np" / p).exists()]
    luns = list((target.configfs / "lun").glob("lun_*"))
    if missing or len(luns) != len(target.luns):
        raise RuntimeError(f"targetcli did not create portals {missing} or LUNs:\n{output}")


def _delete_target(target: IscsiTarget) -> None:
    for portal in target.portals:
        target.logout(portal)
    sh("iscsiadm", "-m", "node", "-T", target.iqn, "-o", "delete", check=False)
    names = [f"{target.iqn.rsplit(':', 1)[1]}_lun{i}" for i in range(len(target.luns))]
    for name in target.dm:
        sh("dmsetup", "resume", name, check=False)  # a suspended LUN lets its callers go
    target.targetcli(
        [f"/iscsi delete {target.iqn}",
         *(f"/backstores/{target.backstore} delete {n}" for n in names)]
    )
    for name in target.dm:
        sh("dmsetup", "remove", "--retry", name, check=False)


IscsiTargetFactory = Callable[..., IscsiTarget]


@pytest.fixture
def iscsi_target(guest_modules: None) -> Iterator[IscsiTargetFactory]:
    """Factory: ``iscsi_target(luns=1, size_mb=64, chap=None, links=0, dm=False)`` ->
    IscsiTarget.

    links=0 puts one portal on 127.0.0.1:3260 in the root namespace; links=N creates a
    network namespace holding the target with N (<= 4) veth links to it, one portal per
    link (10.77.x.2:3260, distinct per target); ``target.links[i].down()``/``.up()`` cut
    and restore a path. dm=True backs each LUN with a device-mapper device (reads give zeros)
    that ``fail_lun``/``restore_lun`` and ``suspend_lun``/``resume_lun`` break and mend.
    """
    created: list[IscsiTarget] = []

    def create(
        luns: int = 1, size_mb: int = 64, chap: tuple[str, str] | None = None, links: int = 0,
        dm: bool = False,
    ) -> IscsiTarget:
        n = next(_serial)
        netns = f"vdsmtgt{n}" if links else None
        made: list[Link] = []
        if netns is not None:
            sh("ip", "netns", "add", netns)
            sh("ip", "-n", netns, "link", "set", "lo", "up")
            if not 1 <= links <= 4:
                raise ValueError("links must be between 0 and 4")
            made = make_links(f"vt{n}", links, netns, subnet=(n * 4) % 252)
        LUN_ROOT.mkdir(parents=True, exist_ok=True)
        target = IscsiTarget(
            iqn=f"{IQN_PREFIX}:target{n}",
            portals=[f"{link.peer_ip}:3260" for link in made] or ["127.0.0.1:3260"],
            luns=[LUN_ROOT / f"target{n}-lun{i}.img" for i in range(luns)],
            netns=netns,
            links=made,
            chap=chap,
            dm=[f"vdsmconn-target{n}-lun{i}" for i in range(luns)] if dm else [],
            size_mb=size_mb,
        )
        created.append(target)
        _create_target(target, size_mb)
        return target

    try:
        yield create
    finally:
        for target in reversed(created):
            _delete_target(target)
            delete_links(target.links)
            if target.netns is not None:
                sh("ip", "netns", "del", target.netns, check=False)
            for lun in target.luns:
                lun.unlink(missing_ok=True)


# --- bonding -------------------------------------------------------------------------------


@dataclass
class Bond:
    """An active-backup bond ``name`` over the host ends of ``links`` (peers in ``netns``)."""

    name: str
    links: list[Link]
    netns: str

    @property
    def slaves(self) -> list[str]:
        return [link.host for link in self.links]

    def sysfs(self, attribute: str) -> str:
        return Path(f"/sys/class/net/{self.name}/bonding/{attribute}").read_text().strip()

    def active_slave(self) -> str:
        return self.sysfs("active_slave")

    def operstate(self) -> str:
        return Path(f"/sys/class/net/{self.name}/operstate").read_text().strip()


@pytest.fixture
def bond(guest_modules: None) -> Iterator[Bond]:
    """bond ``vdbondN`` (active-backup, miimon 100) over two veth links into a namespace."""
    n = next(_serial)
    netns, name = f"vdsmbond{n}", f"vdbond{n}"
    sh("ip", "netns", "add", netns)
    links: list[Link] = []
    try:
        for i in range(2):
            host, peer = f"vb{n}h{i}", f"vb{n}p{i}"
            sh("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
            links.append(Link(host, peer, "", "", netns))
            sh("ip", "link", "set", peer, "netns", netns)
            sh("ip", "-n", netns, "link", "set", peer, "up")
        sh("ip", "link", "add", name, "type", "bond", "mode", "active-backup", "miimon", "100")
        for link in links:
            sh("ip", "link", "set", link.host, "master", name)
        sh("ip", "addr", "add", f"10.78.{n % 250}.1/24", "dev", name)
        sh("ip", "link", "set", name, "up")
        yield Bond(name, links, netns)
    finally:
        sh("ip", "link", "del", name, check=False)
        delete_links(links)
        sh("ip", "netns", "del", netns, check=False)


# --- multipath -------------------------------------------------------------------------------

MULTIPATH_CONFIG = """\
defaults {
    user_friendly_names yes
    find_multipaths no
    polling_interval 2
    no_path_retry 4
}
blacklist {
    devnode "^vd[a-z]"
}
"""


@dataclass
class Multipath:
    """multipathd running with MULTIPATH_CONFIG (braces on their own lines)."""

    config: Path

    def ll(self) -> str:
        return sh("multipath", "-ll", check=False).stdout

    def path_count(self) -> int:
        """Paths in state ``active ready running`` over all maps."""
        return len(re.findall(r"\bactive ready running\b", self.ll()))

    def wait_for_paths(self, count: int, timeout: float = 30.0) -> str:
        wait_for(f"{count} active multipath paths", lambda: self.path_count() >= count, timeout)
        return self.ll()


@pytest.fixture
def multipath(guest_modules: None) -> Iterator[Multipath]:
    MULTIPATH_CONF.write_text(MULTIPATH_CONFIG)
    sh("systemctl", "restart", "multipathd.service", timeout=60)
    try:
        yield Multipath(MULTIPATH_CONF)
    finally:
        sh("multipath", "-F", check=False)
        sh("systemctl", "stop", "multipathd.socket", "multipathd.service", check=False)
        MULTIPATH_CONF.unlink(missing_ok=True)


# --- systemd ---------------------------------------------------------------------------------


@dataclass
class SystemdUnit:
    """A unit installed in /run/systemd/system."""

    name: str
    path: Path

    def systemctl(self, verb: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("systemctl", verb, self.name, check=check, timeout=90)

    def start(self) -> None:
        self.systemctl("start")

    def stop(self) -> None:
        self.systemctl("stop")

    def restart(self) -> None:
        self.systemctl("restart")

    def is_active(self) -> str:
        return self.systemctl("is-active", check=False).stdout.strip()

    def show(self, prop: str) -> str:
        return sh("systemctl", "show", "-P", prop, self.name).stdout.strip()


SystemdUnitFactory = Callable[[str, str], SystemdUnit]


@pytest.fixture
def systemd_unit(guest_modules: None) -> Iterator[SystemdUnitFactory]:
    """Factory: ``systemd_unit(name, text)`` installs the unit and reloads systemd."""
    installed: list[SystemdUnit] = []

    def install(name: str, text: str) -> SystemdUnit:
        UNIT_DIR.mkdir(parents=True, exist_ok=True)
        unit = SystemdUnit(name, UNIT_DIR / name)
        unit.path.write_text(text)
        installed.append(unit)
        sh("systemctl", "daemon-reload")
        return unit

    try:
        yield install
    finally:
        for unit in installed:
            unit.systemctl("stop", check=False)
            unit.path.unlink(missing_ok=True)
        if installed:
            sh("systemctl", "daemon-reload", check=False)
            for unit in installed:
                unit.systemctl("reset-failed", check=False)
