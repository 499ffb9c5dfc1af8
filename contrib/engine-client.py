#!/usr/bin/python3
"""An example engine-side client of vdsmconn over TCP with TLS (docs/API.md).

Standard library only. It plays one engine flow against one host: manage a connection under a
flow-scoped connection ID, wait for it without polling (subscribe + waitStorageServer), print
the state changes that arrive meanwhile, and clean the flow up with one prefix unmanage.

    contrib/engine-client.py --host hv1.example.com:54322 \\
        --cert /etc/pki/engine/engine.pem --key /etc/pki/engine/engine.key \\
        --ca /etc/pki/engine/ca.pem \\
        --flow FLOW101 'nfs://storage.example.com/exports/data?protocol_version=4.2'

The daemon side: rpc.tcp.{listen,cert,key,ca} in /etc/vdsmconn/vdsmconn.yaml; the client
certificate must be signed by the CA named in rpc.tcp.ca.
"""

from __future__ import annotations

import argparse
import itertools
import json
import socket
import ssl
import sys
from collections.abc import Callable
from typing import Any


class RpcError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"error {error.get('code')}: {error.get('message')}")
        self.code = error.get("code")
        self.data = error.get("data")


class VdsmconnClient:
    """JSON-RPC 2.0, one JSON text per line, over one TLS connection."""

    def __init__(self, address: str, cert: str, key: str, ca: str, timeout: float = 60) -> None:
        host, _, port = address.rpartition(":")
        context = ssl.create_default_context(cafile=ca)  # verifies the host's certificate
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert, key)  # the daemon requires a client certificate
        raw = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
        self.sock = context.wrap_socket(raw, server_hostname=host.strip("[]"))
        self.stream = self.sock.makefile("rwb")
        self.ids = itertools.count(1)
        self.on_event: Callable[[dict[str, Any]], None] = lambda params: None

    def call(self, method: str, wait: float = 0, **params: Any) -> Any:
        request_id = next(self.ids)
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        self.stream.write(json.dumps(message).encode() + b"\n")
        self.stream.flush()
        self.sock.settimeout(60 + wait)
        while True:
            line = self.stream.readline()
            if not line:
                raise ConnectionError("vdsmconn closed the connection")
            reply = json.loads(line)
            if "id" not in reply:  # a notification (subscribe)
                self.on_event(reply.get("params", {}))
            elif reply["id"] == request_id:
                if "error" in reply:
                    raise RpcError(reply["error"])
                return reply["result"]

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", required=True, help="HOST:PORT of rpc.tcp.listen")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--flow", default="FLOW1", help="flow name used in the CIDs")
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait")
    parser.add_argument("--keep", action="store_true", help="leave the connection managed")
    parser.add_argument("connection", help="a connection URI or JSON object")
    args = parser.parse_args()
    connection = json.loads(args.connection) if args.connection.startswith("{") \
        else args.connection
    prefix = f"ENGINE_{args.flow}_"
    cid = f"{prefix}CON1"

    client = VdsmconnClient(args.host, args.cert, args.key, args.ca)
    try:
        print("host:", client.call("getHostInfo")["version"])
        client.on_event = lambda e: print(
            f"  event {','.join(e['connectionIDs'])}: {e['oldState']} -> {e['newState']}"
            + (f" ({e['lastError']['code']} {e['lastError']['message']})"
               if e.get("lastError") else ""))
        client.call("subscribe", events=["storageServerStateChanged"])
        reply = client.call("manageStorageServer", connectionID=cid, connection=connection)
        print(f"managed {cid} key={reply['key']}")
        try:
            statuses = client.call("waitStorageServer", wait=args.timeout,
                                   connectionIDs=[cid], timeout=args.timeout, until="error")
        except RpcError as e:
            if e.code != 480:
                raise
            statuses = e.data
            print(f"not connected within {args.timeout:g} s")
        status = statuses[cid]
        print(f"{cid}: {status['state']} path={status['path']} error={status['lastError']}")
        if not args.keep:
            print("unmanaged:", client.call("unmanageStorageServer", prefix=prefix))
        return 0 if status["connected"] else 1
    except RpcError as e:
        print(f"vdsmconn: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
