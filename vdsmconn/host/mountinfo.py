"""The kernel's mount table, `/proc/self/mountinfo`, parsed by a pure function.

Line format (proc(5)):

    36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    id pa maj:mn root mountpoint options [optional fields...] - fstype source super-options

The kernel escapes space, tab, newline and backslash in paths as `\\ooo` octal; a mount point
whose directory was removed ends in ` (deleted)`. Reading the file never blocks, even when a
mounted filesystem hangs.
"""

from __future__ import annotations

import logging
import re
import select
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from vdsmconn.model import normalize_path, normalize_remote

log = logging.getLogger(__name__)

PATH = "/proc/self/mountinfo"

_OCTAL = re.compile(r"\\([0-7]{3})")
_DELETED = "\\040(deleted)"


@dataclass(frozen=True)
class Mount:
    mount_id: int
    parent_id: int
    major_minor: str
    root: str
    mountpoint: str
    options: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]
    deleted: bool = False


def unescape(field: str) -> str:
    """Decode the kernel's `\\ooo` escapes (`\\040` space, `\\134` backslash...)."""
    if "\\" not in field:
        return field
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_line(line: str) -> Mount | None:
    """One mountinfo line as a `Mount`, or None if the line is not well formed."""
    fields = line.split(" ")
    try:
        sep = fields.index("-", 6)
    except ValueError:
        return None
    after = fields[sep + 1 :]
    if len(after) != 3 or not after[0]:
        return None
    try:
        mount_id, parent_id = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    major_minor, root, mountpoint = fields[2], fields[3], fields[4]
    if ":" not in major_minor or not root or not mountpoint:
        return None
    deleted = mountpoint.endswith(_DELETED)
    if deleted:
        mountpoint = mountpoint[: -len(_DELETED)]
    return Mount(
        mount_id=mount_id,
        parent_id=parent_id,
        major_minor=major_minor,
        root=unescape(root),
        mountpoint=unescape(mountpoint),
        options=tuple(fields[5].split(",")),
        fstype=after[0],
        source=unescape(after[1]),
        super_options=tuple(after[2].split(",")),
        deleted=deleted,
    )


def parse(text: str) -> list[Mount]:
    """Every well-formed line of a mountinfo text, in order; malformed lines are skipped."""
    mounts = []
    # Only "\n" ends a line: the kernel escapes it in paths, but not "\f", "\x85"...
    for number, line in enumerate(text.split("\n"), 1):
        if not line:
            continue
        mount = parse_line(line)
        if mount is None:
            log.debug("mountinfo line %d malformed, skipped: %r", number, line)
            continue
        mounts.append(mount)
    return mounts


class Parser:
    """Parses successive reads of the table, each line once: between two reads of a table
    with a thousand mounts usually one line changed, and parsing is what costs."""

    def __init__(self) -> None:
        self._lines: dict[bytes, Mount | None] = {}

    def parse(self, raw: bytes) -> list[Mount]:
        known = self._lines
        lines: dict[bytes, Mount | None] = {}
        mounts = []
        for line in raw.split(b"\n"):
            if not line:
                continue
            if line in known:
                mount = known[line]
            else:
                mount = parse_line(line.decode("utf-8", errors="surrogateescape"))
                if mount is None:
                    log.debug("mountinfo line malformed, skipped: %r", line)
            lines[line] = mount
            if mount is not None:
                mounts.append(mount)
        self._lines = lines
        return mounts


def read(path: str = PATH, parser: Parser | None = None) -> list[Mount]:
    """The current mount table of this process's mount namespace (`parser`: one that
    parsed earlier reads, for reading it often)."""
    with open(path, "rb") as f:
        raw = f.read()
    if parser is not None:
        return parser.parse(raw)
    return parse(raw.decode("utf-8", errors="surrogateescape"))


def escape(path: str) -> str:
    """A path as the kernel writes it in mountinfo (space, tab, newline, backslash octal)."""
    for char in "\\ \t\n":
        path = path.replace(char, f"\\{ord(char):03o}")
    return path


