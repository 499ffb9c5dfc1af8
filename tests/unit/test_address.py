"""host:port and IPv6 brackets, written and read in one place."""

from __future__ import annotations

import pytest

from vdsmconn.host import address


@pytest.mark.parametrize(("host", "shown"), [
    ("10.0.0.1", "10.0.0.1"), ("server.example", "server.example"),
    ("fd00::1", "[fd00::1]"), ("[fd00::1]", "[fd00::1]"), ("", ""),
])
def test_bracket_only_ipv6_once(host: str, shown: str) -> None:
    assert address.bracket(host) == shown
    assert address.unbracket(shown) == host.strip("[]")


def test_join() -> None:
    assert address.join("10.0.0.1", 3260) == "10.0.0.1:3260"
    assert address.join("fd00::1", 3260) == "[fd00::1]:3260"
    assert address.join("[fd00::1]", 2049) == "[fd00::1]:2049"
    assert address.join("server", 9917) == "server:9917"


@pytest.mark.parametrize(("text", "split"), [
    ("10.0.0.1:3260", ("10.0.0.1", 3260)),
    ("[fd00::1]:3260", ("fd00::1", 3260)),
    ("::1:9917", ("::1", 9917)),  # no brackets: the last colon is the port's
    ("localhost:0", ("localhost", 0)),
])
def test_split(text: str, split: tuple[str, int]) -> None:
    assert address.split(text) == split


def test_split_default_port_only_for_an_empty_one() -> None:
    assert address.split("10.0.0.1:", default_port=3260) == ("10.0.0.1", 3260)
    assert address.split("[fd00::1]:", default_port=3260) == ("fd00::1", 3260)
    for text in ("10.0.0.1", "host:http", "[fd00::1]", "10.0.0.1:"):
        with pytest.raises(ValueError):
            address.split(text)


@pytest.mark.parametrize(("text", "split"), [
    ("server:/export", ("server", "/export")),
    ("[fd00::1]:/export/a", ("[fd00::1]", "/export/a")),
    ("server:6789:/path", ("server:6789", "/path")),
    ("a:6789,b:6789:/x", ("a:6789,b:6789", "/x")),
    ("server:/a:/b", ("server", "/a:/b")),
    (":/x", ("", "/x")),
    ("/dev/sdb1", (None, "/dev/sdb1")),
    ("tmpfs", (None, "tmpfs")),
])
def test_split_remote(text: str, split: tuple[str | None, str]) -> None:
    assert address.split_remote(text) == split


def test_same_host() -> None:
    assert address.same_host("[FD00:0::1]", "fd00::1")
    assert address.same_host("10.0.0.1", "10.0.0.1")
    assert address.same_host("Server.Example.", "server.example")
    assert not address.same_host("10.0.0.1", "10.0.0.2")
    assert not address.same_host("fd00::1", "fd00::2")
