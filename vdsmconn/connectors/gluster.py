"""glusterfs: FUSE mounts of GlusterFS volumes under <mount_root>/glusterSD (SPEC 8).

Before each mount the volume's brick hosts are looked up (`gluster volume info --xml`, from
the volfile server, else from the local glusterd) and passed as `backup-volfile-servers`, so
the client can fetch the volume file when the server named in the connection is down. A
failed look-up is a warning, not an error; a user-given `backup-volfile-servers` wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

from vdsmconn import errors
from vdsmconn.clock import Clock
from vdsmconn.connectors.base import Connected, StepLog
from vdsmconn.connectors.mount import HelperMountConnector
from vdsmconn.host import gluster, mountinfo
from vdsmconn.host.address import join, split_remote, unbracket
from vdsmconn.model import MountSpec

log = logging.getLogger(__name__)

GLUSTERD_PORT = 24007
CLI_TIMEOUT = 30.0  # at most, per gluster CLI call (and never over command_timeout)
BACKUP_OPTION = "backup-volfile-servers"


def split_connection(connection: str) -> tuple[str, str]:
    """`server:/volume[/subdir]` -> (`server`, `volume`); IPv6 servers lose their brackets."""
    server, path = split_remote(connection)
    return unbracket(server or ""), path.lstrip("/").split("/")[0]


class GlusterConnector(HelperMountConnector):
    fstype = "glusterfs"
    package = "glusterfs-client"

    def kernel_missing(self) -> str | None:
        if not os.path.exists("/dev/fuse"):
            return "no FUSE on this host (/dev/fuse is missing)"
        return self.host.kernel.missing_filesystem("fuse", "FUSE")

    @property
    def _cli_timeout(self) -> float:
        return min(CLI_TIMEOUT, self.host.settings.command_timeout)

    async def connect(self, spec: MountSpec) -> Connected:
        # A mount already there is taken before glusterd is asked for the backup servers
        # (extra_options): it must not depend on a server that may be down.
        m = mountinfo.mounted_at(self.mountpoint(spec))
        if m is not None:
            return self._found(m, spec)
        return await super().connect(spec)

    async def extra_options(self, spec: MountSpec) -> tuple[str, ...]:
        if any(o.partition("=")[0] == BACKUP_OPTION for o in spec.options()):
            return ()
        server, volume = split_connection(spec.connection)
        backups = await self.backup_servers(server, volume)
        return (f"{BACKUP_OPTION}={':'.join(backups)}",) if backups else ()

    async def backup_servers(self, server: str, volume: str) -> list[str]:
        """Brick hosts other than `server`, or [] (with a warning) if nobody can tell."""
        reasons = []
        for remote in (server, None):
            try:
                info = await self.volume_info(volume, remote)
            except errors.Error as e:
                reasons.append(f"{remote or 'local glusterd'}: {e.message}")
                continue
            backups = gluster.backup_servers(info, server)
            log.info("GLUSTER volume=%s server=%s bricks=%s backups=%s (from %s)", volume,
                     server, ",".join(info.brick_hosts), ",".join(backups) or "none",
                     remote or "local glusterd")
            return backups
        log.warning("GLUSTER volume=%s server=%s: cannot look up brick hosts, mounting "
                    "without backup-volfile-servers: %s", volume, server, "; ".join(reasons))
        return []

    async def volume_info(self, volume: str, remote: str | None) -> gluster.Volume:
        argv = [self.host.settings.gluster_command, "--mode=script", "volume", "info", volume]
        if remote is not None:
            argv.append(f"--remote-host={remote}")
        argv.append("--xml")
        result = await self.host.runner.run(argv, timeout=self._cli_timeout)
        if result.rc != 0:
            detail = (result.stderr.strip() or result.stdout.strip())[-300:] or "no message"
            raise errors.ConnectError(f"gluster volume info failed (rc={result.rc}): {detail}")
        try:
            volumes = gluster.parse_volume_info(result.stdout)
        except gluster.GlusterOutputError as e:
            raise errors.ConnectError(f"gluster volume info {volume}: {e}") from None
        for v in volumes:
            if v.name == volume:
                return v
        raise errors.ConnectError(f"gluster volume info does not list volume {volume}")

    async def test(self, spec: MountSpec, timeout: float) -> StepLog:
        server, volume = split_connection(spec.connection)
        steps = StepLog(self.host.clock)
        addresses: list[str] = []

        async def resolve() -> str:
            addresses.extend(await _resolve(server, timeout))
            return f"{server} is {', '.join(addresses)}"

        async def connect() -> str:
            return await _tcp_connect(addresses[0], GLUSTERD_PORT, timeout, self.host.clock)

        async def info() -> str:
            v = await self.volume_info(volume, server)
            if v.status != "Started":
                raise errors.ConnectError(f"volume {volume} is {v.status}, not started")
            backups = gluster.backup_servers(v, server)
            return (f"volume {volume}: {v.type}, {v.status}, {len(v.bricks)} bricks on "
                    f"{', '.join(v.brick_hosts)}; backup-volfile-servers: "
                    f"{':'.join(backups) or 'none'}")

        for name, check in (("resolve", resolve), ("connect", connect), ("volume", info)):
            if not await steps.run(name, check):
                break
        return steps


async def _resolve(host: str, timeout: float) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(host, GLUSTERD_PORT, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise errors.Timeout(f"resolving {host} took over {timeout:g} s") from None
    except OSError as e:
        raise errors.ConnectError(f"cannot resolve {host}: {e.strerror or e}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def _tcp_connect(address: str, port: int, timeout: float, clock: Clock) -> str:
    start = clock.monotonic()
    target = join(address, port)
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(address, port)
    except TimeoutError:
        raise errors.Timeout(f"TCP connect to {target} timed out after {timeout:g} s") from None
    except OSError as e:
        raise errors.ConnectError(f"TCP connect to {target}: {e.strerror or e}") from None
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return f"glusterd port {target} accepts ({clock.monotonic() - start:.3f} s)"
