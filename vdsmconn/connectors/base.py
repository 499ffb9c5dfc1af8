"""The small async contract every backend implements, and what the host gives it."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from vdsmconn import errors
from vdsmconn.clock import Clock
from vdsmconn.host.command import CommandRunner
from vdsmconn.host.kernel import Kernel
from vdsmconn.host.probe import Probes
from vdsmconn.model import ConnectionSpec
from vdsmconn.settings import HostSettings
from vdsmconn.state.actual import Attachment, HostState, PathStatus

S = TypeVar("S", bound=ConnectionSpec)


class AttachmentStore(Protocol):
    """Where the attachment records of managed volumes are kept, durably (the state
    store): each is committed before its attach is reported."""

    async def attachments(self) -> dict[str, Attachment]: ...

    async def put_attachment(self, record: Attachment) -> None: ...

    async def delete_attachment(self, volume_id: str) -> None: ...


class DeviceEvents:
    """Block devices came or went (udev): wakes whoever waits for the kernel to show one.

    Without a watcher feeding it (`watched` False: no udev here), a wait looks again after a
    short pause instead."""

    RECHECK = 0.05  # seconds between looks when nothing tells us of devices

    def __init__(self) -> None:
        self.watched = False
        self._event = asyncio.Event()

    def changed(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, clock: Clock, timeout: float) -> None:
        """Until the next change, or `timeout` seconds on `clock`."""
        if not self.watched:
            await clock.sleep(min(timeout, self.RECHECK))
            return
        await clock.sleep_or(timeout, self._event)


@dataclass(frozen=True)
class QuickCheck:
    """A probe that is one blocking check of one target, within `timeout` seconds of its
    running: the supervisors' sweep (reconcile/sweep.py) runs many at once instead of one
    hand-off each. A check that fails or hangs only wakes the key's supervisor, whose own
    `probe` then finds out and reports what is wrong."""

    target: str
    fn: Callable[[], object]
    name: str
    probes: Probes
    timeout: float


@dataclass
class HostContext:
    """What connectors may use: settings, the command runner, the host state they read and
    keep (the mount table as last read, iSCSI sessions and paths, attachments: the actual
    state's), the clock, and the one registry of probe threads (at most one per mount,
    directory or device)."""

    settings: HostSettings
    runner: CommandRunner
    state: HostState = field(default_factory=HostState)
    clock: Clock = field(default_factory=Clock)
    attachments: AttachmentStore | None = None  # where managed volumes' records are kept
    devices: DeviceEvents = field(default_factory=DeviceEvents)
    probes: Probes = field(default_factory=Probes)
    kernel: Kernel = field(default_factory=Kernel)  # what the running kernel can do


@dataclass(frozen=True)
class Connected:
    """What a successful connect or adoption reports."""

    path: str | None = None
    paths: tuple[PathStatus, ...] | None = None
    degraded: bool = False


@dataclass
class Step:
    step: str
    ok: bool
    seconds: float
    detail: str

    def to_wire(self) -> dict[str, Any]:
        return {"step": self.step, "ok": self.ok, "seconds": round(self.seconds, 6),
                "detail": self.detail}


@dataclass
class StepLog:
    """The steps of a connectivity test; `run` stops the test at the first failure."""

    clock: Clock = field(default_factory=Clock)  # times each step
    steps: list[Step] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps)

    async def run(self, name: str, check: Callable[[], Awaitable[str]]) -> bool:
        start = self.clock.monotonic()
        try:
            detail = await check()
        except errors.Error as e:
            self.steps.append(Step(name, False, self.clock.monotonic() - start, e.message))
            return False
        self.steps.append(Step(name, True, self.clock.monotonic() - start, detail))
        return True

    def to_wire(self) -> dict[str, Any]:
        return {"ok": self.ok, "steps": [s.to_wire() for s in self.steps]}


class Connector(abc.ABC, Generic[S]):
    """One backend. Every method may be slow; none may block the event loop."""

    def __init__(self, host: HostContext) -> None:
        self.host = host

    def available(self) -> str | None:
        """None if this backend can work on this host, else the reason it cannot."""
        return None

    @abc.abstractmethod
    async def connect(self, spec: S) -> Connected:
        """Bring the connection up; idempotent when it is already up."""

    async def settle(self, spec: S, found: Connected) -> Connected:
        """After a successful `connect`, outside its operation slot: wait for what the host
        does on its own after a connect (the kernel's LUN scan after an iSCSI login) and
        check the result; raise an `errors.Error` if the connection is not usable. Nothing
        to wait for by default."""
        return found

    @abc.abstractmethod
    async def disconnect(self, spec: S, force: bool = False) -> None:
        """Tear the connection down; success when it is already gone."""

    @abc.abstractmethod
    def present(self, spec: S) -> Connected | None:
        """What the host shows of this connection right now (cheap, no I/O that can hang)."""

    @abc.abstractmethod
    async def probe(self, spec: S) -> None:
        """Check that the connection answers; raise an `errors.Error` if not."""

    def quick_check(self, spec: S) -> QuickCheck | None:
        """The blocking check that `probe` comes down to while the connection is present,
        when it is just one; None when probing takes more (paths, devices, steps)."""
        return None

    @abc.abstractmethod
    async def test(self, spec: S, timeout: float) -> StepLog:
        """A connectivity test that manages nothing."""
