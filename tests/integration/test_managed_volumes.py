"""Managed volumes with real os-brick in its real helper process, real loop devices, the real
store and reconciler (built directly, as the daemon builds them), udev/kernel events.

Needs root (loop devices) and os-brick; skips with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.wait import eventually
from vdsmconn import config, connectors, errors
from vdsmconn.clock import Clock
from vdsmconn.connectors.base import HostContext
from vdsmconn.connectors.managed import ManagedConnector
from vdsmconn.host.command import Arg, CommandRunner, Result
from vdsmconn.model import ConnectionKey, ConnectionSpec, LocalSpec, ManagedSpec, Secret, State
from vdsmconn.monitors.udev import UdevWatcher
from vdsmconn.reconcile.reconciler import Reconciler
from vdsmconn.state.actual import ActualState, KeyStatus
from vdsmconn.state.desired import DesiredState
from vdsmconn.state.store import PutAttachment, Store

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(importlib.util.find_spec("os_brick") is None,
                       reason="os-brick is not installed"),
]


INITIATOR_FILE = Path("/etc/iscsi/initiatorname.iscsi")


class CountingRunner(CommandRunner):
    """The real runner, remembering the op of every helper call."""

    def __init__(self) -> None:
        super().__init__(grace=2.0)
        self.ops: list[str] = []

    async def run(self, argv: Sequence[Arg], *, timeout: float, input: bytes | None = None,
                  check: bool = False, env: Any = None, prepare: Any = None) -> Result:
        if input is not None:
            self.ops.append(json.loads(input)["op"])
        return await super().run(argv, timeout=timeout, input=input, check=check, env=env,
                                 prepare=prepare)


def spec(volume: str, device: str, **extra: Any) -> ManagedSpec:
    info = {"driver_volume_type": "local", "data": {"device_path": device, **extra}}
    return ManagedSpec(volumeID=volume, connection_info=Secret(json.dumps(info, sort_keys=True)))


class World:
    def __init__(self, tmp: Path, probe_interval: float = 0.5, **managed: Any) -> None:
        base = config.local(str(tmp / "vc"))
        sup = dataclasses.replace(base.supervisor, backoff_initial=0.2, backoff_max=1.0,
                                  probe_interval=probe_interval, probe_timeout=3.0)
        self.config = dataclasses.replace(
            base, supervisor=sup, managed=dataclasses.replace(base.managed, **managed))
        self.store = Store(Path(self.config.state_dir))
        self.runner = CountingRunner()
        self.desired = DesiredState()
        self.actual = ActualState()
        self.rec: Reconciler | None = None
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self, udev: bool = False) -> None:
        await self.store.open()
        host = HostContext(config.host_settings(self.config), self.runner, attachments=self.store)
        table = connectors.build(host)
        managed = table["managed"]
        assert isinstance(managed, ManagedConnector)
        self.managed = managed
        await managed.load()  # wiring the daemon needs: records before adoption
        self.rec = Reconciler(self.config, self.desired, self.actual, table, Clock())
        self.rec.start({}, {})
        if udev:
            watcher = UdevWatcher()
            rec = self.rec
            self.tasks.append(asyncio.create_task(
                watcher.run(lambda event: rec.on_devices())))
            await watcher.ready.wait()

    def manage(self, cid: str, s: ConnectionSpec) -> ConnectionKey:
        assert self.rec is not None
        self.desired.apply_put(cid, s)
        self.rec.kick(s.key)
        return s.key

    def unmanage(self, cid: str) -> None:
        assert self.rec is not None
        key = self.desired.apply_delete(cid)
        assert key is not None
        self.rec.kick(key)

    async def until(self, what: str, check: Callable[[], Any], timeout: float = 30.0) -> None:
        await eventually(check, what, timeout, interval=0.05)

    def state(self, key: ConnectionKey) -> KeyStatus | None:
        return self.actual.get(key)

    async def wait_state(self, key: ConnectionKey, *states: State,
                         timeout: float = 30.0) -> KeyStatus:
        await self.until(f"{key} {states}",
                         lambda: (st := self.state(key)) is not None and st.state in states,
                         timeout)
        st = self.state(key)
        assert st is not None
        return st

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.rec is not None:
            await self.rec.close()
        await self.runner.close()
        await self.store.close()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = World(tmp_path)
    yield w
    await w.close()


class Loop:
    def __init__(self, image: Path) -> None:
        self.image = image
        self.device = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                                     capture_output=True, text=True).stdout.strip()
        self.attached = True

    def detach(self) -> None:
        subprocess.run(["losetup", "-d", self.device], check=True)
        self.attached = False

    def restore(self) -> None:
        subprocess.run(["losetup", self.device, str(self.image)], check=True)
        self.attached = True


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Loop]:
    image = tmp_path / "volume.img"
    with open(image, "wb") as f:
        f.truncate(16 * 1024 * 1024)
        f.write(b"vdsmconn volume\n")
    dev = Loop(image)
    try:
        yield dev
    finally:
        if dev.attached:
            subprocess.run(["losetup", "-d", dev.device], check=False)


async def records(store: Store) -> dict[str, dict[str, Any]]:
    return await store.load_attachments()


async def test_local_attach_links_shares_and_detaches(world: World, loop: Loop) -> None:
    await world.start()
    s = spec("vol-1", loop.device)
    key = world.manage("CID-A", s)
    world.manage("CID-B", s)
    st = await world.wait_state(key, State.CONNECTED)
    link = Path(world.config.run_dir) / "managed" / "vol-1"
    assert st.path == loop.device
    assert os.readlink(link) == loop.device
    assert link.read_bytes()[:16] == b"vdsmconn volume\n"
    assert world.runner.ops == ["connect"]  # two CIDs, one attachment
    stored = await records(world.store)
    assert stored["vol-1"]["path"] == loop.device
    assert stored["vol-1"]["device_info"] == {"type": "local", "path": loop.device}
    assert stored["vol-1"]["multipath"] is False

    world.unmanage("CID-A")
    await asyncio.sleep(0.5)
    assert world.runner.ops == ["connect"] and link.is_symlink()  # CID-B still holds it
    world.unmanage("CID-B")
    await world.until("key gone", lambda: world.state(key) is None)
    assert world.runner.ops == ["connect", "disconnect"]
    assert not link.is_symlink()
    assert await records(world.store) == {}


async def test_vanished_device_fails_then_is_attached_again(tmp_path: Path, loop: Loop) -> None:
    # Probes only every 60 s: noticing the detach at once is the udev/kernel event's doing.
    world = World(tmp_path, probe_interval=60.0)
    try:
        await _vanish_and_restore(world, loop)
    finally:
        await world.close()


async def _vanish_and_restore(world: World, loop: Loop) -> None:
    await world.start(udev=True)
    key = world.manage("CID-A", spec("vol-1", loop.device))
    await world.wait_state(key, State.CONNECTED)
    started = time.monotonic()
    loop.detach()
    st = await world.wait_state(key, State.FAILED, timeout=30)
    noticed = time.monotonic() - started
    # Probes are 60 s apart: only the udev event explains noticing it before that.
    assert noticed < 30.0, f"the detach was noticed after {noticed:.2f}s, not by an event"
    assert st.last_error is not None
    await asyncio.sleep(1.0)
    now = world.state(key)
    assert now is not None and now.state in (State.FAILED, State.CONNECTING)
    assert now.attempts >= 1
    loop.restore()
    st = await world.wait_state(key, State.CONNECTED, timeout=15)
    assert st.path == loop.device
    assert os.readlink(Path(world.config.run_dir) / "managed" / "vol-1") == loop.device
    assert world.runner.ops.count("connect") >= 2
    world.unmanage("CID-A")
    await world.until("key gone", lambda: world.state(key) is None)
    assert await records(world.store) == {}


async def test_restart_adopts_attachment_without_connecting(tmp_path: Path, loop: Loop) -> None:
    first = World(tmp_path)
    try:
        await first.start()
        key = first.manage("CID-A", spec("vol-1", loop.device))
        await first.wait_state(key, State.CONNECTED)
    finally:
        await first.close()
    second = World(tmp_path)
    try:
        second.desired.apply_put("CID-A", spec("vol-1", loop.device))
        changes: list[tuple[str | None, str | None]] = []
        second.actual.listen(lambda c: changes.append((c.old, c.new)))
        await second.start()
        st = await second.wait_state(key, State.CONNECTED)
        assert st.path == loop.device
        assert changes[0] == (None, State.UNCERTAIN)
        assert "connect" not in second.runner.ops
        second.unmanage("CID-A")
        await second.until("key gone", lambda: second.state(key) is None)
        assert second.runner.ops == ["disconnect"]
    finally:
        await second.close()


async def test_other_connection_info_for_an_attached_volume_is_929(
        world: World, loop: Loop) -> None:
    await world.start()
    key = world.manage("CID-A", spec("vol-1", loop.device))
    await world.wait_state(key, State.CONNECTED)
    # The stored attachment was made with other connection info (an update cut by a restart).
    other = spec("vol-1", loop.device, note="other")
    with pytest.raises(errors.Error) as raised:
        await world.managed.connect(other)
    assert raised.value.code == 929
    assert world.runner.ops == ["connect"]
    world.unmanage("CID-A")
    await world.until("key gone", lambda: world.state(key) is None)


async def test_iscsi_attach_fails_within_deadline_with_926(world: World) -> None:
    world.config = dataclasses.replace(
        world.config, managed=dataclasses.replace(world.config.managed, helper_timeout=60.0))
    await world.start()
    info = {"driver_volume_type": "iscsi", "data": {
        "target_portal": "127.0.0.1:3260", "target_iqn": "iqn.2003-01.org.example:t1",
        "target_lun": 1, "auth_method": "CHAP", "auth_username": "chapuser",
        "auth_password": "chap-Secret-42"}}
    s = ManagedSpec(volumeID="vol-iscsi", connection_info=Secret(json.dumps(info)))
    started = time.monotonic()
    key = world.manage("CID-I", s)
    st = await world.wait_state(key, State.FAILED, timeout=70)
    seconds = time.monotonic() - started
    assert seconds < 60.0
    assert st.last_error is not None and st.last_error.code == 926, st.last_error
    assert "chap-Secret-42" not in st.last_error.message
    assert st.next_retry is not None  # retried with backoff
    assert await records(world.store) == {}
    assert not (Path(world.config.run_dir) / "managed" / "vol-iscsi").is_symlink()
    print(f"iSCSI attach failed after {seconds:.1f}s: {st.last_error.message[:200]}")
    world.unmanage("CID-I")
    await world.until("key gone", lambda: world.state(key) is None, timeout=70)


async def test_hanging_helper_is_killed_and_others_go_on(tmp_path: Path, loop: Loop) -> None:
    hang = tmp_path / "hang.py"
    hang.write_text("import time\ntime.sleep(3600)\n")
    w = World(tmp_path, helper_timeout=1.0, helper_command=f"{sys.executable} {hang}")
    try:
        await w.start()
        key = w.manage("CID-H", spec("vol-h", loop.device))
        started = time.monotonic()
        st = await w.wait_state(key, State.FAILED, State.STUCK, timeout=15)
        seconds = time.monotonic() - started
        assert st.last_error is not None and st.last_error.code == errors.Timeout.code
        assert seconds < 14.0  # within the wait: attach and rollback deadlines, never a hang
        # Meanwhile the loop serves: a local directory connects at once.
        localdir = tmp_path / "local"
        localdir.mkdir()
        assert w.rec is not None
        lkey = w.manage("CID-L", LocalSpec(connection=str(localdir)))
        await w.wait_state(lkey, State.CONNECTED, timeout=5)
        assert await records(w.store) == {}
        w.unmanage("CID-L")
        w.unmanage("CID-H")
        await w.until("keys gone", lambda: w.state(key) is None and w.state(lkey) is None)
    finally:
        await w.close()


def has_os_brick(python: str) -> bool:
    return subprocess.run([python, "-c", "import os_brick"], capture_output=True,
                          check=False).returncode == 0


async def test_os_brick_missing_is_925(tmp_path: Path, loop: Loop) -> None:
    python = "/usr/bin/python3"
    if has_os_brick(python):
        pytest.skip(f"{python} has os-brick")
    w = World(tmp_path, helper_command=f"{python} -m vdsmconn.host.brick_helper")
    try:
        await w.start()
        with pytest.raises(errors.Error) as raised:
            await w.managed.connect(spec("vol-1", loop.device))
        assert raised.value.code == 925
        assert await records(w.store) == {}
    finally:
        await w.close()


async def test_connector_info_is_this_hosts_and_cached(world: World) -> None:
    await world.start()
    info = await world.managed.connector_info()
    assert info["host"] == os.uname().nodename
    assert info["multipath"] is False
    assert info["platform"] == os.uname().machine
    assert "ip" in info and info["os_type"] == "linux"
    if INITIATOR_FILE.exists():  # noqa: ASYNC240 - a file in /etc
        assert info["initiator"].startswith("iqn.")
    again = await world.managed.connector_info()
    assert again == info and world.runner.ops == ["connector_info"]
    await world.managed.connector_info(refresh=True)
    assert world.runner.ops == ["connector_info", "connector_info"]


async def test_stale_record_of_a_gone_device_is_replaced(world: World, loop: Loop) -> None:
    await world.store.open()
    old = {"volume_id": "vol-1", "connection_info": {"driver_volume_type": "local",
                                                      "data": {"device_path": "/dev/nonesuch"}},
           "device_info": {"type": "local", "path": "/dev/nonesuch"},
           "path": "/dev/nonesuch", "multipath": False, "attached": 0}
    await world.store.commit([PutAttachment("vol-1", old)])
    await world.store.close()
    world.store = Store(Path(world.config.state_dir))
    await world.start()
    key = world.manage("CID-A", spec("vol-1", loop.device))
    st = await world.wait_state(key, State.CONNECTED)
    assert st.path == loop.device
    assert world.runner.ops == ["disconnect", "connect"]
    assert (await records(world.store))["vol-1"]["path"] == loop.device
    world.unmanage("CID-A")
    await world.until("key gone", lambda: world.state(key) is None)
