"""STOMP frame fuzzing against the real daemon: every fault gets an ERROR frame or a close,
the daemon never crashes or hangs, a normal client is answered during and after, memory stays
bounded. Prints its figures (run with -s).

The daemon's mount command is `false` and idle_timeout is short, so a frame left half-sent
is closed soon, and a fuzzed request that happens to be valid mounts nothing.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon
from tests.integration.test_stomp import Raw
from tests.reliability.test_protocol_fuzz import rss_mb

IDLE = 3.0  # the daemon's idle_timeout here
DEADLINE = 30.0  # generous bound for one answer or one close
CONNECT = b"CONNECT\naccept-version:1.2\nhost:fuzz\n\n\0"
SUBSCRIBE = b"SUBSCRIBE\nid:r\ndestination:replies\nack:auto\n\n\0"


def send(body: bytes, *, receipt: str | None = None) -> bytes:
    extra = f"receipt:{receipt}\n".encode() if receipt else b""
    return (b"SEND\ndestination:jms.topic.vdsm_requests\nreply-to:replies\n" + extra
            + b"content-length:%d\n\n" % len(body) + body + b"\0")


def request(request_id: str) -> bytes:
    return send(b'{"jsonrpc":"2.0","id":"%s","method":"getHostInfo"}' % request_id.encode())


# Faults each answered by an ERROR frame, sent after CONNECT and SUBSCRIBE.
FAULTS: dict[str, bytes] = {
    "lying content-length (short)": b"SEND\ndestination:jms.topic.vdsm_requests\n"
                                    b"content-length:2\n\n{}}}\0",
    "lying content-length (long, then more frames)": b"SEND\ncontent-length:40\n\n{}\0"
                                                     + request("x") * 2,
    "missing NUL before the next frame": b"SEND\ndestination:q\ncontent-length:2\n\n{}"
                                        + request("y"),
    "oversize header": b"SEND\ndestination:q\nx:" + b"v" * 20000 + b"\n\n\0",
    "oversize header without end": b"SEND\nx:" + b"v" * 70000,
    "too many headers": b"SEND\n" + b"".join(b"h%d:v\n" % i for i in range(100)) + b"\n\0",
    "oversize frame": send(b"x" * (1 << 20)),
    "oversize frame without NUL": b"SEND\ndestination:q\n\n" + b"x" * (1 << 20) + b"x",
    "unknown command": b"PUBLISH\ndestination:q\n\n\0",
    "lower-case command": b"send\ndestination:q\n\n\0",
    "server frame from a client": b"MESSAGE\ndestination:q\n\n\0",
    "binary garbage": bytes(range(256)) * 4,
    "header without colon": b"SEND\ndestination\n\n\0",
    "bad escape": b"SEND\ndestination:a\\tb\n\n\0",
    "bad content-length": b"SEND\ncontent-length:0x10\n\n\0",
    "second CONNECT": CONNECT,
    "unsupported ACK": b"ACK\nid:1\n\n\0",
    "unknown destination": b"SEND\ndestination:/queue/elsewhere\n\n{}\0",
    "SUBSCRIBE without id": b"SUBSCRIBE\ndestination:x\n\n\0",
}
# Faults the daemon can only wait on (the rest of the frame may still come): closed by
# idle_timeout.
STALLS: dict[str, bytes] = {
    "truncated headers": b"SEND\ndestination:jms.to",
    "truncated body": b"SEND\ncontent-length:100\n\n{\"jsonrpc\"",
    "lying content-length (long)": b"SEND\ncontent-length:4000\n\n{}\0",
    "half a command": b"SUBSC",
}


@pytest.fixture
def fuzz_daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, mount_command="false")
    d.settings["rpc"]["idle_timeout"] = IDLE
    d.settings["logging"] = {"level": "info"}
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


def opened(d: Daemon, *, subscribe: bool = True) -> Raw:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(d.socket)
    raw = Raw(sock)
    raw.sock.settimeout(DEADLINE)
    raw.send(CONNECT + (SUBSCRIBE if subscribe else b""))
    frame = raw.frame()
    assert frame is not None and frame[0] == "CONNECTED"
    return raw


def blast(raw: Raw, data: bytes) -> None:
    """Send `data`; the daemon may close before it has all of it (an oversize frame)."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        raw.send(data)


