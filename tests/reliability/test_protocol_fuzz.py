"""Protocol fuzzing against the real daemon: every reply is valid JSON-RPC 2.0, the daemon
never crashes or hangs, its memory stays bounded.

The daemon's mount command is `false`, so a fuzzed call that happens to be a valid manage
request mounts nothing.
"""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon

pytestmark = pytest.mark.root

MESSAGES = 20_000
METHODS = ["manageStorageServer", "unmanageStorageServer", "getStorageServerList",
           "waitStorageServer", "updateStorageServer", "testStorageServer", "getHostInfo",
           "subscribe", "unsubscribe", "nope", ""]
PARAM_NAMES = ["connectionID", "connection", "prefix", "connectionIDs", "timeout", "until",
               "includeUnmanaged", "events", "x"]


def value(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.randrange(12 if depth < 3 else 7)
    if pick == 0:
        return None
    if pick == 1:
        return rng.choice([True, False])
    if pick == 2:
        return rng.choice([0, -1, 2**63, -(2**70), 10**400 // 10**390, 3.5, 1e308])
    if pick == 3:
        return "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(12)))
    if pick == 4:
        return rng.choice(["-o", "a/b", "..", "nfs://h/x", "posixfs:///dev/x?vfs_type=xfs",
                           "localfs:///", "iscsi://h/iqn.2003-01.x:y", "x" * 300, "srv:/a,rw"])
    if pick == 5:
        return {"type": rng.choice(["nfs", "posixfs", "localfs", "glusterfs", "iscsi",
                                    "managed", "zz"]),
                "connection": rng.choice(["srv:/e", "/dev/vc-fuzz", "vc-fuzz", "-x", 5])}
    if pick == 6:
        return "x" * rng.randrange(1000, 20000)
    if pick < 9:
        return [value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(PARAM_NAMES): value(rng, depth + 1) for _ in range(rng.randrange(4))}


def message(rng: random.Random) -> bytes:
    kind = rng.randrange(10)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60))).replace(b"\n", b"")
    if kind == 1:
        return b"[" * rng.randrange(100, 3000) + b"]" * rng.randrange(0, 3000)
    request: dict[str, Any] = {"jsonrpc": rng.choice(["2.0", "2.0", "2.0", "1.0", 2])}
    if rng.random() < 0.9:
        request["method"] = rng.choice(METHODS)
    if rng.random() < 0.8:
        request["id"] = rng.choice([1, "a", None, 2.5, [1], {"a": 1}, True, 10**30])
    if rng.random() < 0.8:
        request["params"] = value(rng) if rng.random() < 0.3 else {
            rng.choice(PARAM_NAMES): value(rng) for _ in range(rng.randrange(4))}
    text = json.dumps(request).encode()
    if kind == 2:
        text = text[: rng.randrange(len(text))]  # truncated
    if kind == 3:
        text = json.dumps([request, request, 1]).encode()  # a batch
    return text


def valid_reply(reply: Any) -> bool:
    if isinstance(reply, list):
        return bool(reply) and all(valid_reply(r) for r in reply)
    if not isinstance(reply, dict) or reply.get("jsonrpc") != "2.0" or "id" not in reply:
        return False
    if ("result" in reply) == ("error" in reply):
        return False
    if "error" in reply:
        err = reply["error"]
        return (isinstance(err, dict) and isinstance(err.get("code"), int)
                and isinstance(err.get("message"), str))
    return True


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def fuzz_daemon(tmp_path: Path) -> Any:
    d = Daemon(tmp_path, mount_command="false")
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


def test_fuzzed_messages_get_valid_replies(fuzz_daemon: Daemon) -> None:
    daemon = fuzz_daemon
    assert daemon.proc is not None
    pid = daemon.proc.pid
    rng = random.Random(1125)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(daemon.socket)
    reader = sock.makefile("rb")
    replies = 0
    start_rss = rss_mb(pid)
    try:
        for n in range(MESSAGES):
            data = message(rng)
            # Wait-calls block up to their timeout: give them none worth waiting for.
            data = data.replace(b'"waitStorageServer"', b'"getHostInfo"')
            sock.sendall(data + b"\n")
            # A probe request after each message: its reply proves the daemon still answers
            # and separates the replies (notifications carry no id).
            sock.sendall(b'{"jsonrpc":"2.0","id":"probe","method":"getHostInfo"}\n')
            while True:
                line = reader.readline()
                assert line, f"connection closed after message {n}: {data[:200]!r}"
                reply = json.loads(line)
                if isinstance(reply, dict) and "id" not in reply and "method" in reply:
                    continue  # a notification of a subscription the fuzzer made
                assert valid_reply(reply), (data[:200], reply)
                replies += 1
                if isinstance(reply, dict) and reply.get("id") == "probe":
                    break
    finally:
        reader.close()
        sock.close()
    assert daemon.proc.poll() is None
    assert replies >= MESSAGES
    assert rss_mb(pid) < start_rss + 100
    for cid in daemon.call("getStorageServerList", includeUnmanaged=False):
        daemon.call("unmanageStorageServer", connectionID=cid)
