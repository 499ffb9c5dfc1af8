"""managed: block volumes attached through os-brick, in a helper subprocess (SPEC 8).

os-brick never runs in the daemon: every call goes to `vdsmconn.host.brick_helper` through the
command runner, under `managed.helper_timeout`. What an attach did (the connection info, what
os-brick returned, the device path, the multipath setting used) is an attachment record in the
state store, committed before the attach is reported; detach uses the record, so it undoes
exactly what was done, with the same multipath setting.

Codes: 925 os-brick missing, 926 the helper (os-brick) failed, 927 the device is already the
device of another managed volume, 928 os-brick cannot attach this kind of volume or returned no
block device, 929 the volume is attached with other connection info (a record left by an update
interrupted by a restart, say): it is neither attached a second way nor detached behind a VM's
back; unmanage (which detaches the recorded attachment) or update back to that info.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import mmap
import os
import shlex
import stat
import sys
from typing import Any

from vdsmconn import errors
from vdsmconn.connectors.base import Connected, Connector, HostContext, StepLog
from vdsmconn.host.brick_helper import scrub, secret_values
from vdsmconn.host.command import StuckCommand, tail
from vdsmconn.host.links import make_link, remove_link
from vdsmconn.model import ManagedSpec, mask_secrets
from vdsmconn.state.actual import Attachment

log = logging.getLogger(__name__)

SECTOR = 4096
# The folder holding the vdsmconn package, for the helper to import it from.
SOURCE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))



class ManagedConnector(Connector[ManagedSpec]):
    def __init__(self, host: HostContext) -> None:
        super().__init__(host)
        self._loading = asyncio.Lock()
        self._info: dict[str, Any] | None = None
        self._info_lock = asyncio.Lock()

    # --- places ------------------------------------------------------------------------

    @property
    def lock_path(self) -> str:
        return os.path.join(self.host.settings.state_dir, "brick-locks")

    def link(self, volume_id: str) -> str:
        return os.path.join(self.host.settings.run_dir, "managed", volume_id)

    def available(self) -> str | None:
        if self.host.attachments is None:
            return "no state store for attachment records"
        if self.host.settings.managed.helper_command is None and \
                importlib.util.find_spec("os_brick") is None:
            return "os-brick is not installed (pip install os-brick)"
        return None

    def _require(self) -> None:
        reason = self.available()
        if reason is not None:
            raise errors.ManagedVolumeNotSupported(f"managed volumes not available: {reason}")

    # --- records -------------------------------------------------------------------------

    @property
    def _records(self) -> dict[str, Attachment]:
        """The attachments as loaded (empty before `load`): the host state's."""
        return self.host.state.attachments or {}

    async def load(self) -> dict[str, Attachment]:
        """The attachment records, read from the store once (call before adopting)."""
        async with self._loading:
            if self.host.state.attachments is None:
                store = self.host.attachments
                found = await store.attachments() if store else {}
                self.host.state.attachments = found
                log.info("ATTACHMENTS loaded=%d", len(found))
            return self.host.state.attachments

    def _record(self, spec: ManagedSpec) -> Attachment | None:
        return self._records.get(spec.volumeID)

    async def _put(self, record: Attachment) -> None:
        assert self.host.attachments is not None
        await self.host.attachments.put_attachment(record)

    async def _delete(self, volume_id: str) -> None:
        assert self.host.attachments is not None
        await self.host.attachments.delete_attachment(volume_id)

    # --- the contract ----------------------------------------------------------------------

    def present(self, spec: ManagedSpec) -> Connected | None:
        rec = self._record(spec)
        if rec is None or rec.connection_info != spec.info() or not device_ready(rec.path):
            return None
        return Connected(path=rec.path)

    async def connect(self, spec: ManagedSpec) -> Connected:
        self._require()
        records = await self.load()
        info = spec.info()
        rec = records.get(spec.volumeID)
        if rec is not None:
            if device_ready(rec.path):
                if rec.connection_info != info:
                    raise errors.ManagedVolumeConnectionMismatch(
                        f"volume {spec.volumeID} is attached at {rec.path} with other"
                        " connection info; unmanage it to detach it first")
                await asyncio.to_thread(make_link, rec.path, self.link(spec.volumeID))
                log.info("ATTACHED volume=%s path=%s (recorded, not attached again)",
                         spec.volumeID, rec.path)
                return Connected(path=rec.path)
            log.info("ATTACH volume=%s recorded device %s is gone: detaching the record",
                     spec.volumeID, rec.path)
            await self._detach(spec.volumeID, rec, force=True)
        return await self._attach(spec.volumeID, info)

    async def _attach(self, volume_id: str, info: dict[str, Any]) -> Connected:
        multipath = self.host.settings.managed.multipath
        try:
            device_info = await self._call("connect", info, multipath)
        except errors.Timeout:  # killed half way: undo what it may have done
            await self._rollback(volume_id, info, None, multipath, recorded=False)
            raise
        if not isinstance(device_info, dict):
            await self._rollback(volume_id, info, None, multipath, recorded=False)
            raise errors.ManagedVolumeUnsupportedDevice(
                f"os-brick returned no device for volume {volume_id}")
        recorded = False
        try:
            path = device_path(info, device_info)
            self._check_unique(volume_id, path)
            await self._verify(path)
            record = Attachment(volume_id, info, device_info, path, multipath,
                                self.host.clock.time())
            await self._put(record)
            recorded = True
            (await self.load())[volume_id] = record
            await asyncio.to_thread(make_link, path, self.link(volume_id))
        except errors.ManagedVolumeAlreadyAttached:
            raise  # the device is another volume's: detaching it would take it from that one
        except errors.Error:
            await self._rollback(volume_id, info, device_info, multipath, recorded)
            raise
        log.info("ATTACHED volume=%s path=%s link=%s", volume_id, path, self.link(volume_id))
        return Connected(path=path)

    def _check_unique(self, volume_id: str, path: str) -> None:
        real = os.path.realpath(path)
        for other, rec in self._records.items():
            if other != volume_id and os.path.realpath(rec.path) == real:
                raise errors.ManagedVolumeAlreadyAttached(
                    f"device {path} of volume {volume_id} is already attached as volume {other}")

    async def _verify(self, path: str) -> None:
        if not device_ready(path):
            raise errors.ConnectError(f"os-brick attached {path}, but it is not a usable block"
                                      " device")
        await self._read(path)

    async def _rollback(self, volume_id: str, info: dict[str, Any],
                        device_info: dict[str, Any] | None, multipath: bool,
                        recorded: bool) -> None:
        log.warning("ROLLBACK volume=%s undoing a partial attach", volume_id)
        try:
            await self._call("disconnect", info, multipath, device_info, force=True)
        except errors.Error as e:
            log.error("ROLLBACK volume=%s detach failed, device may be left: %s",
                      volume_id, e.message)
            return
        await asyncio.to_thread(remove_link, self.link(volume_id))
        if recorded:
            await self._delete(volume_id)
            self._records.pop(volume_id, None)

    async def disconnect(self, spec: ManagedSpec, force: bool = False) -> None:
        rec = (await self.load()).get(spec.volumeID)
        if rec is None:
            await asyncio.to_thread(remove_link, self.link(spec.volumeID))
            return
        self._require()
        await self._detach(spec.volumeID, rec, force)

    async def _detach(self, volume_id: str, rec: Attachment, force: bool) -> None:
        """Detach with the record; a device already gone is success; a failure keeps it."""
        try:
            await self._call("disconnect", rec.connection_info, rec.multipath,
                             rec.device_info, force=force)
        except StuckCommand:
            raise
        except errors.Error as e:
            if device_exists(rec.path):
                log.warning("DETACH volume=%s failed, record kept: %s", volume_id, e.message)
                raise
            log.info("DETACH volume=%s os-brick failed but %s is gone: %s", volume_id,
                     rec.path, e.message)
        await asyncio.to_thread(remove_link, self.link(volume_id))
        await self._delete(volume_id)
        self._records.pop(volume_id, None)
        log.info("DETACHED volume=%s path=%s", volume_id, rec.path)

    async def probe(self, spec: ManagedSpec) -> None:
        rec = self._record(spec)
        if rec is None or rec.connection_info != spec.info():
            raise errors.ConnectError(f"volume {spec.volumeID} has no attachment")
        await self._read(rec.path)
        await asyncio.to_thread(make_link, rec.path, self.link(spec.volumeID))

    async def _read(self, path: str) -> None:
        """Read the first sector in an abandonable thread; at most one per device."""
        try:
            await self.host.probes.run(path, lambda: read_sector(path), f"read of {path}",
                                       self.host.settings.probe_timeout)
        except errors.Timeout as e:
            raise errors.MountHung(e.message) from None
        except OSError as e:
            raise errors.ConnectError(f"{path} does not answer: {e.strerror or e}") from None

    async def test(self, spec: ManagedSpec, timeout: float) -> StepLog:
        log_ = StepLog(self.host.clock)

        async def backend() -> str:
            self._require()
            await self._call("check", spec.info(), self.host.settings.managed.multipath)
            return f"os-brick can attach {spec.info().get('driver_volume_type')} volumes"

        await log_.run("os-brick", backend)
        return log_

    async def connector_info(self, refresh: bool = False) -> dict[str, Any]:
        """os-brick's connector properties of this host, cached until `refresh`."""
        self._require()
        async with self._info_lock:
            if self._info is None or refresh:
                found = await self._call("connector_info", {}, self.host.settings.managed.multipath)
                if not isinstance(found, dict):
                    raise errors.ManagedVolumeHelperFailed(
                        "os-brick returned no connector properties")
                self._info = mask_secrets(found)
            return dict(self._info)

    # --- the helper ----------------------------------------------------------------------

    def _argv(self) -> list[str]:
        command = self.host.settings.managed.helper_command
        return shlex.split(command) if command else [sys.executable, "-m",
                                                     "vdsmconn.host.brick_helper"]

    async def _call(self, op: str, info: dict[str, Any], multipath: bool,
                    device_info: dict[str, Any] | None = None, force: bool = False) -> Any:
        cfg = self.host.settings.managed
        request = {
            "op": op, "protocol": str(info.get("driver_volume_type", "")),
            "connection_properties": info.get("data", {}), "device_info": device_info,
            "multipath": multipath, "force": force, "lock_path": self.lock_path,
            "my_ip": cfg.my_ip,
        }
        if op == "check":
            request["op"] = "connect"
            request["check_only"] = True
        secrets = secret_values(info)
        env = {"PYTHONPATH": os.pathsep.join(p for p in (SOURCE, os.environ.get("PYTHONPATH"))
                                             if p)}
        result = await self.host.runner.run(
            self._argv(), timeout=cfg.helper_timeout, input=json.dumps(request).encode(),
            env=env,
        )
        reply = _reply(result.stdout)
        if reply is None:
            raise errors.ManagedVolumeHelperFailed(
                f"os-brick helper {op} failed with rc={result.rc}:"
                f" {scrub(tail(result.stderr), secrets)}")
        if reply.get("ok"):
            return reply.get("result")
        message = scrub(f"{reply.get('error')}: {reply.get('message')}", secrets)
        kind = reply.get("kind")
        if kind == "missing":
            raise errors.ManagedVolumeNotSupported(f"os-brick is not available: {message}")
        if kind == "unsupported":
            raise errors.ManagedVolumeUnsupportedDevice(
                f"os-brick cannot {op} this volume: {message}")
        raise errors.ManagedVolumeHelperFailed(f"os-brick {op} failed: {message}")


