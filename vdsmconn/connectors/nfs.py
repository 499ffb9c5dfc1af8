"""nfs: the kernel NFS client, options per SPEC 8 (see model.NfsSpec.options).

The mount itself is `MountConnector`'s (`mount -t nfs -o <options> server:/export <mount
point>` through the configured mount command). What NFS adds:

- adoption that survives the kernel's ways of showing a source: NFSv4 mounts may read
  `server://path`, IPv6 servers are in brackets and may be spelled differently, host names
  differ in case. The mount point is what matches; the source must be the same export.
- a mount that runs past its deadline is 480 like every deadline (mount.nfs retries a dead
  server for minutes on its own; the command deadline ends that); anything else mounted at
  the mount point is a conflict (453), left alone.
- `testStorageServer`: resolve, TCP connect to 2049, ONC RPC NULL to the NFS program in the
  version asked for, and for NFSv3 the portmapper and mountd; every step timed, stopping at
  the first that fails with what went wrong there.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket

from vdsmconn import errors
from vdsmconn.clock import Clock
from vdsmconn.connectors.base import StepLog
from vdsmconn.connectors.mount import NFS_FSTYPES, HelperMountConnector
from vdsmconn.host import mountinfo, oncrpc, probe
from vdsmconn.host.address import join, same_host, unbracket
from vdsmconn.host.address import split_remote as split_host_path
from vdsmconn.model import MountSpec, NfsSpec, normalize_remote

log = logging.getLogger(__name__)

NFS_PORT = 2049


# --- exports as the kernel shows them --------------------------------------------------------


def split_remote(remote: str) -> tuple[str, str]:
    """`server:/path` -> (`server`, `/path`) after normalization; brackets are kept."""
    host, path = split_host_path(normalize_remote(remote))
    return host or "", path


def same_export(a: str, b: str) -> bool:
    """Whether two `server:/path` texts name one export (`server://p/` is `server:/p`,
    `[fd00::1]` is `[FD00:0::1]`, host names ignore case)."""
    host_a, path_a = split_remote(a)
    host_b, path_b = split_remote(b)
    return path_a == path_b and same_host(host_a, host_b)


def is_mount_of(m: mountinfo.Mount, spec: MountSpec) -> bool:
    return m.fstype in NFS_FSTYPES and same_export(mountinfo.normalized_source(m),
                                                   spec.connection)


# --- the connector ---------------------------------------------------------------------------


class NfsConnector(HelperMountConnector):
    fstype = "nfs"
    package = "nfs-common"

    def kernel_missing(self) -> str | None:
        return self.host.kernel.missing_filesystem("nfs", "NFS client")

    def is_mount_of(self, m: mountinfo.Mount, spec: MountSpec) -> bool:
        return is_mount_of(m, spec)

    async def test(self, spec: MountSpec, timeout: float) -> StepLog:
        assert isinstance(spec, NfsSpec)
        return await ConnectivityTest(spec, timeout, self.host.settings.probe_timeout,
                                      self.host.clock).run()


# --- testStorageServer -----------------------------------------------------------------------


def _connect_failure(target: str, e: BaseException, seconds: float) -> errors.Error:
    if isinstance(e, TimeoutError):
        return errors.ConnectError(
            f"TCP connect to {target} timed out: no answer within {seconds:.1f} s "
            "(host down, or a firewall drops the packets)"
        )
    if isinstance(e, ConnectionRefusedError):
        return errors.ConnectError(
            f"TCP connect to {target} refused: nothing listens there (server stopped?)"
        )
    if isinstance(e, OSError) and e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH,
                                              errno.EHOSTDOWN):
        return errors.ConnectError(f"TCP connect to {target}: {_reason(e)} (unreachable)")
    return errors.ConnectError(f"TCP connect to {target} failed: {_reason(e)}")


def _reason(e: BaseException) -> str:
    """The system's words for an error (asyncio's own messages repeat the address)."""
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)
    return str(e) or type(e).__name__


def _call_failure(what: str, target: str, e: BaseException, seconds: float) -> errors.Error:
    if isinstance(e, TimeoutError):
        return errors.ConnectError(f"{what} at {target}: no reply within {seconds:.1f} s")
    if isinstance(e, asyncio.IncompleteReadError):
        return errors.ConnectError(f"{what} at {target}: the server closed the connection "
                                   "without a reply")
    if isinstance(e, oncrpc.RpcError):
        return errors.ConnectError(f"{what} at {target}: {e.message}")
    return errors.ConnectError(f"{what} at {target} failed: {_reason(e)}")


class ConnectivityTest:
    """One run of the NFS connectivity test; each step within what is left of `timeout`."""

    def __init__(self, spec: NfsSpec, timeout: float, resolve_timeout: float,
                 clock: Clock | None = None) -> None:
        self.spec = spec
        self.clock = clock or Clock()
        self.host = unbracket(split_remote(spec.connection)[0])
        # Finish a little before the service's own deadline, so the steps are reported.
        self.deadline = self.clock.monotonic() + timeout - min(1.0, timeout * 0.1)
        self.resolve_timeout = resolve_timeout
        self.addresses: list[str] = []
        self.address = ""
        self.client: oncrpc.Client | None = None
        self.nfs_version = 0

    def left(self) -> float:
        return max(0.0, self.deadline - self.clock.monotonic())

    async def run(self) -> StepLog:
        log = StepLog(self.clock)
        try:
            ok = (await log.run("resolve", self.resolve)
                  and await log.run("connect", self.connect)
                  and await log.run("nfs", self.nfs))
            if ok and self.nfs_version == 3:
                await log.run("mountd", self.mountd)
        finally:
            if self.client is not None:
                await self.client.close()
        return log

    async def resolve(self) -> str:
        host = self.host
        seconds = min(self.left(), self.resolve_timeout)
        try:
            infos = await probe.run(
                lambda: socket.getaddrinfo(host, NFS_PORT, type=socket.SOCK_STREAM),
                f"resolving {host}", seconds,
            )
        except errors.Timeout as e:
            raise errors.ConnectError(f"cannot resolve {host}: {e.message}") from None
        except socket.gaierror as e:
            raise errors.ConnectError(f"cannot resolve {host}: {e.strerror}") from None
        for info in infos:
            address = str(info[4][0])
            if address not in self.addresses:
                self.addresses.append(address)
        if not self.addresses:
            raise errors.ConnectError(f"cannot resolve {host}: no address")
        return f"{host} is {', '.join(self.addresses)}"

    async def connect(self) -> str:
        failures = []
        for address in self.addresses:
            target = join(address, NFS_PORT)
            seconds = self.left()
            try:
                async with asyncio.timeout(seconds):
                    self.client = await oncrpc.Client.connect(address, NFS_PORT)
            except (OSError, TimeoutError) as e:
                failures.append(_connect_failure(target, e, seconds).message)
                continue
            self.address = address
            local = self.client.writer.get_extra_info("sockname")
            source = f" from {local[0]}" if local else ""
            return f"connected to {target}{source}"
        raise errors.ConnectError("; ".join(failures))

    async def _call(self, what: str, target: str, client: oncrpc.Client, program: int,
                    version: int) -> None:
        seconds = self.left()
        try:
            async with asyncio.timeout(seconds):
                await client.null(program, version)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, oncrpc.RpcError) as e:
            raise _call_failure(what, target, e, seconds) from None

    async def nfs(self) -> str:
        assert self.client is not None
        target = join(self.address, NFS_PORT)
        version = self.spec.protocol_version
        if version == "auto":
            try:
                await self._call("NFS version 4 NULL call", target, self.client,
                                 oncrpc.NFS_PROGRAM, 4)
                self.nfs_version = 4
            except errors.ConnectError:
                await self._call("NFS version 3 NULL call", target, self.client,
                                 oncrpc.NFS_PROGRAM, 3)
                self.nfs_version = 3
        else:
            self.nfs_version = int(version.partition(".")[0])
            await self._call(f"NFS version {self.nfs_version} NULL call", target, self.client,
                             oncrpc.NFS_PROGRAM, self.nfs_version)
        return f"NFS (program {oncrpc.NFS_PROGRAM}) version {self.nfs_version} answered at {target}"

    async def mountd(self) -> str:
        portmapper = join(self.address, oncrpc.PMAP_PORT)
        seconds = self.left()
        try:
            async with asyncio.timeout(seconds):
                client = await oncrpc.Client.connect(self.address, oncrpc.PMAP_PORT)
        except (OSError, TimeoutError) as e:
            reason = _connect_failure(portmapper, e, seconds).message
            raise errors.ConnectError(f"portmapper (rpcbind): {reason}") from None
        try:
            try:
                async with asyncio.timeout(seconds):
                    port = await client.getport(oncrpc.MOUNT_PROGRAM, 3)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, oncrpc.RpcError) as e:
                raise _call_failure("portmapper GETPORT", portmapper, e, seconds) from None
        finally:
            await client.close()
        if port == 0:
            raise errors.ConnectError(
                f"mountd (program {oncrpc.MOUNT_PROGRAM} version 3) is not registered with "
                f"the portmapper at {portmapper}"
            )
        target = join(self.address, port)
        seconds = self.left()
        try:
            async with asyncio.timeout(seconds):
                client = await oncrpc.Client.connect(self.address, port)
        except (OSError, TimeoutError) as e:
            raise errors.ConnectError(f"mountd: {_connect_failure(target, e, seconds).message}"
                                      ) from None
        try:
            await self._call("mountd version 3 NULL call", target, client,
                             oncrpc.MOUNT_PROGRAM, 3)
        finally:
            await client.close()
        return f"mountd (program {oncrpc.MOUNT_PROGRAM}) version 3 answered at {target}"
