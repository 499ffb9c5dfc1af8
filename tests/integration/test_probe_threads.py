"""Probe threads do not pile up on a hung file system: a localfs directory inside a real FUSE
mount whose server hangs (vcfuse, as a dead NFS mount would) holds one probe thread however
often it is probed, and a healthy directory next to it keeps answering. The connector runs in
this process, so its threads can be counted."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fusefs import MOUNT_COMMAND, VcFuse
from vdsmconn import config, errors
from vdsmconn.connectors.base import HostContext
from vdsmconn.connectors.localfs import LocalConnector
from vdsmconn.host.fakerunner import FakeRunner
from vdsmconn.model import LocalSpec

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")]

PROBES = 20


def probe_threads(name: str) -> int:
    return sum(t.name == f"probe {name}" for t in threading.enumerate())


@pytest.fixture
def hung_dir(tmp_path: Path) -> Iterator[tuple[Path, VcFuse]]:
    """The root of a vcfuse mount (serving until told to hang); unmounted at the end."""
    fs = VcFuse(tmp_path / "ctl")
    mnt = tmp_path / "fuse"
    mnt.mkdir()
    subprocess.run([MOUNT_COMMAND, "-t", "fuse.vcfuse", str(fs.ctl), str(mnt)], check=True,
                   timeout=30)
    try:
        yield mnt, fs
    finally:
        fs.set_mode("serve")  # held callers go on, nothing stays in D state
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)
        fs.wait_no_servers()


async def test_localfs_in_a_hung_mount_holds_one_probe_thread(
        tmp_path: Path, hung_dir: tuple[Path, VcFuse]) -> None:
    mnt, fs = hung_dir
    base = config.local(str(tmp_path / "daemon"))
    cfg = dataclasses.replace(base, supervisor=dataclasses.replace(
        base.supervisor, probe_timeout=0.2))
    connector = LocalConnector(HostContext(config.host_settings(cfg), FakeRunner()))
    hung = LocalSpec(connection=str(mnt))
    healthy = LocalSpec(connection=str(tmp_path / "ok"))
    (tmp_path / "ok").mkdir()
    name = f"check of {mnt}"
    await connector.connect(hung)
    await connector.connect(healthy)
    fs.set_mode("hang")
    most = 0
    for _ in range(PROBES):
        with pytest.raises(errors.MountHung) as caught:
            await connector.probe(hung)
        most = max(most, probe_threads(name))
        await connector.probe(healthy)  # not held up by the hung one
    print(f"OBSERVED hung localfs: at most {most} probe thread(s) over {PROBES} probes")
    assert most == 1
    assert caught.value.code == 481
    assert "an earlier read has not returned yet" in caught.value.message
    fs.set_mode("serve")  # the held request is answered: the thread returns
    async with asyncio.timeout(30):
        while probe_threads(name):  # noqa: ASYNC110 - a thread ends, no loop event
            await asyncio.sleep(0.05)
    await connector.probe(hung)  # it answers again
    await connector.disconnect(hung)
    await connector.disconnect(healthy)
