"""The TCP listener: TLS 1.2+ with client certificates signed by the configured CA, the same
framing and verbs as the unix socket. Certificates are made here with the openssl CLI."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon
from tests.tlscerts import HAVE_OPENSSL, Pki, make_pki
from tests.unit.test_metrics_collector import free_port
from vdsmconn.rpc import server

pytestmark = pytest.mark.skipif(not HAVE_OPENSSL, reason="openssl missing")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_daemon(tmp_path: Path, pki: Pki) -> Iterator[tuple[Daemon, int]]:
    port = free_port()
    d = Daemon(tmp_path)
    d.settings["rpc"]["tcp"] = {"listen": f"127.0.0.1:{port}", "cert": pki.path("host.pem"),
                                "key": pki.path("host.key"), "ca": pki.path("engine-ca.pem")}
    try:
        d.start()
        yield d, port
    finally:
        d.cleanup()


def client_context(pki: Pki, cert: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.path("engine-ca.pem"))
    if cert is not None:
        context.load_cert_chain(pki.path(f"{cert}.pem"), pki.path(f"{cert}.key"))
    return context


def exchange(sock: socket.socket, *messages: dict[str, Any]) -> list[dict[str, Any]]:
    """Send each message on one line, read one reply line for each."""
    stream = sock.makefile("rwb")
    replies = []
    for message in messages:
        stream.write(json.dumps(message).encode() + b"\n")
        stream.flush()
        line = stream.readline()
        if not line:
            raise ConnectionResetError("closed without a reply")
        replies.append(json.loads(line))
    return replies


def connect(port: int, pki: Pki, cert: str | None) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return client_context(pki, cert).wrap_socket(raw, server_hostname="127.0.0.1")


def test_client_with_a_certificate_of_the_ca_is_served(
    tls_daemon: tuple[Daemon, int], pki: Pki
) -> None:
    d, port = tls_daemon
    with connect(port, pki, "engine") as sock:
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
        info, bad, manage = exchange(
            sock,
            {"jsonrpc": "2.0", "id": 1, "method": "getHostInfo"},
            {"jsonrpc": "2.0", "id": 2, "method": "nope"},
            {"jsonrpc": "2.0", "id": "m", "method": "manageStorageServer",
             "params": {"connectionID": "tls-1", "connection": "localfs:///nonexistent-dir"}},
        )
        assert info["result"]["version"] and info["id"] == 1
        assert bad["error"]["code"] == -32601
        assert manage["result"] == {"connectionID": "tls-1", "key": manage["result"]["key"]}
        stream = sock.makefile("rwb")
        stream.write(b"{not json\n")  # framing as on the unix socket: -32700, still open
        stream.flush()
        assert json.loads(stream.readline())["error"]["code"] == -32700
        assert exchange(sock, {"jsonrpc": "2.0", "id": 4, "method": "getHostInfo"})[0]["id"] == 4
    assert "tls-1" in d.call("getStorageServerList")  # the same daemon behind both listeners
    assert "cn=engine" in d.log()
    d.call("unmanageStorageServer", connectionID="tls-1")


def refused(port: int, pki: Pki, cert: str | None) -> None:
    """The handshake fails, or the first request gets no reply."""
    try:
        with connect(port, pki, cert) as sock:
            exchange(sock, {"jsonrpc": "2.0", "id": 1, "method": "getHostInfo"})
    except (ssl.SSLError, ConnectionError, TimeoutError):
        return
    raise AssertionError(f"served a client with certificate {cert}")


def test_client_without_a_certificate_is_refused(
    tls_daemon: tuple[Daemon, int], pki: Pki
) -> None:
    refused(tls_daemon[1], pki, None)


def test_client_certificate_of_another_ca_is_refused(
    tls_daemon: tuple[Daemon, int], pki: Pki
) -> None:
    refused(tls_daemon[1], pki, "intruder")


def test_plain_tcp_is_refused(tls_daemon: tuple[Daemon, int]) -> None:
    with socket.create_connection(("127.0.0.1", tls_daemon[1]), timeout=10) as sock:
        sock.sendall(b'{"jsonrpc":"2.0","id":1,"method":"getHostInfo"}\n')
        data = b""
        try:
            while chunk := sock.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
    assert b"result" not in data and b"version" not in data


def test_server_context_requires_tls_1_2_and_a_client_certificate(pki: Pki) -> None:
    context = server.tls_context(pki.path("host.pem"), pki.path("host.key"),
                                 pki.path("engine-ca.pem"))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED


def test_listen_without_certificates_stops_start_up(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("rpc:\n  tcp: {listen: '127.0.0.1:5000'}\n")
    proc = subprocess.run([sys.executable, "-m", "vdsmconn", "--show-config", "-c", str(config)],
                          capture_output=True, text=True, timeout=60, check=False,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 2
    assert "rpc.tcp.cert: required when rpc.tcp.listen is set" in proc.stderr


def test_example_engine_client_runs_a_flow(tls_daemon: tuple[Daemon, int], pki: Pki,
                                           tmp_path: Path) -> None:
    d, port = tls_daemon
    data = tmp_path / "domain"
    data.mkdir()
    script = Path(__file__).resolve().parents[2] / "contrib" / "engine-client.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--host", f"127.0.0.1:{port}",
         "--cert", pki.path("engine.pem"), "--key", pki.path("engine.key"),
         "--ca", pki.path("engine-ca.pem"), "--flow", "F7", f"localfs://{data}"],
        capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "managed ENGINE_F7_CON1 key=file:" in proc.stdout
    assert "  event ENGINE_F7_CON1: connecting -> connected" in lines
    assert "unmanaged: {'connectionIDs': ['ENGINE_F7_CON1']}" in lines
    assert d.call("getStorageServerList", includeUnmanaged=False) == {}
