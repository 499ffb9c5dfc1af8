"""Crash consistency: clients manage and unmanage CIDs on shared keys while the daemon is
killed with SIGKILL at a random moment, round after round. After each restart: no
acknowledged change is lost, refs equal the CIDs present, and each key has exactly one
mount (or none)."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest

from tests.daemon import Daemon
from vdsmconn.cli import RpcError, TransportError
from vdsmconn.host import mountinfo

pytestmark = pytest.mark.root

ROUNDS = 20
CLIENTS = 8
KEYS = 4


def tmpfs(n: int) -> dict[str, Any]:
    return {"type": "posixfs", "connection": f"vc-crash{n}", "vfs_type": "tmpfs",
            "mnt_options": "size=1m"}


class Ledger:
    """What the daemon acknowledged: per CID, the last acknowledged state and any change in
    flight when the daemon died (which may or may not have been committed)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: dict[str, bool] = {}  # cid -> managed?
        self.in_flight: dict[str, bool] = {}

    def begin(self, cid: str, managed: bool) -> None:
        with self.lock:
            self.in_flight[cid] = managed

    def ack(self, cid: str, managed: bool) -> None:
        with self.lock:
            self.acked[cid] = managed
            self.in_flight.pop(cid, None)


def client(daemon: Daemon, ledger: Ledger, n: int, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    try:
        with daemon.client(timeout=10) as c:
            while not stop.is_set():
                cid = f"cr-{n}-{rng.randrange(6)}"
                key = rng.randrange(KEYS)
                with ledger.lock:
                    managed = ledger.acked.get(cid, False)
                if managed:
                    ledger.begin(cid, False)
                    c.call("unmanageStorageServer", {"connectionID": cid})
                    ledger.ack(cid, False)
                else:
                    ledger.begin(cid, True)
                    try:
                        c.call("manageStorageServer",
                               {"connectionID": cid, "connection": tmpfs(key)})
                    except RpcError as e:
                        # 453 cannot happen (one spec per key); anything else is a bug.
                        raise AssertionError(f"manage {cid}: {e}") from e
                    ledger.ack(cid, True)
    except (TransportError, OSError):
        return  # the daemon was killed under us


def mounts_of(daemon: Daemon) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in mountinfo.read():
        if m.mountpoint.startswith(daemon.mount_root + "/"):
            counts[m.mountpoint] = counts.get(m.mountpoint, 0) + 1
    return counts


def test_sigkill_at_random_moments_loses_nothing(daemon: Daemon) -> None:
    ledger = Ledger()
    rng = random.Random(20261125)
    for round_ in range(ROUNDS):
        stop = threading.Event()
        threads = [threading.Thread(target=client,
                                    args=(daemon, ledger, n, stop, rng.random()))
                   for n in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.05, 0.6))
        daemon.kill9()
        stop.set()
        for t in threads:
            t.join(30)
            assert not t.is_alive()
        daemon.start()
        listing = daemon.call("getStorageServerList", includeUnmanaged=False)
        present = set(listing)
        with ledger.lock:
            for cid, managed in ledger.acked.items():
                if cid in ledger.in_flight:
                    continue  # died in flight: either outcome is allowed
                assert (cid in present) == managed, f"round {round_}: {cid} lost"
            # Settle the in-flight ones to what the daemon kept, for the next round.
            for cid in list(ledger.in_flight):
                ledger.acked[cid] = cid in present
            ledger.in_flight.clear()
            assert present == {c for c, m in ledger.acked.items() if m}
        by_key: dict[str, list[str]] = {}
        for cid, status in listing.items():
            by_key.setdefault(status["key"], []).append(cid)
        for cids in by_key.values():
            assert {listing[c]["refs"] for c in cids} == {len(cids)}
        if present:
            daemon.call("waitStorageServer", connectionIDs=sorted(present), timeout=30)
        keys_mounted = {f"{daemon.mount_root}/{k.removeprefix('file:')}" for k in by_key}
        daemon._until("unreferenced mounts gone",
                      lambda k=keys_mounted: set(mounts_of(daemon)) == k, 20)
        assert all(n == 1 for n in mounts_of(daemon).values()), mounts_of(daemon)
    daemon.call("unmanageStorageServer", prefix="cr-")
    daemon._until("all unmounted", lambda: not mounts_of(daemon), 20)
