"""nfs: the kernel NFS client, options per SPEC 8 (see model.NfsSpec.options)."""

from __future__ import annotations

from vdsmconn.connectors.mount import HelperMountConnector


class NfsConnector(HelperMountConnector):
    fstype = "nfs"
    package = "nfs-common"
