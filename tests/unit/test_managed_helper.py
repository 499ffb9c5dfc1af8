"""The os-brick helper's protocol and masking, device path resolution, config, the connector
without os-brick or store: all without root."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vdsmconn import config, connectors
from vdsmconn.connectors.base import HostContext
from vdsmconn.connectors.managed import ManagedConnector, device_path, device_ready
from vdsmconn.errors import ManagedVolumeNotSupported, ManagedVolumeUnsupportedDevice
from vdsmconn.host import brick_helper
from vdsmconn.host.fakerunner import FakeRunner
from vdsmconn.model import MASK, ManagedSpec, Secret


def test_secret_values_are_found_at_any_depth() -> None:
    info = {"data": {"auth_password": "pw-123", "auth_username": "user",
                     "nested": [{"discovery_auth_password": "disc-456"}], "secret_uuid": 99999},
            "driver_volume_type": "iscsi"}
    # SPEC 4: every name with "auth" in it is a secret, the user name of CHAP too.
    assert brick_helper.secret_values(info) == ["disc-456", "pw-123", "99999", "user"]
    assert brick_helper.scrub("login pw-123 and disc-456", ["disc-456", "pw-123"]) == \
        f"login {MASK} and {MASK}"


def test_helper_refuses_bad_requests() -> None:
    assert brick_helper.serve("not json")["kind"] == "bad_request"
    assert brick_helper.serve("[]")["kind"] == "bad_request"
    reply = brick_helper.serve(json.dumps({"op": "format", "lock_path": "/x"}))
    assert reply == {"ok": False, "kind": "bad_request", "error": "BadRequest",
                     "message": "unknown op 'format'"}


def test_helper_failure_message_masks_the_request_secrets(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    def boom(request: dict[str, Any]) -> None:
        raise RuntimeError(f"login with {request['connection_properties']['auth_password']}"
                           " refused")

    monkeypatch.setattr(brick_helper, "handle", boom)
    request = {"op": "connect", "protocol": "ISCSI", "lock_path": str(tmp_path),
               "connection_properties": {"auth_password": "hunter2-secret"}}
    reply = brick_helper.serve(json.dumps(request))
    assert reply["kind"] == "failed"
    assert "hunter2-secret" not in reply["message"]
    assert reply["message"] == f"login with {MASK} refused"


def test_helper_without_os_brick_says_missing(tmp_path: Path) -> None:
    """The helper run by a Python that lacks os-brick answers `missing` on stdout, rc 0."""
    python = "/usr/bin/python3"
    if subprocess.run([python, "-c", "import os_brick"], capture_output=True,
                      check=False).returncode == 0:
        pytest.skip(f"{python} has os-brick")
    request = {"op": "connector_info", "lock_path": str(tmp_path / "locks")}
    root = str(Path(__file__).parents[2])
    proc = subprocess.run([python, "-m", "vdsmconn.host.brick_helper"], input=json.dumps(request),
                          capture_output=True, text=True, timeout=60, check=False,
                          env={"PYTHONPATH": root, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    assert reply["ok"] is False and reply["kind"] == "missing"
    assert "os_brick" in reply["message"]


@pytest.mark.parametrize(("info", "device_info", "expected"), [
    ({"driver_volume_type": "local"}, {"type": "local", "path": "/dev/loop3"}, "/dev/loop3"),
    ({"driver_volume_type": "rbd", "data": {"name": "pool/vol-1"}},
     {"type": "block", "path": "/dev/rbd0"}, "/dev/rbd/pool/vol-1"),
    ({"driver_volume_type": "iscsi"}, {"path": "/dev/sdb", "scsi_wwn": "36001"}, "/dev/sdb"),
])
def test_device_path(info: dict[str, Any], device_info: dict[str, Any], expected: str) -> None:
    assert device_path(info, device_info) == expected


def test_device_path_of_a_multipath_map_without_its_node_falls_back() -> None:
    # No /dev/mapper/<wwn> and no dm name in sysfs for a made-up path: os-brick's path.
    found = device_path({"driver_volume_type": "iscsi"},
                        {"path": "/dev/nonesuch-dm", "multipath_id": "3600nonesuch"})
    assert found == "/dev/nonesuch-dm"


def test_device_path_refuses_what_is_not_a_device() -> None:
    with pytest.raises(ManagedVolumeUnsupportedDevice) as raised:
        device_path({"driver_volume_type": "nfs"}, {"path": "/mnt/x/volume-1"})
    assert raised.value.code == 928


def test_device_ready_only_for_block_devices(tmp_path: Path) -> None:
    regular = tmp_path / "file"
    regular.write_text("x")
    assert not device_ready(str(regular))
    assert not device_ready(str(tmp_path / "missing"))


def _managed(tmp_path: Path) -> ManagedConnector:
    cfg = config.local(str(tmp_path))
    host = HostContext(config.host_settings(cfg), FakeRunner())
    table = connectors.build(host)
    managed = table["managed"]
    assert isinstance(managed, ManagedConnector)
    return managed


async def test_without_a_store_the_backend_is_unavailable_with_925(tmp_path: Path) -> None:
    managed = _managed(tmp_path)
    assert managed.available() == "no state store for attachment records"
    spec = ManagedSpec(volumeID="v", connection_info=Secret(json.dumps(
        {"driver_volume_type": "local", "data": {"device_path": "/dev/null"}})))
    with pytest.raises(ManagedVolumeNotSupported) as raised:
        await managed.connect(spec)
    assert raised.value.code == 925
    await managed.disconnect(spec)  # nothing recorded: nothing to detach


def test_managed_config_defaults_and_types(tmp_path: Path) -> None:
    cfg = config.Config()
    assert (cfg.managed.multipath, cfg.managed.helper_timeout) == (False, 120.0)
    loaded = config.load_text("managed: {multipath: true, helper_timeout: 30}", "t")
    assert loaded.managed.multipath is True and loaded.managed.helper_timeout == 30.0
    with pytest.raises(config.ConfigError, match=r"managed\.multipath"):
        config.load_text("managed: {multipath: 1}", "t")
    with pytest.raises(config.ConfigError, match=r"managed\.helper_timeout"):
        config.load_text("managed: {helper_timeout: 0}", "t")


def test_helper_runs_as_a_module(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "vdsmconn.host.brick_helper"], input="{}",
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["kind"] == "bad_request"
