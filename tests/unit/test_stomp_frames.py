"""STOMP 1.2 frames: the pure parser and encoder (vdsmconn/rpc/stompframe.py)."""

from __future__ import annotations

import pytest

from vdsmconn.rpc.stompframe import Frame, FrameError, Parser, encode, heartbeats, sniff


def parser(max_frame: int = 4096, max_headers: int = 8, max_header_bytes: int = 512) -> Parser:
    return Parser(max_frame, max_headers, max_header_bytes)


def test_connect_frame_of_the_engine() -> None:
    frames = parser().feed(b"CONNECT\naccept-version:1.2\nhost:h1\nheart-beat:0,15000\n\n\0")
    assert frames == [Frame("CONNECT", {"accept-version": "1.2", "host": "h1",
                                        "heart-beat": "0,15000"})]


def test_crlf_and_lf_eols_and_heartbeats_between_frames() -> None:
    data = (b"\n\r\nSEND\r\ndestination:q\r\n\r\nbody\0\n\n"
            b"SUBSCRIBE\nid:1\r\ndestination:r\n\r\n\0\r\n")
    assert parser().feed(data) == [Frame("SEND", {"destination": "q"}, b"body"),
                                   Frame("SUBSCRIBE", {"id": "1", "destination": "r"})]


def test_several_frames_in_one_read() -> None:
    one = b"SEND\ndestination:q\n\n{}\0"
    assert len(parser().feed(one * 50)) == 50


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_frames_split_across_reads_at_every_byte(size: int) -> None:
    data = (b"SEND\r\ndestination:q\r\ncontent-length:5\r\n\r\na\0b\0c\0"
            b"SEND\ndestination:x\\cy\n\nplain\0")
    p = parser()
    frames = []
    for i in range(0, len(data), size):
        frames += p.feed(data[i:i + size])
    assert frames == [Frame("SEND", {"destination": "q", "content-length": "5"}, b"a\0b\0c"),
                      Frame("SEND", {"destination": "x:y"}, b"plain")]
    assert p.buffered == 0


def test_content_length_body_may_hold_nul() -> None:
    data = b"SEND\ncontent-length:3\n\n\0\0\0\0"
    assert parser().feed(data)[0].body == b"\0\0\0"


def test_header_escapes_decoded() -> None:
    frame = parser().feed(b"SEND\na\\cb:1\\\\2\\r\\n3\\c\n\n\0")[0]
    assert frame.headers == {"a:b": "1\\2\r\n3:"}


def test_connect_headers_are_not_unescaped() -> None:
    frame = parser().feed(b"CONNECT\nlogin:a\\cb\n\n\0")[0]
    assert frame.headers == {"login": "a\\cb"}


def test_repeated_header_first_wins() -> None:
    frame = parser().feed(b"SEND\ndestination:a\ndestination:b\n\n\0")[0]
    assert frame.headers["destination"] == "a"


