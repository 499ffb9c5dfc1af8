"""`gluster --mode=script volume info <vol> --xml`, parsed by pure functions.

The CLI exits 0 even when the volume does not exist: the verdict is `opRet` (0 = success)
with `opErrstr` saying why not. Each brick reads `<brick uuid=..>HOST:/path<name>HOST:/path
</name>...</brick>`; IPv6 hosts are written without brackets, so the host is everything
before the last ":/" of the name.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass


class GlusterOutputError(ValueError):
    """The output is not what `gluster volume info --xml` prints, or reports a failure."""


@dataclass(frozen=True)
class Brick:
    host: str
    path: str
    arbiter: bool = False


@dataclass(frozen=True)
class Volume:
    name: str
    id: str
    status: str  # statusStr: Created, Started, Stopped
    type: str  # typeStr: Distribute, Replicate, Disperse...
    bricks: tuple[Brick, ...]
    options: tuple[tuple[str, str], ...] = ()

    @property
    def brick_hosts(self) -> list[str]:
        """Brick hosts in brick order, each once."""
        return list(dict.fromkeys(b.host for b in self.bricks))


def split_brick(name: str) -> Brick:
    host, sep, path = name.rpartition(":/")
    if not sep or not host:
        raise GlusterOutputError(f"brick name is not HOST:/PATH: {name!r}")
    return Brick(host=host, path="/" + path)


def parse_volume_info(text: str) -> list[Volume]:
    """The volumes of a `volume info --xml` output; `GlusterOutputError` if it failed."""
    try:
        root = ET.fromstring(text.strip())
    except ET.ParseError as e:
        raise GlusterOutputError(f"not XML: {e}") from None
    if root.tag != "cliOutput":
        raise GlusterOutputError(f"unexpected root element <{root.tag}>")
    op_ret = root.findtext("opRet")
    if op_ret is None:
        raise GlusterOutputError("no <opRet> in the output")
    if op_ret.strip() != "0":
        errstr = (root.findtext("opErrstr") or "").strip() or f"opRet {op_ret.strip()}"
        raise GlusterOutputError(errstr)
    return [_volume(v) for v in root.iterfind("volInfo/volumes/volume")]


def _volume(elem: ET.Element) -> Volume:
    bricks = []
    for b in elem.iterfind("bricks/brick"):
        name = b.findtext("name") or (b.text or "")
        brick = split_brick(name.strip())
        arbiter = (b.findtext("isArbiter") or "0").strip() == "1"
        bricks.append(Brick(brick.host, brick.path, arbiter))
    options = tuple(
        ((o.findtext("name") or "").strip(), (o.findtext("value") or "").strip())
        for o in elem.iterfind("options/option")
    )
    return Volume(
        name=(elem.findtext("name") or "").strip(),
        id=(elem.findtext("id") or "").strip(),
        status=(elem.findtext("statusStr") or "").strip(),
        type=(elem.findtext("typeStr") or "").strip(),
        bricks=tuple(bricks),
        options=options,
    )


def backup_servers(volume: Volume, volfile_server: str) -> list[str]:
    """Brick hosts in order, each once, without the volfile server (SPEC 8).

    If the volfile server is not among them (a name for an address, a client-only peer), all
    brick hosts are backups.
    """
    server = _bare(volfile_server)
    return [h for h in volume.brick_hosts if _bare(h) != server]


def _bare(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host
