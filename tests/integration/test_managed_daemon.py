"""Managed volumes through the real daemon over its socket: os-brick's LOCAL connector on a
real loop device, connector info, restart adoption."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.daemon import Daemon

pytestmark = pytest.mark.root


def test_attach_adopt_detach_over_the_socket(daemon: Daemon, tmp_path: Path) -> None:
    image = tmp_path / "vol.img"
    with open(image, "wb") as f:
        f.truncate(8 * 1024 * 1024)
    device = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True,
                            text=True, check=True, timeout=30).stdout.strip()
    try:
        info = daemon.call("getConnectorInfo")
        assert info["host"] == os.uname().nodename
        conn = {"type": "managed", "volumeID": "vol-d1",
                "connection_info": {"driver_volume_type": "local",
                                    "data": {"device_path": device}}}
        daemon.call("manageStorageServer", connectionID="m1", connection=conn)
        daemon.call("manageStorageServer", connectionID="m2", connection=conn)
        status = daemon.call("waitStorageServer", connectionIDs=["m1", "m2"],
                             timeout=60)["m1"]
        assert status["path"] == device and status["refs"] == 2
        link = Path(daemon.run_dir, "managed", "vol-d1")
        assert os.readlink(link) == device
        daemon.stop()
        daemon.start()
        again = daemon.call("waitStorageServer", connectionIDs=["m1"], timeout=60)["m1"]
        assert again["path"] == device
        # The volume in getDeviceList: a loop device has no SCSI identity, only its size.
        (found,) = daemon.call("getDeviceList")["devices"]
        assert (found["path"], found["devices"], found["connectionIDs"]) == (
            device, [device], ["m1", "m2"])
        assert found["size"] == 8 * 1024 * 1024 and found["sessions"] == []
        assert found["wwid"] is None and found["multipath"] is None and found["error"] is None
        log = daemon.log().split("STOPPED")[-1]
        assert "ATTACHMENTS loaded=1" in log
        assert "ADOPT key=managed:vol-d1" in log and "uncertain->connected" in log
        assert "none->connecting" not in log  # adopted, not attached a second time
        daemon.call("unmanageStorageServer", prefix="m")
        daemon._until("link removed", lambda: not os.path.lexists(link), 60)
        daemon.wait_nothing_listed()
    finally:
        subprocess.run(["losetup", "-d", device], check=False, timeout=30)
