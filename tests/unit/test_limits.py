"""Operation slots per remote server and host-wide: one server cannot starve another."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from vdsmconn import config, errors
from vdsmconn.host.command import StuckCommand
from vdsmconn.model import (
    ConnectionSpec,
    GlusterSpec,
    IscsiSpec,
    LocalSpec,
    ManagedSpec,
    NfsSpec,
    PosixSpec,
)
from vdsmconn.reconcile.limits import Limits, bucket_of


def nfs(server: str, export: str = "/e") -> NfsSpec:
    return NfsSpec(connection=f"{server}:{export}")


class Holder:
    """A task that takes a slot for `spec` and keeps it until `done` is set."""

    def __init__(self, limits: Limits, spec: ConnectionSpec, name: str = "") -> None:
        self.inside = asyncio.Event()
        self.done = asyncio.Event()
        self.task = asyncio.create_task(self._run(limits, spec), name=f"holder {name}")

    async def _run(self, limits: Limits, spec: ConnectionSpec) -> None:
        async with limits.slot(spec):
            self.inside.set()
            await self.done.wait()

    async def finish(self) -> None:
        self.done.set()
        await self.task


@pytest.fixture
async def holders() -> AsyncIterator[list[Holder]]:
    made: list[Holder] = []
    yield made
    for h in made:
        h.task.cancel()
    await asyncio.gather(*(h.task for h in made), return_exceptions=True)


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_buckets_are_remote_servers_or_one_local_bucket_per_type() -> None:
    assert bucket_of(nfs("srv")) == "server:srv"
    assert bucket_of(NfsSpec(connection="SRV.example.com:/a/b")) == "server:srv.example.com"
    assert bucket_of(nfs("[fe80::1]")) == "server:fe80::1"
    assert bucket_of(GlusterSpec(connection="srv:/vol")) == "server:srv"
    assert bucket_of(IscsiSpec(connection="srv", iqn="iqn.x:t")) == "server:srv"
    assert bucket_of(IscsiSpec(connection="FE80::1", iqn="iqn.x:t")) == "server:fe80::1"
    assert bucket_of(PosixSpec(connection="10.0.0.7:/ceph", vfs_type="ceph")) == \
        "server:10.0.0.7"
    assert bucket_of(PosixSpec(connection="user@host:/dir", vfs_type="fuse.sshfs")) == \
        "server:host"
    assert bucket_of(PosixSpec(connection="//smb/share", vfs_type="cifs")) == "server:smb"
    assert bucket_of(PosixSpec(connection="/dev/sdb1", vfs_type="xfs")) == "local:posixfs"
    assert bucket_of(PosixSpec(connection="/srv/a:/b", vfs_type="xfs")) == "local:posixfs"
    assert bucket_of(PosixSpec(connection="tmpfs-x", vfs_type="tmpfs")) == "local:posixfs"
    assert bucket_of(LocalSpec(connection="/srv/data")) == "local:localfs"
    assert bucket_of(ManagedSpec(volumeID="v1")) == "local:managed"


async def test_full_server_does_not_block_another_server(holders: list[Holder]) -> None:
    limits = Limits(host=64, per_server=2)
    holders += [Holder(limits, nfs("dead", f"/e{i}"), f"dead{i}") for i in range(3)]
    await settle()
    assert [h.inside.is_set() for h in holders] == [True, True, False]
    assert limits.held("server:dead") == 2 and limits.waiting("server:dead") == 1
    # Another server, and a local connection, get their slots at once.
    other = Holder(limits, GlusterSpec(connection="alive:/v"), "alive")
    local = Holder(limits, PosixSpec(connection="t", vfs_type="tmpfs"), "local")
    holders += [other, local]
    async with asyncio.timeout(1):
        await other.inside.wait()
        await local.inside.wait()
    await other.finish()
    await local.finish()
    assert not holders[2].inside.is_set()
    await holders[0].finish()
    async with asyncio.timeout(1):
        await holders[2].inside.wait()


async def test_host_bound_holds_across_servers() -> None:
    limits = Limits(host=3, per_server=2)
    running = 0
    peak = 0

    async def op(server: str) -> None:
        nonlocal running, peak
        async with limits.slot(nfs(server)):
            running += 1
            peak = max(peak, running)
            assert limits.running <= 3
            for _ in range(5):
                await asyncio.sleep(0)
            running -= 1

    async with asyncio.timeout(5):
        await asyncio.gather(*(op(f"s{i % 5}") for i in range(40)))
    assert peak == 3
    assert limits.running == 0 and all(limits.held(f"server:s{i}") == 0 for i in range(5))


async def test_freed_host_slot_goes_to_the_server_running_fewest(holders: list[Holder]) -> None:
    limits = Limits(host=3, per_server=3)
    a1, a2, b = Holder(limits, nfs("a"), "a1"), Holder(limits, nfs("a"), "a2"), \
        Holder(limits, nfs("b"), "b")
    holders += [a1, a2, b]
    await settle()
    a3 = Holder(limits, nfs("a"), "a3")  # waits first
    await settle()
    c = Holder(limits, nfs("c"), "c")
    holders += [a3, c]
    await settle()
    assert not a3.inside.is_set() and not c.inside.is_set()
    await b.finish()
    await settle()
    # Server a already runs two operations, c none: c goes first although it came later.
    assert c.inside.is_set() and not a3.inside.is_set()
    await c.finish()
    async with asyncio.timeout(1):
        await a3.inside.wait()


async def test_cancelled_holder_and_waiter_release_their_slots(holders: list[Holder]) -> None:
    limits = Limits(host=1, per_server=1)
    first, waiter, last = (Holder(limits, nfs("s"), str(i)) for i in range(3))
    holders += [first, waiter, last]
    await settle()
    assert first.inside.is_set() and limits.waiting("server:s") == 2
    waiter.task.cancel()
    await settle()
    assert limits.waiting("server:s") == 1
    first.task.cancel()
    async with asyncio.timeout(1):
        await last.inside.wait()
    assert limits.running == 1 and limits.held("server:s") == 1
    await last.finish()
    assert limits.running == 0 and limits.held("server:s") == 0


async def test_slot_granted_to_a_task_cancelled_before_it_ran_is_given_back() -> None:
    limits = Limits(host=1, per_server=1)
    cm = limits.slot(nfs("s"))
    await cm.__aenter__()
    entered = asyncio.Event()

    async def wait_for_slot() -> None:
        async with limits.slot(nfs("s")):
            entered.set()

    task = asyncio.create_task(wait_for_slot())
    await settle()
    await cm.__aexit__(None, None, None)  # grants the slot to the task, which has not run
    assert limits.running == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not entered.is_set()
    assert limits.running == 0 and limits.held("server:s") == 0
    async with asyncio.timeout(1), limits.slot(nfs("s")):
        pass


async def test_stuck_command_keeps_its_server_slot_but_not_the_host_slot(
        holders: list[Holder]) -> None:
    limits = Limits(host=1, per_server=1)
    reaped_now = asyncio.Event()

    async def reap() -> int:
        await reaped_now.wait()
        return -9

    reaped = asyncio.create_task(reap())
    with pytest.raises(StuckCommand):
        async with limits.slot(nfs("dead")):
            raise StuckCommand("mount did not die", reaped)
    assert limits.held("server:dead") == 1 and limits.running == 0
    # The only host-wide slot is free for another server...
    other = Holder(limits, nfs("alive"), "alive")
    holders.append(other)
    async with asyncio.timeout(1):
        await other.inside.wait()
    await other.finish()
    # ...while the dead server's own slot stays taken until the command is reaped.
    again = Holder(limits, nfs("dead", "/other"), "again")
    holders.append(again)
    await settle()
    assert not again.inside.is_set()
    reaped_now.set()
    await reaped
    async with asyncio.timeout(1):
        await again.inside.wait()
    await again.finish()
    assert limits.held("server:dead") == 0 and limits.running == 0


async def test_failed_operation_gives_both_slots_back() -> None:
    limits = Limits(host=1, per_server=1)
    with pytest.raises(errors.MountError):
        async with limits.slot(nfs("s")):
            raise errors.MountError("mount failed")
    assert limits.running == 0 and limits.held("server:s") == 0


def test_limits_are_configured_under_supervisor() -> None:
    c = config.load_text("supervisor: {max_operations: 8, max_operations_per_server: 2}", "t")
    config.check_complete(c)
    assert (c.supervisor.max_operations, c.supervisor.max_operations_per_server) == (8, 2)
    with pytest.raises(config.ConfigError,
                       match=r"max_operations_per_server: expected an integer from 1 to 4096"):
        config.load_text("supervisor: {max_operations_per_server: 0}", "t")
    above = config.load_text("supervisor: {max_operations: 4, max_operations_per_server: 5}",
                             "t")
    with pytest.raises(config.ConfigError, match=r"is above supervisor\.max_operations \(4\)"):
        config.check_complete(above)
