"""Parsers and exit-code mapping on output captured from the real iscsiadm: in the test guest
(where every command works) and on our machines (no kernel initiator: login rc 20)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vdsmconn import errors
from vdsmconn.host import iscsi_parse, iscsiadm
from vdsmconn.host.command import Result

DATA = Path(__file__).parent / "data" / "iscsi"


def captured(name: str) -> Result:
    base = DATA / name
    argv = ("iscsiadm", "-m", name)
    return Result(argv, int((base.with_suffix(".rc")).read_text()),
                  base.with_suffix(".out").read_text(), base.with_suffix(".err").read_text(), 0.1)


def test_iface_list_guest_bound_ifaces() -> None:
    ifaces = iscsi_parse.parse_iface_list(captured("guest-iface-list").stdout)
    assert [(i.name, i.transport, i.net_ifacename) for i in ifaces] == [
        ("vt1h0", "tcp", "vt1h0"), ("vt1h1", "tcp", "vt1h1"), ("default", "tcp", None),
        ("iser", "iser", None)]
    assert ifaces[2].hwaddress is None and ifaces[2].initiatorname is None


def test_iface_list_host() -> None:
    ifaces = iscsi_parse.parse_iface_list(captured("host-iface-list").stdout)
    assert [i.name for i in ifaces] == ["vdsmc_test", "default", "iser"]


def test_node_list_tpgt_unknown_is_none() -> None:
    targets = iscsi_parse.parse_targets(captured("host-node-list").stdout)
    assert [(t.portal, t.tpgt, t.iqn) for t in targets] == [
        ("127.0.0.1:3260", None, "iqn.2003-01.org.example:t1"),
        ("10.252.7.2:3260", 1, "iqn.2003-01.org.vdsmconn.test:cap1")]


def test_discovery_output() -> None:
    targets = iscsi_parse.parse_targets(captured("guest-discovery").stdout)
    assert [t.to_wire() for t in targets] == [
        {"portal": "10.77.4.2:3260", "tpgt": 1, "iqn": "iqn.2003-01.org.vdsmconn.test:target1"},
        {"portal": "10.77.5.2:3260", "tpgt": 1, "iqn": "iqn.2003-01.org.vdsmconn.test:target1"},
        {"portal": "127.0.0.1:3260", "tpgt": 1, "iqn": "iqn.2003-01.org.vdsmconn.test:target2"},
    ]


def test_discovery_ipv6_portal() -> None:
    text = "[fd00::7]:3260,2 iqn.2003-01.org.example:t6\n10.0.0.1:3261,1 iqn.x:y\n"
    targets = iscsi_parse.parse_targets(text)
    assert [(t.address, t.port, t.tpgt, t.portal) for t in targets] == [
        ("fd00::7", 3260, 2, "[fd00::7]:3260"), ("10.0.0.1", 3261, 1, "10.0.0.1:3261")]


def test_no_sessions() -> None:
    result = captured("guest-session-none")
    assert result.rc == iscsiadm.RC_NO_OBJS_FOUND


# --- exit codes ----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "what", "error", "code", "words"), [
    ("host-login", iscsiadm.LOGIN, errors.IscsiSetupError, 465,
     "initiator reported error (20 - could not connect to iscsid)"),
    ("host-discovery-rc", iscsiadm.DISCOVERY, errors.IscsiDiscoveryError, 475,
     "Could not perform SendTargets discovery"),
    ("host-iface-update", iscsiadm.IFACE, errors.IscsiIfaceError, 473,
     "Cound not locate transport for iface vdsmc_test"),
    ("guest-login-chap-rejected", iscsiadm.LOGIN, errors.IscsiAuthError, 476,
     "authorization failure"),
    ("guest-discovery-chap-rejected", iscsiadm.DISCOVERY, errors.IscsiAuthError, 476,
     "Login authentication failed"),
    ("guest-discovery-unreachable", iscsiadm.DISCOVERY, errors.IscsiDiscoveryError, 475,
     "Network is unreachable"),
])  # fmt: skip
def test_failures_are_mapped_with_the_real_message(name: str, what: str,
                                                   error: type[errors.Error], code: int,
                                                   words: str) -> None:
    e = iscsiadm.failure(captured(name), what)
    assert type(e) is error and e.code == code
    assert words in e.message
    assert "System has not been booted" not in e.message  # noise dropped
    assert e.data == {"rc": captured(name).rc}


def test_known_rcs_of_captured_output() -> None:
    assert captured("guest-login-exists").rc == iscsiadm.RC_SESS_EXISTS
    assert captured("guest-logout-none").rc == iscsiadm.RC_NO_OBJS_FOUND
    assert captured("host-node-delete-again").rc == iscsiadm.RC_NO_OBJS_FOUND
    assert captured("guest-login-chap-rejected").rc == iscsiadm.RC_LOGIN_AUTH_FAILED


def test_timeout_rc() -> None:
    result = Result(("iscsiadm",), 8, "", "iscsiadm: timed out\n", 1.0)
    assert isinstance(iscsiadm.failure(result, iscsiadm.LOGIN), errors.Timeout)
    assert isinstance(iscsiadm.failure(result, iscsiadm.DISCOVERY), errors.IscsiDiscoveryError)


# --- sysfs ---------------------------------------------------------------------------------


def write_session(sysfs: Path, sid: int, iqn: str, address: str, port: int, tpgt: int,
                  iface: str, state: str = "LOGGED_IN", disk: str | None = None) -> None:
    session = sysfs / "class" / "iscsi_session" / f"session{sid}"
    session.mkdir(parents=True, exist_ok=True)
    for name, value in (("targetname", iqn), ("tpgt", str(tpgt)), ("state", state),
                        ("ifacename", iface)):
        (session / name).write_text(value + "\n")
    conn = sysfs / "class" / "iscsi_connection" / f"connection{sid}:0"
    conn.mkdir(parents=True, exist_ok=True)
    (conn / "persistent_address").write_text(address + "\n")
    (conn / "persistent_port").write_text(f"{port}\n")
    if disk:
        (session / "device" / f"target{sid}:0:0" / f"{sid}:0:0:0" / "block" / disk).mkdir(
            parents=True)


def test_read_sessions_from_sysfs(tmp_path: Path) -> None:
    write_session(tmp_path, 1, "iqn.x:t", "10.77.4.2", 3260, 1, "vt1h0", disk="sda")
    write_session(tmp_path, 2, "iqn.x:t", "10.77.5.2", 3260, 1, "vt1h1", state="FAILED")
    (tmp_path / "class" / "iscsi_session" / "session3").mkdir()  # vanishing: left out
    sessions = iscsi_parse.read_sessions(str(tmp_path))
    assert [(s.sid, s.address, s.iface, s.state, s.disks) for s in sessions] == [
        (1, "10.77.4.2", "vt1h0", "LOGGED_IN", ("sda",)),
        (2, "10.77.5.2", "vt1h1", "FAILED", ())]
    assert iscsi_parse.read_sessions(str(tmp_path / "none")) == []
