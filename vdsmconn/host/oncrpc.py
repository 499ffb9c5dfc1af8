"""A small ONC RPC client (RFC 5531) over TCP: NULL calls and portmapper GETPORT.

Enough to ask an NFS server "are you there, and do you speak version N?" without the kernel:
connectivity tests call procedure 0 (NULL) of a program, which every RPC server answers
without doing anything, and ask the portmapper (RFC 1833, version 2) where a program listens.

On TCP a message travels as a record: fragments, each behind a 4-byte header holding its
length and, in the top bit, "last fragment". Calls use AUTH_NONE. Nothing here has its own
deadline: callers wrap calls in `asyncio.timeout`.

Encoding and decoding are pure functions, tested on bytes; `Client` does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct

NFS_PROGRAM = 100003
MOUNT_PROGRAM = 100005
PMAP_PROGRAM = 100000
PMAP_VERSION = 2
PMAP_PORT = 111
PMAPPROC_GETPORT = 3
IPPROTO_TCP = 6
IPPROTO_UDP = 17

PROGRAM_NAMES = {NFS_PROGRAM: "NFS", MOUNT_PROGRAM: "mountd", PMAP_PROGRAM: "portmapper"}

RPC_VERSION = 2
CALL, REPLY = 0, 1
MSG_ACCEPTED, MSG_DENIED = 0, 1
SUCCESS, PROG_UNAVAIL, PROG_MISMATCH, PROC_UNAVAIL, GARBAGE_ARGS, SYSTEM_ERR = range(6)
RPC_MISMATCH, AUTH_ERROR = 0, 1
AUTH_NONE = 0

LAST_FRAGMENT = 0x8000_0000
MAX_RECORD = 1 << 20  # a NULL or GETPORT reply is a few dozen bytes

ACCEPT_STATUS = {
    PROG_UNAVAIL: "program not available",
    PROG_MISMATCH: "program version not supported",
    PROC_UNAVAIL: "procedure not available",
    GARBAGE_ARGS: "arguments not understood",
    SYSTEM_ERR: "system error",
}


class RpcError(Exception):
    """The server answered, but not with success (or not in ONC RPC)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ProtocolError(RpcError):
    """The bytes that came back are not a well-formed reply to our call."""


class Rejected(RpcError):
    """MSG_DENIED: RPC version mismatch or an authentication error."""


class NotAccepted(RpcError):
    """MSG_ACCEPTED with a status other than SUCCESS; `low`/`high` for PROG_MISMATCH."""

    def __init__(self, status: int, low: int | None = None, high: int | None = None) -> None:
        text = ACCEPT_STATUS.get(status, f"accept status {status}")
        if status == PROG_MISMATCH and low is not None:
            text += f" (the server offers versions {low} to {high})"
        super().__init__(text)
        self.status = status
        self.low = low
        self.high = high


# --- encoding ------------------------------------------------------------------------------


def record(payload: bytes) -> bytes:
    """`payload` as one record of one (last) fragment."""
    return struct.pack(">I", LAST_FRAGMENT | len(payload)) + payload


def encode_call(xid: int, program: int, version: int, procedure: int,
                args: bytes = b"") -> bytes:
    """A CALL message (without record marking), credentials and verifier AUTH_NONE."""
    header = struct.pack(
        ">10I", xid, CALL, RPC_VERSION, program, version, procedure, AUTH_NONE, 0, AUTH_NONE, 0
    )
    return header + args


def encode_mapping(program: int, version: int, protocol: int = IPPROTO_TCP) -> bytes:
    """The argument of PMAPPROC_GETPORT: struct mapping {prog, vers, prot, port}."""
    return struct.pack(">4I", program, version, protocol, 0)


# --- decoding ------------------------------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def u32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise ProtocolError(f"reply truncated at byte {self.pos} of {len(self.data)}")
        (value,) = struct.unpack_from(">I", self.data, self.pos)
        self.pos += 4
        return int(value)

    def opaque(self, limit: int = 400) -> bytes:
        length = self.u32()
        if length > limit:
            raise ProtocolError(f"opaque field of {length} bytes (at most {limit} expected)")
        padded = (length + 3) & ~3
        if self.pos + padded > len(self.data):
            raise ProtocolError("reply truncated inside an opaque field")
        value = self.data[self.pos : self.pos + length]
        self.pos += padded
        return value

    def rest(self) -> bytes:
        return self.data[self.pos :]


def reply_xid(message: bytes) -> int:
    return _Reader(message).u32()


def decode_reply(message: bytes) -> bytes:
    """The results of a successful REPLY message, or the error it carries."""
    r = _Reader(message)
    r.u32()  # xid: matched by the caller
    kind = r.u32()
    if kind != REPLY:
        raise ProtocolError(f"message type {kind}, not a reply")
    stat = r.u32()
    if stat == MSG_DENIED:
        reason = r.u32()
        if reason == RPC_MISMATCH:
            low, high = r.u32(), r.u32()
            raise Rejected(f"RPC version 2 rejected (the server speaks {low} to {high})")
        if reason == AUTH_ERROR:
            raise Rejected(f"authentication rejected (auth status {r.u32()})")
        raise Rejected(f"call denied (reject status {reason})")
    if stat != MSG_ACCEPTED:
        raise ProtocolError(f"reply status {stat}")
    r.u32()  # verifier flavor
    r.opaque()  # verifier body
    accept = r.u32()
    if accept == SUCCESS:
        return r.rest()
    if accept == PROG_MISMATCH:
        raise NotAccepted(accept, r.u32(), r.u32())
    raise NotAccepted(accept)


def decode_port(results: bytes) -> int:
    """The result of PMAPPROC_GETPORT: a port, 0 when the program is not registered."""
    port = _Reader(results).u32()
    if port > 65535:
        raise ProtocolError(f"portmapper answered port {port}")
    return port


# --- I/O ---------------------------------------------------------------------------------


async def read_record(reader: asyncio.StreamReader, limit: int = MAX_RECORD) -> bytes:
    """One record: fragments up to the last one. EOF before it raises IncompleteReadError."""
    parts: list[bytes] = []
    size = 0
    while True:
        (header,) = struct.unpack(">I", await reader.readexactly(4))
        length = header & ~LAST_FRAGMENT
        size += length
        if size > limit:
            raise ProtocolError(f"record of more than {limit} bytes")
        parts.append(await reader.readexactly(length))
        if header & LAST_FRAGMENT:
            return b"".join(parts)


class Client:
    """Calls over one TCP connection, one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._xid = random.getrandbits(32)

    @classmethod
    async def connect(cls, host: str, port: int) -> Client:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    def _next_xid(self) -> int:
        self._xid = (self._xid + 1) & 0xFFFF_FFFF
        return self._xid

    async def call(self, program: int, version: int, procedure: int, args: bytes = b"") -> bytes:
        """Send a call and return the results of its reply; replies to other xids are
        skipped. The server closing the connection raises `asyncio.IncompleteReadError`."""
        xid = self._next_xid()
        self.writer.write(record(encode_call(xid, program, version, procedure, args)))
        await self.writer.drain()
        while True:
            message = await read_record(self.reader)
            if reply_xid(message) == xid:
                return decode_reply(message)

    async def null(self, program: int, version: int) -> None:
        await self.call(program, version, 0)

    async def getport(self, program: int, version: int, protocol: int = IPPROTO_TCP) -> int:
        """Ask the portmapper this client is connected to where `program` listens."""
        results = await self.call(PMAP_PROGRAM, PMAP_VERSION, PMAPPROC_GETPORT,
                                  encode_mapping(program, version, protocol))
        return decode_port(results)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
