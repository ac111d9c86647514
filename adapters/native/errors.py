"""The native protocol's errors: wire codes, the one table from core error classes to them, and the errors about
the bytes and values of one frame.

The core raises errors by class and blame (core/errors.py) and knows no wire codes; this module is where the
native protocol gives them numbers. The SDK reads the same table backwards, so a client sees the class the
broker raised (`TopicNotFound`, `NotAuthorized`, ...) with the wire code in `.code`. `FrameValueError` and
`Truncated` are raised by the typed frame table (`frames.py`) and the hot-path byte helpers (`fastpath.py`)
alike, so they live below both; errors about the protocol's rules (`ProtocolError`) belong to the codec.
"""

from __future__ import annotations

from enum import IntEnum

from tidegate.core import errors as core


class ErrorCode(IntEnum):
    # Codes are part of the native protocol (docs/native-protocol.md); never renumber.
    OK = 0
    BAD_REQUEST = 1
    UNSUPPORTED_VERSION = 2
    FRAME_TOO_LARGE = 3
    MALFORMED_FRAME = 4
    INVALID_NAME = 10
    TOPIC_NOT_FOUND = 11
    TOPIC_EXISTS = 12
    QUEUE_NOT_FOUND = 13
    GROUP_NOT_FOUND = 14
    OFFSET_OUT_OF_RANGE = 15
    MESSAGE_TOO_LARGE = 16
    MESSAGE_NOT_FOUND = 17
    INVALID_FILTER = 18
    INVALID_RECEIPT = 19
    NO_PERMISSION = 20
    NOT_AUTHORIZED = 21
    NOT_AUTHENTICATED = 22
    QUOTA_EXCEEDED = 23  # a limit against abuse: rate, bandwidth, connections, subscriptions, sizes
    SCHEMA_VIOLATION = 24  # the message does not satisfy its topic's JSON Schema or content-type rule
    STORE_FULL = 30
    STORE_ERROR = 31
    SHUTTING_DOWN = 32
    INTERNAL = 99


class FrameValueError(core.TidegateError):
    """A frame was built (or decoded) with a value its wire type cannot carry."""

    code = ErrorCode.MALFORMED_FRAME


class Truncated(Exception):
    """Internal: a field ran past the end of its frame; the codec reports it as MALFORMED_FRAME."""


# Core error class -> wire code. A subclass not listed takes its nearest listed base's code (CorruptRecord is
# a STORE_ERROR); a bare TidegateError, like any other exception, is INTERNAL.
WIRE_CODES: dict[type[BaseException], ErrorCode] = {
    core.TidegateError: ErrorCode.INTERNAL,
    core.ClientError: ErrorCode.BAD_REQUEST,
    core.ServerError: ErrorCode.INTERNAL,
    core.BadRequest: ErrorCode.BAD_REQUEST,
    core.InvalidName: ErrorCode.INVALID_NAME,
    core.TopicNotFound: ErrorCode.TOPIC_NOT_FOUND,
    core.TopicExists: ErrorCode.TOPIC_EXISTS,
    core.QueueNotFound: ErrorCode.QUEUE_NOT_FOUND,
    core.GroupNotFound: ErrorCode.GROUP_NOT_FOUND,
    core.OffsetOutOfRange: ErrorCode.OFFSET_OUT_OF_RANGE,
    core.MessageTooLarge: ErrorCode.MESSAGE_TOO_LARGE,
    core.MessageNotFound: ErrorCode.MESSAGE_NOT_FOUND,
    core.InvalidFilter: ErrorCode.INVALID_FILTER,
    core.InvalidReceipt: ErrorCode.INVALID_RECEIPT,
    core.NoPermission: ErrorCode.NO_PERMISSION,
    core.NotAuthorized: ErrorCode.NOT_AUTHORIZED,
    core.NotAuthenticated: ErrorCode.NOT_AUTHENTICATED,
    core.QuotaExceeded: ErrorCode.QUOTA_EXCEEDED,
    core.SchemaViolation: ErrorCode.SCHEMA_VIOLATION,
    core.StoreFull: ErrorCode.STORE_FULL,
    core.StoreError: ErrorCode.STORE_ERROR,
    core.ShuttingDown: ErrorCode.SHUTTING_DOWN,
    core.InternalError: ErrorCode.INTERNAL,
}

_resolved: dict[type[BaseException], ErrorCode] = {}  # per concrete class, filled on first use


def wire_code(error: BaseException) -> ErrorCode:
    """The native code to report `error` with.

    Errors of this adapter carry their own code (`code` attribute: the codec's protocol errors, errors the SDK
    rebuilt from an ERROR frame); core errors are looked up by class, walking up to the nearest listed base."""
    # Read without getattr: core/errors.py's transitional `code` fallback calls back into this function.
    code = getattr(error, "__dict__", {}).get("code", None) or getattr(type(error), "code", None)
    if isinstance(code, ErrorCode):
        return code
    cls = type(error)
    found = _resolved.get(cls)
    if found is None:
        found = next((WIRE_CODES[base] for base in cls.__mro__ if base in WIRE_CODES), ErrorCode.INTERNAL)
        _resolved[cls] = found
    return found


def _classes_by_code() -> dict[ErrorCode, type[core.TidegateError]]:
    # The most general class of each code, so a client catches what the broker could have raised
    # (STORE_ERROR -> StoreError, not its CorruptRecord subclass). Codes of the blame bases stay plain.
    table: dict[ErrorCode, type[core.TidegateError]] = {}
    for cls, code in WIRE_CODES.items():
        if cls in (core.TidegateError, core.ClientError, core.ServerError, core.InternalError):
            continue
        if issubclass(cls, core.TidegateError):
            table.setdefault(code, cls)
    return table


CLASSES_BY_CODE = _classes_by_code()


def error_for_code(code: int, message: str) -> core.TidegateError:
    """The error an SDK raises for an ERROR frame: the core class of `code` (plain `TidegateError` for codes
    without one; INTERNAL for codes this version does not know), with the wire code in `.code`."""
    try:
        wire = ErrorCode(code)
    except ValueError:
        error = core.TidegateError(f"[code {code}] {message}")
        error.code = ErrorCode.INTERNAL  # type: ignore[attr-defined]
        return error
    cls = CLASSES_BY_CODE.get(wire, core.TidegateError)
    error = cls(message)
    error.code = wire  # type: ignore[attr-defined]
    return error


__all__ = ["CLASSES_BY_CODE", "WIRE_CODES", "ErrorCode", "FrameValueError", "Truncated", "error_for_code", "wire_code"]
