"""localfs: a local directory, linked under the mount root (SPEC 4)."""

from __future__ import annotations

import asyncio
import os
import stat

from vdsmconn import errors
from vdsmconn.connectors.base import Connected, Connector, StepLog
from vdsmconn.host.links import make_link, remove_link
from vdsmconn.model import LocalSpec
from vdsmconn.state.actual import ForeignMount


def _check_directory(path: str) -> None:
    """Blocking: the directory exists and this process may use it."""
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{path} is not a directory")
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise PermissionError(f"{path} is not readable, writable and searchable")


class LocalConnector(Connector[LocalSpec]):
    def link(self, spec: LocalSpec) -> str:
        return os.path.join(self.host.settings.mount_root, spec.mount_name)

    def present(self, spec: LocalSpec) -> Connected | None:
        link = self.link(spec)
        try:
            target = os.readlink(link)
        except OSError:
            return None
        return Connected(path=link) if target == spec.connection else None

    async def _check(self, spec: LocalSpec) -> None:
        timeout = self.host.settings.probe_timeout
        name = f"check of {spec.connection}"
        try:
            # One thread per directory at most: a directory in a dead NFS mount would
            # otherwise leave a thread in D state behind at every retry.
            await self.host.probes.run(spec.connection,
                                       lambda: _check_directory(spec.connection), name, timeout)
        except errors.Timeout as e:
            raise errors.MountHung(e.message) from None
        except PermissionError as e:
            raise errors.AccessPermissionError(str(e)) from None
        except FileNotFoundError:
            raise errors.ConnectError(f"{spec.connection} does not exist") from None
        except OSError as e:
            raise errors.ConnectError(f"{spec.connection}: {e.strerror or e}") from None

    async def connect(self, spec: LocalSpec) -> Connected:
        await self._check(spec)
        link = self.link(spec)
        await asyncio.to_thread(make_link, spec.connection, link)
        return Connected(path=link)

    async def disconnect(self, spec: LocalSpec, force: bool = False) -> None:
        await asyncio.to_thread(remove_link, self.link(spec), spec.connection)

    async def probe(self, spec: LocalSpec) -> None:
        if self.present(spec) is None:
            raise errors.ConnectError(f"{self.link(spec)} no longer links to {spec.connection}")
        await self._check(spec)

    async def test(self, spec: LocalSpec, timeout: float) -> StepLog:
        log = StepLog(self.host.clock)

        async def directory() -> str:
            await self._check(spec)
            return f"{spec.connection} is a usable directory"

        await log.run("directory", directory)
        return log


def foreign_links(mount_root: str, known: set[str]) -> list[ForeignMount]:
    """Blocking: links under the mount root that no managed key owns."""
    found = []
    try:
        entries = list(os.scandir(mount_root))
    except OSError:
        return []
    for entry in entries:
        if entry.is_symlink() and entry.path not in known:
            try:
                target = os.readlink(entry.path)
            except OSError:
                continue
            found.append(ForeignMount("localfs", target, entry.path))
    return sorted(found, key=lambda f: f.path)
