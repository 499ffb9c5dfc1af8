"""oVirt storage domain trees as the tests write them (standard library only: the guest
imports this too)."""

from __future__ import annotations

import uuid
from pathlib import Path


def metadata(sd_uuid: str, description: str, type_: str = "NFS", version: int = 5) -> str:
    """The KEY=VALUE text of a domain's dom_md/metadata, as the engine's hosts write it."""
    return "\n".join([
        "ALIGNMENT=1048576", "BLOCK_SIZE=512", "CLASS=Data", f"DESCRIPTION={description}",
        "IOOPTIMEOUTSEC=10", "LEASERETRIES=3", "LEASETIMESEC=60", "LOCKPOLICY=",
        "LOCKRENEWALINTERVALSEC=5", "POOL_UUID=", "REMOTE_PATH=server:/export", "ROLE=Regular",
        f"SDUUID={sd_uuid}", f"TYPE={type_}", f"VERSION={version}",
        "_SHA_CKSUM=0123456789abcdef0123456789abcdef01234567", "EOF", ""])


def write_domain(root: Path | str, description: str, type_: str = "NFS") -> str:
    """A domain directory `<root>/<uuid>/dom_md/metadata` (plus its usual neighbours)."""
    sd = str(uuid.uuid4())
    md = Path(root, sd, "dom_md")
    md.mkdir(parents=True)
    (md / "metadata").write_text(metadata(sd, description, type_))
    for name in ("ids", "inbox", "outbox", "leases", "xleases"):
        (md / name).write_bytes(b"")
    Path(root, sd, "images").mkdir()
    return sd


def write_broken(root: Path | str) -> dict[str, str]:
    """Domain-like directories the scan must skip: name -> what is wrong."""
    empty, garbage = str(uuid.uuid4()), str(uuid.uuid4())
    Path(root, empty, "images").mkdir(parents=True)
    Path(root, garbage, "dom_md").mkdir(parents=True)
    Path(root, garbage, "dom_md", "metadata").write_bytes(b"garbage\xff\xfe\x01\x02")
    Path(root, "__DIRECT_IO_TEST__").write_bytes(b"")  # not a UUID: ignored, not skipped
    Path(root, "lost+found").mkdir(exist_ok=True)
    return {empty: "no dom_md/metadata", garbage: "metadata is not text"}
