"""Prometheus metrics (SPEC 9): per real connection, operations, RPC requests, build, process.

Per-connection values are read from the daemon's state when Prometheus scrapes, by a custom
collector running in the HTTP server's thread: a scrape never waits for the event loop, let
alone a backend. The state is read with single C-level operations (a copy of a dict, a
lookup), each atomic under the GIL; a read that races a change is simply retried.

Labels are bounded: `type` (connection type), `target` (the key: one per real connection,
never a CID, never a secret), `operation`, `result`, `reason` and `method`/`code` from fixed
tables.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import itertools
import logging
import platform
import threading
import time
from collections.abc import Awaitable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from vdsmconn import __version__, errors
from vdsmconn.connectors.base import Connected, Connector, QuickCheck, StepLog
from vdsmconn.host import address
from vdsmconn.host.command import StuckCommand
from vdsmconn.model import ConnectionKey, ConnectionSpec, State
from vdsmconn.state.actual import (
    CONNECTED_STATES,
    ActualState,
    Change,
    KeyStatus,
    PathStatus,
)
from vdsmconn.state.desired import DesiredState

log = logging.getLogger(__name__)

PREFIX = "vdsmconn"
OPERATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
RPC_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300)
_RPC_LE = tuple(repr(float(bound)) for bound in RPC_BUCKETS)  # as prometheus_client writes them

# Error codes (SPEC 3.1) -> the `reason` label of connection_errors_total.
REASONS: dict[int, str] = {
    100: "internal", 451: "connect", 452: "disconnect", 453: "conflict", 465: "iscsi",
    469: "permission", 473: "iscsi", 474: "iscsi", 475: "iscsi", 476: "auth", 477: "mount",
    480: "timeout", 481: "stale", 925: "managed_volume", 926: "managed_volume",
    927: "managed_volume", 928: "managed_volume", 929: "managed_volume",
}


def reason(code: int) -> str:
    return REASONS.get(code, "other")


def result_of(exc: BaseException | None) -> str:
    """The `result` label of an operation that ended with `exc`."""
    if exc is None:
        return "ok"
    if isinstance(exc, StuckCommand):
        return "stuck"
    if isinstance(exc, errors.Timeout | errors.MountHung):
        return "timeout"
    return "error"


@dataclass
class _KeyRecord:
    """What the state-change listener remembers of one key (counters survive state changes)."""

    type: str = ""
    was_up: bool = False
    reconnects: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    last_success: float | None = None
    last_error: object = None  # the ErrorInfo last counted (identity)


class Metrics:
    """The registry of one daemon and the hooks that feed it."""

    def __init__(self, desired: DesiredState, actual: ActualState) -> None:
        self.desired = desired
        self.actual = actual
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._keys: dict[ConnectionKey, _KeyRecord] = {}
        reg = self.registry
        self.operation_seconds = Histogram(
            f"{PREFIX}_operation_duration_seconds",
            "Duration of connect, disconnect and probe operations on real connections",
            ["operation", "type", "result"], buckets=OPERATION_BUCKETS, registry=reg)
        # Labelled children looked up once: a probe of every key is timed.
        self._running: dict[tuple[str, str], Gauge] = {}
        self._durations: dict[tuple[str, str, str], Histogram] = {}
        self._requests: dict[tuple[str, int], _RpcTally] = {}
        self.operations_in_progress = Gauge(
            f"{PREFIX}_operations_in_progress", "Operations running now",
            ["operation", "type"], registry=reg)
        reg.register(_RpcCollector(self._requests))
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        GCCollector(registry=reg)
        reg.register(_StateCollector(self))
        actual.listen(self._on_change)

    # --- hooks (event loop thread) -----------------------------------------------------

    def _on_change(self, change: Change) -> None:
        with self._lock:
            if change.new is None:
                self._keys.pop(change.key, None)
                return
            rec = self._keys.setdefault(change.key, _KeyRecord())
            if change.new in CONNECTED_STATES:
                if rec.was_up and change.old not in (*CONNECTED_STATES, State.UNCERTAIN):
                    rec.reconnects += 1
                rec.was_up = True
                rec.last_success = change.time
            elif change.new == State.UNCERTAIN:
                rec.was_up = True
            status = change.status
            if status is not None and status.last_failure is not None \
                    and status.last_failure is not rec.last_error:
                rec.last_error = status.last_failure
                name = reason(status.last_failure.code)
                rec.errors[name] = rec.errors.get(name, 0) + 1

    def remember_type(self, key: ConnectionKey, type_: str) -> None:
        found = self._keys.get(key)  # the loop is the only writer: a read needs no lock
        if found is not None and found.type == type_:
            return
        with self._lock:
            self._keys.setdefault(key, _KeyRecord()).type = type_

    async def timed(self, operation: str, spec: ConnectionSpec, call: Awaitable[T]) -> T:
        """Await one operation on a real connection, counting it and its duration."""
        self.remember_type(spec.key, spec.TYPE)
        running = self._running.get((operation, spec.TYPE))
        if running is None:
            running = self.operations_in_progress.labels(operation, spec.TYPE)
            self._running[operation, spec.TYPE] = running
        running.inc()
        start = time.monotonic()
        try:
            result = await call
        except asyncio.CancelledError:  # the daemon is stopping: not an outcome
            running.dec()
            raise
        except Exception as e:
            running.dec()
            self.observe(operation, spec.TYPE, result_of(e), start)
            raise
        running.dec()
        self.observe(operation, spec.TYPE, "ok", start)
        return result

    def observe(self, operation: str, type_: str, result: str, start: float) -> None:
        """One operation done, started at `start` (monotonic); from any thread."""
        child = self._durations.get((operation, type_, result))
        if child is None:
            child = self.operation_seconds.labels(operation, type_, result)
            self._durations[operation, type_, result] = child
        child.observe(time.monotonic() - start)

    def instrument(self, table: dict[str, Connector[Any]]) -> dict[str, Connector[Any]]:
        """The connector table with every connect, disconnect and probe timed."""
        return {name: TimedConnector(connector, self) for name, connector in table.items()}

    def rpc_request(self, method: str, code: int, seconds: float) -> None:
        """One request done (the dispatcher's observer): by method and result code."""
        tally = self._requests.get((method, code))
        if tally is None:
            tally = self._requests[method, code] = _RpcTally()
        tally.buckets[bisect.bisect_left(RPC_BUCKETS, seconds)] += 1
        tally.seconds += seconds

    # --- reads (any thread) --------------------------------------------------------------

    def records(self) -> dict[ConnectionKey, _KeyRecord]:
        with self._lock:
            return {k: _KeyRecord(r.type, r.was_up, r.reconnects, dict(r.errors),
                                  r.last_success) for k, r in self._keys.items()}

    def snapshot(self) -> list[tuple[ConnectionKey, str, KeyStatus | None, int]]:
        """(key, type, status, refs) of every real connection, desired or still present."""
        for _ in range(5):
            try:
                return self._snapshot()
            except (RuntimeError, KeyError):  # the loop changed the state under us
                time.sleep(0.001)
        return self._snapshot()

    def _snapshot(self) -> list[tuple[ConnectionKey, str, KeyStatus | None, int]]:
        statuses = dict(self.actual.items())
        keys = set(self.desired.all_keys()) | set(statuses)
        types = {k: r.type for k, r in self.records().items()}
        out = []
        for key in sorted(keys):
            spec = self.desired.spec_of(key)
            type_ = spec.TYPE if spec is not None else types.get(key) or key.kind
            out.append((key, type_, statuses.get(key), self.desired.refs(key)))
        return out

    def state_counts(self) -> dict[str, int]:
        """Real connections by state (a desired key not seen yet counts as connecting)."""
        for _ in range(5):
            try:
                return self._state_counts()
            except RuntimeError:  # the loop changed the state under us
                time.sleep(0.001)
        return self._state_counts()

    def _state_counts(self) -> dict[str, int]:
        # Counted, not listed: systemd's status line is made every second while thousands
        # of keys change, and a sorted snapshot cost a start with 10,000 keys a tenth of it.
        counts = {str(s): 0 for s in State}
        for _key, status in self.actual.items():
            counts[str(status.state)] += 1
        counts[str(State.CONNECTING)] += sum(
            1 for key in self.desired.all_keys()
            if self.actual.get(key) is None and self.desired.refs(key))
        return counts

    def status_line(self) -> str:
        """The systemd STATUS= text: counts by state."""
        counts = self.state_counts()
        total = sum(counts.values())
        shown = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        return f"supervising {total} connections" + (f": {shown}" if shown else "")


T = TypeVar("T")


class _RpcTally:
    """The requests of one method and result code: counted on the event loop without a
    lock (a Counter and a Histogram of prometheus_client took two locks and a search through
    the buckets in Python, about 3 % of a request's loop time in a profile), read by scrapes."""

    __slots__ = ("buckets", "created", "seconds")

    def __init__(self) -> None:
        self.buckets = [0] * (len(RPC_BUCKETS) + 1)  # not cumulative; the last is +Inf
        self.seconds = 0.0
        self.created = time.time()


class _RpcCollector(Collector):
    """vdsmconn_rpc_requests_total and vdsmconn_rpc_request_duration_seconds."""

    def __init__(self, tallies: dict[tuple[str, int], _RpcTally]) -> None:
        self._tallies = tallies

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        labels = ["method", "code"]
        requests = CounterMetricFamily(
            f"{PREFIX}_rpc_requests", "JSON-RPC requests handled, by method and result code "
            "(0: success)", labels=labels)
        seconds = HistogramMetricFamily(f"{PREFIX}_rpc_request_duration_seconds",
                                        "Duration of JSON-RPC requests", labels=labels)
        for (method, code), tally in list(self._tallies.items()):
            counts = list(tally.buckets)  # one C-level copy: counts of one moment
            total = sum(counts)
            cumulative = list(itertools.accumulate(counts))
            bounds = [(le, float(n)) for le, n in zip(_RPC_LE, cumulative, strict=False)]
            requests.add_metric([method, str(code)], total, created=tally.created)
            seconds.add_metric([method, str(code)], [*bounds, ("+Inf", float(total))],
                               tally.seconds)
        yield requests
        yield seconds


class _StateCollector(Collector):
    """Per-connection metrics, read from the state at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # do not collect at registration time

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        labels = ["type", "target"]
        build = GaugeMetricFamily(f"{PREFIX}_build_info", "vdsmconn version",
                                  labels=["version", "python"])
        build.add_metric([__version__, platform.python_version()], 1)
        up = GaugeMetricFamily(f"{PREFIX}_connection_up",
                               "1 if the real connection is connected (or degraded)", labels=labels)
        state = GaugeMetricFamily(f"{PREFIX}_connection_state",
                                  "State of the real connection: 1 for the current one",
                                  labels=[*labels, "state"])
        refs = GaugeMetricFamily(f"{PREFIX}_connection_refs",
                                 "Connection IDs referring to the real connection", labels=labels)
        reconnects = CounterMetricFamily(
            f"{PREFIX}_connection_reconnects", "Times the connection came back after being lost",
            labels=labels)
        errs = CounterMetricFamily(f"{PREFIX}_connection_errors",
                                   "Errors recorded on the connection, by reason",
                                   labels=[*labels, "reason"])
        success = GaugeMetricFamily(
            f"{PREFIX}_connection_last_success_timestamp_seconds",
            "Last time the connection was seen healthy (connect or probe)", labels=labels)
        failure = GaugeMetricFamily(f"{PREFIX}_connection_last_error_timestamp_seconds",
                                    "Time of the connection's last error", labels=labels)
        since = GaugeMetricFamily(f"{PREFIX}_connection_state_since_timestamp_seconds",
                                  "Time of the connection's last state change", labels=labels)
        paths = GaugeMetricFamily(f"{PREFIX}_iscsi_path_up",
                                  "1 if this path (iface) of the iSCSI connection is up",
                                  labels=[*labels, "iface"])
        totals = GaugeMetricFamily(f"{PREFIX}_connections", "Real connections by state",
                                   labels=["state"])
        counts = {str(s): 0 for s in State}
        records = m.records()
        for key, type_, status, nrefs in m.snapshot():
            lv = [type_, str(key)]
            current = str(status.state) if status else str(State.CONNECTING)
            counts[current] += 1
            up.add_metric(lv, 1 if status is not None and status.connected else 0)
            for s in State:
                state.add_metric([*lv, str(s)], 1 if str(s) == current else 0)
            refs.add_metric(lv, nrefs)
            rec = records.get(key) or _KeyRecord()
            reconnects.add_metric(lv, rec.reconnects)
            for name in sorted(rec.errors):
                errs.add_metric([*lv, name], rec.errors[name])
            if status is None:
                continue
            since.add_metric(lv, status.since)
            healthy = status.last_check if status.connected and status.last_check else None
            last = max(filter(None, (healthy, rec.last_success)), default=None)
            if last is not None:
                success.add_metric(lv, last)
            if status.last_failure is not None:
                failure.add_metric(lv, status.last_failure.time)
            for iface, path_up in _paths(status.paths):
                paths.add_metric([*lv, iface], path_up)
        for name, n in counts.items():
            totals.add_metric([name], n)
        yield from (build, totals, up, state, refs, reconnects, errs, success, failure, since,
                    paths)


def _paths(paths: tuple[PathStatus, ...] | None) -> list[tuple[str, int]]:
    """(iface, up) of each path of an iSCSI status."""
    return [(p.iface or "default", 1 if p.up else 0) for p in paths or ()]


class TimedConnector(Connector[Any]):
    """A connector whose connect, disconnect and probe are counted; the rest passes through.
    Given to the reconciler (where operations start) only: it is not an instance of the
    backend's class, so code that asks isinstance (the service) keeps the plain table."""

    def __init__(self, inner: Connector[Any], metrics: Metrics) -> None:
        super().__init__(inner.host)
        self.inner = inner
        self._metrics = metrics

    def available(self) -> str | None:
        return self.inner.available()

    async def connect(self, spec: Any) -> Connected:
        return await self._metrics.timed("connect", spec, self.inner.connect(spec))

    async def disconnect(self, spec: Any, force: bool = False) -> None:
        await self._metrics.timed("disconnect", spec, self.inner.disconnect(spec, force))

    async def settle(self, spec: Any, found: Connected) -> Connected:
        return await self.inner.settle(spec, found)

    def present(self, spec: Any) -> Connected | None:
        return self.inner.present(spec)

    async def probe(self, spec: Any) -> None:
        await self._metrics.timed("probe", spec, self.inner.probe(spec))

    def quick_check(self, spec: Any) -> QuickCheck | None:
        check = self.inner.quick_check(spec)
        if check is None:
            return None
        metrics, type_, fn = self._metrics, spec.TYPE, check.fn

        def timed() -> object:  # in a probe thread
            start = time.monotonic()
            result = fn()  # a failure is counted by the supervisor's probe that follows it
            metrics.observe("probe", type_, "ok", start)
            return result

        return dataclasses.replace(check, fn=timed)

    async def test(self, spec: Any, timeout: float) -> StepLog:
        return await self.inner.test(spec, timeout)


class MetricsServer:
    """The HTTP endpoint (/metrics) in a thread of its own."""

    def __init__(self, metrics: Metrics, listen: str) -> None:
        self._metrics = metrics
        self._host, self._port = address.split(listen)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_port if self._server else self._port

    def start(self) -> None:
        self._server, self._thread = start_http_server(self._port, self._host,
                                                       registry=self._metrics.registry)
        log.info("METRICS listen=%s:%d", self._host, self.port)

    def close(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = self._thread = None

