"""Metrics read from the state at scrape time, operation and RPC instrumentation, alerts."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vdsmconn import errors, metrics
from vdsmconn.connectors.base import Connected, Connector, HostContext, StepLog
from vdsmconn.model import ConnectionKey, ConnectionSpec, MountSpec, State
from vdsmconn.rpc import jsonrpc
from vdsmconn.state.actual import ActualState, ErrorInfo, PathStatus
from vdsmconn.state.desired import DesiredState

CONTRIB = Path(__file__).resolve().parents[2] / "contrib" / "prometheus"


def samples(registry: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict[Any, float], name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def spec(name: str) -> ConnectionSpec:
    from vdsmconn.rpc import params
    return params.parse_connection({"type": "posixfs", "connection": name, "vfs_type": "tmpfs"})


@pytest.fixture
def state() -> tuple[DesiredState, ActualState, metrics.Metrics]:
    desired, actual = DesiredState(), ActualState()
    return desired, actual, metrics.Metrics(desired, actual)


def test_connection_metrics_follow_the_state(
    state: tuple[DesiredState, ActualState, metrics.Metrics],
) -> None:
    desired, actual, m = state
    s = spec("vc-a")
    desired.apply_put("cid-secret-name-1", s)
    desired.apply_put("cid-2", s)
    target = str(s.key)
    lv = {"type": "posixfs", "target": target}
    found = samples(m.registry)
    assert value(found, "vdsmconn_connection_up", **lv) == 0
    assert value(found, "vdsmconn_connection_state", state="connecting", **lv) == 1
    assert value(found, "vdsmconn_connection_refs", **lv) == 2

    actual.set_state(s.key, State.CONNECTING, 100.0)
    actual.set_state(s.key, State.CONNECTED, 101.0, last_check=101.0)
    found = samples(m.registry)
    assert value(found, "vdsmconn_connection_up", **lv) == 1
    assert value(found, "vdsmconn_connection_state", state="connected", **lv) == 1
    assert value(found, "vdsmconn_connection_state", state="connecting", **lv) == 0
    assert value(found, "vdsmconn_connection_reconnects_total", **lv) == 0
    assert value(found, "vdsmconn_connection_last_success_timestamp_seconds", **lv) == 101.0
    assert value(found, "vdsmconn_connections", state="connected") == 1
    assert not any("cid" in str(k) for k in found)  # never a CID in a label

    # Lost, then back: one reconnect, one error with its reason.
    actual.set_state(s.key, State.FAILED, 110.0, last_error=ErrorInfo(477, "gone", 110.0))
    actual.set_state(s.key, State.CONNECTING, 111.0)
    actual.set_state(s.key, State.CONNECTED, 112.0)
    found = samples(m.registry)
    assert value(found, "vdsmconn_connection_reconnects_total", **lv) == 1
    assert value(found, "vdsmconn_connection_errors_total", reason="mount", **lv) == 1
    assert value(found, "vdsmconn_connection_last_error_timestamp_seconds", **lv) == 110.0
    assert value(found, "vdsmconn_connection_last_success_timestamp_seconds", **lv) == 112.0

    # Gone from the host and from the desired state: no series left.
    desired.apply_delete("cid-secret-name-1")
    desired.apply_delete("cid-2")
    actual.remove(s.key, 120.0)
    found = samples(m.registry)
    assert not [k for k in found if ("target", target) in k[1]]


def test_adoption_is_not_a_reconnect(
    state: tuple[DesiredState, ActualState, metrics.Metrics],
) -> None:
    desired, actual, m = state
    s = spec("vc-b")
    desired.apply_put("c", s)
    actual.set_state(s.key, State.UNCERTAIN, 1.0)
    actual.set_state(s.key, State.CONNECTED, 2.0)
    found = samples(m.registry)
    assert value(found, "vdsmconn_connection_reconnects_total", type="posixfs",
                 target=str(s.key)) == 0


def test_iscsi_paths_are_reported_per_iface(
    state: tuple[DesiredState, ActualState, metrics.Metrics],
) -> None:
    _desired, actual, m = state
    key = ConnectionKey("iscsi", "10.0.0.1:3260,1,iqn.2003-01.org.example:t1")
    m.remember_type(key, "iscsi")
    actual.set_state(key, State.DEGRADED, 1.0, paths=(
        PathStatus("eth1", "eth1", "up"), PathStatus("eth2", "eth2", "down")))
    found = samples(m.registry)
    lv = {"type": "iscsi", "target": str(key)}
    assert value(found, "vdsmconn_iscsi_path_up", iface="eth1", **lv) == 1
    assert value(found, "vdsmconn_iscsi_path_up", iface="eth2", **lv) == 0
    assert value(found, "vdsmconn_connection_up", **lv) == 1


def test_status_line_counts_states(
    state: tuple[DesiredState, ActualState, metrics.Metrics],
) -> None:
    desired, actual, m = state
    a, b = spec("vc-c"), spec("vc-d")
    desired.apply_put("a", a)
    desired.apply_put("b", b)
    actual.set_state(a.key, State.CONNECTED, 1.0)
    assert m.status_line() == "supervising 2 connections: 1 connecting, 1 connected"


def test_state_counts_agree_with_the_snapshot(
    state: tuple[DesiredState, ActualState, metrics.Metrics],
) -> None:
    """Desired keys not seen yet count as connecting; a key still up after its last CID
    went counts by its state; each key once."""
    desired, actual, m = state
    a, b, c, gone = spec("vc-a"), spec("vc-b"), spec("vc-c"), spec("vc-gone")
    for cid, s in (("a", a), ("a2", a), ("b", b), ("c", c)):
        desired.apply_put(cid, s)
    actual.set_state(a.key, State.CONNECTED, 1.0)
    actual.set_state(b.key, State.FAILED, 1.0)
    actual.set_state(gone.key, State.DISCONNECTING, 1.0)
    counts = m.state_counts()
    expected = {str(st): 0 for st in State}
    for _key, _type, status, refs in m.snapshot():
        if refs or status is not None:
            expected[str(status.state if status else State.CONNECTING)] += 1
    assert counts == expected
    assert (counts["connected"], counts["failed"], counts["disconnecting"],
            counts["connecting"]) == (1, 1, 1, 1)


class SlowConnector(Connector[MountSpec]):
    """connect waits until released; probe fails as a hung mount would."""

    def __init__(self) -> None:
        super().__init__(HostContext(None, None))  # type: ignore[arg-type]
        self.release = asyncio.Event()
        self.extra = "passes through"

    async def connect(self, spec: MountSpec) -> Connected:
        await self.release.wait()
        return Connected(path="/x")

    async def disconnect(self, spec: MountSpec, force: bool = False) -> None:
        raise errors.MountError("umount failed")

    def present(self, spec: MountSpec) -> Connected | None:
        return None

    async def probe(self, spec: MountSpec) -> None:
        raise errors.MountHung("did not return within 3 s")

    async def test(self, spec: MountSpec, timeout: float) -> StepLog:
        return StepLog()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        return str(r.read().decode())


async def test_operations_are_timed_and_a_scrape_never_waits_for_one(
    state: tuple[DesiredState, ActualState, metrics.Metrics],
) -> None:
    _desired, _actual, m = state
    slow = SlowConnector()
    table = m.instrument({"posixfs": slow})
    timed = table["posixfs"]
    # No attribute passes through by magic: the backend's own extras are on `inner`.
    assert isinstance(timed, metrics.TimedConnector)
    assert getattr(timed.inner, "extra") == "passes through"  # noqa: B009 - backend extras
    s = spec("vc-e")
    connecting = asyncio.create_task(timed.connect(s))
    for _ in range(5):  # it starts, and waits for `release`
        await asyncio.sleep(0)
    server = metrics.MetricsServer(m, f"127.0.0.1:{free_port()}")
    server.start()
    try:
        # The event loop is busy in this test, the connect hangs: the scrape still answers.
        text = await asyncio.to_thread(scrape, server.port, 2.0)
    finally:
        server.close()
    assert 'vdsmconn_operations_in_progress{operation="connect",type="posixfs"} 1.0' in text
    slow.release.set()
    assert (await connecting).path == "/x"
    with pytest.raises(errors.MountHung):
        await timed.probe(s)
    with pytest.raises(errors.MountError):
        await timed.disconnect(s)
    found = samples(m.registry)
    count = "vdsmconn_operation_duration_seconds_count"
    assert value(found, count, operation="connect", type="posixfs", result="ok") == 1
    assert value(found, count, operation="probe", type="posixfs", result="timeout") == 1
    assert value(found, count, operation="disconnect", type="posixfs", result="error") == 1
    assert value(found, "vdsmconn_operations_in_progress", operation="connect",
                 type="posixfs") == 0


class Session:
    peer = "test"

    def notify(self, method: str, params: dict[str, Any]) -> None:
        pass


async def test_rpc_requests_are_counted_by_method_and_code(
    state: tuple[DesiredState, ActualState, metrics.Metrics],
) -> None:
    _desired, _actual, m = state

    async def ok(p: dict[str, Any], s: jsonrpc.Session) -> Any:
        return {"n": p.get("n")}

    async def broken(p: dict[str, Any], s: jsonrpc.Session) -> Any:
        raise errors.ConnectionIdNotFound("no such CID")

    table = [jsonrpc.Method("ok", ("n",), frozenset(), ok),
             jsonrpc.Method("broken", (), frozenset(), broken)]
    dispatcher = jsonrpc.Dispatcher(table, observe=m.rpc_request)
    session = Session()
    for line in (b'{"jsonrpc":"2.0","id":1,"method":"ok","params":{"n":1}}',
                 b'{"jsonrpc":"2.0","id":2,"method":"ok","params":{"x":1}}',
                 b'{"jsonrpc":"2.0","id":3,"method":"broken"}',
                 b'{"jsonrpc":"2.0","id":4,"method":"ok"}'):
        assert await dispatcher.handle(line, session) is not None
    found = samples(m.registry)
    assert value(found, "vdsmconn_rpc_requests_total", method="ok", code="0") == 2
    assert value(found, "vdsmconn_rpc_requests_total", method="ok", code="-32602") == 1
    assert value(found, "vdsmconn_rpc_requests_total", method="broken", code="479") == 1
    assert value(found, "vdsmconn_rpc_request_duration_seconds_count", method="broken",
                 code="479") == 1


def test_rpc_samples_are_those_of_prometheus_clients_own_counter_and_histogram(
    state: tuple[DesiredState, ActualState, metrics.Metrics],
) -> None:
    m = state[2]
    reference = CollectorRegistry()
    counter = Counter("vdsmconn_rpc_requests", "x", ["method", "code"], registry=reference)
    histogram = Histogram("vdsmconn_rpc_request_duration_seconds", "x", ["method", "code"],
                          buckets=metrics.RPC_BUCKETS, registry=reference)
    observations = [("manage", 0, s) for s in (0.0, 0.0004, 0.001, 0.0011, 0.7, 299.0, 301.0)]
    observations += [("manage", 481, 0.02), ("list", 0, 5.0), ("list", 0, 5.5)]
    for method, code, seconds in observations:
        m.rpc_request(method, code, seconds)
        counter.labels(method, str(code)).inc()
        histogram.labels(method, str(code)).observe(seconds)

    def rpc(found: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[Any, float]:
        return {k: v for k, v in found.items()
                if k[0].startswith("vdsmconn_rpc_") and not k[0].endswith("_created")}

    ours, theirs = rpc(samples(m.registry)), rpc(samples(reference))
    # Per pair of labels: the counter, 13 buckets, count and sum.
    assert ours.keys() == theirs.keys() and len(ours) == 3 * (1 + 13 + 2)
    for name, expected in theirs.items():
        assert ours[name] == pytest.approx(expected), name


def test_build_and_process_info_are_exported(
    state: tuple[DesiredState, ActualState, metrics.Metrics],
) -> None:
    text = generate_latest(state[2].registry).decode()
    assert 'vdsmconn_build_info{python="' in text
    assert "process_resident_memory_bytes" in text
    assert "process_open_fds" in text


def test_reasons_are_a_small_fixed_set() -> None:
    assert metrics.reason(477) == "mount"
    assert metrics.reason(481) == "stale"
    assert metrics.reason(12345) == "other"
    assert len(set(metrics.REASONS.values())) <= 12


needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool missing (Debian package prometheus)")


@needs_promtool
def test_scrape_passes_promtool_check_metrics(
    state: tuple[DesiredState, ActualState, metrics.Metrics],
) -> None:
    desired, actual, m = state
    s = spec("vc-f")
    desired.apply_put("c", s)
    actual.set_state(s.key, State.FAILED, 1.0, last_error=ErrorInfo(481, "stale", 1.0))
    text = generate_latest(m.registry)
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                          timeout=30, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout + proc.stderr == b""  # not even a lint warning


@needs_promtool
def test_alert_rules_are_valid_and_fire_in_their_unit_tests() -> None:
    check = subprocess.run(["promtool", "check", "rules", "alerts.yml"], cwd=CONTRIB,
                           capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 4 rules found" in check.stdout
    test = subprocess.run(["promtool", "test", "rules", "alerts.test.yml"], cwd=CONTRIB,
                          capture_output=True, text=True, timeout=60, check=False)
    assert test.returncode == 0, test.stdout + test.stderr