def outcome(raw: Raw) -> tuple[int, bool]:
    """(ERROR frames, closed) after what was sent: read until the daemon closes."""
    errors = 0
    with raw.sock:
        while (frame := raw.frame()) is not None:
            errors += frame[0] == "ERROR"
    return errors, True


class Prober(threading.Thread):
    """A normal STOMP client calling getHostInfo while the fuzzer runs."""

    def __init__(self, d: Daemon) -> None:
        super().__init__(daemon=True)
        self.raw = opened(d)
        self.stop = threading.Event()
        self.answered = 0
        self.slowest = 0.0
        self.failure: str | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                started = time.monotonic()
                self.raw.send(request(f"p{self.answered}"))
                frame = self.raw.frame()
                if frame is None or frame[0] != "MESSAGE":
                    self.failure = f"probe got {frame!r}"
                    return
                self.slowest = max(self.slowest, time.monotonic() - started)
                self.answered += 1
                time.sleep(0.01)
        except OSError as exc:
            self.failure = repr(exc)


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        op, at = rng.randrange(4), rng.randrange(len(buf) + 1)
        if op == 0 and at < len(buf):
            buf[at] = rng.randrange(256)
        elif op == 1:
            buf[at:at] = bytes([rng.choice(b"\0\n\r:\\cA{")])
        elif op == 2:
            del buf[at:at + rng.randrange(1, 8)]
        else:
            buf = buf[:at]
    return bytes(buf)


def test_fuzzed_frames_get_an_error_or_a_close(fuzz_daemon: Daemon) -> None:
    d = fuzz_daemon
    assert d.proc is not None
    pid = d.proc.pid
    rng = random.Random(1214)
    rss_before = rss_mb(pid)
    prober = Prober(d)
    prober.start()
    sent = errors = closes = 0
    try:
        for name, data in FAULTS.items():
            raw = opened(d)
            blast(raw, data)
            seen, closed = outcome(raw)
            assert seen == 1 and closed, name
            sent, errors, closes = sent + 1, errors + seen, closes + closed
        for name, data in STALLS.items():
            raw = opened(d)
            raw.send(data)
            started = time.monotonic()
            seen, closed = outcome(raw)
            assert closed and time.monotonic() - started >= IDLE * 0.5, name
            sent, closes = sent + 1, closes + closed
        valid = [SUBSCRIBE, request("m"), b"UNSUBSCRIBE\nid:r\n\n\0",
                 send(b"[]", receipt="x"), b"DISCONNECT\nreceipt:d\n\n\0"]
        for _ in range(300):
            raw = opened(d, subscribe=False)
            blast(raw, b"".join(mutate(rng, f) if rng.random() < 0.5 else f for f in valid))
            with contextlib.suppress(OSError):
                raw.sock.shutdown(socket.SHUT_WR)
            seen, closed = outcome(raw)
            sent, errors, closes = sent + len(valid), errors + seen, closes + closed
        many = 10_000
        raw = opened(d)
        with raw.sock:
            replies = 0
            for start in range(0, many, 100):
                raw.send(b"\n".join(request(f"n{n}") for n in range(start, start + 100)))
                for _ in range(100):
                    frame = raw.frame()
                    assert frame is not None and frame[0] == "MESSAGE"
                    replies += 1
            sent += many
        assert replies == many
    finally:
        prober.stop.set()
        prober.join(DEADLINE)
    rss_after = rss_mb(pid)
    print(f"\nSTOMP fuzz: frames sent {sent}, ERROR frames {errors}, connections closed "
          f"{closes}, probe answered {prober.answered} (slowest {prober.slowest:.3f}s), "
          f"daemon RSS {rss_before:.1f} MB before, {rss_after:.1f} MB after")
    assert prober.failure is None and prober.answered > 0
    assert prober.slowest < DEADLINE
    assert d.proc.poll() is None
    assert rss_after < rss_before + 100
    raw = opened(d)
    raw.send(request("after"))
    after: Any = raw.frame()
    assert after is not None and after[0] == "MESSAGE" and b'"after"' in after[2]
    raw.sock.close()
    assert "connection failed" not in d.log() and "Traceback" not in d.log()
