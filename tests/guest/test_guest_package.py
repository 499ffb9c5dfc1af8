"""The Debian package on a real Debian host (the test guest, systemd as PID 1): installed with
apt from the guest's own packages, the daemon enabled and running; an NFS export managed with
the installed client; a newer build installed while the mount is live restarts the daemon
once, which adopts the mount (same mount id, no mount command, the CID still there) and keeps
the administrator's configuration; apt remove stops it and leaves mounts, state and
configuration; apt purge removes state and configuration.

The two builds (same tree, the second one's version bumped) are made on the host by
``prepare_guest``, which the guest plugin runs before the boot: they reach the guest through
the results share. Standard library only at the top level (Debian's python3 collects this
module).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guest.fixtures import NfsExport, sh

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = "packages"  # under the results share
IN_GUEST_RESULTS = Path("/run/vdsmconn-results")  # where image/vdsmconn-guest-boot mounts it
UNIT = "vdsmconn.service"
MOUNT_ROOT = Path("/rhev/data-center/mnt")
CONFFILE = Path("/etc/vdsmconn/vdsmconn.yaml")
STATE = Path("/var/lib/vdsmconn")
ADMIN_CHANGE = "\nsupervisor:\n  probe_interval: 5   # set by the administrator\n"


def prepare_guest(results: Path) -> None:
    """On the host: build the package twice (revisions 1 and 2) into results/packages."""
    out = results / PACKAGES
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {}
    try:
        build = REPO / "contrib" / "packaging" / "build-deb"
        upstream = subprocess.run(
            ["python3", str(REPO / "contrib/packaging/stage.py"), "--vendor", "deb",
             "--python", "/usr/bin/python3", "--print-version"],
            capture_output=True, text=True, check=True, timeout=60).stdout.strip()
        for name, revision in (("old", 1), ("new", 2)):
            proc = subprocess.run(["bash", str(build), "--version", f"{upstream}-{revision}",
                                   "--out", str(out)], capture_output=True, text=True,
                                  timeout=900, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"build-deb exited {proc.returncode}: {proc.stderr[-3000:]}")
            deb = Path(proc.stdout.split()[-1])
            manifest[name] = str(IN_GUEST_RESULTS / PACKAGES / deb.name)
            manifest[f"{name}_version"] = f"{upstream}-{revision}"
    except Exception:
        manifest["error"] = traceback.format_exc()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def manifest() -> dict[str, str]:
    path = IN_GUEST_RESULTS / PACKAGES / "manifest.json"
    assert path.exists(), f"{path} is missing: prepare_guest did not run on the host"
    found: dict[str, str] = json.loads(path.read_text())
    assert "error" not in found, f"building the packages on the host failed:\n{found['error']}"
    return found


def apt(*args: str) -> str:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = subprocess.run(["apt-get", "-y", "-q", "-o", "Dpkg::Use-Pty=0", *args],
                          capture_output=True, text=True, timeout=900, env=env, check=False)
    assert proc.returncode == 0, f"apt-get {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


def client(*args: str, timeout: float = 120) -> Any:
    """The installed client, /usr/bin/vdsmconn, with --json."""
    proc = subprocess.run(["/usr/bin/vdsmconn", "--json", *args], capture_output=True,
                          text=True, timeout=timeout, check=False,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert proc.returncode == 0, f"vdsmconn {' '.join(args)}: {proc.stdout}{proc.stderr}"
    return json.loads(proc.stdout)


def systemctl(*args: str) -> str:
    return sh("systemctl", *args, check=False, timeout=90).stdout.strip()


def package_status() -> str:
    return sh("dpkg-query", "-W", "-f=${Status}", "vdsmconn", check=False).stdout.strip()


def mounts() -> dict[str, int]:
    """mount point -> mount id under the mount root."""
    found = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4].startswith(f"{MOUNT_ROOT}/"):
            found[fields[4]] = int(fields[0])
    return found


class Journal:
    def __init__(self) -> None:
        self.since = sh("date", "+%Y-%m-%d %H:%M:%S").stdout.strip()

    def text(self) -> str:
        return sh("journalctl", "-u", UNIT, "--since", self.since, "-o", "cat",
                  "--no-pager").stdout

    def count(self, needle: str) -> int:
        return self.text().count(needle)


@pytest.fixture
def clean_host() -> Iterator[None]:
    """Whatever the test leaves (package, mounts, state) is purged and unmounted after it."""
    assert package_status() == "", "vdsmconn is already installed in the guest"
    try:
        yield
    finally:
        if package_status():
            apt("purge", "vdsmconn")
        for point in sorted(mounts(), reverse=True):
            sh("umount", "-f", "-l", point, check=False)
        subprocess.run(["rm", "-rf", "/rhev", str(STATE), "/etc/vdsmconn"], check=False,
                       timeout=60)
        sh("systemctl", "reset-failed", UNIT, check=False)


def test_install_upgrade_remove_purge_keep_the_mount(
        nfs_export: NfsExport, clean_host: None) -> None:
    debs = manifest()
    journal = Journal()

    started = time.monotonic()
    apt("install", debs["old"])
    installed_in = time.monotonic() - started
    assert package_status() == "install ok installed"
    assert systemctl("is-enabled", UNIT) == "enabled"
    assert systemctl("is-active", UNIT) == "active"
    assert sh("getent", "group", "kvm", check=False).returncode == 0
    info = client("info")
    unavailable = {k: b["reason"] for k, b in info["backends"].items() if not b["available"]}
    assert unavailable == {}, unavailable
    assert set(info["backends"]) >= {"nfs", "posixfs", "glusterfs", "localfs", "iscsi",
                                     "managed"}
    brick = client("connector-info")  # os-brick from Debian, in the helper process
    assert brick["os_type"] == "linux" and "ip" in brick, brick

    connection = json.dumps({"type": "nfs", "connection": nfs_export.remote,
                             "protocol_version": "4.2"})
    client("manage", "PKG1", connection)
    status = client("wait", "PKG1", "--timeout", "120")["PKG1"]
    assert status["state"] == "connected", status
    before = mounts()
    assert list(before) == [status["path"]], before
    pid = int(systemctl("show", "-P", "MainPID", UNIT))
    CONFFILE.write_text(CONFFILE.read_text() + ADMIN_CHANGE)

    started = time.monotonic()
    apt("install", debs["new"])
    upgraded_in = time.monotonic() - started
    assert sh("dpkg-query", "-W", "-f=${Version}", "vdsmconn").stdout == debs["new_version"]
    assert systemctl("is-active", UNIT) == "active"
    new_pid = int(systemctl("show", "-P", "MainPID", UNIT))
    assert new_pid not in (0, pid)
    listed = client("list", "--no-unmanaged")
    assert list(listed) == ["PKG1"] and listed["PKG1"]["state"] == "connected", listed
    after = mounts()
    print(f"OBSERVED package upgrade: mount ids before={before} after={after}, "
          f"pid {pid} -> {new_pid}, install {installed_in:.0f}s, upgrade {upgraded_in:.0f}s")
    assert after == before  # the same mount: not remounted
    assert CONFFILE.read_text().endswith(ADMIN_CHANGE)
    assert not list(CONFFILE.parent.glob("*.dpkg-*"))
    assert client("info")["pid"] == new_pid
    text = journal.text()
    assert text.count("START version=") == 2, text[-4000:]  # restarted once
    assert text.count("STOPPED") == 1, text[-4000:]
    assert int(systemctl("show", "-P", "NRestarts", UNIT)) == 0
    assert text.count("RUN argv=mount") == 1, text[-4000:]  # the first daemon's only
    assert text.count("ADOPT key=") == 1, text[-4000:]
    assert "UMOUNT" not in text and "RUN argv=umount" not in text

    apt("remove", "vdsmconn")
    assert package_status() == "deinstall ok config-files"
    assert systemctl("is-active", UNIT) in ("inactive", "unknown")
    assert not Path("/usr/bin/vdsmconnd").exists()
    assert mounts() == before
    assert (STATE / "vdsmconn.db").exists()
    assert CONFFILE.read_text().endswith(ADMIN_CHANGE)

    apt("purge", "vdsmconn")
    assert package_status() == ""
    assert not STATE.exists() and not CONFFILE.parent.exists()
    assert mounts() == before  # purge removes state, never a mount in use
    journal_after = journal.text()
    assert journal_after.count("START version=") == 2
    assert "UMOUNT" not in journal_after
