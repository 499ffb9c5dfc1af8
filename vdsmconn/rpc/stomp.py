"""STOMP 1.2, the engine's transport (SPEC 3.2), over the same listeners as newline JSON-RPC.

As the engine's client library and VDSM speak it: CONNECT or STOMP (version 1.2 only,
heart-beats both ways), SUBSCRIBE/UNSUBSCRIBE with ids (ack:auto), SEND of JSON-RPC requests
to the request destinations, DISCONNECT; any frame may ask for a RECEIPT. We are not a broker:
the reply to a SEND is a MESSAGE to the `reply-to` destination on the subscriptions of the same
connection only, and state changes go to every connection's subscriptions of the event
destination. A fault gets an ERROR frame and a close. Frames: stompframe.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vdsmconn import __version__
from vdsmconn.rpc import jsonrpc, stompframe
from vdsmconn.rpc.connection import Connection, Limits
from vdsmconn.rpc.stompframe import Frame, FrameError
from vdsmconn.status import StateEvent

log = logging.getLogger(__name__)

READ_SIZE = 65536
HEARTBEAT_GRACE = 2.0  # a peer silent for this many of its heart-beat intervals is dropped
MAX_SUBSCRIPTIONS = 64  # per connection
# Where a reply goes when its SEND has no reply-to: VDSM's response destination.
DEFAULT_REPLY_TO = "jms.topic.vdsm_responses"
EVENT_METHOD = "|storage|connection_state|"  # + key: VDSM's "|namespace|event|id" form
# VDSM's event_time(): monotonic milliseconds plus 2**31 - 1, because older engines failed to
# parse values below INT_MAX (vdsm lib/vdsm/common/time.py).
_EVENT_TIME_BASE = 2**31 - 1

Changes = Callable[[Callable[[StateEvent], None]], Callable[[], None]]


def event_time(monotonic: float) -> int:
    """The notify_time of an event at `monotonic` seconds, as VDSM computes it."""
    return _EVENT_TIME_BASE + int(monotonic * 1000)


@dataclass(frozen=True)
class Destinations:
    requests: tuple[str, ...] = ("jms.topic.vdsm_requests", "jms.topic.vdsm_irs_requests")
    events: str = "jms.queue.events"

    def is_request(self, destination: str) -> bool:
        """A request destination, or one below it ("jms.topic.vdsm_requests.x"), as VDSM."""
        return any(destination == d or destination.startswith(d + ".") for d in self.requests)


class Endpoint:
    """What the STOMP connections of one daemon share: destinations, and the state changes
    (`changes`: a subscription source such as Service.subscribe_changes) they publish."""

    def __init__(self, destinations: Destinations, changes: Changes | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.destinations = destinations
        self._monotonic = monotonic
        self._connections: set[StompConnection] = set()
        self._unsubscribe = changes(self.publish) if changes is not None else None

    def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   dispatcher: jsonrpc.Dispatcher, limits: Limits, peer: str,
                   head: bytes) -> StompConnection:
        return StompConnection(reader, writer, dispatcher, limits, peer, head, self)

    def attach(self, connection: StompConnection) -> None:
        self._connections.add(connection)

    def detach(self, connection: StompConnection) -> None:
        self._connections.discard(connection)

    def publish(self, event: StateEvent) -> None:
        """A storageServerStateChanged event, as a notification to the event destination."""
        params = {**event.to_wire(), "notify_time": event_time(self._monotonic())}
        try:
            data = jsonrpc.encode_notification(f"{EVENT_METHOD}{event.key}", params)
        except (TypeError, ValueError):
            log.exception("EVENT not encodable key=%s", event.key)
            return
        for connection in list(self._connections):
            connection.deliver(self.destinations.events, data)

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None


class StompConnection(Connection):
    """One STOMP client. Requests run concurrently as on the other transports; frames and
    heart-beats go out through the same bounded queue. Implements `jsonrpc.Session`: a
    notification (of the JSON-RPC `subscribe` verb) goes to the event destination."""

    protocol = "stomp"
    _EOL = b""  # queued data are whole frames

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 dispatcher: jsonrpc.Dispatcher, limits: Limits, peer: str,
                 head: bytes, endpoint: Endpoint) -> None:
        super().__init__(reader, writer, dispatcher, limits, peer, head)
        self._endpoint = endpoint
        self._parser = stompframe.Parser(limits.max_message, limits.max_headers,
                                         limits.max_header_bytes)
        self._subscriptions: dict[str, str] = {}  # id -> destination
        self._connected = False
        self._send_every = 0.0  # seconds: our heart-beats (0: none)
        self._expect_every = 0.0  # seconds: the peer's heart-beats (0: none)
        self._message_ids = itertools.count(1)
        self._receipt: str | None = None  # of the DISCONNECT that ended reading

    def notify(self, method: str, params: dict[str, Any]) -> None:
        self.deliver(self._endpoint.destinations.events,
                     jsonrpc.encode_notification(method, params))

    def deliver(self, destination: str, body: bytes) -> int:
        """A MESSAGE to each subscription of this connection to `destination`; how many."""
        sent = 0
        for sub_id, subscribed in list(self._subscriptions.items()):
            if subscribed == destination:
                self._send(stompframe.encode("MESSAGE", [
                    ("destination", destination), ("subscription", sub_id),
                    ("message-id", str(next(self._message_ids))),
                    ("content-type", "application/json"),
                ], body))
                sent += 1
        return sent

    async def serve(self) -> None:
        self._endpoint.attach(self)
        try:
            await super().serve()
        finally:
            self._endpoint.detach(self)

    def _heartbeat(self) -> float | None:
        return self._send_every or None

    async def _read_loop(self) -> None:
        data: bytes | None = self._head
        self._head = b""
        while data is not None:
            try:
                for frame in self._parser.feed(data):
                    if not await self._handle(frame):
                        await self._disconnect()
                        return
            except FrameError as exc:
                self._fault(exc)
                return
            data = await self._read()
            if data == b"":  # end of input: finish what was asked, then close
                if self._pending:
                    await asyncio.wait(self._pending)
                self._close("end of input", flush=True)
                return

    async def _read(self) -> bytes | None:
        """The next data (b"" at end of input); None once the connection is being closed: an
        idle peer, or one whose heart-beats stopped."""
        while True:
            if self._expect_every:
                limit: float | None = self._expect_every * HEARTBEAT_GRACE
            elif self._connected and self._send_every and not self._parser.buffered:
                limit = None  # the peer reads our heart-beats: a dead one fails our writes
            else:
                limit = self._limits.idle_timeout
            try:
                async with asyncio.timeout(limit):
                    return await self._reader.read(READ_SIZE)
            except TimeoutError:
                if self._expect_every:
                    self._fault(FrameError(f"no heart-beat for {limit:g}s"))
                    return None
                if not self._pending:
                    log.info("DROP peer=%s reason=idle for %ss", self._peer,
                             self._limits.idle_timeout)
                    self._close("idle", flush=True)
                    return None
            except OSError as exc:
                self._close(f"read failed: {exc}", flush=False)
                return None

    def _fault(self, exc: FrameError) -> None:
        log.warning("STOMP ERROR peer=%s message=%s", self._peer, exc.message)
        headers = [("message", exc.message), ("content-type", "text/plain")]
        if exc.receipt is not None:
            headers.append(("receipt-id", exc.receipt))
        self._send(stompframe.encode("ERROR", headers, exc.message.encode() + b"\n"))
        self._close(f"protocol error: {exc.message}", flush=True)

    async def _handle(self, frame: Frame) -> bool:
        """Act on one frame; False after DISCONNECT. FrameError for a fault."""
        command, receipt = frame.command, frame.headers.get("receipt")
        if command in ("CONNECT", "STOMP"):
            self._connect(frame)
            return True
        if not self._connected and command not in ("SUBSCRIBE", "UNSUBSCRIBE"):
            # The engine subscribes before it connects; nothing else comes first.
            raise FrameError(f"{command} before CONNECT", receipt)
        if command == "SEND":
            await self._request_frame(frame, receipt)
        elif command == "SUBSCRIBE":
            self._subscribe(frame, receipt)
        elif command == "UNSUBSCRIBE":
            self._unsubscribe(frame, receipt)
        elif command == "DISCONNECT":
            self._receipt = receipt
            return False
        else:
            raise FrameError(f"{command} is not supported (subscriptions are ack:auto, "
                             "no transactions)", receipt)
        if receipt is not None:
            self._send(stompframe.encode("RECEIPT", [("receipt-id", receipt)]))
        return True

    def _connect(self, frame: Frame) -> None:
        if self._connected:
            raise FrameError("already connected")
        versions = frame.headers.get("accept-version", "1.0").split(",")
        if "1.2" not in (v.strip() for v in versions):
            raise FrameError("Supported protocol versions are 1.2")
        send, expect = stompframe.heartbeats(frame.headers.get("heart-beat"))
        self._connected = True
        self._send_every, self._expect_every = send / 1000, expect / 1000
        log.info("STOMP CONNECTED peer=%s command=%s heart-beat=%d,%d", self._peer,
                 frame.command, send, expect)
        self._send(stompframe.encode("CONNECTED", [
            ("version", "1.2"), ("heart-beat", f"{send},{expect}"),
            ("server", f"vdsmconn/{__version__}"),
        ]))

    def _subscribe(self, frame: Frame, receipt: str | None) -> None:
        destination, sub_id = frame.headers.get("destination"), frame.headers.get("id")
        if not destination or not sub_id:
            raise FrameError("SUBSCRIBE needs destination and id headers", receipt)
        if sub_id in self._subscriptions:
            raise FrameError(f"subscription id {sub_id!r} is in use", receipt)
        if frame.headers.get("ack", "auto") != "auto":
            raise FrameError("only ack:auto is supported", receipt)
        if len(self._subscriptions) >= MAX_SUBSCRIPTIONS:
            raise FrameError(f"more than {MAX_SUBSCRIPTIONS} subscriptions", receipt)
        self._subscriptions[sub_id] = destination
        log.debug("STOMP SUBSCRIBE peer=%s id=%s destination=%s", self._peer, sub_id,
                  destination)

    def _unsubscribe(self, frame: Frame, receipt: str | None) -> None:
        sub_id = frame.headers.get("id")
        if not sub_id:
            raise FrameError("UNSUBSCRIBE needs an id header", receipt)
        if self._subscriptions.pop(sub_id, None) is None:
            log.debug("STOMP UNSUBSCRIBE peer=%s id=%s: no such subscription", self._peer,
                      sub_id)

    async def _request_frame(self, frame: Frame, receipt: str | None) -> None:
        destination = frame.headers.get("destination")
        if not destination:
            raise FrameError("SEND needs a destination header", receipt)
        if not self._endpoint.destinations.is_request(destination):
            raise FrameError(f"unknown destination {destination!r}: requests go to "
                             f"{', '.join(self._endpoint.destinations.requests)}", receipt)
        while len(self._pending) >= self._limits.max_pending:
            await asyncio.wait(self._pending, return_when=asyncio.FIRST_COMPLETED)
        reply_to = frame.headers.get("reply-to") or DEFAULT_REPLY_TO
        self._spawn(self._call(frame.body, reply_to))

    async def _call(self, body: bytes, reply_to: str) -> None:
        reply = await self._dispatcher.handle(body, self)
        if reply is not None and not self.deliver(reply_to, reply) and not self.closed:
            log.warning("STOMP REPLY DROPPED peer=%s destination=%s: not subscribed",
                        self._peer, reply_to)

    async def _disconnect(self) -> None:
        """After DISCONNECT: the replies to requests already sent, the RECEIPT, the close."""
        if self._pending:
            await asyncio.wait(self._pending)
        if self._receipt is not None:
            self._send(stompframe.encode("RECEIPT", [("receipt-id", self._receipt)]))
        self._close("DISCONNECT", flush=True)
