"""The settings connectors work with: typed, frozen, and no more than they need.

The daemon builds them from its configuration (`config.host_settings`); connectors never see
the whole `Config` (RPC, metrics, logging are none of their business) and never import it.
A leaf module: it imports nothing of the package. The defaults live in `config` alone.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IscsiSettings:
    parallel_logins: int
    login_retries: int  # node.session.initial_login_retry_max
    login_timeout: int  # node.conn[0].timeo.login_timeout, seconds
    iscsiadm_command: str
    inq_command: str  # userspace login of the connectivity test
    sysfs_root: str  # where iscsi_session and net devices are read


@dataclass(frozen=True)
class ManagedSettings:
    multipath: bool
    helper_timeout: float  # deadline of one os-brick helper call
    helper_command: str | None  # None: this Python with -m vdsmconn.host.brick_helper
    my_ip: str | None


@dataclass(frozen=True)
class HostSettings:
    state_dir: str
    run_dir: str
    mount_root: str
    mount_command: str
    umount_command: str
    gluster_command: str
    scope_slice: str
    probe_timeout: float  # a health probe, a name lookup, a device read
    command_timeout: float  # an external command
    iscsi: IscsiSettings
    managed: ManagedSettings
