"""`iscsiadm` on the command runner: a deadline on every call, exit codes named and mapped.

| rc | name | becomes |
|---|---|---|
| 0 | | success |
| 15 | ISCSI_ERR_SESS_EXISTS | success of a login |
| 21 | ISCSI_ERR_NO_OBJS_FOUND | "nothing to do" of logout, rescan, delete, session list |
| 24 | ISCSI_ERR_LOGIN_AUTH_FAILED | 476 IscsiAuthError (also 5/19 saying "authentication |
| | | failed", as discovery does) |
| 8 | ISCSI_ERR_TRANS_TIMEOUT | 480 Timeout (475 in discovery) |
| other (7, 12, 20, ...) | | 465 IscsiSetupError; 473 for iface, 474 for logout, 475 for discovery |

The message of an error keeps what iscsiadm wrote on stderr (its `iscsiadm:` lines), so the
status' `lastError` tells an operator why. CHAP secrets are `model.Secret` values given after
`-n <secret name> -v`: the runner masks them in every logged or reported argv.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from vdsmconn import errors
from vdsmconn.host import iscsi_parse
from vdsmconn.host.command import Arg, CommandRunner, Result, show
from vdsmconn.model import Secret

RC_LOGIN_FAILURE = 5
RC_TRANS_TIMEOUT = 8
RC_FATAL_LOGIN = 19
RC_SESS_EXISTS = 15
RC_NO_OBJS_FOUND = 21
RC_LOGIN_AUTH_FAILED = 24

RC_NAMES = {
    1: "generic error", 2: "session not found", 3: "out of memory", 4: "transport error",
    5: "login failure", 6: "node database error", 7: "invalid argument",
    8: "timeout", 9: "internal error", 10: "logout failure", 11: "PDU timeout",
    12: "iSCSI driver or transport not found", 13: "access denied", 15: "session exists",
    18: "iscsid communication error", 19: "fatal login error",
    20: "could not connect to iscsid", 21: "no records found", 23: "host not found",
    24: "authentication failed", 29: "try again", 32: "session not connected",
}

# Error class of a failure, by what was being done.
NODE, IFACE, LOGIN, LOGOUT, DISCOVERY = "node", "iface", "login", "logout", "discovery"
_ERRORS: dict[str, type[errors.Error]] = {
    NODE: errors.IscsiSetupError, LOGIN: errors.IscsiSetupError, IFACE: errors.IscsiIfaceError,
    LOGOUT: errors.IscsiLogoutError, DISCOVERY: errors.IscsiDiscoveryError,
}


def reason(result: Result) -> str:
    """iscsiadm's own words: its stderr lines, without the systemd/D-Bus noise."""
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    useful = [line for line in lines if line.startswith(("iscsiadm:", "iSCSI ERROR"))]
    text = "; ".join(useful or lines)
    return text[-600:] if len(text) > 600 else text


def failure(result: Result, what: str) -> errors.Error:
    """The typed error of a failed call (see the table above)."""
    rc = result.rc
    name = RC_NAMES.get(rc, "error")
    message = f"{show(result.argv)} failed (rc {rc}: {name})"
    detail = reason(result)
    if detail:
        message += f": {detail}"
    data = {"rc": rc}
    if rc == RC_LOGIN_AUTH_FAILED or (
            rc in (RC_LOGIN_FAILURE, RC_FATAL_LOGIN) and "authentication failed" in detail.lower()):
        return errors.IscsiAuthError(message, data)
    if rc == RC_TRANS_TIMEOUT and what != DISCOVERY:
        return errors.Timeout(message, data)
    return _ERRORS[what](message, data)


