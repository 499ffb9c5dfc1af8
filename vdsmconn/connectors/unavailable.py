"""Stand-in for a backend that this build or this host cannot run: every call says why."""

from __future__ import annotations

from typing import NoReturn

from vdsmconn import errors
from vdsmconn.connectors.base import Connected, Connector, HostContext, StepLog
from vdsmconn.model import ConnectionSpec


class UnavailableConnector(Connector[ConnectionSpec]):
    def __init__(self, host: HostContext, type_name: str, reason: str) -> None:
        super().__init__(host)
        self.type_name = type_name
        self.reason = reason

    def available(self) -> str | None:
        return self.reason

    def _fail(self) -> NoReturn:
        raise errors.BackendUnavailable(
            f"backend {self.type_name} not available on this host: {self.reason}"
        )

    def present(self, spec: ConnectionSpec) -> Connected | None:
        return None

    async def connect(self, spec: ConnectionSpec) -> Connected:
        self._fail()

    async def disconnect(self, spec: ConnectionSpec, force: bool = False) -> None:
        """Nothing of this backend can be up, so nothing needs tearing down."""

    async def probe(self, spec: ConnectionSpec) -> None:
        self._fail()

    async def test(self, spec: ConnectionSpec, timeout: float) -> StepLog:
        log = StepLog()

        async def backend() -> str:
            self._fail()

        await log.run("backend", backend)
        return log
