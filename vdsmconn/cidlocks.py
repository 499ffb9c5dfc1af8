"""Per-CID exclusion for the changes of the desired state (service.py).

A CID nobody holds is taken without waiting and without an object of its own; a waiter gets
the CID handed over by the holder's `release`, in the order it came. Unlike `async with`, a
holder releases when it chooses: a change keeps its CIDs until its commit is settled, even
when the task that asked for it was cancelled meanwhile.
"""

from __future__ import annotations

import asyncio
from collections import deque


class CidLocks:
    def __init__(self) -> None:
        # CID -> the futures of those waiting for it; present while someone holds it.
        self._held: dict[str, deque[asyncio.Future[None]]] = {}

    def held(self, cid: str) -> bool:
        return cid in self._held

    async def acquire(self, cids: list[str]) -> list[str]:
        """Hold every CID of `cids`; taken in sorted order, so two callers asking for
        overlapping sets cannot deadlock. Returns them sorted, for `release`. Cancelled
        while waiting, it holds none of them."""
        if len(cids) == 1 and cids[0] not in self._held:  # a manage or update, uncontended
            self._held[cids[0]] = deque()
            return [cids[0]]
        wanted = sorted(set(cids))
        taken: list[str] = []
        try:
            for cid in wanted:
                waiters = self._held.get(cid)
                if waiters is None:
                    self._held[cid] = deque()
                else:
                    await self._wait(cid, waiters)
                taken.append(cid)
        except BaseException:
            self.release(taken)
            raise
        return wanted

    async def _wait(self, cid: str, waiters: deque[asyncio.Future[None]]) -> None:
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            # A cancelled turn stays in the queue; `release` passes over it.
            if turn.done() and not turn.cancelled():
                self.release([cid])  # it was handed over before the cancel arrived
            raise

    def release(self, cids: list[str]) -> None:
        """Hand each CID to its next waiter, or free it."""
        for cid in cids:
            waiters = self._held[cid]
            while waiters:
                turn = waiters.popleft()
                if not turn.done():
                    turn.set_result(None)
                    break
            else:
                del self._held[cid]