class Iscsiadm:
    def __init__(self, runner: CommandRunner, timeout: float, command: str = "iscsiadm",
                 login_timeout: float | None = None) -> None:
        self.runner = runner
        self.timeout = timeout
        self.login_timeout = login_timeout or timeout
        self.command = command

    async def run(self, args: Sequence[Arg], what: str, ok: tuple[int, ...] = (0,),
                  timeout: float | None = None) -> Result:
        """Run `iscsiadm ARGS`; rc in `ok` is success, any other raises (table above), and
        past its deadline `errors.Timeout` (480), whatever the operation."""
        result = await self.runner.run([self.command, *args], timeout=timeout or self.timeout)
        if result.rc not in ok:
            raise failure(result, what)
        return result

    # --- ifaces ----------------------------------------------------------------------------

    async def iface_list(self) -> list[iscsi_parse.Iface]:
        result = await self.run(["-m", "iface"], IFACE, ok=(0, RC_NO_OBJS_FOUND))
        return iscsi_parse.parse_iface_list(result.stdout)

    async def iface_new(self, name: str) -> None:
        await self.run(["-m", "iface", "-I", name, "-o", "new"], IFACE)

    async def iface_update(self, name: str, setting: str, value: str) -> None:
        await self.run(["-m", "iface", "-I", name, "-o", "update", "-n", setting, "-v", value],
                       IFACE)

    async def iface_delete(self, name: str) -> None:
        await self.run(["-m", "iface", "-I", name, "-o", "delete"], IFACE,
                       ok=(0, RC_NO_OBJS_FOUND))

    # --- node records ----------------------------------------------------------------------

    @staticmethod
    def _node(iqn: str, portal: str, iface: str) -> list[Arg]:
        return ["-m", "node", "-T", iqn, "-p", portal, "-I", iface]

    async def node_exists(self, iqn: str, portal: str, iface: str) -> bool:
        result = await self.run(self._node(iqn, portal, iface), NODE, ok=(0, RC_NO_OBJS_FOUND))
        return result.rc == 0

    async def node_new(self, iqn: str, portal: str, iface: str) -> None:
        """`portal` is `ip:port,tpgt` (or `ip:port` when any tpgt will do)."""
        await self.run([*self._node(iqn, portal, iface), "-o", "new"], NODE)

    async def node_update(self, iqn: str, portal: str, iface: str, setting: str,
                          value: str | Secret) -> None:
        await self.run([*self._node(iqn, portal, iface), "-o", "update", "-n", setting,
                        "-v", value], NODE)

    async def node_delete(self, iqn: str, portal: str, iface: str) -> None:
        await self.run([*self._node(iqn, portal, iface), "-o", "delete"], NODE,
                       ok=(0, RC_NO_OBJS_FOUND))

    async def login(self, iqn: str, portal: str, iface: str) -> None:
        await self.run([*self._node(iqn, portal, iface), "--login"], LOGIN,
                       ok=(0, RC_SESS_EXISTS), timeout=self.login_timeout)

    async def logout(self, iqn: str, portal: str, iface: str) -> bool:
        """False when there was no session to log out."""
        result = await self.run([*self._node(iqn, portal, iface), "--logout"], LOGOUT,
                                ok=(0, RC_NO_OBJS_FOUND))
        return result.rc == 0

    # --- discovery -------------------------------------------------------------------------

    async def discover(self, portal: str, user: str | None, password: Secret | None,
                       user_in: str | None = None, password_in: Secret | None = None,
                       ) -> list[iscsi_parse.Target]:
        """sendtargets discovery through a discovery record that is always deleted after."""
        record: list[Arg] = ["-m", "discoverydb", "-t", "sendtargets", "-p", portal]
        await self.run([*record, "-o", "new"], DISCOVERY)
        try:
            settings: list[tuple[str, str | Secret | None]] = []
            if user is not None and password is not None:
                settings = [("authmethod", "CHAP"), ("username", user), ("password", password),
                            ("username_in", user_in), ("password_in", password_in)]
            for name, value in settings:
                if value is not None:
                    await self.run([*record, "-o", "update", "-n",
                                    f"discovery.sendtargets.auth.{name}", "-v", value],
                                   DISCOVERY)
            result = await self.run([*record, "--discover", "-o", "nonpersistent"], DISCOVERY)
        except BaseException:
            with contextlib.suppress(errors.Error):  # the discovery's own error is reported
                await self.run([*record, "-o", "delete"], DISCOVERY, ok=(0, RC_NO_OBJS_FOUND))
            raise
        await self.run([*record, "-o", "delete"], DISCOVERY, ok=(0, RC_NO_OBJS_FOUND))
        return iscsi_parse.parse_targets(result.stdout)
