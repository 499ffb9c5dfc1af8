"""Model check: hypothesis drives manage / unmanage / update / restart against the real
daemon and a plain model of CID -> key refcounts, and compares the daemon's list and the
host's mount table with the model after every step."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.daemon import Daemon
from vdsmconn.cli import RpcError
from vdsmconn.host import mountinfo

pytestmark = pytest.mark.root

CIDS = st.sampled_from([f"m{n}" for n in range(5)])
KEYS = st.integers(0, 2)


def conn(key: int) -> dict[str, Any]:
    return {"type": "posixfs", "connection": f"vc-model{key}", "vfs_type": "tmpfs",
            "mnt_options": "size=1m"}


class DaemonModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.base = Path(tempfile.mkdtemp(prefix="vc-model-"))
        self.daemon = Daemon(self.base)
        self.daemon.start()
        self.model: dict[str, int] = {}  # cid -> key number

    def teardown(self) -> None:
        self.daemon.cleanup()
        shutil.rmtree(self.base, ignore_errors=True)

    @rule(cid=CIDS, key=KEYS)
    def manage(self, cid: str, key: int) -> None:
        try:
            self.daemon.call("manageStorageServer", connectionID=cid, connection=conn(key))
        except RpcError as e:
            assert cid in self.model and self.model[cid] != key and e.code == 478
            return
        assert self.model.get(cid, key) == key
        self.model[cid] = key

    @rule(cid=CIDS)
    def unmanage(self, cid: str) -> None:
        try:
            self.daemon.call("unmanageStorageServer", connectionID=cid)
        except RpcError as e:
            assert cid not in self.model and e.code == 479
            return
        del self.model[cid]

    @rule(cid=CIDS, key=KEYS)
    def update(self, cid: str, key: int) -> None:
        try:
            self.daemon.call("updateStorageServer", connectionID=cid, connection=conn(key))
        except RpcError as e:
            assert cid not in self.model and e.code == 479
            return
        self.model[cid] = key

    @rule(hard=st.booleans())
    def restart(self, hard: bool) -> None:
        if hard:
            self.daemon.kill9()
        else:
            self.daemon.stop()
        self.daemon.start()

    @invariant()
    def daemon_matches_model(self) -> None:
        listing = self.daemon.call("getStorageServerList", includeUnmanaged=False)
        assert set(listing) == set(self.model)
        for cid, key in self.model.items():
            refs = sum(1 for k in self.model.values() if k == key)
            assert listing[cid]["key"] == f"file:vc-model{key}"
            assert listing[cid]["refs"] == refs
        if self.model:
            self.daemon.call("waitStorageServer", connectionIDs=sorted(self.model), timeout=20)
        expected = {f"{self.daemon.mount_root}/vc-model{k}" for k in self.model.values()}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            mounts = [m.mountpoint for m in mountinfo.read()
                      if m.mountpoint.startswith(self.daemon.mount_root + "/")]
            if sorted(mounts) == sorted(expected):
                return
            time.sleep(0.02)
        raise AssertionError(f"mounts {sorted(mounts)} != model {sorted(expected)}")


DaemonModel.TestCase.settings = settings(
    max_examples=12, stateful_step_count=12, deadline=None,
    suppress_health_check=[HealthCheck.too_slow], derandomize=True,
)
test_daemon_follows_model = DaemonModel.TestCase
