"""Load: 200 concurrent clients x 100 mixed calls against the real daemon: no error."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import Daemon

pytestmark = pytest.mark.root

CLIENTS = 200
CALLS = 100


@pytest.fixture
def busy_daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    d.settings["rpc"]["max_clients"] = CLIENTS + 10
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


def test_200_clients_100_calls_each(busy_daemon: Daemon) -> None:
    daemon = busy_daemon
    latencies: list[float] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        mine: list[float] = []
        try:
            with daemon.client(timeout=60) as c:
                for i in range(CALLS):
                    start = time.perf_counter()
                    kind = i % 4
                    if kind == 0:
                        c.call("manageStorageServer", {"connectionID": f"ld-{n}-{i}",
                               "connection": {"type": "posixfs", "connection": "vc-load",
                                              "vfs_type": "tmpfs"}})
                    elif kind == 1:
                        c.call("getStorageServerList", {"connectionIDs": [f"ld-{n}-{i - 1}"]})
                    elif kind == 2:
                        c.call("unmanageStorageServer", {"connectionID": f"ld-{n}-{i - 2}"})
                    else:
                        c.call("getHostInfo")
                    mine.append(time.perf_counter() - start)
        except BaseException as e:
            with lock:
                failures.append(e)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    elapsed = time.perf_counter() - start
    assert not failures, failures[:3]
    assert len(latencies) == CLIENTS * CALLS
    p99 = statistics.quantiles(latencies, n=100)[98]
    print(f"\nload: {len(latencies)} calls in {elapsed:.1f}s, "
          f"{len(latencies) / elapsed:.0f}/s, p50 {statistics.median(latencies) * 1000:.1f} ms,"
          f" p99 {p99 * 1000:.1f} ms")
    assert daemon.call("getStorageServerList", includeUnmanaged=False) == {}
    daemon.wait_gone(f"{daemon.mount_root}/vc-load")
