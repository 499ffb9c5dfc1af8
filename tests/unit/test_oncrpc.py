"""ONC RPC encoding and decoding on bytes, and the client against a tiny in-process server
that speaks record marking (fragments, stray replies, closed connections)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from vdsmconn.host import oncrpc


def u32(*values: int) -> bytes:
    return struct.pack(f">{len(values)}I", *values)


def accepted(xid: int, status: int, body: bytes = b"", verifier: bytes = b"") -> bytes:
    pad = b"\0" * (-len(verifier) % 4)
    return u32(xid, 1, 0, 0, len(verifier)) + verifier + pad + u32(status) + body


def test_call_is_encoded_as_rfc_5531_says() -> None:
    message = oncrpc.encode_call(0x01020304, 100003, 4, 0)
    assert message == u32(0x01020304, 0, 2, 100003, 4, 0, 0, 0, 0, 0)
    assert oncrpc.record(message) == u32(0x80000000 | 40) + message


def test_getport_arguments() -> None:
    assert oncrpc.encode_mapping(100005, 3) == u32(100005, 3, 6, 0)
    assert oncrpc.encode_mapping(100005, 1, oncrpc.IPPROTO_UDP) == u32(100005, 1, 17, 0)


def test_success_reply_gives_results_after_the_verifier() -> None:
    assert oncrpc.decode_reply(accepted(7, 0, u32(20048))) == u32(20048)
    assert oncrpc.decode_reply(accepted(7, 0, u32(2049), verifier=b"abcde")) == u32(2049)
    assert oncrpc.decode_port(u32(20048)) == 20048
    assert oncrpc.reply_xid(accepted(7, 0)) == 7


def test_program_version_mismatch_names_the_versions_offered() -> None:
    with pytest.raises(oncrpc.NotAccepted) as raised:
        oncrpc.decode_reply(accepted(1, oncrpc.PROG_MISMATCH, u32(4, 4)))
    assert (raised.value.status, raised.value.low, raised.value.high) == (2, 4, 4)
    assert raised.value.message == ("program version not supported "
                                    "(the server offers versions 4 to 4)")


@pytest.mark.parametrize(("status", "text"), [
    (1, "program not available"),
    (3, "procedure not available"),
    (4, "arguments not understood"),
    (5, "system error"),
    (9, "accept status 9"),
])  # fmt: skip
def test_other_accept_statuses(status: int, text: str) -> None:
    with pytest.raises(oncrpc.NotAccepted, match=f"^{text}$"):
        oncrpc.decode_reply(accepted(1, status))


def test_denied_replies() -> None:
    with pytest.raises(oncrpc.Rejected, match=r"RPC version 2 rejected \(the server speaks 3 to 3"):
        oncrpc.decode_reply(u32(1, 1, 1, 0, 3, 3))
    with pytest.raises(oncrpc.Rejected, match=r"authentication rejected \(auth status 2\)"):
        oncrpc.decode_reply(u32(1, 1, 1, 1, 2))


@pytest.mark.parametrize("message", [
    u32(1, 0),  # a CALL, not a reply
    u32(1, 1),  # truncated
    u32(1, 1, 7),  # unknown reply status
    u32(1, 1, 0, 0, 1000),  # verifier longer than allowed
    u32(1, 1, 0, 0, 8, 1),  # truncated inside the verifier
])  # fmt: skip
def test_malformed_replies_are_protocol_errors(message: bytes) -> None:
    with pytest.raises(oncrpc.ProtocolError):
        oncrpc.decode_reply(message)


def test_port_out_of_range_is_a_protocol_error() -> None:
    with pytest.raises(oncrpc.ProtocolError):
        oncrpc.decode_port(u32(70000))


# --- the client over a real TCP connection ---------------------------------------------------

Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """Reads calls (one fragment each); `handler` writes whatever the test wants back."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int, int, bytes]] = []
        self.handler: Handler | None = None
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                message = await oncrpc.read_record(reader)
                xid, _, _, prog, vers, proc = struct.unpack_from(">6I", message)
                self.calls.append((xid, prog, vers, proc, message[40:]))
                assert self.handler is not None
                await self.handler(message, writer)
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    s = Server()
    await s.start()
    yield s
    await s.stop()


def xid_of(message: bytes) -> int:
    return int(struct.unpack_from(">I", message)[0])


async def test_null_call_with_reply_in_fragments(server: Server) -> None:
    async def reply(message: bytes, writer: asyncio.StreamWriter) -> None:
        body = accepted(xid_of(message), 0)
        writer.write(u32(5) + body[:5] + u32(0x80000000 | (len(body) - 5)) + body[5:])

    server.handler = reply
    client = await oncrpc.Client.connect("127.0.0.1", server.port)
    try:
        await client.null(100003, 3)
        await client.null(100003, 4)
    finally:
        await client.close()
    assert [c[1:] for c in server.calls] == [(100003, 3, 0, b""), (100003, 4, 0, b"")]
    assert server.calls[1][0] == (server.calls[0][0] + 1) & 0xFFFFFFFF


async def test_getport_skips_replies_to_other_calls(server: Server) -> None:
    async def reply(message: bytes, writer: asyncio.StreamWriter) -> None:
        xid = xid_of(message)
        writer.write(oncrpc.record(accepted(xid ^ 1, 0, u32(1))))
        writer.write(oncrpc.record(accepted(xid, 0, u32(20048))))

    server.handler = reply
    client = await oncrpc.Client.connect("127.0.0.1", server.port)
    try:
        assert await client.getport(100005, 3) == 20048
    finally:
        await client.close()
    assert server.calls[0][1:] == (100000, 2, 3, u32(100005, 3, 6, 0))


async def test_server_closing_without_reply(server: Server) -> None:
    async def hang_up(message: bytes, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server.handler = hang_up
    client = await oncrpc.Client.connect("127.0.0.1", server.port)
    try:
        with pytest.raises(asyncio.IncompleteReadError):
            await client.null(100003, 3)
    finally:
        await client.close()


async def test_oversized_record_is_refused(server: Server) -> None:
    async def huge(message: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(u32(oncrpc.MAX_RECORD + 1))

    server.handler = huge
    client = await oncrpc.Client.connect("127.0.0.1", server.port)
    try:
        with pytest.raises(oncrpc.ProtocolError, match="record of more than"):
            await client.null(100003, 3)
    finally:
        await client.close()