@pytest.mark.parametrize(("data", "message"), [
    (b"HELLO\n\n\0", "unknown command 'HELLO'"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\x00\x00", "unknown command"),
    (b"SEND\ndestination:q\n\0", "frame ends before its headers"),
    (b"SEND\nno colon\n\n\0", "header line without a colon"),
    (b"SEND\na:\\t\n\n\0", "undefined escape sequence"),
    (b"SEND\na:x\\\n\n\0", "undefined escape sequence"),
    (b"SEND\na:\xff\n\n\0", "not UTF-8"),
    (b"SEND\ncontent-length:-1\n\n\0", "bad content-length"),
    (b"SEND\ncontent-length:\xd9\xa3\n\n\0", "bad content-length"),  # an Arabic-Indic 3
    (b"SEND\ncontent-length:2\n\nabc\0", "not terminated by NUL"),
    (b"SEND\ncontent-length:9999\n\n", "frame over 4096 bytes"),
])
def test_faults(data: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        parser().feed(data)


def test_fault_carries_the_receipt_when_known() -> None:
    with pytest.raises(FrameError) as info:
        parser().feed(b"SEND\nreceipt:r9\ncontent-length:1\n\nxy\0")
    assert info.value.receipt == "r9"


def test_body_without_nul_is_bounded_by_the_frame_size() -> None:
    p = parser(max_frame=100)
    p.feed(b"SEND\ndestination:q\n\n" + b"x" * 70)
    with pytest.raises(FrameError, match="frame over 100 bytes"):
        p.feed(b"x" * 20)


def test_headers_are_bounded_before_their_end_arrives() -> None:
    p = parser(max_header_bytes=64)
    p.feed(b"SEND\nlong:" + b"v" * 40)
    with pytest.raises(FrameError, match="headers over 64 bytes"):
        p.feed(b"v" * 40)


def test_header_count_is_bounded() -> None:
    data = b"SEND\n" + b"".join(b"h%d:v\n" % i for i in range(9)) + b"\n\0"
    with pytest.raises(FrameError, match="more than 8 headers"):
        parser().feed(data)
    assert len(parser().feed(data.replace(b"h8:v\n", b""))) == 1


def test_frame_size_counts_headers_and_body() -> None:
    head = b"SEND\ndestination:q\n\n"
    assert parser(max_frame=len(head) + 10).feed(head + b"x" * 10 + b"\0")
    with pytest.raises(FrameError):
        parser(max_frame=len(head) + 10).feed(head + b"x" * 11 + b"\0")


def test_many_frames_parse_in_linear_time() -> None:
    one = b"SEND\ndestination:q\ncontent-length:2\n\n{}\0"
    p = parser()
    count = 0
    data = one * 20000
    for i in range(0, len(data), 65536):
        count += len(p.feed(data[i:i + 65536]))
    assert count == 20000


def test_encode_escapes_headers_and_adds_content_length() -> None:
    data = encode("MESSAGE", [("destination", "a:b\nc\\"), ("subscription", "s")], b"{\0}")
    assert data == (b"MESSAGE\ndestination:a\\cb\\nc\\\\\nsubscription:s\n"
                    b"content-length:3\n\n{\0}\0")


def test_encode_connected_unescaped_and_without_body() -> None:
    assert encode("CONNECTED", [("version", "1.2"), ("heart-beat", "0,0")]) == (
        b"CONNECTED\nversion:1.2\nheart-beat:0,0\n\n\0")


def test_encode_parse_round_trip() -> None:
    headers = {"destination": "x:y", "odd\\name": "v\r\n"}
    frame = parser().feed(encode("SEND", headers.items(), b"\0body"))[0]
    assert frame == Frame("SEND", {**headers, "content-length": "5"}, b"\0body")


@pytest.mark.parametrize(("header", "expected"), [
    (None, (0, 0)),
    ("0,0", (0, 0)),
    ("0,15000", (15000, 0)),  # the engine: it sends none, wants ours every 15 s
    ("1000,1000", (1000, 1000)),
    ("10,20", (1000, 1000)),  # each non-zero interval at least 1 s
    ("5000, 0", (0, 5000)),
])
def test_heartbeat_negotiation(header: str | None, expected: tuple[int, int]) -> None:
    assert heartbeats(header) == expected


@pytest.mark.parametrize("header", ["", "1", "1,2,3", "-1,0", "a,b", "\u0663,0"])
def test_bad_heartbeat_header(header: str) -> None:
    with pytest.raises(FrameError, match="heart-beat"):
        heartbeats(header)


@pytest.mark.parametrize(("head", "verdict"), [
    (b"", None),
    (b"CONN", None),
    (b"CONNECT\n", True),
    (b"STOMP\r\n", True),
    (b"\nSUBSCRIBE\n", True),  # the engine subscribes before it connects
    (b"{", False),
    (b"[", False),
    (b" {", False),
    (b"CONNECTION\n", False),
    (b"ABCDEFGHIJKLMN", False),
])
def test_sniff(head: bytes, verdict: bool | None) -> None:
    assert sniff(head) is verdict
