"""The table of backends: connection type -> connector."""

from __future__ import annotations

from typing import Any

from vdsmconn.connectors.base import Connector, HostContext
from vdsmconn.connectors.gluster import GlusterConnector
from vdsmconn.connectors.iscsi import IscsiConnector
from vdsmconn.connectors.localfs import LocalConnector
from vdsmconn.connectors.managed import ManagedConnector
from vdsmconn.connectors.mount import PosixConnector
from vdsmconn.connectors.nfs import NfsConnector


def build(host: HostContext) -> dict[str, Connector[Any]]:
    return {
        "posixfs": PosixConnector(host),
        "nfs": NfsConnector(host),
        "glusterfs": GlusterConnector(host),
        "localfs": LocalConnector(host),
        "iscsi": IscsiConnector(host),
        "managed": ManagedConnector(host),
    }
