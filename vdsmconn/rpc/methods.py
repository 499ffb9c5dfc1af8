"""The verb table: wire names and parameters -> the service. Parameters are checked here."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from vdsmconn import errors
from vdsmconn.model import Secret
from vdsmconn.rpc import params, vdsm
from vdsmconn.rpc.jsonrpc import Method, Session
from vdsmconn.service import Service
from vdsmconn.status import StateEvent, StatusView

log = logging.getLogger(__name__)

EVENTS = ("storageServerStateChanged",)
MAX_WAIT = 86400.0

Handler = Callable[[dict[str, Any], Session], Awaitable[Any]]


def _method(
    name: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> Callable[[Handler], Method]:
    def wrap(fn: Handler) -> Method:
        return Method(name=name, params=required + optional, required=frozenset(required),
                      handler=fn)
    return wrap


class Subscriptions:
    """Which sessions want which events; a closed session drops out by itself."""

    def __init__(self, service: Service) -> None:
        self._sessions: weakref.WeakKeyDictionary[Session, set[str]] = (
            weakref.WeakKeyDictionary()
        )
        service.subscribe_changes(self._publish)

    def add(self, session: Session, events: list[str]) -> list[str]:
        current = self._sessions.setdefault(session, set())
        current.update(events)
        return sorted(current)

    def remove(self, session: Session, events: list[str]) -> list[str]:
        current = self._sessions.get(session, set())
        current.difference_update(events)
        return sorted(current)

    def _publish(self, event: StateEvent) -> None:
        body = None
        for session, events in list(self._sessions.items()):
            if "storageServerStateChanged" in events:
                body = body or event.to_wire()
                session.notify("storageServerStateChanged", body)


def _events(value: Any) -> list[str]:
    names = params.get_str_list(value, "events")
    for i, name in enumerate(names):
        if name not in EVENTS:
            raise params.bad_value(f"events[{i}]", f"unknown event {name!r}")
    return names


def _cids(p: dict[str, Any]) -> list[str] | None:
    """The optional `connectionIDs` list of a request."""
    if p.get("connectionIDs") is None:
        return None
    return [params.get_cid(c, f"connectionIDs[{i}]")
            for i, c in enumerate(params.get_str_list(p["connectionIDs"], "connectionIDs"))]


def _wire(statuses: dict[str, StatusView]) -> dict[str, dict[str, Any]]:
    """Statuses on the wire; CIDs of one key share one status (and its dict)."""
    shown: dict[int, dict[str, Any]] = {}
    out = {}
    for cid, view in statuses.items():
        wire = shown.get(id(view))
        if wire is None:
            wire = shown[id(view)] = view.to_wire()
        out[cid] = wire
    return out


def build(service: Service) -> list[Method]:
    subs = Subscriptions(service)

    @_method("manageStorageServer", ("connectionID", "connection"))
    async def manage(p: dict[str, Any], s: Session) -> Any:
        cid = params.get_cid(p["connectionID"])
        return await service.manage(cid, params.parse_connection(p["connection"]))

    @_method("unmanageStorageServer", (), ("connectionID", "prefix"))
    async def unmanage(p: dict[str, Any], s: Session) -> Any:
        if ("connectionID" in p) == ("prefix" in p):
            raise errors.InvalidParams("give exactly one of connectionID and prefix",
                                       {"field": "connectionID"})
        if "prefix" in p:
            prefix = params.get_str(p["prefix"], "prefix")
            if not prefix:
                raise params.bad_value("prefix", "must not be empty")
            return await service.unmanage(None, prefix)
        return await service.unmanage(params.get_cid(p["connectionID"]), None)

    @_method("getStorageServerList", (), ("connectionIDs", "prefix", "includeUnmanaged"))
    async def get_list(p: dict[str, Any], s: Session) -> Any:
        cids = _cids(p)
        prefix = p.get("prefix")
        if prefix is not None:
            prefix = params.get_str(prefix, "prefix")
        unmanaged = params.get_bool(p.get("includeUnmanaged", True), "includeUnmanaged")
        return _wire(await service.list_status(cids, prefix, unmanaged))

    @_method("waitStorageServer", ("connectionIDs", "timeout"), ("until",))
    async def wait(p: dict[str, Any], s: Session) -> Any:
        cids = [params.get_cid(c, f"connectionIDs[{i}]")
                for i, c in enumerate(params.get_str_list(p["connectionIDs"], "connectionIDs"))]
        if not cids:
            raise params.bad_value("connectionIDs", "must not be empty")
        timeout = params.get_number(p["timeout"], "timeout", 0, MAX_WAIT)
        until = params.get_str(p.get("until", "connected"), "until")
        if until not in ("connected", "error"):
            raise params.bad_value("until", "must be connected or error")
        return _wire(await service.wait(cids, timeout, until))

    @_method("updateStorageServer", ("connectionID", "connection"))
    async def update(p: dict[str, Any], s: Session) -> Any:
        cid = params.get_cid(p["connectionID"])
        return await service.update(cid, params.parse_connection(p["connection"]))

    @_method("testStorageServer", ("connection",), ("timeout",))
    async def test(p: dict[str, Any], s: Session) -> Any:
        spec = params.parse_connection(p["connection"])
        timeout = params.get_number(p.get("timeout", 30), "timeout", 0.1, 3600)
        return (await service.test(spec, timeout)).to_wire()

    @_method("getHostInfo", ())
    async def host_info(p: dict[str, Any], s: Session) -> Any:
        return service.host_info()

    @_method("discoverSendTargets", ("host",), ("port", "user", "password", "ipv6_enabled"))
    async def discover(p: dict[str, Any], s: Session) -> Any:
        host = params.get_text(p["host"], "host", max_len=255)
        port = params.get_int(p.get("port", 3260), "port", 1, 65535)
        user = None if p.get("user") is None else params.get_text(p["user"], "user")
        password = None if p.get("password") is None else Secret(
            params.get_str(p["password"], "password"))
        ipv6 = params.get_bool(p.get("ipv6_enabled", False), "ipv6_enabled")
        return [t.to_wire() for t in await service.discover(host, port, user, password, ipv6)]

    @_method("getDeviceList", (), ("connectionIDs",))
    async def device_list(p: dict[str, Any], s: Session) -> Any:
        return (await service.inventory.devices(_cids(p))).to_wire()

    @_method("getStorageDomainList", (), ("connectionIDs",))
    async def domain_list(p: dict[str, Any], s: Session) -> Any:
        return (await service.inventory.domains(_cids(p))).to_wire()

    @_method("getConnectorInfo", (), ("refresh",))
    async def connector_info(p: dict[str, Any], s: Session) -> Any:
        refresh = params.get_bool(p.get("refresh", False), "refresh")
        return await service.connector_info(refresh)

    @_method("subscribe", ("events",))
    async def subscribe(p: dict[str, Any], s: Session) -> Any:
        return {"events": subs.add(s, _events(p["events"]))}

    @_method("unsubscribe", ("events",))
    async def unsubscribe(p: dict[str, Any], s: Session) -> Any:
        return {"events": subs.remove(s, _events(p["events"]))}

    return [manage, unmanage, get_list, wait, update, test, host_info, discover,
            device_list, domain_list, connector_info, subscribe, unsubscribe,
            *vdsm.build(service)]
