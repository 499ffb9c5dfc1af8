"""The settings connectors work with: typed, frozen, and no more than they need.

The daemon builds them from its configuration (`config.host_settings`); connectors never see
the whole `Config` (RPC, metrics, logging are none of their business) and never import it.
A leaf module: it imports nothing of the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class IscsiSettings:
    parallel_logins: int = 10
    login_retries: int = 1  # node.session.initial_login_retry_max
    login_timeout: int = 15  # node.conn[0].timeo.login_timeout, seconds
    iscsiadm_command: str = "iscsiadm"
    inq_command: str = "iscsi-inq"  # userspace login of the connectivity test
    sysfs_root: str = "/sys"  # where iscsi_session and net devices are read


@dataclass(frozen=True)
class ManagedSettings:
    multipath: bool = False
    helper_timeout: float = 120.0  # deadline of one os-brick helper call
    helper_command: str | None = None  # None: this Python with -m vdsmconn.host.brick_helper
    my_ip: str | None = None


@dataclass(frozen=True)
class HostSettings:
    state_dir: str = "/var/lib/vdsmconn"
    run_dir: str = "/run/vdsmconn"
    mount_root: str = "/rhev/data-center/mnt"
    mount_command: str = "mount"
    umount_command: str = "umount"
    gluster_command: str = "gluster"
    scope_slice: str = "vdsmconn.slice"
    probe_timeout: float = 10.0  # a health probe, a name lookup, a device read
    command_timeout: float = 60.0  # an external command
    iscsi: IscsiSettings = field(default_factory=IscsiSettings)
    managed: ManagedSettings = field(default_factory=ManagedSettings)
