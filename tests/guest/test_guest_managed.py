"""In the test guest, for real: os-brick's ISCSI connector attaches an LIO LUN over two paths
with dm-multipath through `type: managed`; a restart adopts it; unmanage detaches it, logs the
sessions out and removes the map.

The reconciler, store and connectors are built in-process as the daemon builds them (see
tests/integration/test_managed_volumes.py); os-brick comes from the project's virtualenv, which the
guest has on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.guest.fixtures import IscsiTargetFactory, Multipath, sh, wait_for
from vdsmconn.model import ManagedSpec, Secret, State

pytestmark = [pytest.mark.guest, pytest.mark.root]


async def test_iscsi_multipath_volume_attach_adopt_detach(
    multipath: Multipath, iscsi_target: IscsiTargetFactory, tmp_path: Path
) -> None:
    from tests.integration.test_managed_volumes import World

    target = iscsi_target(luns=1, size_mb=32, links=2)
    data = {
        "target_portal": target.portals[0], "target_iqn": target.iqn, "target_lun": 0,
        "target_portals": target.portals, "target_iqns": [target.iqn] * 2,
        "target_luns": [0, 0], "discard": False,
    }
    info = {"driver_volume_type": "iscsi", "data": data}
    spec = ManagedSpec(volumeID="vol-mp", connection_info=Secret(json.dumps(info)))
    settings = {"multipath": True, "helper_timeout": 180.0}

    first = World(tmp_path, probe_interval=5.0, **settings)
    try:
        await first.start(udev=True)
        key = first.manage("CID-MP", spec)
        st = await first.wait_state(key, State.CONNECTED, State.FAILED, timeout=200)
        assert st.state == State.CONNECTED, st.last_error
        assert st.path is not None and st.path.startswith("/dev/mapper/"), st.path
        link = Path(first.config.run_dir) / "managed" / "vol-mp"
        assert os.readlink(link) == st.path
        assert str(link.resolve()).startswith("/dev/dm-")
        assert len(target.sessions()) == 2
        listing = multipath.wait_for_paths(2)
        assert Path(st.path).name in listing
        record = (await first.store.load_attachments())["vol-mp"]
        assert record["multipath"] is True and record["device_info"]["multipath_id"]
        print(f"attached {st.path} -> {link.resolve()}\n{listing}")
    finally:
        await first.close()

    second = World(tmp_path, probe_interval=5.0, **settings)
    try:
        second.desired.apply_put("CID-MP", spec)
        await second.start(udev=True)
        st = await second.wait_state(key, State.CONNECTED, timeout=30)
        assert "connect" not in second.runner.ops
        path = st.path
        assert path is not None
        second.unmanage("CID-MP")
        await second.until("detached", lambda: second.state(key) is None, timeout=200)
        assert second.runner.ops == ["disconnect"]
        assert target.sessions() == []
        wait_for("the map to go", lambda: not Path(path).exists(), timeout=30)
        assert Path(path).name not in sh("multipath", "-ll", check=False).stdout
        assert not (Path(second.config.run_dir) / "managed" / "vol-mp").is_symlink()
        assert await second.store.load_attachments() == {}
    finally:
        await second.close()
