"""Transports for the JSON-RPC dispatcher: newline-delimited UTF-8 JSON over a Unix socket
and over TCP with TLS, and STOMP 1.2 on both (SPEC 3.2, rpc/stomp.py).

`connection.Connection` is the per-client logic and knows nothing about the listener
(`Connection` and `Limits` are imported from here too). `UnixServer` owns the socket file,
checks peers and caps the clients; `TlsServer` (the engine's transport) accepts only clients
whose certificate the configured CA signed, over TLS 1.2 or later. Given a STOMP endpoint, a
listener tells the protocol of each client from its first bytes.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import grp
import logging
import os
import socket
import ssl
import stat
import struct
from collections.abc import Coroutine
from typing import Any, Protocol

from vdsmconn import errors
from vdsmconn.host import address
from vdsmconn.rpc import jsonrpc, stompframe
from vdsmconn.rpc.connection import ClientProtocol
from vdsmconn.rpc.connection import Connection as Connection
from vdsmconn.rpc.connection import Limits as Limits

log = logging.getLogger(__name__)

_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


class StompEndpoint(Protocol):
    """What a listener needs of the STOMP layer (stomp.Endpoint)."""

    def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   dispatcher: jsonrpc.Dispatcher, limits: Limits, peer: str,
                   head: bytes) -> Connection:
        """The connection of a client whose first bytes `head` were a STOMP frame."""
        ...


def refuse(writer: asyncio.StreamWriter, peer: str, error: errors.Error,
           stomp: bool = False) -> None:
    """Send one error (a line, or a STOMP ERROR frame) to a client that is not served, and
    close its connection."""
    log.warning("REFUSE peer=%s reason=%s", peer, error.message)
    if stomp:
        writer.write(stompframe.encode("ERROR", [("message", error.message)]))
    else:
        writer.write(jsonrpc.encode_error(error) + b"\n")
    writer.close()


async def sniff(reader: asyncio.StreamReader) -> tuple[bool, bytes]:
    """Whether the client speaks STOMP, and the bytes read to tell (b"" at end of input)."""
    head = b""
    while (stomp := stompframe.sniff(head)) is None:
        byte = await reader.read(1)
        if not byte:
            return False, head
        head += byte
    return stomp, head


class _Listener(abc.ABC):
    """What every transport shares: admitting clients, telling their protocol (with a STOMP
    endpoint), serving each with a `Connection`, dropping them all on close."""

    REFUSE_WAIT = 2.0  # seconds a refused client has to show its protocol before the reply

    def __init__(self, dispatcher: jsonrpc.Dispatcher, limits: Limits | None,
                 stomp: StompEndpoint | None) -> None:
        self._dispatcher = dispatcher
        self._limits = limits or Limits()
        self._stomp = stomp
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._refusing: set[asyncio.Task[None]] = set()

    @property
    def clients(self) -> int:
        """Number of clients being served now."""
        return len(self._clients)

    def _admit(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str,
               denied: str | None = None) -> None:
        """Serve a new client, or refuse it with one error (`denied`: why not)."""
        if self._server is None:
            refuse(writer, peer, errors.GeneralError("Server is shutting down"))
            return
        error = None
        if denied is not None:
            error = errors.GeneralError(f"Permission denied: {denied}")
        elif len(self._clients) >= self._limits.max_clients:
            error = errors.GeneralError(f"Too many clients (limit {self._limits.max_clients})")
        if error is None:
            self._track(self._clients, self._serve(reader, writer, peer), peer)
        elif self._stomp is None:
            refuse(writer, peer, error)
        elif len(self._refusing) < self._limits.max_clients:
            self._track(self._refusing, self._refuse(reader, writer, peer, error), peer)
        else:  # a flood of refused clients: no reply, no task
            log.warning("REFUSE peer=%s reason=%s (no reply)", peer, error.message)
            writer.transport.abort()

    def _protocol(self) -> ClientProtocol:
        """The protocol of a new client; it calls `_accept` once connected."""
        return ClientProtocol(self._limits.max_message, self._accept)

    @abc.abstractmethod
    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A client connected: admit it (`_admit`) with what the listener knows of it."""

    @staticmethod
    def _track(tasks: set[asyncio.Task[None]], work: Coroutine[Any, Any, None],
               peer: str) -> None:
        task = asyncio.create_task(work, name=f"rpc-client {peer}")
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     peer: str) -> None:
        try:
            connection = await self._open(reader, writer, peer)
            if connection is not None:
                await connection.serve()
        except Exception:
            log.exception("connection failed peer=%s", peer)
        finally:
            writer.transport.abort()

    async def _open(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    peer: str) -> Connection | None:
        """The connection that speaks the client's protocol; None if it left or said nothing
        for idle_timeout."""
        if self._stomp is None:
            return Connection(reader, writer, self._dispatcher, self._limits, peer)
        try:
            async with asyncio.timeout(self._limits.idle_timeout):
                stomp, head = await sniff(reader)
        except TimeoutError:
            log.info("DROP peer=%s reason=idle for %ss", peer, self._limits.idle_timeout)
            return None
        except OSError as exc:
            log.info("DROP peer=%s reason=read failed: %s", peer, exc)
            return None
        if stomp:
            ClientProtocol.of(writer).leave_to_reader()
            return self._stomp.connection(reader, writer, self._dispatcher, self._limits, peer,
                                          head)
        if not head:
            return None
        return Connection(reader, writer, self._dispatcher, self._limits, peer)

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      peer: str, error: errors.Error) -> None:
        """Refuse in the client's protocol, as far as it shows it in REFUSE_WAIT."""
        stomp = False
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.REFUSE_WAIT):
                    stomp, _ = await sniff(reader)
            refuse(writer, peer, error, stomp)
            with contextlib.suppress(OSError, TimeoutError):  # a refused peer may be gone
                async with asyncio.timeout(self._limits.close_timeout):
                    await writer.wait_closed()
        except OSError:
            log.debug("REFUSE peer=%s: connection already gone", peer)
        finally:
            writer.transport.abort()

    async def _stop(self) -> None:
        """Stop listening, drop every client and wait for their tasks."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        tasks = self._clients | self._refusing
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


class UnixServer(_Listener):
    """The local listener: a Unix stream socket with mode `mode` and group `group`. Peers
    are root, the daemon's own user, or members of the group (the daemon's group if None)."""

    def __init__(
        self,
        dispatcher: jsonrpc.Dispatcher,
        path: str,
        *,
        group: str | None = None,
        mode: int = 0o660,
        limits: Limits | None = None,
        stomp: StompEndpoint | None = None,
    ) -> None:
        super().__init__(dispatcher, limits, stomp)
        self._path = path
        self._group = group
        self._mode = mode
        self._gid = os.getegid()
        self._inode: int | None = None

    @property
    def path(self) -> str:
        return self._path

    async def start(self) -> None:
        if self._group is not None:
            try:
                self._gid = grp.getgrnam(self._group).gr_gid
            except KeyError:
                raise ValueError(f"rpc socket group {self._group!r} does not exist") from None
        _remove_stale_socket(self._path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Nobody can connect before listen(), so mode and group are set before that.
            sock.bind(self._path)
            os.chmod(self._path, self._mode)
            if self._group is not None:
                os.chown(self._path, -1, self._gid)
            self._inode = os.stat(self._path).st_ino
            # A deep backlog: a burst of clients waits to be accepted instead of being
            # refused with EAGAIN (too many clients are refused by max_clients, with a reply).
            self._server = await asyncio.get_running_loop().create_unix_server(
                self._protocol, sock=sock, backlog=1024)
        except BaseException:
            sock.close()
            raise
        log.info("LISTEN path=%s mode=%o gid=%d", self._path, self._mode, self._gid)

    async def close(self) -> None:
        """Stop listening, drop every client and wait for their tasks; remove the socket."""
        if self._server is None:
            return
        await self._stop()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self._path).st_ino == self._inode:
                os.unlink(self._path)
        log.info("CLOSED path=%s", self._path)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pid, uid, gid = _peer_credentials(writer)
        self._admit(reader, writer, f"pid={pid} uid={uid}", self._check_peer(pid, uid, gid))

    def _check_peer(self, pid: int, uid: int, gid: int) -> str | None:
        """None if the peer may use the daemon, else why not."""
        if uid in (0, os.geteuid()) or gid == self._gid:
            return None
        try:
            groups = _supplementary_groups(pid)
        except (OSError, ValueError) as exc:
            return f"cannot read the groups of pid {pid}: {exc}"
        if self._gid in groups:
            return None
        return f"uid {uid} is not in group {self._group or self._gid}"


def _peer_credentials(writer: asyncio.StreamWriter) -> tuple[int, int, int]:
    sock = writer.get_extra_info("socket")
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return int(pid), int(uid), int(gid)


def _supplementary_groups(pid: int) -> frozenset[int]:
    """The Groups: of /proc/<pid>/status (the peer's groups; read at connect time)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Groups:"):
                return frozenset(int(gid) for gid in line.split()[1:])
    raise ValueError("no Groups: line")


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a daemon that is gone; refuse to steal a live one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)  # a live listener with a full backlog: BlockingIOError
        live = probe.connect_ex(path) in (0, errno.EAGAIN)
    if live:
        raise FileExistsError(f"{path} is in use by another process")
    log.info("REMOVE stale socket path=%s", path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# --- TCP with TLS ------------------------------------------------------------------------


def tls_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """Server context: TLS 1.2+, our certificate, client certificates required and verified
    against `ca` (the engine's CA)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(cert, key)
    context.load_verify_locations(cafile=ca)
    return context


class TlsServer(_Listener):
    """The remote listener: TCP with TLS and required client certificates. Every client is
    served exactly like a client of the unix socket."""

    def __init__(
        self,
        dispatcher: jsonrpc.Dispatcher,
        listen: str,
        context: ssl.SSLContext,
        *,
        limits: Limits | None = None,
        handshake_timeout: float = 10.0,
        stomp: StompEndpoint | None = None,
    ) -> None:
        super().__init__(dispatcher, limits, stomp)
        self._host, self._port = address.split(listen)
        self._context = context
        self._handshake_timeout = handshake_timeout

    @property
    def port(self) -> int:
        """The port listened on (the one the system chose when 0 was asked for)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.get_running_loop().create_server(
            self._protocol, self._host, self._port, ssl=self._context,
            ssl_handshake_timeout=self._handshake_timeout)
        log.info("LISTEN tcp=%s:%d tls=required-client-cert", self._host, self.port)

    async def close(self) -> None:
        if self._server is None:
            return
        await self._stop()
        log.info("CLOSED tcp=%s:%d", self._host, self._port)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._admit(reader, writer, _tls_peer(writer))


def _tls_peer(writer: asyncio.StreamWriter) -> str:
    """"tcp=ADDR:PORT cn=NAME" of a verified client, for log lines."""
    address = writer.get_extra_info("peername")
    where = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
    cert = writer.get_extra_info("peercert") or {}
    names = [value for rdn in cert.get("subject", ()) for name, value in rdn
             if name == "commonName"]
    return f"tcp={where} cn={names[0] if names else '?'}"
