"""The small async contract every backend implements, and what the host gives it."""

from __future__ import annotations

import abc
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from vdsmconn import errors
from vdsmconn.clock import Clock
from vdsmconn.config import Config
from vdsmconn.host.command import CommandRunner
from vdsmconn.host.kernel import Kernel
from vdsmconn.host.probe import Probes
from vdsmconn.model import ConnectionSpec
from vdsmconn.state.actual import HostState, PathStatus
from vdsmconn.state.store import Store

S = TypeVar("S", bound=ConnectionSpec)


@dataclass
class HostContext:
    """What connectors may use: settings, the command runner, the host state they read and
    keep (the mount table as last read, iSCSI sessions and paths, attachments: the actual
    state's), the clock, and the one registry of probe threads (at most one per mount,
    directory or device)."""

    config: Config
    runner: CommandRunner
    state: HostState = field(default_factory=HostState)
    clock: Clock = field(default_factory=Clock)
    store: Store | None = None  # managed volumes keep their attachment records here
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

    steps: list[Step] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps)

    async def run(self, name: str, check: Callable[[], Awaitable[str]]) -> bool:
        start = time.monotonic()
        try:
            detail = await check()
        except errors.Error as e:
            self.steps.append(Step(name, False, time.monotonic() - start, e.message))
            return False
        self.steps.append(Step(name, True, time.monotonic() - start, detail))
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

    @abc.abstractmethod
    async def disconnect(self, spec: S, force: bool = False) -> None:
        """Tear the connection down; success when it is already gone."""

    @abc.abstractmethod
    def present(self, spec: S) -> Connected | None:
        """What the host shows of this connection right now (cheap, no I/O that can hang)."""

    @abc.abstractmethod
    async def probe(self, spec: S) -> None:
        """Check that the connection answers; raise an `errors.Error` if not."""

    @abc.abstractmethod
    async def test(self, spec: S, timeout: float) -> StepLog:
        """A connectivity test that manages nothing."""
