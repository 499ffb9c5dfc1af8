"""A real UnixServer on a temporary socket, talked to by real socket clients."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.wait import eventually
from vdsmconn.rpc import stomp
from vdsmconn.rpc.jsonrpc import Dispatcher, Method, Session
from vdsmconn.rpc.server import Limits, UnixServer

DEADLINE = 10.0  # generous upper bound for anything that should happen "soon"


class Gate:
    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.entered = asyncio.Event()


def methods(gate: Gate) -> list[Method]:
    async def echo(args: dict[str, Any], session: Session) -> Any:
        return args["value"]

    async def wait_gate(args: dict[str, Any], session: Session) -> Any:
        gate.entered.set()
        await gate.event.wait()
        return "opened"

    async def flood(args: dict[str, Any], session: Session) -> Any:
        for n in range(args["count"]):
            session.notify("flood", {"n": n, "pad": "x" * args["size"]})
            await asyncio.sleep(0)
        return args["count"]

    async def subscribe(args: dict[str, Any], session: Session) -> Any:
        session.notify("storageServerStateChanged", {"key": "k", "new": "connected"})
        return True

    return [
        Method("echo", ("value",), frozenset({"value"}), echo),
        Method("wait_gate", (), frozenset(), wait_gate),
        Method("flood", ("count", "size"), frozenset({"count", "size"}), flood),
        Method("subscribe", (), frozenset(), subscribe),
    ]


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, path: str) -> Client:
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 24)
        return cls(reader, writer)

    async def send(self, message: Any) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode()
        self.writer.write(data + b"\n")
        await self.writer.drain()

    async def recv(self) -> Any:
        line = await asyncio.wait_for(self.reader.readline(), DEADLINE)
        assert line.endswith(b"\n"), f"connection closed: {line!r}"
        return json.loads(line)

    async def call(self, method: str, params: Any = None, request_id: Any = 1) -> Any:
        request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": request_id}
        if params is not None:
            request["params"] = params
        await self.send(request)
        return await self.recv()

    async def wait_closed_by_server(self) -> None:
        """Read (and discard) until the server closes the connection."""
        async with asyncio.timeout(DEADLINE):
            with contextlib.suppress(ConnectionResetError):
                while data := await self.reader.read(1 << 20):
                    del data

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


Factory = Callable[..., Awaitable[UnixServer]]


@pytest.fixture
def sockdir() -> Iterator[str]:
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="vc-") as path:
        yield path


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
async def make_server(sockdir: str, gate: Gate) -> AsyncIterator[Factory]:
    servers: list[UnixServer] = []

    async def factory(**kwargs: Any) -> UnixServer:
        limits = Limits(**kwargs.pop("limits", {}))
        kind = kwargs.pop("dispatcher", Dispatcher)
        server = UnixServer(
            kind(methods(gate)), os.path.join(sockdir, "s.sock"), limits=limits, **kwargs
        )
        await server.start()
        servers.append(server)
        return server

    yield factory
    gate.event.set()
    for server in servers:
        await server.close()
    # No task may outlive the server (clients use plain streams, no tasks). asyncio's own
    # accept task for a connection refused during close() needs a loop iteration to finish.
    for _ in range(10):
        await asyncio.sleep(0)
    assert asyncio.all_tasks() == {asyncio.current_task()}, asyncio.all_tasks()


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    opened: list[Client] = []
    yield opened
    for client in opened:
        await client.close()


async def connect(server: UnixServer, clients: list[Client]) -> Client:
    client = await Client.open(server.path)
    clients.append(client)
    return client


async def test_call_round_trip(make_server: Factory, clients: list[Client]) -> None:
    client = await connect(await make_server(), clients)
    assert await client.call("echo", ["hi"]) == {"jsonrpc": "2.0", "result": "hi", "id": 1}
    assert await client.call("echo", {"value": [1, 2]}, "x") == {
        "jsonrpc": "2.0",
        "result": [1, 2],
        "id": "x",
    }


async def test_malformed_line_keeps_connection(make_server: Factory, clients: list[Client]) -> None:
    client = await connect(await make_server(), clients)
    await client.send(b'{"jsonrpc": "2.0", "method": "echo", "para')
    assert (await client.recv())["error"]["code"] == -32700
    await client.send(b"\xff\xfe")
    assert (await client.recv())["error"]["code"] == -32700
    await client.send(b"")  # blank lines are ignored
    assert (await client.call("echo", ["still here"]))["result"] == "still here"


async def test_oversize_line_closes_connection(make_server: Factory, clients: list[Client]) -> None:
    server = await make_server(limits={"max_message": 1000})
    client = await connect(server, clients)
    assert (await client.call("echo", ["x" * 900]))["result"] == "x" * 900
    await client.send(b'{"jsonrpc": "2.0", "method": "echo", "params": ["' + b"x" * 2000 + b'"]}')
    reply = await client.recv()
    assert reply["error"]["code"] == -32600
    assert "too large" in reply["error"]["message"]
    await client.wait_closed_by_server()
    other = await connect(server, clients)
    assert (await other.call("echo", [1]))["result"] == 1


async def test_oversize_without_newline_closes_connection(
    make_server: Factory, clients: list[Client]
) -> None:
    client = await connect(await make_server(limits={"max_message": 1000}), clients)
    client.writer.write(b"[" + b" " * 5000)  # never a newline
    reply = await client.recv()
    assert reply["error"]["code"] == -32600
    await client.wait_closed_by_server()


async def test_idle_client_dropped(make_server: Factory, clients: list[Client]) -> None:
    server = await make_server(limits={"idle_timeout": 0.2})
    client = await connect(server, clients)
    assert (await client.call("echo", [1]))["result"] == 1
    await client.wait_closed_by_server()
    await eventually(lambda: server.clients == 0)


async def test_running_request_is_not_idle(
    make_server: Factory, clients: list[Client], gate: Gate
) -> None:
    client = await connect(await make_server(limits={"idle_timeout": 0.1}), clients)
    await client.send({"jsonrpc": "2.0", "method": "wait_gate", "id": 1})
    await gate.entered.wait()
    await asyncio.sleep(0.5)  # several idle periods while the request runs
    gate.event.set()
    assert (await client.recv())["result"] == "opened"


async def test_max_clients_enforced(make_server: Factory, clients: list[Client]) -> None:
    server = await make_server(limits={"max_clients": 2})
    first = await connect(server, clients)
    second = await connect(server, clients)
    assert (await first.call("echo", [1]))["result"] == 1
    assert (await second.call("echo", [2]))["result"] == 2
    third = await connect(server, clients)
    reply = await third.recv()
    assert reply["id"] is None and "Too many clients" in reply["error"]["message"]
    await third.wait_closed_by_server()
    assert (await first.call("echo", [3]))["result"] == 3
    await first.close()
    await eventually(lambda: server.clients == 1)
    fourth = await connect(server, clients)
    assert (await fourth.call("echo", [4]))["result"] == 4


async def test_slow_request_does_not_delay_others(
    make_server: Factory, clients: list[Client], gate: Gate
) -> None:
    server = await make_server()
    slow = await connect(server, clients)
    other = await connect(server, clients)
    await slow.send({"jsonrpc": "2.0", "method": "wait_gate", "id": "slow"})
    await gate.entered.wait()
    # Same connection: the next request is answered while the first still runs.
    assert (await slow.call("echo", ["same"], "fast"))["id"] == "fast"
    # Another client is served as well.
    assert (await other.call("echo", ["other"]))["result"] == "other"
    assert not gate.event.is_set()
    gate.event.set()
    assert await slow.recv() == {"jsonrpc": "2.0", "result": "opened", "id": "slow"}


async def test_batch_over_socket(make_server: Factory, clients: list[Client]) -> None:
    client = await connect(await make_server(), clients)
    await client.send(
        [
            {"jsonrpc": "2.0", "method": "echo", "params": [1], "id": 1},
            {"jsonrpc": "2.0", "method": "echo", "params": [2]},
            {"jsonrpc": "2.0", "method": "nope", "id": 3},
        ]
    )
    replies = sorted(await client.recv(), key=lambda reply: reply["id"])
    assert replies[0]["result"] == 1 and replies[1]["error"]["code"] == -32601
    assert len(replies) == 2


async def test_non_reading_client_dropped(
    make_server: Factory, clients: list[Client], caplog: pytest.LogCaptureFixture
) -> None:
    server = await make_server(limits={"max_queue": 8})
    lazy = await connect(server, clients)
    busy = await connect(server, clients)
    assert (await lazy.call("echo", ["a"]))["result"] == "a"
    assert (await busy.call("echo", ["b"]))["result"] == "b"
    assert server.clients == 2
    # 64 MiB of notifications: far beyond what socket buffers hold for a client not reading.
    await lazy.send({"jsonrpc": "2.0", "method": "flood", "params": [1024, 65536], "id": 1})
    await eventually(lambda: server.clients == 1)
    assert "outgoing queue overflow" in caplog.text
    for n in range(20):
        assert (await busy.call("echo", [n]))["result"] == n
    await lazy.wait_closed_by_server()


async def test_slow_reader_gets_every_message_in_order(
    make_server: Factory, clients: list[Client]
) -> None:
    # 16 MiB of notifications to a client that reads in bursts with pauses: each time the
    # socket is full, the rest waits in the queue; each time it is empty again, messages
    # may go straight to it. Every one arrives, in order, and the reply last.
    server = await make_server(limits={"max_queue": 2048})
    client = await connect(server, clients)
    await client.send({"jsonrpc": "2.0", "method": "flood", "params": [1024, 16384], "id": 1})
    seen = []
    for n in range(1024):
        if n % 32 == 0:
            await asyncio.sleep(0.01)
        seen.append((await client.recv())["params"]["n"])
    assert seen == list(range(1024))
    assert await client.recv() == {"jsonrpc": "2.0", "result": 1024, "id": 1}


class Faulty(Dispatcher):
    """A dispatcher with a bug: it raises instead of answering a request for "boom"."""

    async def handle(self, data: bytes, session: Session) -> bytes | None:
        if b'"boom"' in data:
            raise RuntimeError("a bug in the dispatcher")
        return await super().handle(data, session)


async def test_a_request_that_fails_outside_its_method_drops_only_its_client(
    make_server: Factory, clients: list[Client], gate: Gate,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await make_server(dispatcher=Faulty)
    faulty = await connect(server, clients)
    other = await connect(server, clients)
    await faulty.send({"jsonrpc": "2.0", "method": "wait_gate", "id": 1})
    await asyncio.wait_for(gate.entered.wait(), DEADLINE)
    await faulty.send({"jsonrpc": "2.0", "method": "boom", "id": 2})
    await faulty.wait_closed_by_server()
    assert "REQUEST FAILED" in caplog.text and "a bug in the dispatcher" in caplog.text
    await eventually(lambda: server.clients == 1)
    assert (await other.call("echo", ["still here"]))["result"] == "still here"


async def test_pipelined_requests_beyond_max_pending_all_get_replies(
    make_server: Factory, clients: list[Client], gate: Gate,
) -> None:
    # Twelve requests in one write with max_pending 4: four wait at the gate, the others
    # wait to be read; each gets its reply once the gate opens.
    server = await make_server(limits={"max_pending": 4})
    client = await connect(server, clients)
    client.writer.write(b"".join(
        json.dumps({"jsonrpc": "2.0", "method": "wait_gate", "id": n}).encode() + b"\n"
        for n in range(12)))
    await asyncio.wait_for(gate.entered.wait(), DEADLINE)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.recv(), 0.2)  # nothing answers while the gate is shut
    gate.event.set()
    replies = [await asyncio.wait_for(client.recv(), DEADLINE) for _ in range(12)]
    assert sorted(reply["id"] for reply in replies) == list(range(12))
    assert {reply["result"] for reply in replies} == {"opened"}


async def test_requests_arriving_a_byte_at_a_time_are_whole(
    make_server: Factory, clients: list[Client],
) -> None:
    client = await connect(await make_server(), clients)
    data = b"".join(json.dumps({"jsonrpc": "2.0", "method": "echo", "params": [f"v{n}"],
                                "id": n}).encode() + b"\n" for n in range(3))
    for i in range(len(data)):
        client.writer.write(data[i:i + 1])
        await client.writer.drain()
        if i % 16 == 0:
            await asyncio.sleep(0)  # let the server read what came so far
    replies = [await asyncio.wait_for(client.recv(), DEADLINE) for _ in range(3)]
    assert sorted((r["id"], r["result"]) for r in replies) == [(n, f"v{n}") for n in range(3)]


async def test_json_rpc_beside_stomp_gets_every_pipelined_request(
    make_server: Factory, clients: list[Client],
) -> None:
    # With a STOMP endpoint the listener reads the first bytes to tell the protocol; what
    # came with them in the same write must not be lost.
    endpoint = stomp.Endpoint(stomp.Destinations(("jms.topic.vdsm_requests",), "events"))
    client = await connect(await make_server(stomp=endpoint), clients)
    client.writer.write(b"".join(
        json.dumps({"jsonrpc": "2.0", "method": "echo", "params": [n], "id": n}).encode()
        + b"\n" for n in range(50)))
    replies = [await asyncio.wait_for(client.recv(), DEADLINE) for _ in range(50)]
    assert sorted(r["result"] for r in replies) == list(range(50))


async def test_notify_delivers_notification(make_server: Factory, clients: list[Client]) -> None:
    client = await connect(await make_server(), clients)
    await client.send({"jsonrpc": "2.0", "method": "subscribe", "id": 1})
    first, second = await client.recv(), await client.recv()
    assert first == {
        "jsonrpc": "2.0",
        "method": "storageServerStateChanged",
        "params": {"key": "k", "new": "connected"},
    }
    assert second == {"jsonrpc": "2.0", "result": True, "id": 1}


async def test_half_closed_client_gets_replies(make_server: Factory, clients: list[Client]) -> None:
    client = await connect(await make_server(), clients)
    client.writer.write(
        b'{"jsonrpc":"2.0","method":"echo","params":["a"],"id":1}\n'
        b'{"jsonrpc":"2.0","method":"echo","params":["b"],"id":2}'
    )
    client.writer.write_eof()
    replies = [await client.recv(), await client.recv()]
    assert sorted(reply["result"] for reply in replies) == ["a", "b"]
    await client.wait_closed_by_server()


async def test_socket_mode_and_group(make_server: Factory) -> None:
    server = await make_server(group="daemon")
    st = os.stat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == grp.getgrnam("daemon").gr_gid


async def test_unknown_group_fails_start(make_server: Factory) -> None:
    with pytest.raises(ValueError, match="no-such-group"):
        await make_server(group="no-such-group")


async def test_stale_socket_removed_live_one_kept(make_server: Factory, sockdir: str) -> None:
    path = os.path.join(sockdir, "s.sock")
    stale = await asyncio.start_unix_server(lambda r, w: None, path)
    stale.close()
    await stale.wait_closed()
    server = await make_server()
    assert stat.S_ISSOCK(os.stat(server.path).st_mode)
    with pytest.raises(FileExistsError, match="in use"):
        await UnixServer(Dispatcher([]), path).start()


async def test_close_removes_socket_and_drops_clients(
    make_server: Factory, clients: list[Client], gate: Gate
) -> None:
    server = await make_server()
    client = await connect(server, clients)
    await client.send({"jsonrpc": "2.0", "method": "wait_gate", "id": 1})
    await gate.entered.wait()
    await server.close()
    assert not Path(server.path).exists()  # noqa: ASYNC240 - a stat of a tmp file
    await client.wait_closed_by_server()


# Peer credentials.


async def test_peer_check_allows_root(make_server: Factory, clients: list[Client]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    client = await connect(await make_server(group="daemon"), clients)
    assert (await client.call("echo", ["root"]))["result"] == "root"


CHILD = """
import contextlib, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
with contextlib.suppress(OSError):  # if refused, the server may be gone; its line is queued
    s.sendall(b'{"jsonrpc":"2.0","method":"echo","params":["child"],"id":1}\\n')
sys.stdout.write(s.makefile("rb").readline().decode())
"""


@pytest.mark.root
@pytest.mark.parametrize(("extra_groups", "allowed"), [([], False), (["daemon"], True)])
async def test_peer_check_other_user(
    make_server: Factory, sockdir: str, extra_groups: list[str], allowed: bool
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as nobody")
    python = "/usr/bin/python3"  # the test's own interpreter may live where nobody can't go
    if not Path(python).exists():  # noqa: ASYNC240 - a stat
        pytest.skip(f"{python} is needed to run a client as nobody")
    os.chmod(sockdir, 0o755)
    server = await make_server(group="daemon", mode=0o666)  # let the kernel pass everyone
    child = await asyncio.create_subprocess_exec(
        python,
        "-I",
        "-c",
        CHILD,
        server.path,
        stdout=asyncio.subprocess.PIPE,
        cwd="/",
        user="nobody",
        group="nogroup",
        extra_groups=extra_groups,
    )
    out, _ = await asyncio.wait_for(child.communicate(), DEADLINE)
    reply = json.loads(out)
    if allowed:
        assert reply["result"] == "child"
    else:
        assert "Permission denied" in reply["error"]["message"]
