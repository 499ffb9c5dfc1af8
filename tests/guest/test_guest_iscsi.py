"""iSCSI for real, in the test guest: the kernel initiator (iscsi_tcp, iscsid) against LIO
targets, dm-multipath, veth links into a namespace holding the portals.

Through the real daemon: manage → node record with node.startup=manual, session, LUN,
`connected` with its path; restart adopts the session; wrong CHAP → 476 retried with growing
nextRetry; two keys on one session → logout only after the last; logout failure → 474.
Through the connector itself: discovery with and without CHAP; an iSCSI bond of two veth links
→ two sessions, two paths, one multipath map; link down → path down and degraded at once; link
up → path back. Through the daemon again: the same link events, seen by its netlink monitor;
a LUN whose reads fail or hang (device-mapper under LIO) → 481 and back to `connected`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, running
from tests.guest.fixtures import (
    IQN_PREFIX,
    LUN_ROOT,
    Bond,
    IscsiTarget,
    IscsiTargetFactory,
    Multipath,
    _create_target,
    _delete_target,
    sh,
    wait_for,
)
from vdsmconn import config, errors
from vdsmconn.connectors.base import HostContext
from vdsmconn.connectors.iscsi import IscsiConnector
from vdsmconn.connectors.iscsi_discovery import discover_send_targets
from vdsmconn.host.command import CommandRunner
from vdsmconn.host.iscsiadm import Iscsiadm
from vdsmconn.model import IscsiSpec, Secret
from vdsmconn.monitors.netlink import LinkEvent, LinkWatcher

pytestmark = pytest.mark.guest


def report(what: str, **figures: Any) -> None:
    print(f"OBSERVED {what}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with running(tmp_path, supervisor={"probe_interval": 1, "probe_timeout": 5,
                                       "command_timeout": 30}) as d:
        yield d


def conn(target: IscsiTarget, **fields: Any) -> dict[str, Any]:
    host = target.portals[0].rsplit(":", 1)[0]
    return {"type": "iscsi", "connection": host, "iqn": target.iqn, **fields}


def node_records(iqn: str) -> list[str]:
    out = sh("iscsiadm", "-m", "node", check=False).stdout
    return [line for line in out.splitlines() if iqn in line]


def discovery_records() -> str:
    return sh("iscsiadm", "-m", "discoverydb", check=False).stdout.strip()


def log_lines(daemon: Daemon, *words: str) -> list[str]:
    text = daemon.log_file.read_text(errors="replace")
    return [line for line in text.splitlines() if all(w in line for w in words)]


# --- discovery ---------------------------------------------------------------------------


async def _discover(host: str, user: str | None = None,
                    password: Secret | None = None) -> list[dict[str, Any]]:
    runner = CommandRunner()
    try:
        found = await discover_send_targets(Iscsiadm(runner, 60), host, 3260, user, password)
        return [t.to_wire() for t in found]
    finally:
        await runner.close()


def test_discover_send_targets_with_and_without_chap(
        iscsi_target: IscsiTargetFactory) -> None:
    t = iscsi_target()
    found = asyncio.run(_discover("127.0.0.1"))
    report("discovery", found=found)
    assert {"portal": "127.0.0.1:3260", "tpgt": 1, "iqn": t.iqn} in found
    assert node_records(t.iqn) == []  # nonpersistent: no node records made
    assert discovery_records() == ""
    t.targetcli(["/iscsi set discovery_auth enable=1 userid=duser password=dpass12345"])
    try:
        with pytest.raises(errors.IscsiAuthError) as caught:
            asyncio.run(_discover("127.0.0.1", "duser", Secret("wrong-pass-9")))
        report("discovery wrong CHAP", code=caught.value.code, message=caught.value.message)
        assert "wrong-pass-9" not in caught.value.message
        assert discovery_records() == ""  # deleted after the failure too
        found = asyncio.run(_discover("127.0.0.1", "duser", Secret("dpass12345")))
        assert {"portal": "127.0.0.1:3260", "tpgt": 1, "iqn": t.iqn} in found
        assert discovery_records() == ""
    finally:
        t.targetcli(["/iscsi set discovery_auth enable=0"])


# --- the real daemon -------------------------------------------------------------------------


def test_manage_logs_in_restart_adopts_unmanage_logs_out(
        daemon: Daemon, iscsi_target: IscsiTargetFactory) -> None:
    t = iscsi_target()
    start = time.monotonic()
    daemon.call("manageStorageServer", connectionID="i1", connection=conn(t, tpgt=1))
    st = daemon.call("waitStorageServer", connectionIDs=["i1"], timeout=60)["i1"]
    seconds = time.monotonic() - start
    device = t.device()
    report("manage", seconds=round(seconds, 2), path=st["path"], paths=st["paths"])
    assert st["state"] == "connected" and st["connected"]
    assert [(p["iface"], p["netdev"], p["state"]) for p in st["paths"]] == [
        ("default", None, "up")]
    assert st["path"] == str(device)
    assert len(t.sessions()) == 1
    record = sh("iscsiadm", "-m", "node", "-T", t.iqn, "-p", t.portals[0] + ",1").stdout
    assert "node.startup = manual" in record
    assert "node.session.initial_login_retry_max = 1" in record
    before = t.sessions()
    daemon.stop()
    daemon.start()
    st = daemon.call("waitStorageServer", connectionIDs=["i1"], timeout=60)["i1"]
    assert st["state"] == "connected" and t.sessions() == before  # same session id
    assert log_lines(daemon, "ADOPT key=iscsi:")
    assert not log_lines(daemon, "--logout")
    daemon.call("unmanageStorageServer", connectionID="i1")
    wait_for("logout", lambda: t.sessions() == [], 30)
    wait_for("node record deleted", lambda: node_records(t.iqn) == [], 10)


def test_wrong_chap_is_476_retried_with_growing_next_retry(
        tmp_path: Path, iscsi_target: IscsiTargetFactory) -> None:
    t = iscsi_target(chap=("cuser", "cpass123456"))
    d = Daemon(tmp_path, supervisor={"backoff_initial": 0.5, "backoff_max": 8,
                                     "command_timeout": 30})
    try:
        d.start()
        d.call("manageStorageServer", connectionID="w",
               connection=conn(t, user="cuser", password="wrongpass99"))
        delays: dict[int, float] = {}
        deadline = time.monotonic() + 90
        while len(delays) < 3 and time.monotonic() < deadline:
            st = d.call("getStorageServerList", connectionIDs=["w"])["w"]
            error = st["lastError"]
            if error and st["nextRetry"] and st["attempts"] not in delays:
                assert error["code"] == 476, st
                delays[st["attempts"]] = st["nextRetry"] - error["time"]
            time.sleep(0.05)
        report("wrong CHAP", delays=delays, message=error["message"])
        values = [delays[k] for k in sorted(delays)]
        assert len(values) == 3 and values[0] < values[1] < values[2], delays
        assert t.sessions() == [] and node_records(t.iqn) == []
        assert "wrongpass99" not in d.log_file.read_text()
        assert "cpass123456" not in d.log_file.read_text()
        d.call("updateStorageServer", connectionID="w",
               connection=conn(t, user="cuser", password="cpass123456"))
        st = d.call("waitStorageServer", connectionIDs=["w"], timeout=60)["w"]
        assert st["state"] == "connected"
        assert "cpass123456" not in d.log_file.read_text()
        d.call("unmanageStorageServer", connectionID="w")
        wait_for("logout", lambda: t.sessions() == [], 30)
    finally:
        d.cleanup()


def test_two_keys_one_session_logout_after_the_last(
        daemon: Daemon, iscsi_target: IscsiTargetFactory) -> None:
    t = iscsi_target()
    a = daemon.call("manageStorageServer", connectionID="a", connection=conn(t))
    b = daemon.call("manageStorageServer", connectionID="b", connection=conn(t, tpgt=1))
    assert a["key"] != b["key"]
    daemon.call("waitStorageServer", connectionIDs=["a", "b"], timeout=60)
    assert len(t.sessions()) == 1
    daemon.call("unmanageStorageServer", connectionID="a")
    time.sleep(2)
    assert len(t.sessions()) == 1
    assert daemon.call("getStorageServerList", connectionIDs=["b"])["b"]["connected"]
    daemon.call("unmanageStorageServer", connectionID="b")
    wait_for("logout after the last key", lambda: t.sessions() == [], 30)
    wait_for("node records deleted", lambda: node_records(t.iqn) == [], 10)


def test_bond_of_missing_interfaces_uses_the_default_iface(
        daemon: Daemon, iscsi_target: IscsiTargetFactory) -> None:
    t = iscsi_target()
    daemon.call("manageStorageServer", connectionID="m",
                connection=conn(t, netIfaceNames=["nosuch0", "nosuch1"]))
    st = daemon.call("waitStorageServer", connectionIDs=["m"], timeout=60)["m"]
    report("bond without interfaces", paths=st["paths"])
    assert [(p["iface"], p["state"]) for p in st["paths"]] == [("default", "up")]
    assert st["state"] == "connected" and len(t.sessions()) == 1
    assert log_lines(daemon, "interfaces not on this host, skipped: nosuch0,nosuch1")
    daemon.call("unmanageStorageServer", connectionID="m")
    wait_for("logout", lambda: t.sessions() == [], 30)


def test_initiator_name_is_the_one_the_target_sees(
        daemon: Daemon, iscsi_target: IscsiTargetFactory) -> None:
    t = iscsi_target()
    name = "iqn.2026-11.org.vdsmconn.test:custom-initiator"
    iface = None
    try:
        daemon.call("manageStorageServer", connectionID="in",
                    connection=conn(t, initiatorName=name))
        st = daemon.call("waitStorageServer", connectionIDs=["in"], timeout=60)["in"]
        (path,) = st["paths"]
        iface = path["iface"]
        session = Path(f"/sys/class/iscsi_session/session{path['session']}")
        seen = (t.configfs / "dynamic_sessions").read_text()
        report("initiatorName", iface=iface, target_sees=seen.strip())
        assert iface.startswith("vdsmconn-") and st["state"] == "connected"
        assert (session / "initiatorname").read_text().strip() == name
        assert name in seen
        daemon.call("unmanageStorageServer", connectionID="in")
        wait_for("logout", lambda: t.sessions() == [], 30)
    finally:
        if iface is not None:
            sh("iscsiadm", "-m", "iface", "-I", iface, "-o", "delete", check=False)


def test_logout_failure_is_reported_as_474(tmp_path: Path,
                                           iscsi_target: IscsiTargetFactory) -> None:
    t = iscsi_target()
    flag = tmp_path / "fail-logout"
    wrapper = tmp_path / "iscsiadm"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'for a in "$@"; do if [ "$a" = --logout ] && [ -e {flag} ]; then\n'
        '  echo "iscsiadm: Could not logout of all requested sessions (test)" >&2; exit 10\n'
        "fi; done\nexec iscsiadm \"$@\"\n")
    wrapper.chmod(0o755)
    d = Daemon(tmp_path, iscsi={"iscsiadm_command": str(wrapper)},
               supervisor={"backoff_initial": 0.5, "backoff_max": 1})
    try:
        d.start()
        d.call("manageStorageServer", connectionID="l", connection=conn(t))
        d.call("waitStorageServer", connectionIDs=["l"], timeout=60)
        flag.touch()
        d.call("unmanageStorageServer", connectionID="l")
        wait_for("474 in the log", lambda: bool(log_lines(d, "code=474")), 30)
        report("logout failure", line=log_lines(d, "code=474")[0][-200:])
        assert len(t.sessions()) == 1  # not swallowed: still there, still retried
        # ...and in the list: the key being torn down, with its error (not a bare session).
        (entry,) = d.call("getStorageServerList").values()
        assert (entry["managed"], entry["state"], entry["lastError"]["code"]) == (
            False, "disconnecting", 474)
        assert entry["key"].startswith("iscsi:") and entry["connection"]["iqn"] == t.iqn
        flag.unlink()
        wait_for("logout on retry", lambda: t.sessions() == [], 30)
    finally:
        flag.unlink(missing_ok=True)
        d.cleanup()


# --- an iSCSI bond and link events --------------------------------------------------------------


def rp_filter(netdev: str, value: str | None = None) -> str:
    path = Path(f"/proc/sys/net/ipv4/conf/{netdev}/rp_filter")
    if value is not None:
        path.write_text(value)
    return path.read_text().strip()


def sysfs_sessions(iqn: str) -> dict[str, str]:
    """iface -> session state of the kernel's sessions of `iqn`."""
    found = {}
    for s in Path("/sys/class/iscsi_session").glob("session*"):
        try:
            if (s / "targetname").read_text().strip() == iqn:
                found[(s / "ifacename").read_text().strip()] = (s / "state").read_text().strip()
        except OSError:
            continue
    return found


