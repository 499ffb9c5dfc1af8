"""testStorageServer for NFS through the real daemon, against a real userspace NFS server:
nfs-ganesha (VFS export of a temporary directory) and rpcbind in a network namespace the test
creates, behind a veth pair. Scenarios: up (v3 with mountd, v4.x), v3 asked of a v4-only
server, server stopped, link down, packets to 2049 dropped by nftables.

rpcbind and ganesha share a private mount namespace with their own /run, so their unix
sockets and state files never meet the host's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon
from tests.netns import InNetns, NetnsLink, sh

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("ganesha.nfsd") is None,
                       reason="nfs-ganesha is not installed (apt: nfs-ganesha nfs-ganesha-vfs)"),
    pytest.mark.skipif(shutil.which("rpcbind") is None, reason="rpcbind is not installed"),
]

GANESHA_CONF = """\
NFS_CORE_PARAM {{
    Protocols = {protocols};
    Enable_NLM = false;
    Enable_RQUOTA = false;
    NFS_Port = 2049;
    MNT_Port = 20048;
}}
NFSV4 {{ Graceless = true; RecoveryRoot = {work}/recovery; }}
EXPORT {{
    Export_Id = 1;
    Path = {work}/export;
    Pseudo = /export;
    Access_Type = RW;
    Squash = No_Root_Squash;
    Protocols = {protocols};
    Transports = TCP;
    SecType = sys;
    FSAL {{ Name = VFS; }}
}}
"""


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait(30)


def listening(address: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((address, port), 0.5):
        return True
    return False


@dataclass
class NfsServer(InNetns):
    """ganesha + rpcbind in netns `ns`, reachable at `address` through `link` (host side)."""

    work: Path
    protocols: str
    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000}")
    rpcbind: subprocess.Popen[bytes] | None = None
    ganesha: subprocess.Popen[bytes] | None = None

    @property
    def net(self) -> NetnsLink:
        return NetnsLink(f"vcnfs{self.tag}", f"10.251.{int(self.tag) % 250}")

    @property
    def export(self) -> str:
        return f"{self.address}:{self.work}/export"

    def in_ns(self, *argv: str) -> list[str]:
        return self.net.in_ns(*argv)

    def setup_network(self) -> None:
        self.net.create()

    def start(self) -> None:
        (self.work / "export").mkdir(exist_ok=True)
        (self.work / "recovery").mkdir(exist_ok=True)
        conf = self.work / "ganesha.conf"
        conf.write_text(GANESHA_CONF.format(protocols=self.protocols, work=self.work))
        log = open(self.work / "servers.out", "ab")  # noqa: SIM115 - the children keep it
        with log:
            if self.rpcbind is None:
                self.rpcbind = subprocess.Popen(
                    self.in_ns("unshare", "--mount", "--propagation", "private", "sh", "-c",
                               "mount -t tmpfs tmpfs /run && exec rpcbind -w -f"),
                    stdout=log, stderr=log,
                )
                self._wait("rpcbind", lambda: listening(self.address, 111))
            self.ganesha = subprocess.Popen(
                self.in_ns(f"--mount=/proc/{self.rpcbind.pid}/ns/mnt", "ganesha.nfsd", "-F",
                           "-f", str(conf), "-L", str(self.work / "ganesha.log"),
                           "-p", str(self.work / "ganesha.pid"), "-N", "NIV_EVENT"),
                stdout=log, stderr=log,
            )
        self._wait("ganesha", lambda: listening(self.address, 2049))

    def _wait(self, what: str, ready: Any, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not ready within {timeout} s: {self.logs()}")
            time.sleep(0.05)

    def logs(self) -> str:
        texts = []
        for name in ("servers.out", "ganesha.log"):
            with contextlib.suppress(OSError):
                texts.append((self.work / name).read_text(errors="replace")[-3000:])
        return "\n".join(texts)

    def stop_ganesha(self) -> None:
        if self.ganesha is not None:
            stop(self.ganesha)
            self.ganesha = None

    def cleanup(self) -> None:
        self.stop_ganesha()
        if self.rpcbind is not None:
            stop(self.rpcbind)
            self.rpcbind = None
        self.net.delete()


@pytest.fixture(params=["3, 4"], ids=["v3+v4"])
def nfs_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NfsServer]:
    work = tmp_path / "ganesha"
    work.mkdir()
    server = NfsServer(work, request.param)
    try:
        server.setup_network()
        server.start()
        yield server
    finally:
        server.cleanup()


def check_storage(daemon: Daemon, connection: dict[str, Any] | str,
                  timeout: float = 10.0) -> dict[str, Any]:
    start = time.monotonic()
    result: dict[str, Any] = daemon.call("testStorageServer", connection=connection,
                                         timeout=timeout)
    elapsed = time.monotonic() - start
    print(f"OBSERVED {elapsed:.3f}s " + "; ".join(
        f"{s['step']} {'ok' if s['ok'] else 'FAILED'} {s['seconds']:.3f}s: {s['detail']}"
        for s in result["steps"]))
    assert elapsed < timeout + 2, result
    for step in result["steps"]:
        assert 0 <= step["seconds"] <= timeout, result
    return result




def steps(result: dict[str, Any]) -> list[tuple[str, bool]]:
    return [(s["step"], s["ok"]) for s in result["steps"]]


def detail(result: dict[str, Any], step: str) -> str:
    return str(next(s["detail"] for s in result["steps"] if s["step"] == step))


@pytest.mark.parametrize("version", ["4", "4.1", "4.2"])
def test_v4_server_up_every_step_ok(daemon: Daemon, nfs_server: NfsServer,
                                    version: str) -> None:
    result = check_storage(daemon, {"type": "nfs", "connection": nfs_server.export,
                                   "protocol_version": version})
    assert result["ok"] is True
    assert steps(result) == [("resolve", True), ("connect", True), ("nfs", True)]
    assert detail(result, "connect") == (f"connected to {nfs_server.address}:2049 from "
                                         f"{nfs_server.net.subnet}.1")
    assert detail(result, "nfs") == f"NFS (program 100003) version 4 answered at " \
                                    f"{nfs_server.address}:2049"
    assert all(s["seconds"] < 5 for s in result["steps"])


def test_v3_server_up_checks_mountd_through_the_portmapper(daemon: Daemon,
                                                           nfs_server: NfsServer) -> None:
    result = check_storage(daemon, f"nfs://{nfs_server.address}{nfs_server.work}/export")
    assert result["ok"] is True, result
    assert steps(result) == [("resolve", True), ("connect", True), ("nfs", True),
                             ("mountd", True)]
    assert detail(result, "mountd") == ("mountd (program 100005) version 3 answered at "
                                        f"{nfs_server.address}:20048")


def test_auto_prefers_v4_and_skips_mountd(daemon: Daemon, nfs_server: NfsServer) -> None:
    result = check_storage(daemon, {"type": "nfs", "connection": nfs_server.export,
                                   "protocol_version": "auto"})
    assert steps(result) == [("resolve", True), ("connect", True), ("nfs", True)]
    assert "version 4 answered" in detail(result, "nfs")


def test_v3_of_a_v4_only_server_stops_at_nfs(daemon: Daemon, tmp_path: Path) -> None:
    work = tmp_path / "ganesha4"
    work.mkdir()
    server = NfsServer(work, "4")
    try:
        server.setup_network()
        server.start()
        result = check_storage(daemon, {"type": "nfs", "connection": server.export})
    finally:
        server.cleanup()
    assert steps(result) == [("resolve", True), ("connect", True), ("nfs", False)]
    assert result["ok"] is False
    assert detail(result, "nfs") == (
        f"NFS version 3 NULL call at {server.address}:2049: program version not supported "
        "(the server offers versions 4 to 4)"
    )


def test_server_stopped_connect_refused(daemon: Daemon, nfs_server: NfsServer) -> None:
    nfs_server.stop_ganesha()
    result = check_storage(daemon, {"type": "nfs", "connection": nfs_server.export,
                                   "protocol_version": "4.2"})
    assert steps(result) == [("resolve", True), ("connect", False)]
    assert detail(result, "connect") == (
        f"TCP connect to {nfs_server.address}:2049 refused: nothing listens there "
        "(server stopped?)"
    )
    assert result["steps"][1]["seconds"] < 4  # an answer, not the 4.5 s deadline


def test_v3_without_portmapper_stops_at_mountd(daemon: Daemon, nfs_server: NfsServer) -> None:
    assert nfs_server.rpcbind is not None
    sh("nsenter", f"--net=/run/netns/{nfs_server.ns}", "nft", "add table inet vc; "
       "add chain inet vc in { type filter hook input priority 0; }; "
       "add rule inet vc in tcp dport 111 reject with tcp reset")
    result = check_storage(daemon, {"type": "nfs", "connection": nfs_server.export})
    assert steps(result) == [("resolve", True), ("connect", True), ("nfs", True),
                             ("mountd", False)]
    assert detail(result, "mountd") == (
        f"portmapper (rpcbind): TCP connect to {nfs_server.address}:111 refused: "
        "nothing listens there (server stopped?)"
    )


def test_host_link_down_is_unreachable(daemon: Daemon, nfs_server: NfsServer) -> None:
    sh("ip", "link", "set", nfs_server.link, "down")
    result = check_storage(daemon, {"type": "nfs", "connection": nfs_server.export,
                                   "protocol_version": "4.2"}, timeout=5)
    assert steps(result) == [("resolve", True), ("connect", False)]
    assert detail(result, "connect") == (
        f"TCP connect to {nfs_server.address}:2049: No route to host (unreachable)"
    )
    assert result["steps"][1]["seconds"] < 4  # an answer, not the 4.5 s deadline


def test_server_link_down_is_unreachable_or_timeout(daemon: Daemon,
                                                    nfs_server: NfsServer) -> None:
    sh("ip", "-n", nfs_server.ns, "link", "set", nfs_server.net.peer, "down")
    result = check_storage(daemon, {"type": "nfs", "connection": nfs_server.export,
                                   "protocol_version": "4.2"}, timeout=5)
    assert steps(result) == [("resolve", True), ("connect", False)]
    text = detail(result, "connect")
    assert text in (
        f"TCP connect to {nfs_server.address}:2049: No route to host (unreachable)",
        f"TCP connect to {nfs_server.address}:2049 timed out: no answer within 4.5 s "
        "(host down, or a firewall drops the packets)",
    )
    assert result["steps"][1]["seconds"] > 0.5


def test_firewall_drop_is_a_timeout(daemon: Daemon, nfs_server: NfsServer) -> None:
    sh("nsenter", f"--net=/run/netns/{nfs_server.ns}", "nft", "add table inet vc; "
       "add chain inet vc in { type filter hook input priority 0; }; "
       "add rule inet vc in tcp dport 2049 drop")
    result = check_storage(daemon, {"type": "nfs", "connection": nfs_server.export,
                                   "protocol_version": "4.2"}, timeout=5)
    assert steps(result) == [("resolve", True), ("connect", False)]
    assert detail(result, "connect") == (
        f"TCP connect to {nfs_server.address}:2049 timed out: no answer within 4.5 s "
        "(host down, or a firewall drops the packets)"
    )
    assert 4.0 < result["steps"][1]["seconds"] < 15


def test_unknown_host_stops_at_resolve(daemon: Daemon) -> None:
    result = check_storage(daemon, {"type": "nfs", "connection": "no-such-host.invalid:/x"})
    assert steps(result) == [("resolve", False)]
    assert detail(result, "resolve").startswith("cannot resolve no-such-host.invalid: ")
