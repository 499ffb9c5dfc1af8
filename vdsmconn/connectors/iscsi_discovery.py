"""iSCSI without a session: name resolution, sendtargets discovery, connectivity test.

`discover_send_targets` is the `discoverySendTargets` verb's body: a discovery record with
CHAP, `--discover` without storing node records, the record always deleted (also on failure),
IPv6 portals dropped unless asked for.

`ConnectivityTest` (testStorageServer): resolve, TCP connect to the portal, then, where
libiscsi's userspace tools are installed (`iscsi-inq`, libiscsi-bin), a real iSCSI login with
the connection's CHAP credentials and an INQUIRY of LUN 0: the target name and credentials are
proven without creating a kernel session. The password reaches iscsi-inq in its environment
(LIBISCSI_CHAP_PASSWORD), never in its argv.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import shutil
import socket
import urllib.parse

from vdsmconn import errors
from vdsmconn.clock import Clock
from vdsmconn.connectors.base import StepLog
from vdsmconn.host import probe
from vdsmconn.host.address import join, unbracket
from vdsmconn.host.command import CommandRunner, tail
from vdsmconn.host.iscsi_parse import Target
from vdsmconn.host.iscsiadm import Iscsiadm
from vdsmconn.model import IscsiSpec, Secret

INITIATOR_FILE = "/etc/iscsi/initiatorname.iscsi"
FALLBACK_INITIATOR = "iqn.2024-01.org.vdsmconn:connectivity-test"


def _literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(unbracket(host)))
    except ValueError:
        return None


async def resolve_all(host: str, timeout: float) -> list[str]:
    literal = _literal(host)
    if literal is not None:
        return [literal]
    try:
        infos = await probe.run(lambda: socket.getaddrinfo(host, None, type=socket.SOCK_STREAM),
                                f"resolving {host}", timeout)
    except errors.Timeout as e:
        raise errors.Timeout(f"cannot resolve {host}: {e.message}", e.data) from None
    except socket.gaierror as e:
        raise errors.ConnectError(f"cannot resolve {host}: {e.strerror}") from None
    found: list[str] = []
    for info in infos:
        address = str(info[4][0])
        if address not in found:
            found.append(address)
    if not found:
        raise errors.ConnectError(f"cannot resolve {host}: no address")
    return found


async def resolve(host: str, timeout: float) -> str:
    return (await resolve_all(host, timeout))[0]


async def discover_send_targets(
    adm: Iscsiadm, host: str, port: int = 3260, user: str | None = None,
    password: Secret | None = None, ipv6_enabled: bool = False, resolve_timeout: float = 10.0,
) -> list[Target]:
    """The targets of a sendtargets discovery; errors 475 (476: CHAP rejected)."""
    try:
        address = await resolve(host, resolve_timeout)
    except errors.ConnectError as e:
        raise errors.IscsiDiscoveryError(e.message) from None
    targets = await adm.discover(join(address, port), user, password)
    return [t for t in targets if ipv6_enabled or ":" not in t.address]


def initiator_name(spec: IscsiSpec) -> str:
    if spec.initiatorName:
        return spec.initiatorName
    try:
        with open(INITIATOR_FILE) as f:
            for line in f:
                name, sep, value = line.strip().partition("=")
                if sep and name == "InitiatorName" and value:
                    return value
    except OSError:
        return FALLBACK_INITIATOR  # no initiator file: open-iscsi not set up here
    return FALLBACK_INITIATOR


class ConnectivityTest:
    def __init__(self, spec: IscsiSpec, timeout: float, runner: CommandRunner,
                 inq_command: str = "iscsi-inq", clock: Clock | None = None) -> None:
        self.spec = spec
        self.runner = runner
        self.inq_command = inq_command
        self.clock = clock or Clock()
        self.deadline = self.clock.monotonic() + timeout - min(1.0, timeout * 0.1)
        self.addresses: list[str] = []
        self.address = ""

    def left(self) -> float:
        return max(0.05, self.deadline - self.clock.monotonic())

    async def run(self) -> StepLog:
        log = StepLog(self.clock)
        if (await log.run("resolve", self.resolve) and await log.run("connect", self.connect)
                and shutil.which(self.inq_command) is not None):
            await log.run("login", self.login)
        return log

    async def resolve(self) -> str:
        self.addresses = await resolve_all(self.spec.connection, self.left())
        return f"{self.spec.connection} is {', '.join(self.addresses)}"

    async def connect(self) -> str:
        failures = []
        for address in self.addresses:
            target = join(address, self.spec.port)
            seconds = self.left()
            try:
                async with asyncio.timeout(seconds):
                    _, writer = await asyncio.open_connection(address, self.spec.port)
            except TimeoutError:
                failures.append(f"TCP connect to {target} timed out: no answer within "
                                f"{seconds:.1f} s (unreachable)")
                continue
            except OSError as e:
                failures.append(f"TCP connect to {target} failed: {e.strerror or e} "
                                "(unreachable)")
                continue
            local = writer.get_extra_info("sockname")
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            self.address = address
            return f"connected to {target}" + (f" from {local[0]}" if local else "")
        raise errors.ConnectError("; ".join(failures))

    async def login(self) -> str:
        spec = self.spec
        chap = spec.user is not None and spec.password is not None
        user = f"{urllib.parse.quote(spec.user or '', safe='')}@" if chap else ""
        url = f"iscsi://{user}{join(self.address, spec.port)}/{spec.iqn}/0"
        env = {}
        if user and spec.password is not None:
            env["LIBISCSI_CHAP_PASSWORD"] = spec.password.reveal()
        if spec.user_in and spec.password_in is not None:
            env["LIBISCSI_CHAP_TARGET_PASSWORD"] = spec.password_in.reveal()
        try:
            result = await self.runner.run(
                [self.inq_command, "-i", initiator_name(spec), url], timeout=self.left(),
                env=env)
        except errors.Timeout as e:
            raise errors.ConnectError(f"iSCSI login to {spec.iqn}: {e.message}") from None
        words = tail(result.stdout + "\n" + result.stderr, 300)
        for secret in env.values():
            words = words.replace(secret, "********")
        if result.rc == 0:
            how = " with CHAP" if user else ""
            return f"logged in to {spec.iqn} at {join(self.address, spec.port)}{how} " \
                   "(userspace, no kernel session); LUN 0 answered INQUIRY"
        if "Authentication failure" in words:
            raise errors.IscsiAuthError(
                f"iSCSI login to {spec.iqn}: CHAP authentication rejected "
                f"(IscsiAuthError {errors.IscsiAuthError.code}): {words}")
        raise errors.IscsiSetupError(f"iSCSI login to {spec.iqn} failed "
                                     f"(IscsiSetupError {errors.IscsiSetupError.code}): {words}")
