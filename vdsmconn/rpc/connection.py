"""One client of a listener: framing, limits, concurrent requests, one bounded outgoing
queue. `Connection` speaks newline JSON-RPC; stomp.StompConnection builds on it. Listeners
(server.py) admit clients and hand each to one of these."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

from vdsmconn import errors, logs
from vdsmconn.rpc import jsonrpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """Per-listener limits, shared by every transport."""

    max_message: int = 1 << 20  # bytes in one line, newline excluded
    idle_timeout: float = 300.0  # seconds without input (and no request running) -> dropped
    max_clients: int = 64
    max_queue: int = 256  # outgoing messages waiting for a slow reader -> dropped beyond
    max_pending: int = 64  # requests running per client; reading pauses beyond
    close_timeout: float = 5.0  # seconds to flush the last replies when closing
    max_headers: int = 64  # STOMP: header lines in one frame (its size is max_message)
    max_header_bytes: int = 16384  # STOMP: command and header lines of one frame


class ClientProtocol(asyncio.StreamReaderProtocol):
    """The protocol of every client's transport: a StreamReaderProtocol (the STOMP layer and
    protocol detection read the client's StreamReader), until a newline JSON-RPC
    `Connection` takes its input over and splits lines itself as they arrive. Reading each
    request through the StreamReader cost a wake-up of a reader task and a pass down its
    coroutines, about a seventh of a request's loop time."""

    def __init__(self, limit: int, connected: Callable[[asyncio.StreamReader,
                                                         asyncio.StreamWriter], None]) -> None:
        loop = asyncio.get_running_loop()
        super().__init__(asyncio.StreamReader(limit=limit, loop=loop), connected, loop=loop)
        self._sink: Connection | None = None
        self._seen: bytearray | None = bytearray()  # what the reader got, until taken over
        self._ended: tuple[BaseException | None] | None = None  # input ended before that

    @staticmethod
    def of(writer: asyncio.StreamWriter) -> ClientProtocol:
        """The protocol of a client's transport (every listener makes one of these)."""
        protocol = writer.transport.get_protocol()
        assert isinstance(protocol, ClientProtocol), protocol
        return protocol

    def take_over(self, sink: Connection) -> None:
        """From now on, everything the client sends goes to `sink`, starting with what it
        sent so far (the reader keeps its copy, but nobody reads it any more)."""
        seen, self._seen = self._seen or b"", None
        self._sink = sink
        transport = sink.transport
        if not transport.is_reading():  # the reader's own limit stopped it
            transport.resume_reading()
        if seen:
            sink.feed(bytes(seen))
        if self._ended is not None:
            sink.end(self._ended[0])

    def leave_to_reader(self) -> None:
        """The client is read through the StreamReader to the end (STOMP)."""
        self._seen = None

    def data_received(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink.feed(data)
            return
        if self._seen is not None:
            self._seen += data
        super().data_received(data)

    def eof_received(self) -> bool:
        if self._sink is not None:
            self._sink.end(None)
        elif self._ended is None:
            self._ended = (None,)
        return bool(super().eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._sink is not None:
            self._sink.end(exc)
        elif self._ended is None:
            self._ended = (exc,)
        super().connection_lost(exc)


class Connection:
    """One client. Requests run concurrently; replies and notifications are written one at a
    time: straight to the socket while it takes them, else from a bounded queue, so a client
    that does not read is dropped, never waited for.
    Implements `jsonrpc.Session`. Newline JSON-RPC here; stomp.StompConnection reads frames
    instead (`_read_loop`) and writes heart-beats (`_heartbeat`)."""

    protocol = "jsonrpc"
    _EOL = b"\n"  # written after each queued message

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        dispatcher: jsonrpc.Dispatcher,
        limits: Limits,
        peer: str,
        head: bytes = b"",
    ) -> None:
        self._head = head  # STOMP: bytes read before this object took over (protocol detection)
        self._reader = reader
        self._writer = writer
        self._dispatcher = dispatcher
        self._limits = limits
        self._peer = peer
        # Unbounded so the end marker always fits; _send enforces limits.max_queue.
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._pending: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._flush = False
        self._reason = "closed"
        self._last_input = 0.0  # loop time of the last line read
        self._idle_timer: asyncio.TimerHandle | None = None
        self._output_at = 0.0  # loop time of the last write
        self._loop = asyncio.get_running_loop()
        # Newline JSON-RPC: input not yet a whole line, whole lines waiting for a free
        # request slot, and the end of input (an error, or None at end of file).
        self._partial = bytearray()
        self._lines: deque[bytes] = deque()
        self._input: asyncio.Future[BaseException | None] | None = None

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def closed(self) -> bool:
        """True once the connection is closing; notifications are then discarded."""
        return self._stop.is_set()

    def notify(self, method: str, params: dict[str, Any]) -> None:
        self._send(jsonrpc.encode_notification(method, params))

    async def serve(self) -> None:
        """Serve until end of input, a limit or a write error; cancel to drop the client."""
        log.info("CONNECT peer=%s protocol=%s", self._peer, self.protocol)
        try:
            async with asyncio.TaskGroup() as tg:
                reading = tg.create_task(self._read_loop())
                writing = tg.create_task(self._write_loop())
                await self._stop.wait()
                reading.cancel()
                for task in self._pending:
                    task.cancel()
                if self._flush:
                    self._queue.put_nowait(None)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._limits.close_timeout):
                            await writing
                writing.cancel()
        finally:
            for task in self._pending:
                task.cancel()
            if self._pending:
                await asyncio.wait(set(self._pending))
            self._close("server closing", flush=False)
            self._writer.transport.abort()
            log.info("DISCONNECT peer=%s reason=%s", self._peer, self._reason)

    def _close(self, reason: str, *, flush: bool) -> None:
        """Stop reading and running requests; with flush, write what is queued first."""
        if self._stop.is_set():
            return
        self._reason = reason
        self._flush = flush
        self._stop.set()

    def _send(self, data: bytes) -> None:
        if self._stop.is_set():
            return
        transport = self._writer.transport
        if self._queue.empty() and not transport.get_write_buffer_size() \
                and not transport.is_closing():
            # The socket took all that was written before: write now. The queue and the
            # writer task are for a client that reads slowly; going through them cost each
            # reply a future, a task step and a drain.
            self._write(data + self._EOL)
            return
        if self._queue.qsize() >= self._limits.max_queue:
            log.warning(
                "DROP peer=%s reason=outgoing queue overflow (%d messages not read)",
                self._peer, self._queue.qsize(),
            )
            self._close("outgoing queue overflow", flush=False)
            return
        self._queue.put_nowait(data)

    @property
    def transport(self) -> asyncio.Transport:
        return cast(asyncio.Transport, self._writer.transport)

    async def _read_loop(self) -> None:
        # One timer for the idle limit, moved on only when it fires: a timeout around
        # every read cost each request about a tenth of its loop time.
        loop = asyncio.get_running_loop()
        self._last_input = loop.time()
        self._idle_timer = loop.call_later(self._limits.idle_timeout, self._idle_check)
        try:
            await self._read_lines(loop)
        finally:
            self._idle_timer.cancel()

    async def _read_lines(self, loop: asyncio.AbstractEventLoop) -> None:
        """Take the client's input over from its StreamReader, run its lines as they come
        (`feed`), and finish what was asked at the end of input."""
        self._input = loop.create_future()
        ClientProtocol.of(self._writer).take_over(self)
        exc = await self._input
        if self._stop.is_set():
            return
        if exc is not None:
            self._close(f"read failed: {exc}", flush=False)
            return
        if self._partial.strip():  # a last request without its newline
            self._lines.append(bytes(self._partial))
            self._run_lines()
        self._partial.clear()
        while self._pending:
            await asyncio.wait(set(self._pending))
        self._close("end of input", flush=True)

    def feed(self, data: bytes) -> None:
        """Bytes from the client (ClientProtocol): whole lines become requests."""
        if self._input is None or self._input.done() or self._stop.is_set():
            return
        self._last_input = self._loop.time()
        if self._partial:
            self._partial += data
            data = bytes(self._partial)
            self._partial.clear()
        limit = self._limits.max_message
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            if end - start > limit:
                self._too_large()
                return
            line = data[start:end + 1]
            start = end + 1
            if line.strip():
                self._lines.append(line)
        if len(data) - start > limit:
            self._too_large()
            return
        self._partial += data[start:]
        self._run_lines()

    def end(self, exc: BaseException | None) -> None:
        """The client's input ended (None) or failed (ClientProtocol)."""
        if self._input is not None and not self._input.done():
            self._input.set_result(exc)

    def _run_lines(self) -> None:
        """Start waiting lines while fewer than max_pending requests run; stop reading the
        client while lines wait."""
        while self._lines and len(self._pending) < self._limits.max_pending:
            self._spawn(self._request(self._lines.popleft()))
        if self._lines:
            if self.transport.is_reading():
                self.transport.pause_reading()
        elif not self.transport.is_reading() and not self.transport.is_closing():
            self.transport.resume_reading()

    def _too_large(self) -> None:
        log.warning("DROP peer=%s reason=message over %d bytes",
                    self._peer, self._limits.max_message)
        self._send(jsonrpc.encode_error(errors.InvalidRequest(
            f"Request too large (limit {self._limits.max_message} bytes)"
        )))
        self._close("message too large", flush=True)
        self.end(None)

    def _idle_check(self) -> None:
        """Drop the client after idle_timeout without input while none of its requests
        runs; else look again when that can next be so."""
        loop = asyncio.get_running_loop()
        now, limit = loop.time(), self._limits.idle_timeout
        if self._stop.is_set():
            return
        if self._pending:
            self._idle_timer = loop.call_at(now + limit, self._idle_check)
        elif now < self._last_input + limit:
            self._idle_timer = loop.call_at(self._last_input + limit, self._idle_check)
        else:
            log.info("DROP peer=%s reason=idle for %ss", self._peer, limit)
            self._close("idle", flush=True)

    def _spawn(self, request: Coroutine[Any, Any, None]) -> None:
        """Run one request of this client; reading pauses while max_pending run. Requests
        are not in serve's task group, whose bookkeeping cost each request a Python call and
        a loop callback more: serve cancels and waits for them itself."""
        task = self._loop.create_task(request)
        self._pending.add(task)
        task.add_done_callback(self._request_done)

    def _request_done(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if self._lines and not self._stop.is_set():
            self._run_lines()
        if not task.cancelled() and (exc := task.exception()) is not None:
            # The dispatcher answers every failure of a method: this is a bug of ours.
            log.error("REQUEST FAILED peer=%s", self._peer, exc_info=exc)
            self._close("request failed", flush=False)

    async def _request(self, line: bytes) -> None:
        reply = await self._dispatcher.handle(line, self)
        if reply is not None:
            self._send(reply)

    def _heartbeat(self) -> float | None:
        """Seconds without output after which a heart-beat (an EOL) is written; None: never."""
        return None

    def _write(self, data: bytes) -> None:
        logs.flush()  # the lines logged before an answer are in the log before it is sent
        self._writer.write(data)
        self._output_at = self._loop.time()

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        self._output_at = loop.time()
        try:
            while True:
                heartbeat = self._heartbeat()
                due = None if heartbeat is None else self._output_at + heartbeat
                try:
                    if due is None:  # no timer per reply where none is needed
                        data = await self._queue.get()
                    else:
                        async with asyncio.timeout_at(due):
                            data = await self._queue.get()
                except TimeoutError:
                    if heartbeat is not None and loop.time() < self._output_at + heartbeat:
                        continue  # a reply went out directly in the meantime
                    self._write(b"\n")
                else:
                    if data is None:
                        break
                    self._write(data + self._EOL)
                await self._writer.drain()
            self._writer.close()
            await self._writer.wait_closed()
        except OSError as exc:
            self._close(f"write failed: {exc}", flush=False)
