"""A server's network namespace for host tests: one veth link from the root namespace, the
host side `<prefix>h` at `<subnet>.1`, the namespace side `<prefix>n` at `<subnet>.2`.
Without its link the subnet is unreachable: packets to it never take the default route."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: rc {proc.returncode}: {proc.stderr.strip()}")
    return proc


@dataclass(frozen=True)
class NetnsLink:
    prefix: str  # names: the namespace itself, "<prefix>h" and "<prefix>n"
    subnet: str  # the first three octets, e.g. "10.252.7"

    @property
    def ns(self) -> str:
        return self.prefix

    @property
    def link(self) -> str:
        return f"{self.prefix}h"

    @property
    def peer(self) -> str:
        return f"{self.prefix}n"

    @property
    def address(self) -> str:
        return f"{self.subnet}.2"

    def in_ns(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.ns}", *argv]

    def create(self) -> None:
        sh("ip", "route", "add", "unreachable", f"{self.subnet}.0/24", "metric", "4000")
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.link, "type", "veth", "peer", "name", self.peer)
        sh("ip", "link", "set", self.peer, "netns", self.ns)
        sh("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.link)
        sh("ip", "link", "set", self.link, "up")
        sh("ip", "-n", self.ns, "addr", "add", f"{self.address}/24", "dev", self.peer)
        sh("ip", "-n", self.ns, "link", "set", self.peer, "up")
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")

    def drop_input(self) -> None:
        """Make the namespace a dead server: nftables drops every packet that comes in, so
        connections to its address hang until their deadline instead of being refused."""
        sh(*self.in_ns("nft", "add table inet vcdead; add chain inet vcdead input "
                       "{ type filter hook input priority 0; policy drop; }"))

    def delete(self) -> None:
        sh("ip", "netns", "del", self.ns, check=False)
        sh("ip", "link", "del", self.link, check=False)
        sh("ip", "route", "del", "unreachable", f"{self.subnet}.0/24", "metric", "4000",
           check=False)


class InNetns:
    """A server that lives in the namespace of its `net`."""

    @property
    def net(self) -> NetnsLink:
        raise NotImplementedError

    @property
    def ns(self) -> str:
        return self.net.ns

    @property
    def link(self) -> str:
        return self.net.link

    @property
    def address(self) -> str:
        return self.net.address
