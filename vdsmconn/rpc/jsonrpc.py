"""JSON-RPC 2.0 (https://www.jsonrpc.org/specification): parse, validate, bind, call, encode.

Protocol only: bytes in, bytes out. Transports live in server.py. Every failure becomes a wire
error through `errors.to_wire`; protocol faults (-32700, -32600, -32601, -32602) are decided
here before a handler runs, so a bug inside a method is never reported as "invalid params".
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from vdsmconn import errors

log = logging.getLogger(__name__)

VERSION = "2.0"


class Session(Protocol):
    """What a handler knows about the client that called it."""

    @property
    def peer(self) -> str:
        """A description of the client for log lines (e.g. "pid=42 uid=0")."""
        ...

    def notify(self, method: str, params: dict[str, Any]) -> None:
        """Queue a JSON-RPC notification to this client; never blocks."""
        ...


Handler = Callable[[dict[str, Any], Session], Awaitable[Any]]
# Told of every request to a known method: its name, its result code (0: success; the
# error's code) and its duration in seconds.
Observer = Callable[[str, int, float], None]


@dataclass(frozen=True)
class Method:
    """One entry of the method table. `params` lists every name, in positional order."""

    name: str
    params: tuple[str, ...]
    required: frozenset[str]
    handler: Handler
    names: frozenset[str] = field(init=False, repr=False, compare=False)  # of params

    def __post_init__(self) -> None:
        unknown = self.required - set(self.params)
        if unknown:
            raise ValueError(f"{self.name}: required {sorted(unknown)} not in params")
        if len(set(self.params)) != len(self.params):
            raise ValueError(f"{self.name}: duplicate parameter names")
        object.__setattr__(self, "names", frozenset(self.params))

    def bind(self, params: dict[str, Any] | list[Any] | None) -> dict[str, Any]:
        """Map positional or named params to names; InvalidParams names the field."""
        if params is None:
            given: dict[str, Any] = {}
        elif isinstance(params, list):
            if len(params) > len(self.params):
                raise errors.InvalidParams(
                    f"Invalid params: {self.name} takes at most {len(self.params)} "
                    f"positional parameters, {len(params)} given"
                )
            given = dict(zip(self.params, params, strict=False))
        else:
            if not self.names.issuperset(params):
                unknown = [name for name in params if name not in self.names]
                raise errors.InvalidParams(
                    f"Invalid params: unknown parameter {_names(unknown)}",
                    data={"fields": unknown},
                )
            given = dict(params)
        if not self.required.issubset(given):
            missing = [name for name in self.params
                       if name in self.required and name not in given]
            raise errors.InvalidParams(
                f"Invalid params: missing required parameter {_names(missing)}",
                data={"fields": missing},
            )
        return given


def _names(names: list[str]) -> str:
    return ", ".join(repr(name) for name in names)


class _RawFloat(float):
    """A JSON number with a fraction or exponent that remembers its text, so an id made of
    one is echoed exactly (1.50 stays 1.50, 1e400 stays 1e400)."""

    raw: str

    def __new__(cls, text: str) -> _RawFloat:
        self = super().__new__(cls, text)
        self.raw = text
        return self


class _Parsed:
    """A request whose envelope is valid."""

    __slots__ = ("id", "method", "notification", "params")

    def __init__(self, message: dict[str, Any]) -> None:
        self.notification = "id" not in message
        self.id = message.get("id")
        self.method: str = message["method"]
        self.params: dict[str, Any] | list[Any] | None = message.get("params")


_Item = _Parsed | bytes  # a request to run, or a reply already decided


class Dispatcher:
    """Turns one JSON-RPC message (a request or a batch) into its reply."""

    def __init__(self, methods: Iterable[Method], *, batch_concurrency: int = 32,
                 observe: Observer | None = None) -> None:
        self._methods: dict[str, Method] = {}
        for method in methods:
            if method.name in self._methods:
                raise ValueError(f"method {method.name!r} registered twice")
            self._methods[method.name] = method
        self._batch_concurrency = batch_concurrency
        self._observe = observe

    async def handle(self, data: bytes, session: Session) -> bytes | None:
        """The encoded reply to `data`, or None when nothing is to be sent back."""
        try:
            message = _loads(data)
        except errors.ParseError as exc:
            return encode_error(exc)
        if not isinstance(message, list):
            item = _check(message)
            return item if isinstance(item, bytes) else await self._run(item, session)
        if not message:
            return encode_error(errors.InvalidRequest("Invalid Request: empty batch"))
        replies = await self._run_batch([_check(member) for member in message], session)
        if not replies:
            return None
        return b"[" + b",".join(replies) + b"]"

    async def _run_batch(self, items: list[_Item], session: Session) -> list[bytes]:
        """Run the members concurrently (at most batch_concurrency at once); replies in any
        order. Each member catches its own failures, so one never affects the others."""
        replies = [item for item in items if isinstance(item, bytes)]
        todo = iter([item for item in items if isinstance(item, _Parsed)])

        async def worker() -> None:
            for request in todo:
                reply = await self._run(request, session)
                if reply is not None:
                    replies.append(reply)

        async with asyncio.TaskGroup() as tg:
            for _ in range(min(self._batch_concurrency, len(items))):
                tg.create_task(worker())
        return replies

    async def _run(self, request: _Parsed, session: Session) -> bytes | None:
        method = self._methods.get(request.method)
        start = time.monotonic()
        code = 0
        try:
            if method is None:
                raise errors.MethodNotFound(f"Method not found: {request.method!r}")
            params = method.bind(request.params)
            log.debug("CALL peer=%s method=%s id=%r", session.peer, request.method, request.id)
            result = await method.handler(params, session)
        except Exception as exc:
            code = exc.code if isinstance(exc, errors.Error) else errors.GeneralError.code
            if not request.notification:
                return encode_error(exc, request.id)
            if isinstance(exc, errors.Error):
                log.warning(
                    "NOTIFICATION FAILED peer=%s method=%s code=%s message=%s",
                    session.peer, request.method, exc.code, exc.message,
                )
            else:
                errors.to_wire(exc)  # logs the traceback; a notification gets no reply
            return None
        finally:
            if method is not None and self._observe is not None:
                self._observe(method.name, code, time.monotonic() - start)
        return None if request.notification else _encode_result(result, request.id)


def encode_notification(method: str, params: dict[str, Any]) -> bytes:
    """A notification message (no id). Raises TypeError/ValueError if params are not JSON."""
    return _dumps({"jsonrpc": VERSION, "method": method, "params": params})


def encode_error(exc: BaseException, request_id: Any = None) -> bytes:
    """An error response for `exc` (through errors.to_wire) to the request `request_id`."""
    return _reply("error", errors.to_wire(exc), request_id)


def _encode_result(result: Any, request_id: Any) -> bytes:
    try:
        return _reply("result", result, request_id)
    except (TypeError, ValueError) as exc:  # the handler returned something that is not JSON
        return encode_error(exc, request_id)


def _reply(member: str, value: Any, request_id: Any) -> bytes:
    """A response with the id last, exactly as received. An id that is a number with a
    fraction or an exponent is written from its text, after the rest; any other goes in
    the one encoding (a 3.5 MB list reply is not copied twice more to append it)."""
    if not isinstance(request_id, _RawFloat):
        return _dumps({"jsonrpc": VERSION, member: value, "id": request_id})
    body = _dumps({"jsonrpc": VERSION, member: value})
    return body[:-1] + b',"id":' + request_id.raw.encode("ascii") + b"}"


def _dumps(value: Any) -> bytes:
    # orjson encodes a 10,000-CID list reply in a sixteenth of json's time (docs/performance.md);
    # what it refuses (integers beyond 64 bits, lone surrogates) takes json.
    try:
        return orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):
        return _json_dumps(value)


def _json_dumps(value: Any) -> bytes:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate came in as "\ud800": send it escaped
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("ascii")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Made once: json.loads with arguments makes a new decoder on every call.
_DECODER = json.JSONDecoder(parse_float=_RawFloat, parse_constant=_reject_constant)


def _loads(data: bytes) -> Any:
    """Parse strict UTF-8 JSON; any failure is a ParseError."""
    try:
        text = data.decode("utf-8")
        return _DECODER.decode(text)
    except UnicodeDecodeError as exc:
        raise errors.ParseError(f"Parse error: invalid UTF-8 at byte {exc.start}") from None
    except RecursionError:
        raise errors.ParseError("Parse error: nesting too deep") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, too many digits
        raise errors.ParseError(f"Parse error: {exc}") from None


def _valid_id(value: Any) -> bool:
    return value is None or (
        isinstance(value, str | int | float) and not isinstance(value, bool)
    )


def _check(message: Any) -> _Item:
    """A valid request, or the -32600 reply for an invalid one. The id is echoed when it
    could be read; otherwise (not an object, id not a string/number/null) it is null."""
    if not isinstance(message, dict):
        return encode_error(errors.InvalidRequest("Invalid Request: not an object"))
    request_id = message.get("id")
    if not _valid_id(request_id):
        return encode_error(
            errors.InvalidRequest("Invalid Request: id must be a string, a number or null")
        )
    problem = None
    if message.get("jsonrpc") != VERSION:
        problem = 'jsonrpc must be "2.0"'
    elif not isinstance(message.get("method"), str):
        problem = "method must be a string"
    elif not isinstance(message.get("params", {}), dict | list):
        problem = "params must be an object or an array"
    if problem:
        return encode_error(errors.InvalidRequest(f"Invalid Request: {problem}"), request_id)
    return _Parsed(message)
