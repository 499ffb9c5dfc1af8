"""Certificates for TLS tests, made with the openssl CLI: the engine's CA, a host certificate
for 127.0.0.1, the engine's client certificate, and an intruder signed by another CA."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

HAVE_OPENSSL = shutil.which("openssl") is not None


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)


def make_cert(folder: Path, ca: str, name: str, ext: str) -> None:
    (folder / f"{name}.ext").write_text(ext)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext",
            cwd=folder)


@dataclass
class Pki:
    folder: Path

    def path(self, name: str) -> str:
        return str(self.folder / name)

    def client_context(self, cert: str | None) -> ssl.SSLContext:
        """A client's context: trusts the engine's CA, presents `cert` if given."""
        context = ssl.create_default_context(cafile=self.path("engine-ca.pem"))
        if cert is not None:
            context.load_cert_chain(self.path(f"{cert}.pem"), self.path(f"{cert}.key"))
        return context

    def connect(self, port: int, cert: str | None = "engine",
                timeout: float = 10.0) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        return self.client_context(cert).wrap_socket(raw, server_hostname="127.0.0.1")

    def tcp_settings(self, port: int) -> dict[str, str]:
        """The daemon's rpc.tcp settings: listen on 127.0.0.1:port as `host`."""
        return {"listen": f"127.0.0.1:{port}", "cert": self.path("host.pem"),
                "key": self.path("host.key"), "ca": self.path("engine-ca.pem")}


def make_pki(folder: Path) -> Pki:
    make_ca(folder, "engine-ca")
    make_ca(folder, "other-ca")
    make_cert(folder, "engine-ca", "host", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
              "extendedKeyUsage=serverAuth\n")
    make_cert(folder, "engine-ca", "engine", "extendedKeyUsage=clientAuth\n")
    make_cert(folder, "other-ca", "intruder", "extendedKeyUsage=clientAuth\n")
    return Pki(folder)
