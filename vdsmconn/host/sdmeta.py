"""oVirt storage domain metadata: the `KEY=VALUE` text, and finding file domains under a mount.

A file domain lives in `<mount>/<sdUUID>/` with its metadata in `dom_md/metadata`; a block
domain keeps the same text at the start of its `metadata` LV (NUL padded), or, in the older
formats, in VG tags `MDT_<KEY>=<VALUE>`. Everything here is pure, except `scan_file_domains`,
which blocks on the file system (the caller runs it in an abandonable thread with a deadline).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

MAX_SIZE = 64 * 1024
METADATA = os.path.join("dom_md", "metadata")
TAG_PREFIX = "MDT_"

UUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


def is_uuid(name: str) -> bool:
    return UUID_RE.fullmatch(name) is not None


@dataclass(frozen=True)
class FileDomain:
    sd_uuid: str
    path: str  # the domain directory, <root>/<sdUUID>
    metadata: dict[str, str]


@dataclass(frozen=True)
class Skipped:
    """A directory that looked like a domain (its name is a UUID) but could not be used."""

    path: str
    reason: str


def parse_metadata(text: str) -> dict[str, str]:
    """The `KEY=VALUE` lines up to an `EOF` line or the first NUL, or `ValueError` saying why
    the text is not domain metadata."""
    if len(text) > MAX_SIZE:
        raise ValueError(f"metadata larger than {MAX_SIZE} bytes")
    text = text.partition("\0")[0]
    meta: dict[str, str] = {}
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.removesuffix("\r")
        if line == "EOF":
            break
        if not line.strip():
            continue
        if not line.replace("\t", " ").isprintable():
            raise ValueError(f"non-printable characters on line {number}")
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"line {number} is not KEY=VALUE")
        if not key or key != key.strip() or " " in key:
            raise ValueError(f"line {number} has no valid key")
        meta[key] = value
    if "SDUUID" not in meta:
        raise ValueError("no SDUUID")
    if not is_uuid(meta["SDUUID"]):
        raise ValueError(f"SDUUID {meta['SDUUID']!r} is not a UUID")
    return meta


def parse_metadata_bytes(data: bytes) -> dict[str, str]:
    """`parse_metadata` of raw bytes (a file, or the start of a metadata LV)."""
    if len(data) > MAX_SIZE:
        raise ValueError(f"metadata larger than {MAX_SIZE} bytes")
    try:
        text = data.partition(b"\0")[0].decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("metadata is not text") from None
    return parse_metadata(text)


def metadata_from_tags(tags: list[str]) -> dict[str, str] | None:
    """The metadata kept in `MDT_<KEY>=<VALUE>` VG tags (values as LVM shows them, escapes
    kept), or None if there is no such tag."""
    meta: dict[str, str] = {}
    found = False
    for tag in tags:
        if tag.startswith(TAG_PREFIX):
            found = True
            key, _, value = tag[len(TAG_PREFIX):].partition("=")
            if key:
                meta[key] = value
    return meta if found else None


def scan_file_domains(root: str) -> tuple[list[FileDomain], list[Skipped]]:
    """The domains in the directories of `root` named by a UUID, and the ones skipped, each
    sorted by path. One listing of `root`, then one open and read per UUID directory; names
    that are not UUIDs are ignored. An error listing `root` itself is raised (OSError)."""
    with os.scandir(root) as entries:
        names = sorted(entry.name for entry in entries if is_uuid(entry.name))
    domains: list[FileDomain] = []
    skipped: list[Skipped] = []
    for name in names:
        path = os.path.join(root, name)
        try:
            meta = parse_metadata_bytes(_read_head(os.path.join(path, METADATA)))
        except (FileNotFoundError, NotADirectoryError):
            skipped.append(Skipped(path, "no dom_md/metadata"))
        except OSError as e:
            skipped.append(Skipped(path, f"cannot read dom_md/metadata: {e.strerror}"))
        except ValueError as e:
            skipped.append(Skipped(path, str(e)))
        else:
            if meta["SDUUID"].lower() == name.lower():
                domains.append(FileDomain(name, path, meta))
            else:
                skipped.append(Skipped(
                    path, f"SDUUID {meta['SDUUID']} in dom_md/metadata is not the "
                          f"directory name {name}"))
    return domains, skipped


def _read_head(path: str) -> bytes:
    """Up to MAX_SIZE + 1 bytes of a file: enough to tell that it is too big."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks: list[bytes] = []
        left = MAX_SIZE + 1
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
