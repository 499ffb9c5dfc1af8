"""JSON-RPC 2.0 protocol: the specification's own examples, ids, binding, errors."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from vdsmconn import errors
from vdsmconn.rpc.jsonrpc import Dispatcher, Method, Session, encode_error, encode_notification


class FakeSession:
    peer = "test"

    def __init__(self) -> None:
        self.notifications: list[tuple[str, dict[str, Any]]] = []

    def notify(self, method: str, params: dict[str, Any]) -> None:
        self.notifications.append((method, params))


class Calls:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.gate = asyncio.Event()


def method(
    name: str,
    params: tuple[str, ...],
    required: tuple[str, ...] = (),
    *,
    calls: Calls,
    body: Any = None,
) -> Method:
    async def handler(args: dict[str, Any], session: Session) -> Any:
        calls.seen.append((name, args))
        return await body(args, session) if body else None

    return Method(name, params, frozenset(required), handler)


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def dispatcher(calls: Calls) -> Dispatcher:
    async def subtract(args: dict[str, Any], session: Session) -> Any:
        return args["minuend"] - args["subtrahend"]

    async def add(args: dict[str, Any], session: Session) -> Any:
        return sum(args.values())

    async def get_data(args: dict[str, Any], session: Session) -> Any:
        return ["hello", 5]

    async def echo(args: dict[str, Any], session: Session) -> Any:
        return args["value"]

    async def mount(args: dict[str, Any], session: Session) -> Any:
        raise errors.MountError("mount failed: access denied", data={"rc": 32})

    async def crash(args: dict[str, Any], session: Session) -> Any:
        raise RuntimeError("secret internals in Traceback")

    async def unencodable(args: dict[str, Any], session: Session) -> Any:
        return {1, 2}

    async def wait_gate(args: dict[str, Any], session: Session) -> Any:
        await calls.gate.wait()
        return "opened"

    async def open_gate(args: dict[str, Any], session: Session) -> Any:
        calls.gate.set()
        return "open"

    async def notify_me(args: dict[str, Any], session: Session) -> Any:
        session.notify("event", {"n": args["n"]})
        return session.peer

    return Dispatcher(
        [
            method(
                "subtract",
                ("minuend", "subtrahend"),
                ("minuend", "subtrahend"),
                calls=calls,
                body=subtract,
            ),
            method("sum", ("a", "b", "c"), calls=calls, body=add),
            method("update", ("a", "b", "c", "d", "e"), calls=calls),
            method("notify_hello", ("value",), calls=calls),
            method("notify_sum", ("a", "b", "c"), calls=calls, body=add),
            method("get_data", (), calls=calls, body=get_data),
            method("echo", ("value",), ("value",), calls=calls, body=echo),
            method("mount", (), calls=calls, body=mount),
            method("crash", (), calls=calls, body=crash),
            method("unencodable", (), calls=calls, body=unencodable),
            method("wait_gate", (), calls=calls, body=wait_gate),
            method("open_gate", (), calls=calls, body=open_gate),
            method("notify_me", ("n",), ("n",), calls=calls, body=notify_me),
        ]
    )


async def call(dispatcher: Dispatcher, request: str | bytes, session: Any = None) -> Any:
    data = request.encode() if isinstance(request, str) else request
    reply = await dispatcher.handle(data, session or FakeSession())
    return None if reply is None else json.loads(reply)


def by_id(replies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(replies, key=lambda reply: json.dumps(reply["id"]))


def error(code: int, request_id: Any = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "error": {"code": code}, "id": request_id}


def strip_messages(reply: dict[str, Any]) -> dict[str, Any]:
    if "error" in reply:
        reply = {**reply, "error": {"code": reply["error"]["code"]}}
    return reply


# The specification's examples (section 7).


async def test_positional_params(dispatcher: Dispatcher) -> None:
    assert await call(
        dispatcher, '{"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}'
    ) == {"jsonrpc": "2.0", "result": 19, "id": 1}
    assert await call(
        dispatcher, '{"jsonrpc": "2.0", "method": "subtract", "params": [23, 42], "id": 2}'
    ) == {"jsonrpc": "2.0", "result": -19, "id": 2}


async def test_named_params(dispatcher: Dispatcher) -> None:
    assert await call(
        dispatcher,
        '{"jsonrpc": "2.0", "method": "subtract", "params": '
        '{"subtrahend": 23, "minuend": 42}, "id": 3}',
    ) == {"jsonrpc": "2.0", "result": 19, "id": 3}
    assert await call(
        dispatcher,
        '{"jsonrpc": "2.0", "method": "subtract", "params": '
        '{"minuend": 42, "subtrahend": 23}, "id": 4}',
    ) == {"jsonrpc": "2.0", "result": 19, "id": 4}


async def test_notification_runs_without_reply(dispatcher: Dispatcher, calls: Calls) -> None:
    assert (
        await call(dispatcher, '{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}')
        is None
    )
    assert await call(dispatcher, '{"jsonrpc": "2.0", "method": "foobar"}') is None
    assert calls.seen == [("update", {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5})]


async def test_nonexistent_method(dispatcher: Dispatcher) -> None:
    reply = await call(dispatcher, '{"jsonrpc": "2.0", "method": "foobar", "id": "1"}')
    assert strip_messages(reply) == error(-32601, "1")
    assert "foobar" in reply["error"]["message"]


async def test_invalid_json(dispatcher: Dispatcher) -> None:
    reply = await call(dispatcher, '{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]')
    assert strip_messages(reply) == error(-32700)


async def test_invalid_request_object(dispatcher: Dispatcher) -> None:
    reply = await call(dispatcher, '{"jsonrpc": "2.0", "method": 1, "params": "bar"}')
    assert strip_messages(reply) == error(-32600)


async def test_batch_invalid_json(dispatcher: Dispatcher) -> None:
    reply = await call(
        dispatcher,
        '[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], '
        '"id": "1"}, {"jsonrpc": "2.0", "method"]',
    )
    assert strip_messages(reply) == error(-32700)


async def test_empty_batch_is_one_error(dispatcher: Dispatcher) -> None:
    assert strip_messages(await call(dispatcher, "[]")) == error(-32600)


async def test_invalid_batch_not_empty(dispatcher: Dispatcher) -> None:
    assert [strip_messages(r) for r in await call(dispatcher, "[1]")] == [error(-32600)]


async def test_invalid_batch(dispatcher: Dispatcher) -> None:
    replies = await call(dispatcher, "[1,2,3]")
    assert [strip_messages(r) for r in replies] == [error(-32600)] * 3


async def test_mixed_batch(dispatcher: Dispatcher) -> None:
    replies = await call(
        dispatcher,
        """[
        {"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},
        {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},
        {"jsonrpc": "2.0", "method": "subtract", "params": [42,23], "id": "2"},
        {"foo": "boo"},
        {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
        {"jsonrpc": "2.0", "method": "get_data", "id": "9"}
    ]""",
    )
    assert by_id([strip_messages(r) for r in replies]) == by_id(
        [
            {"jsonrpc": "2.0", "result": 7, "id": "1"},
            {"jsonrpc": "2.0", "result": 19, "id": "2"},
            error(-32600),
            error(-32601, "5"),
            {"jsonrpc": "2.0", "result": ["hello", 5], "id": "9"},
        ]
    )


async def test_all_notification_batch(dispatcher: Dispatcher, calls: Calls) -> None:
    assert (
        await call(
            dispatcher,
            """[
        {"jsonrpc": "2.0", "method": "notify_sum", "params": [1,2,4]},
        {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]}
    ]""",
        )
        is None
    )
    assert sorted(name for name, _ in calls.seen) == ["notify_hello", "notify_sum"]


# Ids.


@pytest.mark.parametrize(
    "raw",
    [
        "1",
        "-5",
        "0",
        "1180591620717411303424",
        "1.5",
        "1.50",
        "1e400",
        "-0.0",
        "2E-3",
        '"abc"',
        '""',
        '"\u00e9t\u00e9"',
        "null",
    ],
)
async def test_id_echoed_exactly(dispatcher: Dispatcher, raw: str) -> None:
    request = f'{{"jsonrpc":"2.0","method":"get_data","id":{raw}}}'
    reply = await dispatcher.handle(request.encode(), FakeSession())
    assert reply == f'{{"jsonrpc":"2.0","result":["hello",5],"id":{raw}}}'.encode()


async def test_id_with_lone_surrogate_is_escaped(dispatcher: Dispatcher) -> None:
    reply = await dispatcher.handle(
        b'{"jsonrpc":"2.0","method":"get_data","id":"\\ud800x"}', FakeSession()
    )
    assert reply is not None
    assert json.loads(reply)["id"] == "\ud800x"


@pytest.mark.parametrize("raw", ["true", "false", "{}", '{"a": 1}', "[]", "[1]"])
async def test_non_primitive_id_is_invalid(dispatcher: Dispatcher, raw: str) -> None:
    reply = await call(dispatcher, f'{{"jsonrpc":"2.0","method":"get_data","id":{raw}}}')
    assert strip_messages(reply) == error(-32600)


@pytest.mark.parametrize(
    "request_text",
    [
        '{"jsonrpc": "1.0", "method": "get_data", "id": 7}',
        '{"method": "get_data", "id": 7}',
        '{"jsonrpc": 2.0, "method": "get_data", "id": 7}',
        '{"jsonrpc": "2.0", "id": 7}',
        '{"jsonrpc": "2.0", "method": "get_data", "params": "x", "id": 7}',
        '{"jsonrpc": "2.0", "method": "get_data", "params": null, "id": 7}',
    ],
)
async def test_invalid_envelope_echoes_readable_id(
    dispatcher: Dispatcher, request_text: str
) -> None:
    assert strip_messages(await call(dispatcher, request_text)) == error(-32600, 7)


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xfe{}",
        b'{"jsonrpc":"2.0","method":"echo","params":["\xc3"],"id":1}',
        b'{"jsonrpc":"2.0","method":"echo","params":[NaN],"id":1}',
        b'{"jsonrpc":"2.0","method":"echo","params":[Infinity],"id":1}',
        b"[" * 100_000,
        b"",
        b"   ",
    ],
)
async def test_parse_errors(dispatcher: Dispatcher, data: bytes) -> None:
    assert strip_messages(await call(dispatcher, data)) == error(-32700)


async def test_unicode_sent_unescaped(dispatcher: Dispatcher) -> None:
    reply = await dispatcher.handle(
        '{"jsonrpc":"2.0","method":"echo","params":["d\u00e9j\u00e0 \u2713"],"id":1}'.encode(),
        FakeSession(),
    )
    assert reply == '{"jsonrpc":"2.0","result":"d\u00e9j\u00e0 \u2713","id":1}'.encode()


# Parameter binding happens before the handler runs.


async def test_unknown_param_named(dispatcher: Dispatcher, calls: Calls) -> None:
    reply = await call(
        dispatcher,
        '{"jsonrpc":"2.0","method":"subtract","params":'
        '{"minuend":1,"subtrahend":2,"bogus":3},"id":1}',
    )
    assert strip_messages(reply) == error(-32602, 1)
    assert "bogus" in reply["error"]["message"]
    assert calls.seen == []


async def test_missing_param_named(dispatcher: Dispatcher, calls: Calls) -> None:
    reply = await call(
        dispatcher, '{"jsonrpc":"2.0","method":"subtract","params":{"minuend":1},"id":1}'
    )
    assert strip_messages(reply) == error(-32602, 1)
    assert "subtrahend" in reply["error"]["message"]
    reply = await call(dispatcher, '{"jsonrpc":"2.0","method":"subtract","params":[1],"id":2}')
    assert "subtrahend" in reply["error"]["message"]
    assert calls.seen == []


async def test_too_many_positional_params(dispatcher: Dispatcher, calls: Calls) -> None:
    reply = await call(dispatcher, '{"jsonrpc":"2.0","method":"subtract","params":[1,2,3],"id":1}')
    assert strip_messages(reply) == error(-32602, 1)
    assert calls.seen == []


async def test_optional_params_left_out(dispatcher: Dispatcher, calls: Calls) -> None:
    reply = await call(dispatcher, '{"jsonrpc":"2.0","method":"sum","params":{"b":2},"id":1}')
    assert reply["result"] == 2
    assert calls.seen == [("sum", {"b": 2})]


# Handler failures.


async def test_application_error_keeps_code(dispatcher: Dispatcher) -> None:
    reply = await call(dispatcher, '{"jsonrpc":"2.0","method":"mount","id":1}')
    assert reply == {
        "jsonrpc": "2.0",
        "id": 1,
        "error": {"code": 477, "message": "mount failed: access denied", "data": {"rc": 32}},
    }


async def test_unexpected_exception_is_general_error(
    dispatcher: Dispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    reply = await dispatcher.handle(b'{"jsonrpc":"2.0","method":"crash","id":1}', FakeSession())
    assert reply is not None
    assert json.loads(reply)["error"]["code"] == 100
    assert b"Traceback" not in reply and b"secret" not in reply and b"RuntimeError" not in reply
    assert "secret internals" in caplog.text  # the details go to the log


async def test_unencodable_result_is_general_error(dispatcher: Dispatcher) -> None:
    reply = await call(dispatcher, '{"jsonrpc":"2.0","method":"unencodable","id":1}')
    assert strip_messages(reply) == error(100, 1)


async def test_notification_failure_is_logged(
    dispatcher: Dispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    assert await call(dispatcher, '{"jsonrpc":"2.0","method":"mount"}') is None
    assert await call(dispatcher, '{"jsonrpc":"2.0","method":"crash"}') is None
    assert "mount failed" in caplog.text
    assert "secret internals" in caplog.text


async def test_batch_failure_does_not_affect_others(dispatcher: Dispatcher) -> None:
    replies = await call(
        dispatcher,
        """[
        {"jsonrpc":"2.0","method":"crash","id":1},
        {"jsonrpc":"2.0","method":"echo","params":["ok"],"id":2},
        {"jsonrpc":"2.0","method":"unencodable","id":3},
        {"jsonrpc":"2.0","method":"mount","id":4}
    ]""",
    )
    assert by_id([strip_messages(r) for r in replies]) == [
        error(100, 1),
        {"jsonrpc": "2.0", "result": "ok", "id": 2},
        error(100, 3),
        error(477, 4),
    ]


async def test_batch_members_run_concurrently(dispatcher: Dispatcher) -> None:
    # wait_gate only returns once open_gate, a later member of the same batch, has run.
    replies = await asyncio.wait_for(
        call(
            dispatcher,
            """[
        {"jsonrpc":"2.0","method":"wait_gate","id":1},
        {"jsonrpc":"2.0","method":"open_gate","id":2}
    ]""",
        ),
        10,
    )
    assert by_id(replies) == [
        {"jsonrpc": "2.0", "result": "opened", "id": 1},
        {"jsonrpc": "2.0", "result": "open", "id": 2},
    ]


async def test_handler_gets_session(dispatcher: Dispatcher) -> None:
    session = FakeSession()
    reply = await call(
        dispatcher, '{"jsonrpc":"2.0","method":"notify_me","params":[3],"id":1}', session
    )
    assert reply["result"] == "test"
    assert session.notifications == [("event", {"n": 3})]


# Encoders used by transports.


def test_encode_notification() -> None:
    assert (
        encode_notification("storageServerStateChanged", {"key": "k\u00e9"})
        == (
            '{"jsonrpc":"2.0","method":"storageServerStateChanged","params":{"key":"k\u00e9"}}'
        ).encode()
    )


def test_encode_error() -> None:
    assert json.loads(encode_error(errors.InvalidRequest("too large"))) == {
        "jsonrpc": "2.0",
        "error": {"code": -32600, "message": "too large"},
        "id": None,
    }


def test_method_table_checked() -> None:
    async def handler(args: dict[str, Any], session: Session) -> None:
        return None

    with pytest.raises(ValueError, match="required"):
        Method("m", ("a",), frozenset({"b"}), handler)
    with pytest.raises(ValueError, match="twice"):
        Dispatcher([Method("m", (), frozenset(), handler)] * 2)


async def test_the_observer_is_told_of_every_request_to_a_known_method() -> None:
    seen: list[tuple[str, int, float]] = []

    async def ok(args: dict[str, Any], session: Session) -> Any:
        return 1

    async def refused(args: dict[str, Any], session: Session) -> Any:
        raise errors.ConnectionIdNotFound("no such CID")

    async def bug(args: dict[str, Any], session: Session) -> Any:
        raise RuntimeError("a bug")

    table = [Method("ok", ("n",), frozenset(), ok), Method("refused", (), frozenset(), refused),
             Method("bug", (), frozenset(), bug)]
    dispatcher = Dispatcher(table, observe=lambda *seen_: seen.append(seen_))
    for line in (b'{"jsonrpc":"2.0","id":1,"method":"ok"}',
                 b'{"jsonrpc":"2.0","id":2,"method":"ok","params":{"x":1}}',
                 b'{"jsonrpc":"2.0","id":3,"method":"refused"}',
                 b'{"jsonrpc":"2.0","id":4,"method":"bug"}',
                 b'{"jsonrpc":"2.0","id":5,"method":"unknown"}',
                 b'{"jsonrpc":"2.0","method":"refused"}',
                 b'[{"jsonrpc":"2.0","id":6,"method":"ok"}]'):
        await dispatcher.handle(line, FakeSession())
    assert [(name, code) for name, code, _ in seen] == [
        ("ok", 0), ("ok", -32602), ("refused", errors.ConnectionIdNotFound.code),
        ("bug", errors.GeneralError.code), ("refused", errors.ConnectionIdNotFound.code),
        ("ok", 0)]
    assert all(isinstance(seconds, float) and seconds >= 0 for _, _, seconds in seen)
