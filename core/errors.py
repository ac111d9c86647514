"""Errors the core raises, by whose fault they are. No wire codes here: each adapter maps these classes to its
own protocol (native error codes in adapters/native/errors.py, MQTT reason codes, AMQP reply codes).

- `ClientError`: the request cannot be served as asked (bad name, unknown topic, refused by the gate, ...).
  Repeating the same request will fail the same way; the client must change it.
- `ServerError`: the broker failed (disk full, storage failure, shutting down). The request may succeed later
  or on another broker; the client did nothing wrong.

Adapters never show a traceback to a client: they catch `TidegateError`, look up its class in their table and
report it their way (native ERROR frame, MQTT reason code, AMQP channel/connection close). Anything that is not
a `TidegateError` is an internal failure: logged, and reported as such without its details.
"""

from __future__ import annotations


class TidegateError(Exception):
    """Base of every error the core reports to an adapter. A bare `TidegateError` carries no blame and is
    reported as an internal failure; raise a `ClientError` or `ServerError` subclass instead."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""



class ClientError(TidegateError):
    """The client's fault: the request is invalid or not allowed."""


class ServerError(TidegateError):
    """The broker's fault: the request was fine but could not be carried out."""


# ---------------------------------------------------------------------------------------- the client's fault
class BadRequest(ClientError):
    """An argument out of range or a request that does not fit the current state (e.g. credit <= 0)."""


class InvalidName(ClientError):
    """A topic, group, subject, tag or property name that breaks the naming rules."""


class TopicNotFound(ClientError):
    pass


class TopicExists(ClientError):
    pass


class QueueNotFound(ClientError):
    pass


class GroupNotFound(ClientError):
    pass


class OffsetOutOfRange(ClientError):
    pass


class MessageTooLarge(ClientError):
    """Body or properties over the limit."""


class MessageNotFound(ClientError):
    """A query by id found nothing (or retention removed it)."""


class InvalidFilter(ClientError):
    pass


class InvalidReceipt(ClientError):
    """Unknown or expired receipt on ack/nack."""


class NoPermission(ClientError):
    """The topic's own permission (`r`/`w`) forbids the action."""


class NotAuthorized(ClientError):
    """The gate denied an action (or a client named an adapter-private topic)."""


class NotAuthenticated(ClientError):
    """Credentials were missing, wrong, expired or refused."""


class QuotaExceeded(ClientError):
    """A limit against abuse was hit (core/security/limits.py): connections per user or source, connection rate,
    publish rate or bandwidth, subscriptions, message or property size. `cause` names which, from a fixed set."""

    def __init__(self, message: str = "", cause: str = "") -> None:
        super().__init__(message)
        self.cause = cause


class SchemaViolation(ClientError):
    """A message does not satisfy its topic's JSON Schema or content-type rule (core/schema.py)."""


# ---------------------------------------------------------------------------------------- the broker's fault
class StoreFull(ServerError):
    """The disk (or the store's size budget) is full."""


class StoreError(ServerError):
    """A storage failure (I/O error, fsync failure)."""


class CorruptRecord(StoreError):
    """A commit-log record failed its length, magic or CRC check."""


class ShuttingDown(ServerError):
    """The broker is stopping."""


class InternalError(ServerError):
    """A broker bug surfaced as an error (details are logged, never sent)."""

