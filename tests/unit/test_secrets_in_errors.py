"""No secret in an error (SPEC 4): whatever a client sends in a secret-bearing field, no error
message, `data`, repr or log line quotes it, and a password with punctuation is accepted where
the backend takes it.

Each fuzzed secret starts with HEAD and ends with TAIL, so a quoted fragment of it (a mount
option list is cut at its commas) is caught as well as the whole value.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdsmconn import errors
from vdsmconn.model import MASK, ConnectionSpec, IscsiSpec, PosixSpec, Secret
from vdsmconn.rpc import methods, params
from vdsmconn.rpc.jsonrpc import Dispatcher
from vdsmconn.service import Service

HEAD = "Qz7Vq"
TAIL = "Wv8Kx"
IQN = "iqn.2003-01.org.example:t1"

# Printable: no control characters (C0, DEL, C1 are category Cc) and no lone surrogates.
PRINTABLE = st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=40)
SECRETS = PRINTABLE.map(lambda middle: f"{HEAD}{middle}{TAIL}")
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def leaked(secret: str, text: str) -> bool:
    forms = {secret, urllib.parse.quote(secret, safe=""), HEAD, TAIL}
    return any(form in text for form in forms)


def error_text(e: errors.Error) -> str:
    return "\n".join([e.message, json.dumps(e.data), repr(e), str(e)])


def spec_text(spec: ConnectionSpec) -> str:
    return "\n".join([repr(spec), str(spec), json.dumps(spec.to_wire())])


def leaked_from_options(secret: str, text: str, accepted: bool) -> bool:
    """A comma ends a mount option: in an accepted list, what follows one in a password is
    another option, and shown as one. The password's own option stays masked."""
    if accepted and "," in secret:
        return secret in text or HEAD in text
    return leaked(secret, text)


def outcome(conn: Any) -> tuple[ConnectionSpec | None, str]:
    """The spec (or None) and every text shown for it or for its refusal."""
    try:
        spec = params.parse_connection(conn)
    except errors.Error as e:
        return None, error_text(e)
    return spec, spec_text(spec)


# --- examples that leaked before ----------------------------------------------------------


def test_refused_option_next_to_a_password_is_not_quoted() -> None:
    with pytest.raises(errors.InvalidParameter) as e:
        params.parse_connection({"type": "posixfs", "connection": "//srv/share",
                                 "mnt_options": "password=Hunter2!Secret,a b"})
    assert "Hunter2" not in error_text(e.value)
    assert e.value.data == {"field": "connection.mnt_options"}


def test_password_cut_at_a_comma_leaks_no_fragment() -> None:
    with pytest.raises(errors.InvalidParameter) as e:
        params.parse_connection({"type": "posixfs", "connection": "//srv/share",
                                 "mnt_options": "password=Hunter2,!Secret$"})
    assert "Secret" not in error_text(e.value) and "Hunter2" not in error_text(e.value)


@pytest.mark.parametrize("password", ["Hunter2!Secret", "a b$c&d;e'f(g)*?#~^|<>{}`\\",
                                      "pässwörd€", "x=y=z", "-starts-with-dash"])
def test_mount_option_password_with_punctuation_is_accepted(password: str) -> None:
    spec = params.parse_connection({"type": "posixfs", "connection": "//srv/share",
                                    "vfs_type": "cifs",
                                    "mnt_options": f"username=u,password={password},ro"})
    assert isinstance(spec, PosixSpec)
    assert f"password={password}" in spec.options()
    assert password not in spec_text(spec)
    assert spec.to_wire()["mnt_options"] == f"username=u,password={MASK},ro"


def test_double_quote_in_a_secret_option_is_refused_by_name() -> None:
    with pytest.raises(errors.InvalidParameter) as e:
        params.parse_connection({"type": "posixfs", "connection": "//srv/share",
                                 "mnt_options": 'password=Hun"ter2'})
    assert "'password'" in e.value.message and "Hun" not in error_text(e.value)


