"""Slots for operations on real connections: per remote server, and host-wide (SPEC 6).

Every connect, disconnect and recovery runs in a slot. A slot belongs to a *bucket*: the
remote server of the connection (the host of NFS `server:/export`, GlusterFS
`server:/volume`, the iSCSI portal, a remote posixfs spec), or, for connections with no
remote server, one bucket per type (`local:posixfs`, `local:localfs`, `local:managed`) that
no server shares. At most `per_server` operations run at once in one bucket, and at most
`host` in all (a start-up with thousands of keys must not fork thousands of commands).

One dead server can fill its own bucket and no other. A waiter for a full bucket holds
nothing, so it never blocks a waiter of another bucket. When host-wide slots are scarce, a
freed one goes to the waiting bucket that runs the fewest operations (oldest waiter first
among equals), so servers that answer keep getting slots while dead ones hold theirs.

A command that cannot be killed (`StuckCommand`) gives its host-wide slot back at once but
keeps its bucket's slot until the process is finally reaped: hung commands cannot pile up
on one server, and never take what another server needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from vdsmconn.host import address
from vdsmconn.host.command import StuckCommand
from vdsmconn.model import ConnectionSpec, IscsiSpec, MountSpec, PosixSpec

REMOTE = "server"
LOCAL = "local"


def remote_host(connection: str) -> str | None:
    """The server of a `server:/path` (or `//server/share`) connection, or None.

    `[fe80::1]:/x` -> `fe80::1`; `user@host:/x` -> `host`; `a:6789,b:6789:/x` keeps its
    list. A path, a device name or anything else without a server part -> None.
    """
    if connection.startswith("//"):
        host: str | None = connection[2:].split("/", 1)[0]
    elif connection.startswith("/"):
        return None
    else:
        host = address.split_remote(connection)[0]
    if not host:
        return None
    return address.unbracket(host.rpartition("@")[2]).lower() or None


def bucket_of(spec: ConnectionSpec) -> str:
    """`server:<host>` for a connection to a remote server, else `local:<type>`."""
    host: str | None = None
    if isinstance(spec, IscsiSpec):
        host = address.unbracket(spec.connection).lower()
    elif isinstance(spec, MountSpec):
        host = remote_host(spec.connection)
        if host is None and not isinstance(spec, PosixSpec):
            host = spec.connection.lower()  # nfs, glusterfs: remote whatever the text says
    return f"{REMOTE}:{host}" if host else f"{LOCAL}:{spec.TYPE}"


_order = itertools.count()


@dataclass(eq=False)
class _Bucket:
    name: str
    held: int = 0  # slots of this bucket: running operations and stuck commands
    running: int = 0  # host-wide slots held by this bucket's operations
    waiters: deque[tuple[int, asyncio.Future[None]]] = field(default_factory=deque)


class Limits:
    def __init__(self, host: int, per_server: int) -> None:
        if host < 1 or per_server < 1:
            raise ValueError("limits must be at least 1")
        self.host = host
        self.per_server = per_server
        self.running = 0  # host-wide slots in use
        self._buckets: dict[str, _Bucket] = {}

    def held(self, bucket: str) -> int:
        """Slots of `bucket` in use (running operations and stuck commands)."""
        b = self._buckets.get(bucket)
        return b.held if b else 0

    def waiting(self, bucket: str) -> int:
        b = self._buckets.get(bucket)
        return len(b.waiters) if b else 0

    @contextlib.asynccontextmanager
    async def slot(self, spec: ConnectionSpec) -> AsyncIterator[None]:
        """Run the body in a slot of the bucket of `spec` and a host-wide one."""
        name = bucket_of(spec)
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = _Bucket(name)
        await self._acquire(bucket)
        stuck: asyncio.Task[int] | None = None
        try:
            yield
        except StuckCommand as e:
            stuck = e.reaped
            raise
        finally:
            self._release(bucket, stuck)

    async def _acquire(self, bucket: _Bucket) -> None:
        waiter = (next(_order), asyncio.get_running_loop().create_future())
        bucket.waiters.append(waiter)
        self._grant()
        try:
            await waiter[1]
        except asyncio.CancelledError:
            if waiter[1].done() and not waiter[1].cancelled():
                self._release(bucket, None)  # granted just before the cancellation
            else:
                with contextlib.suppress(ValueError):  # `_grant` may have dropped it
                    bucket.waiters.remove(waiter)
                self._drop_if_idle(bucket)
            raise

    def _grant(self) -> None:
        while self.running < self.host:
            ready = [b for b in self._buckets.values()
                     if b.waiters and b.held < self.per_server]
            if not ready:
                return
            bucket = min(ready, key=lambda b: (b.running, b.waiters[0][0]))
            _, future = bucket.waiters.popleft()
            if future.done():  # cancelled, its task has not run its handler yet
                continue
            bucket.held += 1
            bucket.running += 1
            self.running += 1
            future.set_result(None)

    def _release(self, bucket: _Bucket, stuck: asyncio.Task[int] | None) -> None:
        bucket.running -= 1
        self.running -= 1
        if stuck is not None and not stuck.done():
            stuck.add_done_callback(lambda _: self._release_bucket(bucket))
        else:
            bucket.held -= 1
        self._grant()
        self._drop_if_idle(bucket)

    def _release_bucket(self, bucket: _Bucket) -> None:
        bucket.held -= 1
        self._grant()
        self._drop_if_idle(bucket)

    def _drop_if_idle(self, bucket: _Bucket) -> None:
        if bucket.held == 0 and not bucket.waiters and self._buckets.get(bucket.name) is bucket:
            del self._buckets[bucket.name]
