"""Typed, frozen settings: built-in defaults, then /etc drop-ins, or one file given with -c.

Unknown keys and bad values stop start-up with a message naming the key (SPEC 11).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from vdsmconn.host import address
from vdsmconn.settings import HostSettings, IscsiSettings, ManagedSettings

MAIN_FILE = Path("/etc/vdsmconn/vdsmconn.yaml")
DROPIN_GLOB = "/etc/vdsmconn/conf.d/*.yaml"
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A configuration problem; the message names the key and the file."""


@dataclass(frozen=True)
class TcpConfig:
    listen: str | None = None
    cert: str | None = None
    key: str | None = None
    ca: str | None = None


@dataclass(frozen=True)
class StompConfig:
    """STOMP 1.2 on the same listeners (SPEC 3.2): where requests and events go."""

    request_destinations: tuple[str, ...] = ("jms.topic.vdsm_requests",
                                             "jms.topic.vdsm_irs_requests")
    event_destination: str = "jms.queue.events"


@dataclass(frozen=True)
class RpcConfig:
    socket: str = "/run/vdsmconn/vdsmconn.sock"
    socket_group: str | None = "kvm"
    tcp: TcpConfig = field(default_factory=TcpConfig)
    stomp: StompConfig = field(default_factory=StompConfig)
    max_clients: int = 64
    idle_timeout: float = 600.0
    max_message: int = 1024 * 1024


@dataclass(frozen=True)
class MetricsConfig:
    listen: str | None = "127.0.0.1:9917"


@dataclass(frozen=True)
class SupervisorConfig:
    backoff_initial: float = 0.5
    backoff_max: float = 60.0
    probe_interval: float = 10.0
    probe_timeout: float = 10.0
    command_timeout: float = 60.0
    # Connects, disconnects and recoveries running at once: in all, and on one remote server
    # (or, for connections with no server, of one type), so one dead server cannot starve
    # the others (SPEC 6).
    max_operations: int = 64
    max_operations_per_server: int = 16


@dataclass(frozen=True)
class IscsiConfig:
    parallel_logins: int = 10
    login_retries: int = 1  # node.session.initial_login_retry_max: the daemon retries
    login_timeout: int = 15  # node.conn[0].timeo.login_timeout, seconds
    iscsiadm_command: str = "iscsiadm"
    inq_command: str = "iscsi-inq"  # libiscsi-bin: userspace login in testStorageServer
    sysfs_root: str = "/sys"  # where iscsi_session and net devices are read


@dataclass(frozen=True)
class ManagedConfig:
    """Managed block volumes (os-brick)."""

    multipath: bool = False  # used for attach and detach alike (kept in each record)
    helper_timeout: float = 120.0  # deadline of one os-brick helper call
    helper_command: str | None = None  # null: this Python with -m vdsmconn.host.brick_helper
    my_ip: str | None = None  # the host address in getConnectorInfo; null: found out


@dataclass(frozen=True)
class VdsmConfig:
    """VDSM's verbs (StoragePool.connectStorageServer...): how long a call waits for its
    connections. Keep it below the engine's command timeout (vdsTimeout, 180 s by default),
    so the engine gets the statuses and not a timeout of its own."""

    connect_timeout: float = 150.0  # connected or failed once, else status 480
    disconnect_timeout: float = 150.0  # torn down or failed once, else status 480


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"


