"""One error hierarchy. Codes from SPEC 3.1; turned into wire errors in `to_wire` only."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

log = logging.getLogger(__name__)


class Error(Exception):
    """Base of every error the daemon reports. `message` must never contain a secret."""

    code: ClassVar[int] = 100
    name: ClassVar[str] = "GeneralError"

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data

    def to_dict(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err


# Protocol faults (JSON-RPC 2.0 reserved codes).


class ParseError(Error):
    code = -32700
    name = "ParseError"


class InvalidRequest(Error):
    code = -32600
    name = "InvalidRequest"


class MethodNotFound(Error):
    code = -32601
    name = "MethodNotFound"


class InvalidParams(Error):
    code = -32602
    name = "InvalidParams"


class InternalError(Error):
    code = -32603
    name = "InternalError"


# Application errors (SPEC 3.1).


class GeneralError(Error):
    code = 100
    name = "GeneralError"


class InvalidParameter(Error):
    code = 1000
    name = "InvalidParameter"


class ConnectError(Error):
    code = 451
    name = "ConnectionError"


class DisconnectError(Error):
    code = 452
    name = "DisconnectionError"


class ConnectionConflict(Error):
    code = 453
    name = "ConnectionConflict"


class IscsiSetupError(Error):
    code = 465
    name = "IscsiSetupError"


class AccessPermissionError(Error):
    code = 469
    name = "AccessPermissionError"


class IscsiIfaceError(Error):
    code = 473
    name = "IscsiIfaceError"


class IscsiLogoutError(Error):
    code = 474
    name = "IscsiLogoutError"


class IscsiDiscoveryError(Error):
    code = 475
    name = "IscsiDiscoveryError"


class IscsiAuthError(Error):
    code = 476
    name = "IscsiAuthError"


class MountError(Error):
    code = 477
    name = "MountError"


class ConnectionIdInUse(Error):
    code = 478
    name = "ConnectionIdInUse"


class ConnectionIdNotFound(Error):
    code = 479
    name = "ConnectionIdNotFound"


class Timeout(Error):
    code = 480
    name = "Timeout"


class StaleMount(Error):
    code = 481
    name = "StaleMount"


class ManagedVolumeNotSupported(Error):
    code = 925
    name = "ManagedVolumeNotSupported"


class ManagedVolumeHelperFailed(Error):
    code = 926
    name = "ManagedVolumeHelperFailed"


class ManagedVolumeAlreadyAttached(Error):
    code = 927
    name = "ManagedVolumeAlreadyAttached"


class ManagedVolumeUnsupportedDevice(Error):
    code = 928
    name = "ManagedVolumeUnsupportedDevice"


class ManagedVolumeConnectionMismatch(Error):
    code = 929
    name = "ManagedVolumeConnectionMismatch"


class MountHung(StaleMount):
    """A probe of the mount did not return in time: the key is stuck."""


class BackendUnavailable(Error):
    """The connection type's backend cannot run on this host (missing tool or kernel)."""

    code = 451
    name = "ConnectionError"


class CommandStuck(Error):
    """A command ran past its deadline and its process group would not die (D state)."""

    code = 480
    name = "Timeout"


def to_wire(exc: BaseException) -> dict[str, Any]:
    """The JSON-RPC error object for any exception. Never a traceback on the wire."""
    if isinstance(exc, Error):
        return exc.to_dict()
    log.error("unexpected failure", exc_info=exc)
    return {"code": GeneralError.code, "message": "General error (see the daemon's log)"}