async def _bond_scenario(t: IscsiTarget, multipath: Multipath) -> None:
    l0, l1 = t.links
    spec = IscsiSpec(connection=l0.peer_ip, iqn=t.iqn, tpgt=1,
                     netIfaceNames=(l0.host, l1.host, "nosuchnic9"))
    runner = CommandRunner()
    connector = IscsiConnector(HostContext(config.host_settings(config.Config()), runner))
    watcher = LinkWatcher()
    events: list[tuple[float, LinkEvent]] = []
    probes: list[asyncio.Task[None]] = []

    def on_link(event: LinkEvent) -> None:
        # What the daemon's wiring does: mark the paths and wake the key (a probe).
        events.append((time.monotonic(), event))
        if connector.link_changed(event.name, event.up) and event.up:
            probes.append(asyncio.ensure_future(connector.probe(spec)))

    watching = asyncio.ensure_future(watcher.run(on_link))
    try:
        started = time.monotonic()
        ready = asyncio.ensure_future(watcher.ready.wait())
        await asyncio.wait({ready, watching}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if watching.done():
            watching.result()  # the watcher's own error, if it failed
        assert watcher.ready.is_set(), "netlink watcher not ready within 60 s"
        report("netlink watcher", ready_s=round(time.monotonic() - started, 2))
        found = await connector.settle(spec, await connector.connect(spec))
        assert found.paths is not None and not found.degraded
        # l1 is not the route to the portal: strict reverse-path filtering would drop the
        # portal's replies there; it is loose while the session uses it.
        assert rp_filter(l1.host) == "2" and rp_filter(l0.host) == "1"
        assert [(p.iface, p.netdev, p.state) for p in found.paths] == [
            (l0.host, l0.host, "up"), (l1.host, l1.host, "up")]
        assert sysfs_sessions(t.iqn) == {l0.host: "LOGGED_IN", l1.host: "LOGGED_IN"}
        ll = await asyncio.to_thread(multipath.wait_for_paths, 2, 60)
        maps = [line for line in ll.splitlines() if line.startswith("mpath")]
        report("bond", paths=found.paths, maps=maps)
        assert len(maps) == 1

        # Link down: the path is down at once, without waiting for the session to fail.
        down_at = time.monotonic()
        await asyncio.to_thread(l1.down)
        while not ((now := connector.present(spec)) and now.degraded):
            assert time.monotonic() - down_at < 5, "not degraded within 5 s"
            await asyncio.sleep(0.005)
        degraded_s = time.monotonic() - down_at
        assert now.paths is not None and [p.state for p in now.paths] == ["up", "down"]

        # Link up: iscsid recovers the session; the path is up again.
        up_at = time.monotonic()
        await asyncio.to_thread(l1.up)
        while not ((now := connector.present(spec)) and not now.degraded):
            assert time.monotonic() - up_at < 30, "path not back within 30 s"
            await asyncio.sleep(0.01)
        recovered_s = time.monotonic() - up_at

        # A path whose session is gone: link up logs it in at once (the daemon does not wait
        # for its backoff).
        await asyncio.to_thread(sh, "iscsiadm", "-m", "node", "-T", t.iqn, "-p",
                                t.portals[0], "-I", l1.host, "--logout")
        await asyncio.to_thread(l1.down)
        assert l1.host not in sysfs_sessions(t.iqn)
        await asyncio.sleep(0.3)
        up_at = time.monotonic()
        await asyncio.to_thread(l1.up)
        while sysfs_sessions(t.iqn).get(l1.host) != "LOGGED_IN":
            assert time.monotonic() - up_at < 10, "missing path not logged in within 10 s"
            await asyncio.sleep(0.01)
        relogin_s = time.monotonic() - up_at
        await asyncio.gather(*probes)
        now = connector.present(spec)
        assert now is not None and not now.degraded
        report("link events", degraded_after_down_s=round(degraded_s, 3),
               recovered_after_up_s=round(recovered_s, 3),
               missing_path_logged_in_after_up_s=round(relogin_s, 3),
               events=[(round(at - down_at, 3), e.name, e.up) for at, e in events])
        assert relogin_s < 15  # an event, not the 60 s probe interval (figures: report)

        await connector.disconnect(spec)
        assert sysfs_sessions(t.iqn) == {}
        assert node_records(t.iqn) == []
    finally:
        watching.cancel()
        await asyncio.gather(watching, *probes, return_exceptions=True)
        await runner.close()


@contextlib.contextmanager
def bond_links(t: IscsiTarget) -> Iterator[None]:
    """The second link reaches the first portal's address too (as one subnet would: only
    sockets bound to it use this route); strict rp_filter on both, as many hosts have it.
    Afterwards: rp_filter restored by the daemon is checked, the host cleaned."""
    l0, l1 = t.links
    subnet0 = l0.peer_ip.rsplit(".", 1)[0] + ".0/24"
    sh("ip", "route", "add", subnet0, "dev", l1.host, "metric", "500")
    saved = {link.host: rp_filter(link.host) for link in t.links}
    for link in t.links:
        rp_filter(link.host, "1")
    try:
        yield
        after = {link.host: rp_filter(link.host) for link in t.links}
        report("rp_filter", before="strict (1)", after=after)
        assert after == {l0.host: "1", l1.host: "1"}  # restored when no session uses it
    finally:
        for name, value in saved.items():
            rp_filter(name, value)
        sh("ip", "route", "del", subnet0, "dev", l1.host, "metric", "500", check=False)
        for link in t.links:
            sh("iscsiadm", "-m", "node", "-T", t.iqn, "-I", link.host, "--logout", check=False)
            sh("iscsiadm", "-m", "node", "-T", t.iqn, "-I", link.host, "-o", "delete",
               check=False)
            sh("iscsiadm", "-m", "iface", "-I", link.host, "-o", "delete", check=False)
        if os.path.exists("/etc/iscsi/ifaces/nosuchnic9"):
            sh("iscsiadm", "-m", "iface", "-I", "nosuchnic9", "-o", "delete", check=False)


def test_bond_two_paths_link_down_degraded_link_up_back(
        iscsi_target: IscsiTargetFactory, multipath: Multipath) -> None:
    t = iscsi_target(links=2)
    with bond_links(t):
        asyncio.run(_bond_scenario(t, multipath))


def path_states(daemon: Daemon, cid: str) -> tuple[str, list[str]]:
    st = daemon.call("getStorageServerList", connectionIDs=[cid])[cid]
    return st["state"], [p["state"] for p in st["paths"] or []]


def until(daemon: Daemon, cid: str, want: tuple[str, list[str]], limit: float) -> float:
    """Seconds until the daemon reports `want` for `cid` (polled over the socket)."""
    start = time.monotonic()
    while (now := path_states(daemon, cid)) != want:
        assert time.monotonic() - start < limit, f"{want} not within {limit} s: {now}"
        time.sleep(0.01)
    return time.monotonic() - start


def torn_down(daemon: Daemon) -> None:
    """Wait until the daemon has finished the teardown of its iSCSI key (node records deleted,
    rp_filter restored): the CID is gone from the list long before that."""
    wait_for("the teardown", lambda: bool(log_lines(daemon, "DISCONNECTED key=iscsi:")), 30)


def test_daemon_follows_bond_link_events(tmp_path: Path,
                                         iscsi_target: IscsiTargetFactory) -> None:
    """The same through the daemon process: its netlink monitor marks the path of a link that
    went down and logs in a missing path when its link comes up. Probes are 60 s apart, so
    only the link events can explain what the status shows within a second."""
    t = iscsi_target(links=2)
    l0, l1 = t.links
    d = Daemon(tmp_path, supervisor={"probe_interval": 60, "probe_timeout": 5,
                                     "command_timeout": 30})
    with bond_links(t):
        try:
            d.start()
            d.call("manageStorageServer", connectionID="b", connection={
                "type": "iscsi", "connection": l0.peer_ip, "iqn": t.iqn, "tpgt": 1,
                "netIfaceNames": [l0.host, l1.host]})
            st = d.call("waitStorageServer", connectionIDs=["b"], timeout=60)["b"]
            assert [(p["iface"], p["state"]) for p in st["paths"]] == [
                (l0.host, "up"), (l1.host, "up")]
            assert sysfs_sessions(t.iqn) == {l0.host: "LOGGED_IN", l1.host: "LOGGED_IN"}

            l1.down()
            degraded_s = until(d, "b", ("degraded", ["up", "down"]), 5)
            l1.up()
            back_s = until(d, "b", ("connected", ["up", "up"]), 5)

            # A path whose session is gone: its link coming up logs it in at once.
            sh("iscsiadm", "-m", "node", "-T", t.iqn, "-p", t.portals[0], "-I", l1.host,
               "--logout")
            l1.down()
            until(d, "b", ("degraded", ["up", "down"]), 5)
            assert l1.host not in sysfs_sessions(t.iqn)
            up_at = time.monotonic()
            l1.up()
            while sysfs_sessions(t.iqn).get(l1.host) != "LOGGED_IN":
                assert time.monotonic() - up_at < 10, "missing path not logged in in 10 s"
                time.sleep(0.01)
            relogin_s = time.monotonic() - up_at
            status_s = relogin_s + until(d, "b", ("connected", ["up", "up"]), 5)
            report("daemon link events", degraded_after_down_s=round(degraded_s, 3),
                   back_after_up_s=round(back_s, 3),
                   missing_path_logged_in_after_up_s=round(relogin_s, 3),
                   status_connected_after_up_s=round(status_s, 3),
                   log=[line[-120:] for line in log_lines(d, "LINK netdev=")])
            # Events, not the 60 s probe interval (the figures are in the report above).
            assert degraded_s < 15 and back_s < 15 and relogin_s < 15
            assert log_lines(d, f"LINK netdev={l1.host} down")
            assert log_lines(d, f"LINK netdev={l1.host} up")
            d.call("unmanageStorageServer", connectionID="b")
            wait_for("logout", lambda: sysfs_sessions(t.iqn) == {}, 30)
            torn_down(d)
        finally:
            d.cleanup()


def test_net_iface_name_over_a_bonding_device(daemon: Daemon, bond: Bond) -> None:
    """`netIfaceName: <bond>`: the iface is bound to the bonding device; the portal sits
    behind both slaves (a bridge over the peers in the namespace)."""
    ns = bond.netns
    subnet = sh("ip", "-o", "-4", "addr", "show", "dev", bond.name).stdout.split()[3]
    portal_ip = subnet.rsplit(".", 1)[0] + ".2"
    sh("ip", "-n", ns, "link", "add", "vcbr0", "type", "bridge")
    for link in bond.links:
        sh("ip", "-n", ns, "link", "set", link.peer, "master", "vcbr0")
    sh("ip", "-n", ns, "addr", "add", f"{portal_ip}/24", "dev", "vcbr0")
    sh("ip", "-n", ns, "link", "set", "vcbr0", "up")
    sh("ip", "-n", ns, "link", "set", "lo", "up")
    LUN_ROOT.mkdir(parents=True, exist_ok=True)
    target = IscsiTarget(iqn=f"{IQN_PREFIX}:{bond.name}", portals=[f"{portal_ip}:3260"],
                         luns=[LUN_ROOT / f"{bond.name}.img"], netns=ns, links=[], chap=None)
    _create_target(target, 32)
    try:
        daemon.call("manageStorageServer", connectionID="bd",
                    connection={"type": "iscsi", "connection": portal_ip, "iqn": target.iqn,
                                "netIfaceName": bond.name})
        st = daemon.call("waitStorageServer", connectionIDs=["bd"], timeout=60)["bd"]
        report("bond device", paths=st["paths"], active=bond.active_slave())
        assert [(p["iface"], p["netdev"], p["state"]) for p in st["paths"]] == [
            (bond.name, bond.name, "up")]
        tree = sh("iscsiadm", "-m", "session", "-P", "3").stdout
        assert f"Iface Netdev: {bond.name}" in tree
        daemon.call("unmanageStorageServer", connectionID="bd")
        wait_for("logout", lambda: target.sessions() == [], 30)
    finally:
        _delete_target(target)
        target.luns[0].unlink(missing_ok=True)
        sh("iscsiadm", "-m", "iface", "-I", bond.name, "-o", "delete", check=False)


# --- a LUN that stops answering ------------------------------------------------------------

PROBE_INTERVAL, PROBE_TIMEOUT = 1, 5


def blocked_threads(pid: int) -> int:
    """Threads of process `pid` in uninterruptible sleep (a read waiting on a hung disk)."""
    count = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            count += (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "D"
    return count


def until_status(daemon: Daemon, cid: str, check: Any, limit: float) -> tuple[float,
                                                                               dict[str, Any]]:
    """Seconds until the status of `cid` passes `check`, and that status."""
    start = time.monotonic()
    while not check(st := daemon.call("getStorageServerList", connectionIDs=[cid])[cid]):
        assert time.monotonic() - start < limit, f"not within {limit} s: {st}"
        time.sleep(0.05)
    return time.monotonic() - start, st


def broken(st: dict[str, Any]) -> bool:
    return st["state"] in ("degraded", "stuck", "failed") and bool(st["lastError"]) and \
        st["lastError"]["code"] == 481


def test_lun_that_stops_answering_is_not_connected_until_it_answers(
        tmp_path: Path, iscsi_target: IscsiTargetFactory) -> None:
    """A LUN on a device-mapper device: its table made `error` (reads fail), then suspended
    (reads hang). Each time the key leaves `connected` with 481 within a probe interval plus
    the probe timeout, its session is kept, and it is `connected` again once reads answer;
    while reads hang the daemon holds one blocked thread, however many probes come."""
    t = iscsi_target(dm=True)
    d = Daemon(tmp_path, supervisor={"probe_interval": PROBE_INTERVAL,
                                     "probe_timeout": PROBE_TIMEOUT, "command_timeout": 30,
                                     "backoff_initial": 0.5, "backoff_max": 2})
    limit = PROBE_INTERVAL + PROBE_TIMEOUT + 10  # generous: the guest is emulated
    try:
        d.start()
        d.call("manageStorageServer", connectionID="u", connection=conn(t))
        st = d.call("waitStorageServer", connectionIDs=["u"], timeout=60)["u"]
        assert st["state"] == "connected" and st["path"] == str(t.device())
        sessions = t.sessions()

        t.fail_lun()
        failed_s, st = until_status(d, "u", broken, limit)
        report("LUN reads fail", seconds=round(failed_s, 2), state=st["state"],
               error=st["lastError"])
        assert "does not answer" in st["lastError"]["message"]
        assert st["lastError"]["message"].startswith("/dev/sd")
        assert t.sessions() == sessions  # the session is kept: the LUN is what fails
        t.restore_lun()
        back_s, st = until_status(d, "u", lambda s: s["state"] == "connected", 60)
        assert st["lastError"] is None and [p["state"] for p in st["paths"]] == ["up"]

        assert d.proc is not None
        t.suspend_lun()
        try:
            stuck_s, st = until_status(d, "u", broken, limit)
            report("LUN reads hang", seconds=round(stuck_s, 2), state=st["state"],
                   error=st["lastError"])
            time.sleep(5 * PROBE_INTERVAL)  # probes and reconnects go on meanwhile
            blocked = blocked_threads(d.proc.pid)
            attempts = d.call("getStorageServerList", connectionIDs=["u"])["u"]["attempts"]
            assert d.call("getHostInfo")["pid"] == d.proc.pid  # answers meanwhile
        finally:
            t.resume_lun()
        resumed_s, st = until_status(d, "u", lambda s: s["state"] == "connected", 60)
        report("LUN answers again", after_failing_s=round(back_s, 2),
               after_hanging_s=round(resumed_s, 2), blocked_threads_while_hung=blocked,
               attempts_while_hung=attempts)
        assert blocked == 1
        assert t.sessions() == sessions
        assert log_lines(d, "path down: /dev/") and log_lines(d, "path answers again")
        d.call("unmanageStorageServer", connectionID="u")
        wait_for("logout", lambda: t.sessions() == [], 30)
        torn_down(d)
    finally:
        d.cleanup()
