"""A dead server never delays anyone else (issue 13): the real daemon with 24 GlusterFS
connections to a server that drops every packet (their mounts hang until the deadline), and a
tmpfs connection managed meanwhile that connects, remounts and is torn down as usual."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, mounted, running
from tests.netns import NetnsLink

DEAD_KEYS = 24
PER_SERVER = 16  # the default supervisor.max_operations_per_server
WAIT = 20.0  # generous: alone, the healthy key connects in well under a second


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("mount.glusterfs", "glusterfs", "gluster", "nft", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (glusterfs-client, nftables, util-linux, iproute2)"
    return None


pytestmark = [pytest.mark.root, pytest.mark.skipif(_missing() is not None,
                                                   reason=str(_missing()))]


@pytest.fixture
def dead_server() -> Iterator[str]:
    """The address of a server in a namespace of its own that drops every packet."""
    tag = os.getpid()
    net = NetnsLink(f"vcdd{tag % 100000}", f"10.249.{tag % 250}")
    try:
        net.create()
        net.drop_input()
        yield net.address
    finally:
        kill_clients(net.address)
        net.delete()


def _cmdlines() -> Iterator[tuple[int, list[str]]]:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if raw:
            yield int(entry), raw.decode(errors="replace").rstrip("\0").split("\0")


def citing(address: str) -> dict[int, list[str]]:
    """Processes whose command line names `address` (gluster CLI, mount, FUSE clients)."""
    return {pid: argv for pid, argv in _cmdlines() if any(address in a for a in argv)}


def hanging_volumes(address: str) -> set[str]:
    """Volumes of the dead server that a command is working on right now: `gluster volume
    info VOL --remote-host=ADDR` or `mount -t glusterfs ADDR:/VOL`."""
    volumes = set()
    for argv in citing(address).values():
        if os.path.basename(argv[0]) == "gluster" and "info" in argv:
            volumes.add(argv[argv.index("info") + 1])
        elif os.path.basename(argv[0]) == "mount":
            volumes.update(a.split(":/", 1)[1] for a in argv if a.startswith(f"{address}:/"))
    return volumes


def kill_clients(address: str) -> None:
    """SIGKILL the processes we caused that still talk to the dead server (the glusterfs
    FUSE clients leave the mount command's process group), and wait until they are gone."""
    deadline = time.monotonic() + 20
    while pids := list(citing(address)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise AssertionError(f"processes of the dead server left: {citing(address)}")
        time.sleep(0.05)


def states(daemon: Daemon, cids: list[str]) -> dict[str, tuple[str, int]]:
    found = daemon.call("getStorageServerList", connectionIDs=cids)
    return {cid: (s["state"], s["attempts"]) for cid, s in found.items()}


def assert_dead_keys_still_hanging(daemon: Daemon, address: str, cids: list[str]) -> None:
    """Every dead key is still in its first attempt (none has failed yet), and commands on
    the dead server still run, never more than its slots allow."""
    assert states(daemon, cids) == {cid: ("connecting", 1) for cid in cids}
    assert 0 < len(hanging_volumes(address)) <= PER_SERVER


def tmpfs(name: str) -> dict[str, Any]:
    return {"type": "posixfs", "connection": name, "vfs_type": "tmpfs"}


def test_dead_server_does_not_delay_a_healthy_connection(tmp_path: Path,
                                                         dead_server: str) -> None:
    # Long deadlines: the dead keys' commands must still hang at every check below.
    with running(tmp_path, supervisor={"command_timeout": 60}) as daemon:
        try:
            dead = [f"dead-{i}" for i in range(DEAD_KEYS)]
            for i, cid in enumerate(dead):
                daemon.call("manageStorageServer", connectionID=cid,
                            connection={"type": "glusterfs",
                                        "connection": f"{dead_server}:/v{i}"})
            daemon._until(f"{PER_SERVER} commands hanging on the dead server",
                          lambda: len(hanging_volumes(dead_server)) >= PER_SERVER, WAIT)
            assert len(hanging_volumes(dead_server)) == PER_SERVER  # the rest wait

            start = time.monotonic()
            daemon.call("manageStorageServer", connectionID="ok", connection=tmpfs("vc-iso"))
            status = daemon.call("waitStorageServer", connectionIDs=["ok"], timeout=WAIT)["ok"]
            connected_after = time.monotonic() - start
            path = status["path"]
            m = mounted(path)
            assert status["state"] == "connected" and m is not None and m.fstype == "tmpfs"
            assert_dead_keys_still_hanging(daemon, dead_server, dead)

            marker = Path(path, "marker")
            marker.write_text("first mount")
            subprocess.run(["umount", path], check=True, timeout=10)
            start = time.monotonic()
            daemon._until("the healthy key remounted",
                          lambda: mounted(path) is not None and not marker.exists(), WAIT)
            remounted_after = time.monotonic() - start
            status = daemon.call("waitStorageServer", connectionIDs=["ok"], timeout=WAIT)["ok"]
            assert status["state"] == "connected" and status["attempts"] == 0
            assert_dead_keys_still_hanging(daemon, dead_server, dead)

            start = time.monotonic()
            daemon.call("unmanageStorageServer", connectionID="ok")
            daemon.wait_gone(path, timeout=WAIT)
            gone_after = time.monotonic() - start
            assert_dead_keys_still_hanging(daemon, dead_server, dead)
            print(f"with {DEAD_KEYS} keys hanging on a dead server: connected after "
                  f"{connected_after:.2f} s, remounted after {remounted_after:.2f} s, "
                  f"torn down after {gone_after:.2f} s")
        finally:
            daemon.stop()  # cancels the hanging commands, killing their process groups
            kill_clients(dead_server)
