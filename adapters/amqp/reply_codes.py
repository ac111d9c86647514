"""AMQP 0-9-1 reply codes and the codec's error types.

The codec raises `AmqpProtocolError` for bytes the peer got wrong (blame: peer) and `AmqpEncodeError` for something our
own side asked it to send that AMQP cannot carry (blame: local). A peer error carries the reply code, text, channel and
class/method ids the adapter puts in `connection.close`, so no traceback ever reaches a client.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Literal

# The 0-9-1 protocol header: "AMQP", protocol id 0, version 0-9-1. A peer that sends anything else gets exactly these
# eight bytes back and the socket closed (spec 4.2.2).
PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"


class ReplyCode(IntEnum):
    """Reply codes of the AMQP 0-9-1 specification (constants section)."""

    SUCCESS = 200
    CONTENT_TOO_LARGE = 311
    NO_ROUTE = 312
    NO_CONSUMERS = 313
    CONNECTION_FORCED = 320
    INVALID_PATH = 402
    ACCESS_REFUSED = 403
    NOT_FOUND = 404
    RESOURCE_LOCKED = 405
    PRECONDITION_FAILED = 406
    FRAME_ERROR = 501
    SYNTAX_ERROR = 502
    COMMAND_INVALID = 503
    CHANNEL_ERROR = 504
    UNEXPECTED_FRAME = 505
    RESOURCE_ERROR = 506
    NOT_ALLOWED = 530
    NOT_IMPLEMENTED = 540
    INTERNAL_ERROR = 541


class AmqpCodecError(ValueError):
    """Base of every error the AMQP codec raises."""

    blame: Literal["peer", "local"] = "peer"


class ProtocolHeaderMismatch(AmqpCodecError):
    """The peer opened with something other than the AMQP 0-9-1 protocol header.

    The adapter writes `reply_header` (the 0-9-1 header) and closes the connection; no `connection.close` is sent,
    because no AMQP connection exists yet.
    """

    reply_header = PROTOCOL_HEADER

    def __init__(self, received: bytes) -> None:
        super().__init__(f"expected protocol header {PROTOCOL_HEADER!r}, received {received!r}")
        self.received = received
        # Commands decoded before the fault in the same receive_data call (always none for a header fault).
        self.events_before_error: list[object] = []


class AmqpProtocolError(AmqpCodecError):
    """Received frames that break the AMQP 0-9-1 rules; every such fault is a connection exception.

    `reply_code` and `reply_text` go into `connection.close`, with `class_id`/`method_id` naming the offending method
    when it is known (0 otherwise). `channel` is where the fault was seen. After one, the codec refuses further input.
    """

    def __init__(
        self, reply_code: ReplyCode, reply_text: str, *, channel: int = 0, class_id: int = 0, method_id: int = 0
    ) -> None:
        super().__init__(reply_text)
        self.reply_code = ReplyCode(reply_code)
        self.reply_text = reply_text
        self.channel = channel
        self.class_id = class_id
        self.method_id = method_id
        # Commands decoded before the fault in the same receive_data call; the adapter may still act on them.
        self.events_before_error: list[object] = []

    def __str__(self) -> str:
        return f"{self.reply_code.value} {self.reply_code.name} on channel {self.channel}: {self.reply_text}"


class AmqpEncodeError(AmqpCodecError):
    """Our side asked to encode something AMQP 0-9-1 cannot carry (a bug in the adapter, never the peer's fault)."""

    blame: Literal["peer", "local"] = "local"
