"""The periodic probes of connected keys, in rounds.

A connected key whose probe is one blocking check (`Connector.quick_check`: a mount) does
not keep a timer of its own: its supervisor waits for a kick, and the sweep checks it every
probe interval, together with every other key that is due within the same `window`. A
round is handed to the probe threads in batches and comes back to the loop in one piece
(`Probes.sweep`), so a host with a thousand connections pays for a hundred checks a second
about what it paid for a few. A check that passes records the key's `lastCheck`; one that
fails, hangs or finds its target busy wakes the key's supervisor, which probes on its own
and reports what it finds (or waits out the hang, as a probe of its own would).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Callable
from typing import Protocol

from vdsmconn.clock import Clock
from vdsmconn.connectors.base import QuickCheck
from vdsmconn.host.probe import BUSY

log = logging.getLogger(__name__)

ROUND_WINDOW = 1.0  # seconds: keys due this much later join a round (at most interval/10)


class Checked(Protocol):
    """What the sweep needs of a supervisor."""

    def probed(self, now: float) -> None: ...
    def kick(self, suspect: bool = False) -> None: ...


class Ticket:
    """A key enlisted for its next probe; cancelled when its supervisor wakes."""

    __slots__ = ("check", "live", "sup")

    def __init__(self, sup: Checked, check: QuickCheck) -> None:
        self.sup = sup
        self.check = check
        self.live = True

    def cancel(self) -> None:
        self.live = False


class Sweep:
    def __init__(self, clock: Clock, interval: float) -> None:
        self.clock = clock
        self.interval = interval
        self.window = min(ROUND_WINDOW, interval / 10)
        self._due: list[tuple[float, int, Ticket]] = []
        self._seq = itertools.count()
        self._changed = asyncio.Event()  # a ticket due earlier than all others came
        self._task: asyncio.Task[None] | None = None
        self._rounds: set[asyncio.Task[None]] = set()
        self.on_round: Callable[[int], None] | None = None  # checks per round (tests)

    def enlist(self, sup: Checked, check: QuickCheck, due: float) -> Ticket:
        """Probe `check` at `due` (clock time) and every interval after, until cancelled."""
        ticket = Ticket(sup, check)
        self._push(due, ticket)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sweep")
        return ticket

    def _push(self, due: float, ticket: Ticket) -> None:
        if not self._due or due < self._due[0][0]:
            self._changed.set()
        heapq.heappush(self._due, (due, next(self._seq), ticket))

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._rounds) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None

    async def _run(self) -> None:
        while True:
            self._changed.clear()
            while self._due and not self._due[0][2].live:
                heapq.heappop(self._due)
            if not self._due:
                await self._changed.wait()
                continue
            wait = self._due[0][0] - self.clock.time()
            if wait > 0:
                await self.clock.sleep_or(wait, self._changed)
                continue
            horizon = self.clock.time() + self.window
            tickets = []
            while self._due and self._due[0][0] <= horizon:
                ticket = heapq.heappop(self._due)[2]
                if ticket.live:
                    tickets.append(ticket)
            # A round waits for its slowest check (a hang: the probe timeout); the next
            # round must not.
            task = asyncio.get_running_loop().create_task(self._round(tickets), name="round")
            self._rounds.add(task)
            task.add_done_callback(self._rounds.discard)

    async def _round(self, tickets: list[Ticket]) -> None:
        try:
            await self._checks(tickets)
        except Exception:  # a bug: the keys go back to probing on their own
            log.exception("SWEEP round of %d checks failed", len(tickets))
            for ticket in tickets:
                if ticket.live:
                    ticket.cancel()
                    ticket.sup.kick(suspect=True)

    async def _checks(self, tickets: list[Ticket]) -> None:
        if self.on_round is not None:
            self.on_round(len(tickets))
        groups: dict[tuple[int, float], list[Ticket]] = {}
        for ticket in tickets:
            check = ticket.check
            groups.setdefault((id(check.probes), check.timeout), []).append(ticket)
        if len(groups) == 1:
            await self._group(tickets)
        else:
            await asyncio.gather(*(self._group(group) for group in groups.values()))

    async def _group(self, tickets: list[Ticket]) -> None:
        """Checks that share their `Probes` and their timeout."""
        first = tickets[0].check
        outcomes = await first.probes.sweep(
            [(t.check.target, t.check.fn, t.check.name) for t in tickets], first.timeout)
        now = self.clock.time()
        for ticket, outcome in zip(tickets, outcomes, strict=True):
            if not ticket.live:
                continue  # its supervisor woke meanwhile and probes on its own
            if outcome is None:
                ticket.sup.probed(now)
                self._push(now + self.interval, ticket)
            elif outcome is BUSY:
                self._push(now + self.window, ticket)
            else:
                ticket.cancel()
                ticket.sup.kick(suspect=True)