def _reply(stdout: str) -> dict[str, Any] | None:
    lines = stdout.strip().splitlines()
    try:
        reply = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    return reply if isinstance(reply, dict) else None


# --- the host, blocking (call in threads) ------------------------------------------------


def device_path(info: dict[str, Any], device_info: dict[str, Any]) -> str:
    """The device to show and link: the multipath map, the rbd name, or os-brick's path."""
    path = device_info.get("path")
    mpath = device_info.get("multipath_id")
    if isinstance(mpath, str) and mpath:
        mapper = f"/dev/mapper/{mpath}"
        if os.path.exists(mapper):
            return mapper
        name = _dm_name(path) if isinstance(path, str) else None
        if name:  # user_friendly_names: the map has a name of its own
            return f"/dev/mapper/{name}"
    if str(info.get("driver_volume_type", "")).lower() == "rbd":
        name = info.get("data", {}).get("name")
        if isinstance(name, str) and name:
            return f"/dev/rbd/{name}"
    if not isinstance(path, str) or not path.startswith("/dev/"):
        raise errors.ManagedVolumeUnsupportedDevice(f"os-brick returned no block device: {path!r}")
    return path


def _dm_name(path: str) -> str | None:
    try:
        with open(f"/sys/class/block/{os.path.basename(os.path.realpath(path))}/dm/name") as f:
            return f.read().strip() or None
    except OSError:
        return None


def device_exists(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def device_ready(path: str) -> bool:
    """A block device node with a non-zero size (a detached loop device keeps its node)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if not stat.S_ISBLK(st.st_mode):
        return False
    sysfs = f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/size"
    try:
        with open(sysfs) as f:
            return int(f.read().strip() or 0) > 0
    except (OSError, ValueError):
        return True  # no sysfs entry to ask: the node is all we know


def read_sector(path: str) -> None:
    """Read the first sector, bypassing the page cache where the device allows it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = mmap.mmap(-1, SECTOR)  # page aligned, as O_DIRECT wants
        with buf:
            if os.preadv(fd, [buf], 0) <= 0:
                raise OSError(0, "no data (the device is empty or gone)")
    finally:
        os.close(fd)