def mounted_at(mountpoint: str, path: str = PATH) -> Mount | None:
    """The mount on top at `mountpoint` now, or None: from the table as last read while it
    has not changed since (this process's table, `table()`), else read, parsing only the
    lines that name it (a connect or an unmount asks this of one path while a thousand
    others are mounted)."""
    if path == PATH:
        return table().at(mountpoint)
    with open(path, "rb") as f:
        return _find(f.read(), mountpoint)


def _find(raw: bytes, mountpoint: str) -> Mount | None:
    needle = f" {escape(mountpoint)}".encode("utf-8", errors="surrogateescape")
    found: Mount | None = None
    start = raw.find(needle)
    while start >= 0:
        begin = raw.rfind(b"\n", 0, start) + 1
        end = raw.find(b"\n", start)
        end = end if end >= 0 else len(raw)
        after = start + len(needle)
        # Followed by the options, or by the mark of a deleted mount point.
        if raw.startswith((b" ", _DELETED.encode()), after):
            mount = parse_line(raw[begin:end].decode("utf-8", errors="surrogateescape"))
            if mount is not None and mount.mountpoint == mountpoint:
                found = mount  # the last one is on top
        start = raw.find(needle, end)
    return found


class Table:
    """The mount table, read again only once it changed: the kernel flags every change of
    the namespace's table on each open mountinfo file (`POLLPRI`), so a table read after
    the last flag seen on this file is still the table now. The file is this object's own:
    the flag is seen by no other poll (the watcher polls a file of its own)."""

    def __init__(self, path: str = PATH) -> None:
        self.reads = 0  # whole reads (for tests)
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - lives with the object
        self._poll = select.poll()
        self._poll.register(self._file.fileno(), select.POLLPRI)
        self._parser = Parser()
        self._mounts: list[Mount] = []
        self._by_path: dict[str, Mount] | None = None  # None: changed since the last read
        self._lock = threading.Lock()

    def _current(self) -> dict[str, Mount] | None:
        """The table as last read if it has not changed since, else None."""
        if self._poll.poll(0):  # takes the flag: a change after this is flagged anew
            self._by_path = None
        return self._by_path

    def _read(self) -> dict[str, Mount]:
        self._poll.poll(0)
        self._file.seek(0)
        self._mounts = self._parser.parse(self._file.read())
        self._by_path = {m.mountpoint: m for m in self._mounts}  # the last one is on top
        self.reads += 1
        return self._by_path

    def listing(self) -> list[Mount]:
        """Every mount, in the kernel's order."""
        with self._lock:
            if self._current() is None:
                self._read()
            return self._mounts

    def mounts(self) -> dict[str, Mount]:
        """The mount on top at each mount point. The same object while nothing changed:
        callers must not change it."""
        with self._lock:
            current = self._current()
            return self._read() if current is None else current

    def at(self, mountpoint: str) -> Mount | None:
        """The mount on top at `mountpoint` (after a change, parsing only its lines)."""
        with self._lock:
            current = self._current()
            if current is None:
                self._file.seek(0)
                return _find(self._file.read(), mountpoint)
            return current.get(mountpoint)


_table: Table | None = None
_table_lock = threading.Lock()


def table() -> Table:
    """This process's mount table (the namespace's; opened at first use)."""
    global _table
    with _table_lock:
        if _table is None:
            _table = Table()
        return _table


def normalized_source(m: Mount) -> str:
    """The source in the form specs use: `server://a/` and `server:/a` are both `server:/a`."""
    return normalize_remote(m.source)


def under(mounts: Iterable[Mount], root: str) -> list[Mount]:
    """The mounts whose mount point is strictly below `root` (whole path components)."""
    prefix = normalize_path(root).rstrip("/") + "/"
    return [m for m in mounts if m.mountpoint.startswith(prefix) and m.mountpoint != prefix]
