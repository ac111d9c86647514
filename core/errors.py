"""Errors the core raises. Each carries a stable wire code that every adapter maps to its own protocol.

Adapters never show a traceback to a client: they catch `TidegateError`, read `.code` and report it their way
(native error frame, MQTT reason code, AMQP channel/connection close).
"""

from __future__ import annotations

from enum import IntEnum


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
    STORE_FULL = 30
    STORE_ERROR = 31
    SHUTTING_DOWN = 32
    INTERNAL = 99


class TidegateError(Exception):
    """An error a client caused or must be told about; `code` is the wire code."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidName(TidegateError):
    code = ErrorCode.INVALID_NAME


class TopicNotFound(TidegateError):
    code = ErrorCode.TOPIC_NOT_FOUND


class TopicExists(TidegateError):
    code = ErrorCode.TOPIC_EXISTS


class QueueNotFound(TidegateError):
    code = ErrorCode.QUEUE_NOT_FOUND


class GroupNotFound(TidegateError):
    code = ErrorCode.GROUP_NOT_FOUND


class OffsetOutOfRange(TidegateError):
    code = ErrorCode.OFFSET_OUT_OF_RANGE


class MessageTooLarge(TidegateError):
    code = ErrorCode.MESSAGE_TOO_LARGE


class MessageNotFound(TidegateError):
    code = ErrorCode.MESSAGE_NOT_FOUND


class InvalidFilter(TidegateError):
    code = ErrorCode.INVALID_FILTER


class InvalidReceipt(TidegateError):
    code = ErrorCode.INVALID_RECEIPT


class NoPermission(TidegateError):
    code = ErrorCode.NO_PERMISSION


class NotAuthorized(TidegateError):
    """The gate denied an action (or a client named an adapter-private topic)."""

    code = ErrorCode.NOT_AUTHORIZED


class NotAuthenticated(TidegateError):
    """Credentials were missing, wrong, expired or refused."""

    code = ErrorCode.NOT_AUTHENTICATED


class StoreFull(TidegateError):
    code = ErrorCode.STORE_FULL


class StoreError(TidegateError):
    code = ErrorCode.STORE_ERROR


class CorruptRecord(StoreError):
    """A commit-log record failed its length, magic or CRC check."""


class ShuttingDown(TidegateError):
    code = ErrorCode.SHUTTING_DOWN