@pytest.mark.parametrize("uri", [
    "ftp://user:Hunter2@server/x",          # a scheme we do not take
    "nfs://server:Hunter2/x",               # a password where the port goes
    "nfs://user:Hunter2@server/x",
    "localfs://user:Hunter2@/srv/x",
    "iscsi://h/iqn.2003-01.org.example:t1?password=Hunter2",
    "iscsi://h/iqn.2003-01.org.example:t1?user=u&password=Hunter2",
    "glusterfs://h/v?auth_token=Hunter2",
    "nfs://[Hunter2/x",
])
def test_uri_errors_never_quote_credentials(uri: str) -> None:
    with pytest.raises(errors.InvalidParameter) as e:
        params.parse_connection(uri)
    assert "Hunter2" not in error_text(e.value)


def test_spec_repr_masks_secret_mount_options() -> None:
    spec = params.parse_connection({"type": "nfs", "connection": "s:/e",
                                    "mnt_options": "sec=sys,password=Hunter2,authkey=Xyzzy"})
    assert "Hunter2" not in repr(spec) and "Xyzzy" not in repr(spec)
    assert "password=********" in repr(spec) and "sec=sys" in repr(spec)


def test_engine_id_is_shown_in_repr() -> None:
    spec = params.parse_connection({"type": "localfs", "connection": "/srv/x", "id": "e-1"})
    assert "engine_id='e-1'" in repr(spec)


# --- fuzz: the secret-bearing fields, with any printable value ----------------------------

ISCSI_BREAKAGES: list[dict[str, Any]] = [
    {}, {"iqn": "not-an-iqn"}, {"port": "x"}, {"port": 70000}, {"user": "-u"},
    {"tpgt": []}, {"bogus": 1}, {"mnt_options": "ro"}, {"connection": "bad host!"},
    {"ifaceName": "bad iface"}, {"netIfaceNames": ["e", "e"]}, {"initiatorName": "x"},
]


@FUZZ
@given(secret=SECRETS, breakage=st.sampled_from(ISCSI_BREAKAGES),
       field=st.sampled_from(["password", "password_in"]))
def test_fuzz_chap_password_never_in_errors(secret: str, breakage: dict[str, Any],
                                            field: str) -> None:
    conn = {"type": "iscsi", "connection": "h", "iqn": IQN, "user": "u", field: secret,
            **breakage}
    spec, text = outcome(conn)
    assert not leaked(secret, text)
    if not breakage:  # any printable password is accepted, and kept for the login
        assert isinstance(spec, IscsiSpec)
        assert getattr(spec, field) == Secret(secret)
        assert params.parse_connection(spec.to_store()) == spec


OPTION_NAMES = ["password", "pass", "secret", "authtoken", "keyfile", "Token", "cifs_password",
                "PASSWORD2"]
TAILS = ["", ",ro", ",a b", ",x=$(id)", ",-o", ",ro;reboot"]


@FUZZ
@given(secret=SECRETS, name=st.sampled_from(OPTION_NAMES), tail=st.sampled_from(TAILS),
       kind=st.sampled_from(["nfs", "posixfs", "glusterfs"]))
def test_fuzz_secret_mount_option_never_in_errors(secret: str, name: str, tail: str,
                                                  kind: str) -> None:
    conn = {"type": kind, "connection": "srv:/export",
            "mnt_options": f"rw,{name}={secret}{tail}"}
    spec, text = outcome(conn)
    assert not leaked_from_options(secret, text, spec is not None)
    if tail in ("", ",ro") and "," not in secret and '"' not in secret:
        assert spec is not None and f"{name}={secret}" in spec.options()  # type: ignore[attr-defined]


URI_FORMS = [
    "nfs://user:{q}@server/x", "ftp://user:{q}@server/x", "nfs://server:{q}/x",
    "localfs://u:{q}@/srv/x", "iscsi://h/" + IQN + "?password={q}",
    "iscsi://h/" + IQN + "?user=u&password_in={q}", "glusterfs://h/v?auth_token={q}",
    "nfs://h/x?mnt_options=password%3D{q}%2Ca%20b", "posixfs://{q}@/dev/x",
]