@dataclass(frozen=True)
class Config:
    state_dir: str = "/var/lib/vdsmconn"
    run_dir: str = "/run/vdsmconn"
    mount_root: str = "/rhev/data-center/mnt"
    mount_command: str = "mount"
    umount_command: str = "umount"
    gluster_command: str = "gluster"
    lvm_command: str = "lvm"  # vgs/lvs for block storage domains (getStorageDomainList)
    scope_slice: str = "vdsmconn.slice"
    rpc: RpcConfig = field(default_factory=RpcConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    iscsi: IscsiConfig = field(default_factory=IscsiConfig)
    managed: ManagedConfig = field(default_factory=ManagedConfig)
    vdsm: VdsmConfig = field(default_factory=VdsmConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _is_destination(value: str) -> bool:
    """A STOMP destination name in rpc.stomp."""
    return bool(value) and value.isprintable() and not any(c.isspace() for c in value)


# Checks of values beyond their type: key path -> (predicate, what is expected).
_POSITIVE = (lambda v: v > 0, "a number greater than 0")
_CHECKS: dict[str, tuple[Any, str]] = {
    "state_dir": (os.path.isabs, "an absolute path"),
    "run_dir": (os.path.isabs, "an absolute path"),
    "mount_root": (os.path.isabs, "an absolute path"),
    "rpc.socket": (os.path.isabs, "an absolute path"),
    "scope_slice": (lambda v: v.endswith(".slice") and "/" not in v, "a name ending in .slice"),
    "rpc.max_clients": _POSITIVE,
    "rpc.idle_timeout": _POSITIVE,
    "rpc.max_message": (lambda v: v >= 1024, "at least 1024"),
    "supervisor.backoff_initial": _POSITIVE,
    "supervisor.backoff_max": _POSITIVE,
    "supervisor.probe_interval": _POSITIVE,
    "supervisor.probe_timeout": _POSITIVE,
    "supervisor.command_timeout": _POSITIVE,
    "supervisor.max_operations": (lambda v: 1 <= v <= 4096, "an integer from 1 to 4096"),
    "supervisor.max_operations_per_server": (lambda v: 1 <= v <= 4096,
                                             "an integer from 1 to 4096"),
    "lvm_command": (lambda v: bool(v.strip()), "a command"),
    "iscsi.parallel_logins": (lambda v: 1 <= v <= 256, "an integer from 1 to 256"),
    "iscsi.login_retries": (lambda v: 0 <= v <= 100, "an integer from 0 to 100"),
    "iscsi.login_timeout": (lambda v: 1 <= v <= 3600, "an integer from 1 to 3600"),
    "iscsi.iscsiadm_command": (lambda v: bool(v.strip()), "a command"),
    "iscsi.inq_command": (lambda v: bool(v.strip()), "a command"),
    "iscsi.sysfs_root": (os.path.isabs, "an absolute path"),
    "managed.helper_timeout": _POSITIVE,
    "managed.helper_command": (lambda v: bool(v.strip()), "a command line"),
    "vdsm.connect_timeout": (lambda v: 0 < v <= 3600, "a number from 0 (excluded) to 3600"),
    "vdsm.disconnect_timeout": (lambda v: 0 < v <= 3600, "a number from 0 (excluded) to 3600"),
    "logging.level": (lambda v: v in LOG_LEVELS, "one of " + ", ".join(LOG_LEVELS)),
    "metrics.listen": (lambda v: v is None or _is_hostport(v), "HOST:PORT or null"),
    "rpc.tcp.listen": (lambda v: v is None or _is_hostport(v), "HOST:PORT or null"),
    "rpc.stomp.request_destinations": (
        lambda v: bool(v) and all(_is_destination(d) for d in v),
        "a non-empty list of destination names (printable, no spaces)"),
    "rpc.stomp.event_destination": (_is_destination,
                                    "a destination name (printable, no spaces)"),
}


# What each key (and each group of keys) is for: the text of vdsmconn.yaml(5), which
# vdsmconn.manpage writes from this table, the defaults and _CHECKS. Every key has an entry
# (tests/unit/test_manpages.py): a new key needs its line here.
DESCRIPTIONS: dict[str, str] = {
    "state_dir": "Directory of the SQLite database of managed connections (the desired "
                 "state; every change is synced before it is acknowledged).",
    "run_dir": "Runtime directory: the socket by default, and the links of managed volumes.",
    "mount_root": "Where mounts and localfs links are made, one directory per connection.",
    "mount_command": "The mount(8) command.",
    "umount_command": "The umount(8) command.",
    "gluster_command": "The GlusterFS CLI, asked for a volume's backup servers.",
    "lvm_command": "The lvm(8) command; vgs and lvs read block storage domains (read-only).",
    "scope_slice": "systemd slice of the scopes that FUSE mount helpers run in, so they "
                   "outlive a restart of the daemon.",
    "rpc": "The JSON-RPC 2.0 and STOMP 1.2 listeners.",
    "rpc.socket": "Path of the unix socket.",
    "rpc.socket_group": "Group allowed to connect to the unix socket (mode 0660); null: "
                        "root only.",
    "rpc.tcp": "The engine's TLS listener with client certificates: all four keys or none.",
    "rpc.tcp.listen": "HOST:PORT to listen on (e.g. 0.0.0.0:54323); null: no TCP listener.",
    "rpc.tcp.cert": "This host's certificate (PEM), which the engine verifies.",
    "rpc.tcp.key": "The private key of the certificate (PEM).",
    "rpc.tcp.ca": "CA certificate (PEM) that client certificates must be signed by.",
    "rpc.stomp": "STOMP 1.2 on both listeners, told from JSON-RPC by the first bytes.",
    "rpc.stomp.request_destinations": "Destinations whose SEND frames carry JSON-RPC "
                                      "requests.",
    "rpc.stomp.event_destination": "Destination whose subscribers get state changes.",
    "rpc.max_clients": "Clients connected at once, on all listeners.",
    "rpc.idle_timeout": "Seconds without a message before a client is dropped.",
    "rpc.max_message": "Bytes in one message (for STOMP: one frame).",
    "metrics": "The Prometheus endpoint.",
    "metrics.listen": "HOST:PORT of /metrics; null disables it.",
    "supervisor": "How connections are kept up.",
    "supervisor.backoff_initial": "Seconds before the first retry after a failure "
                                  "(jitter is added).",
    "supervisor.backoff_max": "Retries never wait longer than this many seconds.",
    "supervisor.probe_interval": "Seconds between health probes of each connection.",
    "supervisor.probe_timeout": "A probe that does not return within this many seconds "
                                "makes its connection stuck.",
    "supervisor.command_timeout": "Deadline in seconds of every external command "
                                  "(mount, iscsiadm...).",
    "supervisor.max_operations": "Connects, disconnects and recoveries running at once, "
                                 "in all.",
    "supervisor.max_operations_per_server": "The same on one remote server (or, for "
                                            "connections with no server, of one type), so "
                                            "one dead server cannot starve the others.",
    "iscsi": "iSCSI sessions.",
    "iscsi.parallel_logins": "iSCSI logins running at once.",
    "iscsi.login_retries": "node.session.initial_login_retry_max of node records (the "
                           "daemon retries by itself).",
    "iscsi.login_timeout": "node.conn[0].timeo.login_timeout of node records, in seconds.",
    "iscsi.iscsiadm_command": "The iscsiadm(8) command.",
    "iscsi.inq_command": "iscsi-inq from libiscsi-bin: a userspace login for "
                         "testStorageServer.",
    "iscsi.sysfs_root": "Where iscsi_session and network devices are read.",
    "managed": "Managed block volumes, attached through os-brick in a helper process.",
    "managed.multipath": "Whether os-brick uses multipath; the same setting is kept with "
                         "each attachment and used to detach it.",
    "managed.helper_timeout": "Deadline in seconds of one os-brick helper call.",
    "managed.helper_command": "Command line of the os-brick helper; null: this Python "
                              "with -m vdsmconn.host.brick_helper.",
    "managed.my_ip": "This host's address in getConnectorInfo; null: found out.",
    "vdsm": "VDSM's verbs (StoragePool.connectStorageServer...): how long a call waits for "
            "its connections. Keep both below the engine's command timeout (vdsTimeout, "
            "180 s by default).",
    "vdsm.connect_timeout": "Seconds to wait for connected or a failure; past it a "
                            "connection's status is 480.",
    "vdsm.disconnect_timeout": "Seconds to wait for the teardown of connections no other "
                               "CID uses.",
    "logging": "The log, written to standard error (the journal under systemd).",
    "logging.level": "One of " + ", ".join(LOG_LEVELS) + "; debug logs every RPC call.",
}


@dataclass(frozen=True)
class KeyInfo:
    """One configuration key as the man page shows it."""

    name: str  # dotted: rpc.tcp.listen
    type: str  # the field's annotation: "str | None"
    default: Any  # None for a group
    expected: str | None  # what _CHECKS asks for beyond the type
    group: bool


def key_infos(obj: Any = None, prefix: str = "") -> list[KeyInfo]:
    """Every key and group of keys, in declaration order, with its default."""
    obj = Config() if obj is None else obj
    found: list[KeyInfo] = []
    for f in dataclasses.fields(obj):
        name, value = prefix + f.name, getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            found.append(KeyInfo(name, f.name, None, None, True))
            found.extend(key_infos(value, name + "."))
        else:
            check = _CHECKS.get(name)
            found.append(KeyInfo(name, str(f.type), value, check[1] if check else None, False))
    return found


def _is_hostport(value: str) -> bool:
    try:
        host, port = address.split(value)
    except ValueError:
        return False
    return bool(host) and 0 < port < 65536


T = TypeVar("T")


def _coerce(path: str, expected: Any, value: Any, source: str) -> Any:
    """Check `value` against the field type text `expected` (dataclass annotations are text)."""
    optional = expected.endswith("| None")
    base = expected.removesuffix("| None").strip()
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {path}: must not be null")
    if base == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if base == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base == "str" and isinstance(value, str):
        return value
    if base == "bool" and isinstance(value, bool):
        return value
    if base == "tuple[str, ...]" and isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(f"{source}: {path}[{i}]: expected str, "
                                  f"got {type(item).__name__} {item!r}")
        return tuple(value)
    if base == "tuple[str, ...]":
        base = "a list of str"
    raise ConfigError(f"{source}: {path}: expected {base}, got {type(value).__name__} {value!r}")


def _merge(obj: T, data: Any, source: str, prefix: str = "") -> T:
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"{source}: {where}: expected a mapping")
    known = {f.name: f for f in dataclasses.fields(obj)}  # type: ignore[arg-type]
    changes: dict[str, Any] = {}
    for name, value in data.items():
        path = f"{prefix}{name}"
        if name not in known:
            raise ConfigError(f"{source}: unknown key {path!r}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            changes[name] = _merge(current, value, source, f"{path}.")
            continue
        value = _coerce(path, str(known[name].type), value, source)
        check = _CHECKS.get(path)
        if check is not None and value is not None and not check[0](value):
            raise ConfigError(f"{source}: {path}: expected {check[1]}, got {value!r}")
        changes[name] = value
    return dataclasses.replace(obj, **changes)  # type: ignore[type-var]


def load_text(text: str, source: str, base: Config | None = None) -> Config:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    config = base or Config()
    if data is None:
        return config
    config = _merge(config, data, source)
    if config.supervisor.backoff_initial > config.supervisor.backoff_max:
        raise ConfigError(f"{source}: supervisor.backoff_initial is above backoff_max")
    return config


def load(path: str | None = None, base: Config | None = None) -> Config:
    """The effective configuration: `path` alone if given, else defaults + /etc files."""
    files = [Path(path)] if path else _system_files()
    config = base or Config()
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{f}: cannot read: {e.strerror}") from None
        config = load_text(text, str(f), config)
    return config


def check_complete(config: Config) -> None:
    """Checks across keys that may come from different files, once all are merged."""
    sup = config.supervisor
    if sup.max_operations_per_server > sup.max_operations:
        raise ConfigError(f"supervisor.max_operations_per_server"
                          f" ({sup.max_operations_per_server})"
                          f" is above supervisor.max_operations ({sup.max_operations})")
    stomp = config.rpc.stomp
    if stomp.event_destination in stomp.request_destinations:
        raise ConfigError(f"rpc.stomp.event_destination ({stomp.event_destination}) is also "
                          "in rpc.stomp.request_destinations")
    tcp = config.rpc.tcp
    if tcp.listen is not None:
        for name in ("cert", "key", "ca"):
            if not getattr(tcp, name):
                raise ConfigError(f"rpc.tcp.{name}: required when rpc.tcp.listen is set "
                                  "(TLS with client certificates)")


def _system_files() -> list[Path]:
    files = [MAIN_FILE] if MAIN_FILE.exists() else []
    files.extend(Path(p) for p in sorted(glob.glob(DROPIN_GLOB)))
    return files


def local(folder: str) -> Config:
    """The embedded default for a trial run: everything in one local folder, no metrics."""
    root = os.path.abspath(folder)
    return dataclasses.replace(
        Config(),
        state_dir=f"{root}/state",
        run_dir=f"{root}/run",
        mount_root=f"{root}/mnt",
        rpc=RpcConfig(socket=f"{root}/run/vdsmconn.sock", socket_group=None),
        metrics=MetricsConfig(listen=None),
    )


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def host_settings(config: Config) -> HostSettings:
    """What the connectors get of the configuration (they never see all of it)."""
    sup, iscsi, managed = config.supervisor, config.iscsi, config.managed
    return HostSettings(
        state_dir=config.state_dir, run_dir=config.run_dir, mount_root=config.mount_root,
        mount_command=config.mount_command, umount_command=config.umount_command,
        gluster_command=config.gluster_command, scope_slice=config.scope_slice,
        probe_timeout=sup.probe_timeout, command_timeout=sup.command_timeout,
        iscsi=IscsiSettings(
            parallel_logins=iscsi.parallel_logins, login_retries=iscsi.login_retries,
            login_timeout=iscsi.login_timeout, iscsiadm_command=iscsi.iscsiadm_command,
            inq_command=iscsi.inq_command, sysfs_root=iscsi.sysfs_root),
        managed=ManagedSettings(
            multipath=managed.multipath, helper_timeout=managed.helper_timeout,
            helper_command=managed.helper_command, my_ip=managed.my_ip),
    )
