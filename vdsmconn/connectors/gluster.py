"""glusterfs: FUSE mounts of GlusterFS volumes under <mount_root>/glusterSD."""

from __future__ import annotations

from vdsmconn.connectors.mount import HelperMountConnector


class GlusterConnector(HelperMountConnector):
    fstype = "glusterfs"
    package = "glusterfs-client"