@FUZZ
@given(secret=SECRETS, form=st.sampled_from(URI_FORMS))
def test_fuzz_uri_credentials_never_in_errors(secret: str, form: str) -> None:
    spec, text = outcome(form.format(q=urllib.parse.quote(secret, safe="")))
    assert spec is None  # every form is refused
    assert not leaked(secret, text)


@FUZZ
@given(secret=SECRETS, kind=st.sampled_from(["nfs", "posixfs", "glusterfs", "localfs"]),
       key=st.sampled_from(["password", "auth_key", "secret", "token"]))
def test_fuzz_secret_keys_a_type_does_not_take(secret: str, kind: str, key: str) -> None:
    conn = {"type": kind, "connection": "/srv/x" if kind == "localfs" else "s:/e", key: secret}
    spec, text = outcome(conn)
    assert spec is None and not leaked(secret, text)


@FUZZ
@given(secret=SECRETS, driver=st.sampled_from(["rbd", 5, "", None]),
       extra=st.sampled_from([{}, {"bogus": 1}]))
def test_fuzz_managed_volume_secrets_never_shown(secret: str, driver: Any,
                                                 extra: dict[str, Any]) -> None:
    info = {"driver_volume_type": driver, "data": {"auth_password": secret, "keyring": secret,
                                                   "name": "v"}, **extra}
    spec, text = outcome({"type": "managed", "volumeID": "v1", "connection_info": info})
    assert not leaked(secret, text)
    assert (spec is not None) == (driver == "rbd" and not extra)


# --- the manageStorageServer path: the reply and the log ------------------------------------


class RecordingService:
    """Only what the verb table needs to parse and hand over a manage request."""

    def subscribe_changes(self, callback: Any) -> None:
        pass

    async def manage(self, cid: str, spec: ConnectionSpec) -> dict[str, Any]:
        logging.getLogger("vdsmconn.test").info("MANAGE cid=%s spec=%r", cid, spec)
        return {"connectionID": cid, "key": str(spec.key)}


class Peer:
    peer = "test"

    def notify(self, method: str, params: dict[str, Any]) -> None:
        pass


def manage_reply(connection: Any) -> str:
    dispatcher = Dispatcher(methods.build(cast(Service, RecordingService())))
    request = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "manageStorageServer",
                          "params": {"connectionID": "c1", "connection": connection}})
    loop = asyncio.new_event_loop()
    try:
        reply = loop.run_until_complete(dispatcher.handle(request.encode(), Peer()))
    finally:
        loop.close()
    assert reply is not None
    return reply.decode()


MANAGE_FORMS: list[Any] = [
    {"type": "iscsi", "connection": "h", "iqn": IQN, "user": "u", "password": "{s}"},
    {"type": "iscsi", "connection": "h", "iqn": "bad", "user": "u", "password": "{s}"},
    {"type": "iscsi", "connection": "h", "iqn": IQN, "password": "{s}", "port": "x"},
    {"type": "posixfs", "connection": "//srv/s", "mnt_options": "password={s},ro"},
    {"type": "posixfs", "connection": "//srv/s", "mnt_options": "password={s},a b"},
    {"type": "nfs", "connection": "s:/e", "password": "{s}"},
    "iscsi://h/" + IQN + "?password={q}",
    "nfs://u:{q}@s/e",
]


def fill(form: Any, secret: str) -> Any:
    if isinstance(form, str):
        return form.format(q=urllib.parse.quote(secret, safe=""))
    return {k: v.format(s=secret) if isinstance(v, str) else v for k, v in form.items()}


@FUZZ
@given(secret=SECRETS, form=st.sampled_from(MANAGE_FORMS))
def test_fuzz_manage_replies_and_logs_carry_no_secret(
    secret: str, form: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    reply = manage_reply(fill(form, secret))
    accepted = '"result"' in reply
    assert accepted or '"error"' in reply
    if isinstance(form, dict) and "mnt_options" in form:
        assert not leaked_from_options(secret, reply, accepted)
        assert not leaked_from_options(secret, caplog.text, accepted)
    else:
        assert not leaked(secret, reply)
        assert not leaked(secret, caplog.text)
