"""STOMP 1.2 frames (https://stomp.github.io/stomp-specification-1.2.html): parse and encode.

Pure: bytes in, frames out. `Parser` takes data as it arrives (a frame split over many reads,
many frames in one read, EOLs as LF or CRLF, heart-beat EOLs between frames) and enforces the
size limits, so a hostile peer cannot make it buffer more than one frame. Every fault is a
`FrameError`; the connection answers it with an ERROR frame and closes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# Frames a client may send (section "Client Frames").
CLIENT_COMMANDS = frozenset({
    "CONNECT", "STOMP", "SEND", "SUBSCRIBE", "UNSUBSCRIBE", "BEGIN", "COMMIT", "ABORT", "ACK",
    "NACK", "DISCONNECT",
})
# CONNECT and CONNECTED headers are not escaped (section "Value Encoding"); STOMP is CONNECT.
_RAW_HEADERS = frozenset({"CONNECT", "STOMP", "CONNECTED"})
_LONGEST_COMMAND = max(len(c) for c in CLIENT_COMMANDS)
MIN_HEARTBEAT = 1000  # ms: no non-zero heart-beat interval is shorter (as VDSM)

_DECODE = {b"\\\\": b"\\", b"\\r": b"\r", b"\\n": b"\n", b"\\c": b":"}
_ENCODE = {"\\": "\\\\", "\r": "\\r", "\n": "\\n", ":": "\\c"}
_ESCAPE_SEQUENCE = re.compile(rb"\\.?", re.DOTALL)
_SPECIAL = re.compile(r"[\\\r\n:]")
_DIGITS = re.compile(r"[0-9]{1,12}")


class FrameError(Exception):
    """A protocol fault; `message` goes into the ERROR frame's message header."""

    def __init__(self, message: str, receipt: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.receipt = receipt  # the faulty frame's receipt header, when it could be read


@dataclass(frozen=True)
class Frame:
    command: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


def sniff(head: bytes) -> bool | None:
    """Whether a connection whose first bytes are `head` speaks STOMP: True, False, or None
    while `head` is too short to tell. Leading EOLs (heart-beats) are skipped."""
    head = head.lstrip(b"\r\n")
    if not head:
        return None
    if not head[:1].isupper():  # "{" or "[" (or anything else): newline JSON-RPC
        return False
    line, eol, _ = head.partition(b"\n")
    if not eol:
        return None if len(line) <= _LONGEST_COMMAND + 1 else False
    return line.removesuffix(b"\r").decode("ascii", "replace") in CLIENT_COMMANDS


def encode(command: str, headers: Iterable[tuple[str, str]] = (), body: bytes = b"") -> bytes:
    """One frame; content-length is added when there is a body."""
    escape = command not in _RAW_HEADERS
    lines = [command]
    for name, value in headers:
        lines.append(f"{_escape(name)}:{_escape(value)}" if escape else f"{name}:{value}")
    if body:
        lines.append(f"content-length:{len(body)}")
    return "\n".join(lines).encode("utf-8") + b"\n\n" + body + b"\0"


def _escape(text: str) -> str:
    return _SPECIAL.sub(lambda m: _ENCODE[m.group(0)], text)


def _unescape(raw: bytes) -> str:
    if b"\\" not in raw:
        return _decode_raw(raw)

    def one(m: re.Match[bytes]) -> bytes:
        try:
            return _DECODE[m.group(0)]
        except KeyError:
            raise FrameError(f"undefined escape sequence {m.group(0)!r} in a header") from None
    try:
        return _ESCAPE_SEQUENCE.sub(one, raw).decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError("header is not UTF-8") from None


def heartbeats(value: str | None) -> tuple[int, int]:
    """Negotiate a CONNECT's heart-beat header "cx,cy" (ms): the server's (send, expect)
    intervals, each non-zero one at least MIN_HEARTBEAT. We send as often as the client
    wants to receive and expect what it says it can send, so both sides agree on the
    intervals the CONNECTED frame names ("send,expect")."""
    if value is None:
        return 0, 0
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != 2 or not all(_DIGITS.fullmatch(p) for p in parts):
        raise FrameError(f"heart-beat must be two non-negative integers, not {value!r}")
    can_send, wants = (int(p) for p in parts)
    return (max(wants, MIN_HEARTBEAT) if wants else 0,
            max(can_send, MIN_HEARTBEAT) if can_send else 0)


class Parser:
    """Incremental frame parser. `feed` returns the frames completed by the data; a heart-beat
    (a lone EOL between frames) yields nothing. Limits: `max_frame` bytes of headers and body,
    `max_headers` header lines, `max_header_bytes` for the command and header lines."""

    def __init__(self, max_frame: int, max_headers: int, max_header_bytes: int) -> None:
        self._max_frame = max_frame
        self._max_headers = max_headers
        self._max_header_bytes = max_header_bytes
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already searched for the end of the current part
        self._head: tuple[str, dict[str, str]] | None = None  # of the frame being read
        self._head_size = 0
        self._length: int | None = None  # content-length of the frame being read

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        pos = 0
        try:
            while True:
                if self._head is None:
                    pos = self._skip_eols(pos)
                    if pos == len(self._buf):
                        break
                    end = self._read_head(pos)
                    if end < 0:
                        break
                    pos = end
                frame, end = self._read_body(pos)
                if frame is None:
                    break
                frames.append(frame)
                pos = end
        finally:
            del self._buf[:pos]  # once per feed: many frames in one read stay linear
            self._scanned = max(0, self._scanned - pos)
        return frames

    def _skip_eols(self, pos: int) -> int:
        buf = self._buf
        while pos < len(buf):
            if buf[pos] == 0x0A:
                pos += 1
            elif buf[pos] == 0x0D and pos + 1 == len(buf):
                break  # "\r" alone: wait for its "\n"
            elif buf[pos] == 0x0D and buf[pos + 1] == 0x0A:
                pos += 2
            else:
                break
        self._scanned = max(self._scanned, pos)
        return pos

    def _read_head(self, pos: int) -> int:
        """Parse command and headers starting at pos; the body's offset, or -1 for more."""
        buf = self._buf
        first = buf.find(b"\n", pos, pos + _LONGEST_COMMAND + 2)
        if first < 0 and len(buf) - pos <= _LONGEST_COMMAND + 1:
            return -1
        line = bytes(buf[pos:first if first >= 0 else pos + _LONGEST_COMMAND + 2])
        command = line.removesuffix(b"\r").decode("ascii", "replace")
        if first < 0 or command not in CLIENT_COMMANDS:
            raise FrameError(f"unknown command {command!r}")
        start = max(pos, self._scanned - 2)
        lf = buf.find(b"\n\n", start)
        crlf = buf.find(b"\n\r\n", start)
        ends = [(i, 2) for i in (lf,) if i >= 0] + [(i, 3) for i in (crlf,) if i >= 0]
        if not ends:
            self._scanned = len(buf)
            if len(buf) - pos > self._max_header_bytes:
                raise FrameError(f"frame headers over {self._max_header_bytes} bytes")
            if buf.find(b"\0", start) >= 0:
                raise FrameError("frame ends before its headers")
            return -1
        end, sep = min(ends)
        if end - pos > self._max_header_bytes:
            raise FrameError(f"frame headers over {self._max_header_bytes} bytes")
        lines = [line.removesuffix(b"\r") for line in bytes(buf[pos:end]).split(b"\n")]
        if len(lines) - 1 > self._max_headers:
            raise FrameError(f"more than {self._max_headers} headers")
        headers: dict[str, str] = {}
        raw = command in _RAW_HEADERS
        for header in lines[1:]:
            name, colon, value = header.partition(b":")
            if not colon:
                raise FrameError("header line without a colon", headers.get("receipt"))
            if raw:
                key, text = _decode_raw(name), _decode_raw(value)
            else:
                key, text = _unescape(name), _unescape(value)
            headers.setdefault(key, text)  # repeated: the first one counts (spec)
        self._length = _content_length(headers)
        self._head = command, headers
        self._head_size = end + sep - pos
        self._scanned = end + sep
        return end + sep

    def _read_body(self, pos: int) -> tuple[Frame | None, int]:
        assert self._head is not None
        buf = self._buf
        room = self._max_frame - self._head_size
        command, headers = self._head
        receipt = headers.get("receipt")
        if self._length is not None:
            if self._length > room:
                raise FrameError(f"frame over {self._max_frame} bytes", receipt)
            if len(buf) - pos <= self._length:
                return None, pos
            if buf[pos + self._length] != 0:
                raise FrameError("frame body not terminated by NUL after content-length",
                                 receipt)
            end = pos + self._length
        else:
            end = buf.find(b"\0", max(pos, self._scanned))
            if end < 0:
                self._scanned = len(buf)
                if len(buf) - pos > room:
                    raise FrameError(f"frame over {self._max_frame} bytes", receipt)
                return None, pos
            if end - pos > room:
                raise FrameError(f"frame over {self._max_frame} bytes", receipt)
        frame = Frame(command, headers, bytes(buf[pos:end]))
        self._head, self._length = None, None
        self._scanned = end + 1
        return frame, end + 1


def _decode_raw(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError("header is not UTF-8") from None


def _content_length(headers: Mapping[str, str]) -> int | None:
    text = headers.get("content-length")
    if text is None:
        return None
    if not _DIGITS.fullmatch(text):
        raise FrameError(f"bad content-length {text[:20]!r}", headers.get("receipt"))
    return int(text)
