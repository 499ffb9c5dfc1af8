"""In the test guest (systemd is PID 1): the daemon runs as a systemd service, a FUSE mount
helper it starts lands in a transient scope of vdsmconn.slice, and the mount survives
`systemctl restart` of the daemon (which kills everything in the service's own cgroup)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.daemon import Daemon, mounted
from tests.fusefs import MOUNT_COMMAND, VcFuse
from tests.guest.fixtures import SystemdUnitFactory
from vdsmconn.model import escape_mount_name

pytestmark = pytest.mark.guest

UNIT = "vdsmconn-scope-test.service"


def cgroup(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text().strip().rpartition("::")[2]


def wait_answering(daemon: Daemon, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            daemon.call("getHostInfo")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture
def vcfuse(tmp_path: Path) -> Iterator[VcFuse]:
    subprocess.run(["modprobe", "fuse"], check=True, timeout=30)
    fs = VcFuse(tmp_path / "ctl")
    try:
        yield fs
    finally:
        fs.kill_servers()


def test_fuse_helper_runs_in_a_scope_and_survives_restart(
        tmp_path: Path, systemd_unit: SystemdUnitFactory, vcfuse: VcFuse) -> None:
    assert os.path.isdir("/run/systemd/system")
    daemon = Daemon(tmp_path, mount_command=MOUNT_COMMAND)
    daemon.config_file.write_text(yaml.safe_dump(daemon.settings))
    unit = systemd_unit(UNIT, f"""[Service]
Type=notify
Environment=PYTHONPATH={os.environ.get("PYTHONPATH", "")}
ExecStart={sys.executable} -m vdsmconn -c {daemon.config_file}
""")
    try:
        unit.start()
        wait_answering(daemon)
        info = daemon.call("getHostInfo")
        daemon.call("manageStorageServer", connectionID="s", connection=vcfuse.connection)
        status = daemon.call("waitStorageServer", connectionIDs=["s"], timeout=60)["s"]
        path = f"{daemon.mount_root}/{escape_mount_name(str(vcfuse.ctl))}"
        assert status["path"] == path
        before = mounted(path)
        server = vcfuse.pid()
        group = cgroup(server)
        assert group.startswith("/vdsmconn.slice/vdsmconn-mount-"), (group, info)
        assert group.endswith(".scope")
        assert cgroup(int(unit.show("MainPID"))) == f"/system.slice/{UNIT}"

        unit.restart()
        wait_answering(daemon)
        status = daemon.call("waitStorageServer", connectionIDs=["s"], timeout=60)["s"]
        after = mounted(path)
        assert vcfuse.servers() == [server]
        assert before is not None and after is not None and after.mount_id == before.mount_id
        assert os.statvfs(path).f_bsize == 4096

        daemon.call("unmanageStorageServer", connectionID="s")
        daemon.wait_gone(path, timeout=30)
        vcfuse.wait_no_servers()
    finally:
        unit.systemctl("stop", check=False)
        daemon.cleanup()
