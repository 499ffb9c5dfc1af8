"""Pure parsers of open-iscsi's output, and the reader of its sysfs tree.

Tested on output captured from the real tools (tests/unit/data/iscsi): `iscsiadm -m iface`,
`-m node` and discovery. Sessions are read from sysfs, never from `iscsiadm -m session`.
`<empty>` in iscsiadm's output is None here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from vdsmconn.host.address import join, split

EMPTY = "<empty>"
TPGT_UNKNOWN = 4294967295  # what iscsiadm shows for a node record made without a tpgt


def _value(text: str) -> str | None:
    text = text.strip()
    return None if text in ("", EMPTY) else text


@dataclass(frozen=True)
class Iface:
    name: str
    transport: str
    hwaddress: str | None = None
    ipaddress: str | None = None
    net_ifacename: str | None = None
    initiatorname: str | None = None


@dataclass(frozen=True)
class Target:
    """One `portal,tpgt iqn` line of `-m node` or of discovery output."""

    address: str  # IP (IPv6 without brackets) or host name
    port: int
    tpgt: int | None
    iqn: str

    @property
    def portal(self) -> str:
        return join(self.address, self.port)

    def to_wire(self) -> dict[str, object]:
        return {"portal": self.portal, "tpgt": self.tpgt, "iqn": self.iqn}


@dataclass(frozen=True)
class Session:
    """One session, as sysfs shows it."""

    sid: int
    iqn: str
    address: str
    port: int
    tpgt: int | None
    iface: str = "default"
    state: str | None = None  # LOGGED_IN, FAILED, FREE (sysfs session state)
    disks: tuple[str, ...] = field(default_factory=tuple)  # sda, ...

    @property
    def portal(self) -> str:
        return join(self.address, self.port)

    @property
    def logged_in(self) -> bool:
        return self.state == "LOGGED_IN"


def parse_iface_list(text: str) -> list[Iface]:
    """`iscsiadm -m iface`: `name transport,hwaddress,ipaddress,net_ifacename,initiatorname`."""
    found = []
    for line in text.splitlines():
        name, _, rest = line.strip().partition(" ")
        if not name or not rest:
            continue
        parts = [_value(p) for p in rest.strip().split(",")]
        parts += [None] * (5 - len(parts))
        found.append(Iface(name, parts[0] or "", parts[1], parts[2], parts[3], parts[4]))
    return found


def split_portal(text: str) -> tuple[str, int, int | None]:
    """`10.0.0.1:3260,1`, `[fd00::1]:3260,1` or `host:3260` -> (address, port, tpgt)."""
    portal, _, tpgt_text = text.partition(",")
    host, port = split(portal, default_port=3260)
    tpgt = int(tpgt_text) if tpgt_text else None
    if tpgt is not None and tpgt in (TPGT_UNKNOWN, -1):
        tpgt = None
    return host, port, tpgt


def parse_targets(text: str) -> list[Target]:
    """`iscsiadm -m node` and sendtargets discovery: `portal,tpgt iqn` per line."""
    found = []
    for line in text.splitlines():
        words = line.split()
        if len(words) != 2 or "," not in words[0]:
            continue
        try:
            address, port, tpgt = split_portal(words[0])
        except ValueError:
            continue
        found.append(Target(address, port, tpgt, words[1]))
    return found


# --- sysfs ------------------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def read_sessions(sysfs: str = "/sys") -> list[Session]:
    """The kernel's iSCSI sessions from sysfs (never blocks: attributes are in memory).

    Sessions whose attributes vanish while being read (a logout racing) are left out.
    """
    base = os.path.join(sysfs, "class", "iscsi_session")
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return []
    found = []
    for name in names:
        if not name.startswith("session") or not name[7:].isdigit():
            continue
        sid = int(name[7:])
        path = os.path.join(base, name)
        iqn = _read(os.path.join(path, "targetname"))
        conn = os.path.join(sysfs, "class", "iscsi_connection", f"connection{sid}:0")
        address = _read(os.path.join(conn, "persistent_address")) or _read(
            os.path.join(conn, "address"))
        port = _read(os.path.join(conn, "persistent_port")) or _read(os.path.join(conn, "port"))
        if not iqn or not address or not port or not port.isdigit():
            continue
        tpgt_text = _read(os.path.join(path, "tpgt"))
        tpgt = int(tpgt_text) if tpgt_text and tpgt_text.lstrip("-").isdigit() else None
        found.append(Session(
            sid=sid, iqn=iqn, address=address, port=int(port), tpgt=tpgt,
            iface=_read(os.path.join(path, "ifacename")) or "default",
            state=_read(os.path.join(path, "state")),
            disks=tuple(_session_disks(os.path.join(path, "device"))),
        ))
    return found


def _session_disks(device: str) -> list[str]:
    """Block devices under a session's SCSI targets: device/target*/H:C:T:L/block/sdX."""
    disks = []
    try:
        targets = [t for t in os.listdir(device) if t.startswith("target")]
    except OSError:
        return []
    for target in sorted(targets):
        tdir = os.path.join(device, target)
        try:
            luns = sorted(os.listdir(tdir))
        except OSError:
            continue
        for lun in luns:
            with_block = os.path.join(tdir, lun, "block")
            try:
                disks.extend(sorted(os.listdir(with_block)))
            except OSError:
                continue
    return disks
