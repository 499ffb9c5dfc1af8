"""The unmount ladder on real tmpfs mounts: `umount`, `umount -f`, `umount -l`, each with a
deadline; "not mounted" is success; the mount point goes afterwards."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

from tests.daemon import mounted
from vdsmconn import config, errors
from vdsmconn.connectors.base import HostContext
from vdsmconn.connectors.mount import PosixConnector
from vdsmconn.host.command import CommandRunner
from vdsmconn.model import PosixSpec

pytestmark = pytest.mark.root


def stand_in(tmp_path: Path, body: str) -> str:
    """An umount command that logs its arguments, then runs `body` (sh)."""
    script = tmp_path / "umount-stand-in"
    script.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/calls\n{body}\n')
    script.chmod(0o755)
    return str(script)


async def umount(path: str, *flags: str) -> None:
    await asyncio.to_thread(subprocess.run, ["umount", *flags, path], check=False, timeout=10)


def gone(path: str) -> bool:
    return mounted(path) is None and not os.path.lexists(path)


def calls(tmp_path: Path) -> list[str]:
    try:
        return (tmp_path / "calls").read_text().splitlines()
    except FileNotFoundError:
        return []


async def ladder(tmp_path: Path, umount: str) -> tuple[PosixConnector, PosixSpec, str]:
    cfg = dataclasses.replace(config.local(str(tmp_path)), umount_command=umount)
    cfg = dataclasses.replace(cfg, supervisor=dataclasses.replace(cfg.supervisor,
                                                                  command_timeout=1.0))
    runner = CommandRunner(grace=2.0)
    connector = PosixConnector(HostContext(config.host_settings(cfg), runner))
    spec = PosixSpec(connection="vc-ladder", vfs_type="tmpfs")
    path = connector.mountpoint(spec)
    await connector.connect(spec)
    assert mounted(path) is not None
    return connector, spec, path


async def test_busy_then_hung_steps_end_with_lazy_unmount(tmp_path: Path) -> None:
    command = stand_in(tmp_path, 'case "$1 $2" in\n'
                                '  "-c -f") exec sleep 30 ;;\n'    # hangs: deadline, next step
                                '  "-c -l") exec umount "$@" ;;\n'
                                '  *) echo "target is busy" >&2; exit 32 ;;\n'
                                'esac')
    connector, spec, path = await ladder(tmp_path, command)
    try:
        await connector.disconnect(spec)
    finally:
        await connector.host.runner.close()
        if mounted(path):
            await umount(path, "-l")
    assert calls(tmp_path) == [f"-c {path}", f"-c -f {path}", f"-c -l {path}"]
    assert gone(path)


async def test_first_step_that_unmounts_ends_the_ladder(tmp_path: Path) -> None:
    connector, spec, path = await ladder(tmp_path, stand_in(tmp_path, 'exec umount "$@"'))
    await connector.disconnect(spec)
    await connector.host.runner.close()
    assert calls(tmp_path) == [f"-c {path}"]
    assert gone(path)


async def test_not_mounted_is_success(tmp_path: Path) -> None:
    connector, spec, path = await ladder(tmp_path, stand_in(tmp_path, 'exec umount "$@"'))
    await umount(path)
    await connector.disconnect(spec)  # nothing mounted any more: no step, directory removed
    await connector.host.runner.close()
    assert calls(tmp_path) == [] and gone(path)


async def test_every_step_failing_is_a_mount_error(tmp_path: Path) -> None:
    command = stand_in(tmp_path, 'echo "umount: device is busy." >&2; exit 32')
    connector, spec, path = await ladder(tmp_path, command)
    try:
        with pytest.raises(errors.MountError, match="device is busy"):
            await connector.disconnect(spec)
        assert len(calls(tmp_path)) == 3
        assert mounted(path) is not None  # reported, not hidden
    finally:
        await connector.host.runner.close()
        await umount(path)
