"""vdsmconnd: wiring only. Build the parts, run them, stop them in order."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from pathlib import Path

from vdsmconn import __version__, config, connectors, errors, logs, metrics, systemd
from vdsmconn.clock import Clock
from vdsmconn.connectors.base import HostContext
from vdsmconn.connectors.iscsi import IscsiConnector
from vdsmconn.connectors.managed import ManagedConnector
from vdsmconn.connectors.mount import read_mounts
from vdsmconn.host.command import CommandRunner
from vdsmconn.model import ConnectionKey, ConnectionSpec
from vdsmconn.monitors import netlink, udev
from vdsmconn.monitors.mountinfo import MountinfoWatcher
from vdsmconn.reconcile.reconciler import Reconciler
from vdsmconn.rpc import jsonrpc, methods, params, stomp
from vdsmconn.rpc.server import Limits, TlsServer, UnixServer, tls_context
from vdsmconn.service import Service
from vdsmconn.state.actual import ActualState
from vdsmconn.state.desired import DesiredState
from vdsmconn.state.store import DeleteTeardown, Store

log = logging.getLogger("vdsmconn")


class Daemon:
    def __init__(self, cfg: config.Config) -> None:
        self.config = cfg
        self.clock = Clock()
        self.stop = asyncio.Event()

    async def load_desired(self, store: Store) -> DesiredState:
        desired = DesiredState()
        for row in await store.load():
            try:
                spec = params.parse_connection(row.connection)
            except errors.Error as e:
                # Kept on disk untouched; an operator can unmanage it. Never torn down here.
                log.error("LOAD cid=%s unreadable connection, not supervised: %s",
                          row.cid, e.message)
                continue
            desired.apply_put(row.cid, spec)
        return desired

    async def load_teardowns(
        self, store: Store, desired: DesiredState,
    ) -> dict[ConnectionKey, ConnectionSpec]:
        """Keys left without a CID before the daemon could disconnect them."""
        found: dict[ConnectionKey, ConnectionSpec] = {}
        done = []
        for text, connection in (await store.load_teardowns()).items():
            try:
                key, spec = ConnectionKey.parse(text), params.parse_connection(connection)
            except (ValueError, errors.Error):
                log.error("LOAD teardown key=%s unreadable, left alone", text)
                continue
            if desired.refs(key):
                done.append(DeleteTeardown(text))  # managed again: nothing to tear down
            else:
                found[key] = spec
        await store.commit(done)
        return found

    async def run(self) -> None:
        cfg = self.config
        for path in (cfg.run_dir, cfg.mount_root):
            await asyncio.to_thread(os.makedirs, path, 0o755, True)
        store = Store(Path(cfg.state_dir))
        await store.open()
        runner = CommandRunner()
        watcher = MountinfoWatcher()
        server: UnixServer | None = None
        tls: TlsServer | None = None
        endpoint: stomp.Endpoint | None = None
        scrape: metrics.MetricsServer | None = None
        reconciler: Reconciler | None = None
        service: Service | None = None
        status: systemd.StatusReporter | None = None
        try:
            desired = await self.load_desired(store)
            actual = ActualState()
            measure = metrics.Metrics(desired, actual)
            mounts = await read_mounts()
            actual.set_mounts(mounts)
            host = HostContext(config.host_settings(cfg), runner, actual.host, self.clock,
                               attachments=store)
            table = connectors.build(host)
            managed = table["managed"]
            if isinstance(managed, ManagedConnector):
                await managed.load()  # attachment records, so adoption starts as uncertain
            # Operations start in the supervisors only: they get the timed connectors.
            reconciler = Reconciler(cfg, desired, actual, measure.instrument(table), self.clock)
            service = Service(cfg, store, desired, actual, reconciler, table, self.clock,
                              runner)
            status = systemd.StatusReporter(measure.status_line)
            actual.listen(lambda _change: status.changed() if status else None)
            log.info("START version=%s cids=%d keys=%d mount_root=%s", __version__,
                     len(desired), len(desired.all_keys()), cfg.mount_root)
            reconciler.start(mounts, await self.load_teardowns(store, desired))
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(watcher.run(
                    lambda _: reconciler.on_mounts(watcher.table.mounts())))
                iscsi = table["iscsi"]
                if isinstance(iscsi, IscsiConnector) and (why := netlink.available()) is None:
                    def on_link(event: netlink.LinkEvent) -> None:
                        # Down: that path is marked down; up: its missing session logs in.
                        for key in iscsi.link_changed(event.name, event.up):
                            reconciler.kick(key, suspect=True)
                    tasks.create_task(netlink.LinkWatcher(cfg.iscsi.sysfs_root).run(on_link))
                elif why:
                    log.warning("NETLINK not watching links: %s", why)
                if (why := udev.available()) is None:
                    host.devices.watched = True

                    def on_device(_event: udev.DeviceEvent) -> None:
                        host.devices.changed()  # a connect waiting for its LUNs looks again
                        reconciler.on_devices()
                    tasks.create_task(udev.UdevWatcher().run(on_device))
                else:
                    log.warning("UDEV not watching block devices: %s", why)
                dispatcher = jsonrpc.Dispatcher(methods.build(service),
                                                observe=measure.rpc_request)
                limits = Limits(max_message=cfg.rpc.max_message,
                                idle_timeout=cfg.rpc.idle_timeout,
                                max_clients=cfg.rpc.max_clients)
                endpoint = stomp.Endpoint(
                    stomp.Destinations(cfg.rpc.stomp.request_destinations,
                                       cfg.rpc.stomp.event_destination),
                    service.subscribe_changes, self.clock.monotonic)
                server = UnixServer(dispatcher, cfg.rpc.socket, group=cfg.rpc.socket_group,
                                    limits=limits, stomp=endpoint)
                await server.start()
                tcp = cfg.rpc.tcp
                if tcp.listen and tcp.cert and tcp.key and tcp.ca:
                    tls = TlsServer(dispatcher, tcp.listen, tls_context(tcp.cert, tcp.key, tcp.ca),
                                    limits=limits, stomp=endpoint)
                    await tls.start()
                if cfg.metrics.listen:
                    scrape = metrics.MetricsServer(measure, cfg.metrics.listen)
                    await asyncio.to_thread(scrape.start)
                status.ready()
                interval = systemd.watchdog_interval()
                if interval:
                    tasks.create_task(systemd.watchdog(interval))
                log.info("READY socket=%s", cfg.rpc.socket)
                await self.stop.wait()
                systemd.notify("STOPPING=1")
                log.info("STOPPING: connections stay as they are")
                raise _Stop
        except* _Stop:
            log.debug("task group ended by the stop signal")
        finally:
            if status is not None:
                status.close()
            if scrape is not None:
                await asyncio.to_thread(scrape.close)
            if tls is not None:
                await tls.close()
            if server is not None:
                await server.close()
            if endpoint is not None:
                endpoint.close()
            if service is not None:
                # Changes whose clients went away still finish (and reach the disk).
                await service.drain(cfg.supervisor.command_timeout)
            if reconciler is not None:
                await reconciler.close()
            await runner.close()
            await store.close()
            log.info("STOPPED")


class _Stop(Exception):
    """Ends the daemon's task group on a stop signal."""


