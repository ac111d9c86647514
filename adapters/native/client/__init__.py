"""Tidegate Python SDK (`tidegate.client`) for the native protocol.

Blocking API (plain scripts and threads, no reactor): `Producer`, `Admin`, `PushConsumer`, `PullConsumer`,
`SimpleConsumer`. Twisted API: `connect(reactor, host, port) -> Deferred[TwistedClient]`. Every one takes
`tls=ClientTls(ca_file=..., cert_file=..., key_file=...)` to reach a TLS listener (tidegate.client.tls).
Errors are `tidegate.core.errors.TidegateError` subclasses (the class the broker raised: `TopicNotFound`,
`NotAuthorized`, ...) carrying the native wire code in `.code` (`ErrorCode`, adapters/native/errors.py).
"""

from tidegate.adapters.native.errors import ErrorCode
from tidegate.client.blocking import (
    Admin,
    Producer,
    PullConsumer,
    PushConsumer,
    SimpleConsumer,
    build_message,
)
from tidegate.client.common import (
    ConnectionClosed,
    GroupDescription,
    RequestTimeout,
    SendResult,
    TopicDescription,
)
from tidegate.client.connection import Connection
from tidegate.client.tls import ClientTls, TlsError
from tidegate.client.twisted_client import TwistedClient, connect
from tidegate.core.api import Delivered, PullResult, PullStatus
from tidegate.core.errors import TidegateError
from tidegate.core.model import Message

__all__ = [
    "Admin",
    "ClientTls",
    "Connection",
    "ConnectionClosed",
    "Delivered",
    "ErrorCode",
    "GroupDescription",
    "Message",
    "Producer",
    "PullConsumer",
    "PullResult",
    "PullStatus",
    "PushConsumer",
    "RequestTimeout",
    "SendResult",
    "SimpleConsumer",
    "TidegateError",
    "TlsError",
    "TopicDescription",
    "TwistedClient",
    "build_message",
    "connect",
]
