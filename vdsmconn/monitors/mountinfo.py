"""Wake on mount table changes: `poll(POLLPRI)` on /proc/self/mountinfo, without a thread.

The kernel reports `EPOLLPRI | EPOLLERR` on an open mountinfo file once the mount namespace
changed since the last poll. The file is registered in an `epoll` whose own descriptor is
watched by the event loop (`loop.add_reader`), so a mount or unmount wakes the loop directly
(about a millisecond plus the debounce). A burst of changes is read at most once per `debounce`
seconds; a lone change at once.

    watcher = MountinfoWatcher()
    task = asyncio.create_task(watcher.run(on_change))   # owner cancels it to stop

`run` calls `on_change(mounts)` once at start with the current table, then after every wake
with the table read then, even when it equals the last one: a mount and its umount between two
reads leave the table as it was, and the owner of that mount must still hear of it. An
exception from
`on_change` ends `run` with that exception. Cancelling `run` removes the reader and closes
both descriptors.
"""

from __future__ import annotations

import asyncio
import logging
import select
from collections.abc import Callable

from vdsmconn.host import mountinfo
from vdsmconn.host.mountinfo import Mount

log = logging.getLogger(__name__)

DEFAULT_DEBOUNCE = 0.005


class MountinfoWatcher:
    def __init__(self, path: str = mountinfo.PATH, debounce: float = DEFAULT_DEBOUNCE) -> None:
        self.path = path
        self.debounce = debounce
        self.wakes = 0  # kernel notifications seen (for metrics and tests)
        self.reads = 0  # times the table was read
        # Read through this process's table, which others then need not read again.
        self.table = mountinfo.table() if path == mountinfo.PATH else mountinfo.Table(path)

    async def run(self, on_change: Callable[[list[Mount]], None]) -> None:
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()
        # Opening the file records the namespace's event count: any change after this line
        # is reported by the poll, so the first read below cannot miss one.
        flagged = open(self.path, "rb", buffering=0)  # noqa: ASYNC230, SIM115 - procfs: never blocks
        with flagged, select.epoll() as ep:
            ep.register(flagged.fileno(), select.EPOLLPRI | select.EPOLLERR)
            loop.add_reader(ep.fileno(), self._on_wake, ep, changed)
            log.debug("MOUNTINFO watching %s debounce=%gs", self.path, self.debounce)
            try:
                on_change(self._read())
                last = loop.time()
                while True:
                    await changed.wait()
                    # Leading edge: a lone change is read at once, a burst at most once per
                    # `debounce`.
                    pause = self.debounce - (loop.time() - last)
                    if pause > 0:
                        await asyncio.sleep(pause)
                    changed.clear()  # a change after this wakes us again
                    last = loop.time()
                    # Reported even when it equals the last table: a mount and its umount
                    # between two reads are a change its owner must hear of.
                    on_change(self._read())
            finally:
                loop.remove_reader(ep.fileno())
                log.debug("MOUNTINFO stopped watching %s", self.path)

    def _on_wake(self, ep: select.epoll, changed: asyncio.Event) -> None:
        # The loop's own poll of our epoll already consumed the kernel's notification (the
        # mountinfo poll records the event count), so this poll often returns nothing: it only
        # empties the epoll's ready list so the loop stops reporting it readable.
        ep.poll(0)
        self.wakes += 1
        changed.set()

    def _read(self) -> list[Mount]:
        self.reads += 1
        return self.table.listing()