def setup_logging(level: str) -> None:
    # The format shows none of these, and every request logs a line: not looking for the
    # caller's frame, thread and process saves a third of the cost of a line (the logging
    # HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.setLogRecordFactory(logs.Record)
    logging.basicConfig(level=getattr(logging, level.upper()),
                        handlers=[logs.LineHandler(sys.stderr)])


def tune_gc() -> None:
    """Collect young objects after 10,000 net allocations, not 700. The daemon allocates
    much and keeps little (requests, state changes): at the default, the bench's connect and
    group-commit phases spent about a second in the collector, most of it in full
    collections of 70 ms each (the whole state is the heap they walk); at 10,000, 0.15 s
    and no full collection. Garbage in cycles waits a little longer for a collection."""
    gc.set_threshold(10_000, 10, 10)


def build_parser() -> argparse.ArgumentParser:
    """The command line of vdsmconnd (also the source of its man page, vdsmconn.manpage)."""
    parser = argparse.ArgumentParser(prog="vdsmconnd", description="vdsmconn daemon")
    parser.add_argument("-c", "--config", help="configuration file (instead of /etc/vdsmconn)")
    parser.add_argument("--local", metavar="DIR",
                        help="trial run: state, socket and mount root in DIR, no config needed")
    parser.add_argument("--show-config", action="store_true",
                        help="print the effective configuration and exit")
    parser.add_argument("--version", action="version", version=__version__)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.local:
            base = config.local(args.local)
            cfg = config.load(args.config, base) if args.config else base
        else:
            cfg = config.load(args.config)
        config.check_complete(cfg)
    except config.ConfigError as e:
        print(f"vdsmconnd: configuration error: {e}", file=sys.stderr)
        return 2
    if args.show_config:
        print(config.dump(cfg), end="")
        return 0
    setup_logging(cfg.logging.level)
    tune_gc()
    return asyncio.run(_main(cfg))


async def _main(cfg: config.Config) -> int:
    daemon = Daemon(cfg)
    loop = asyncio.get_running_loop()
    # Children are reaped through pidfds on the loop; Python 3.11's default watcher starts a
    # thread per child, which made spawning mount commands the bottleneck of many connects.
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(loop)
    asyncio.set_child_watcher(watcher)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop.set)
    try:
        await daemon.run()
    except Exception as e:
        log.critical("daemon failed: %s", e, exc_info=not isinstance(e, errors.Error | OSError))
        return 1
    return 0
