"""What the status of a CID says while it fails and after it recovers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon

pytestmark = pytest.mark.root


def test_failing_connection_shows_its_path_and_recovery_clears_the_error(
    daemon: Daemon, tmp_path: Path
) -> None:
    data = tmp_path / "later"
    daemon.call("manageStorageServer", connectionID="s", connection=f"localfs://{data}")
    failing: dict[str, Any] = {}

    def failed_twice() -> bool:
        nonlocal failing
        failing = daemon.call("getStorageServerList", connectionIDs=["s"])["s"]
        return bool(failing["state"] == "failed" and failing["attempts"] >= 2)
    daemon._until("not failed twice", failed_twice, 20)
    link = f"{daemon.mount_root}/{str(data).replace('_', '__').replace('/', '_')}"
    assert failing["state"] == "failed" and failing["path"] == link
    assert failing["lastError"]["code"] == 451
    assert failing["lastFailure"] == failing["lastError"]
    data.mkdir()
    status = daemon.call("waitStorageServer", connectionIDs=["s"], timeout=30)["s"]
    assert status["state"] == "connected" and status["path"] == link
    assert status["lastError"] is None
    assert status["lastFailure"]["code"] == 451
    assert status["attempts"] == 0
    daemon.call("unmanageStorageServer", connectionID="s")
    daemon.wait_nothing_listed()


def test_healthy_connection_has_no_error_and_no_attempts(daemon: Daemon) -> None:
    daemon.call("manageStorageServer", connectionID="ok",
                connection={"type": "posixfs", "connection": "vc-ok", "vfs_type": "tmpfs"})
    status = daemon.call("waitStorageServer", connectionIDs=["ok"], timeout=20)["ok"]
    assert status["lastError"] is None and status["lastFailure"] is None
    assert status["attempts"] == 0
    daemon.call("unmanageStorageServer", connectionID="ok")
    daemon.wait_nothing_listed()
