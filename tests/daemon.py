"""The real daemon, started as its own process, spoken to over its real socket."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.wait import until
from vdsmconn.cli import Client, RpcError
from vdsmconn.host import mountinfo

# A bound, not a figure: under TCG emulation on a busy host, importing the daemon's libraries
# from the 9p share alone has taken over 30 s.
READY_TIMEOUT = 120.0


class Daemon:
    """One vdsmconnd process with its own state dir, socket and mount root under `base`."""

    def __init__(self, base: Path, **settings: Any) -> None:
        self.base = base
        # A short socket path: unix socket paths are limited to 107 bytes.
        self.run_dir = Path(tempfile.mkdtemp(prefix="vc-", dir="/tmp"))
        self.mount_root = str(base / "mnt")
        self.socket = str(self.run_dir / "s.sock")
        supervisor = {"backoff_initial": 0.2, "backoff_max": 2, "probe_interval": 1,
                      "probe_timeout": 3, "command_timeout": 20}
        supervisor.update(settings.pop("supervisor", {}))
        self.settings: dict[str, Any] = {
            "state_dir": str(base / "state"),
            "run_dir": str(self.run_dir),
            "mount_root": self.mount_root,
            "rpc": {"socket": self.socket, "socket_group": None},
            "metrics": {"listen": None},
            "supervisor": supervisor,
            "logging": {"level": "debug"},
            **settings,
        }
        self.config_file = base / "vdsmconn.yaml"
        self.log_file = base / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.config_file.write_text(yaml.safe_dump(self.settings))
        notify_path = str(self.run_dir / "notify")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(notify_path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(notify_path)
            notify.settimeout(READY_TIMEOUT)
            env = dict(os.environ, NOTIFY_SOCKET=notify_path)
            with open(self.log_file, "ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "vdsmconn", "-c", str(self.config_file)],
                    stdout=log, stderr=log, env=env,
                )
            deadline = time.monotonic() + READY_TIMEOUT
            while time.monotonic() < deadline:
                try:
                    message = notify.recv(4096).decode()
                except TimeoutError:
                    break
                if "READY=1" in message.split("\n"):
                    return
            raise AssertionError(f"daemon not ready; log:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-20000:]
        except FileNotFoundError:
            return ""

    def client(self, timeout: float = 30.0) -> Client:
        return Client(self.socket, timeout=timeout)

    def call(self, method: str, **params: Any) -> Any:
        with self.client() as c:
            return c.call(method, params, wait=float(params.get("timeout", 0) or 0),
                          expect=object)

    def error(self, method: str, **params: Any) -> RpcError:
        """Call, expecting an error reply, and return it."""
        try:
            result = self.call(method, **params)
        except RpcError as e:
            return e
        raise AssertionError(f"{method} succeeded unexpectedly: {result!r}")

    def wait_state(self, cid: str, state: str, timeout: float = 20.0) -> dict[str, Any]:
        """Poll the list until `cid` is in `state` (for states wait does not cover)."""
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.call("getStorageServerList", connectionIDs=[cid]).get(cid, {})
            if status.get("state") == state:
                return status
            time.sleep(0.05)
        raise AssertionError(f"{cid} not {state} within {timeout}s: {status}\n{self.log()}")

    def _until(self, what: str, check: Any, timeout: float) -> None:
        until(check, what, timeout, detail=lambda: "\n" + self.log())

    def wait_gone(self, path: str, link: bool = False, timeout: float = 20.0) -> None:
        """Until `path` is neither mounted nor present (a link, or an empty mount point)."""
        self._until(f"{path} not gone",
                    lambda: mounted(path) is None and not os.path.lexists(path), timeout)

    def wait_nothing_listed(self, timeout: float = 20.0) -> None:
        """Until the list is empty: no CID, no teardown still running, nothing foreign."""
        self._until("an empty list", lambda: self.call("getStorageServerList") == {}, timeout)

    def wait_mounted(self, path: str, other_than: int | None = None, option: str | None = None,
                     timeout: float = 20.0) -> mountinfo.Mount:
        def check() -> bool:
            m = mounted(path)
            return (m is not None and m.mount_id != other_than
                    and (option is None or option in m.super_options + m.options))
        self._until(f"{path} not mounted as expected", check, timeout)
        found = mounted(path)
        assert found is not None
        return found

    def wait_attempts(self, cid: str, attempts: int, timeout: float = 20.0) -> dict[str, Any]:
        status: dict[str, Any] = {}

        def check() -> bool:
            nonlocal status
            status = self.call("getStorageServerList", connectionIDs=[cid])[cid]
            return int(status["attempts"]) >= attempts
        self._until(f"{cid} not tried {attempts} times", check, timeout)
        return status

    def wait_error(self, cid: str, code: int, timeout: float = 30.0) -> dict[str, Any]:
        """Until the status of `cid` shows an error with `code`, now or as its last failure
        (a quick recovery may have cleared it already); returns that status."""
        status: dict[str, Any] = {}

        def check() -> bool:
            nonlocal status
            status = self.call("getStorageServerList", connectionIDs=[cid])[cid]
            return bool(failure(status)) and failure(status)["code"] == code
        self._until(f"{cid} has no error {code}", check, timeout)
        return status

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(sig)
        return proc.wait(timeout)

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def cleanup(self) -> None:
        """Stop the daemon and remove what it left: it leaves mounts on purpose."""
        if self.proc is not None:
            self.stop()
        for m in sorted(mountinfo.read(), key=lambda m: -len(m.mountpoint)):
            if m.mountpoint.startswith(self.mount_root + "/"):
                subprocess.run(["umount", "-l", m.mountpoint], check=False, timeout=30)
        shutil.rmtree(self.run_dir, ignore_errors=True)


@contextlib.contextmanager
def running(base: Path, **settings: Any) -> Iterator[Daemon]:
    """A started daemon (settings as for `Daemon`), cleaned up afterwards."""
    d = Daemon(base, **settings)
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


def failure(status: dict[str, Any]) -> dict[str, Any]:
    """The error a status shows now, or else its last failure ({} if none)."""
    found: dict[str, Any] = status["lastError"] or status["lastFailure"] or {}
    return found


def mounted(path: str) -> mountinfo.Mount | None:
    for m in mountinfo.read():
        if m.mountpoint == path:
            return m
    return None
