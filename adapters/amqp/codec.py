"""Sans-IO AMQP 0-9-1 codec: bytes in, typed events out; commands in, bytes out.

`AmqpServerCodec.receive_data` takes whatever the transport read and returns one event per complete command: the
protocol header, a method, a method with its content (header and body frames assembled per channel), a heartbeat.
The `send_*` methods return the bytes to write. No sockets, no reactor, no broker imports; pamqp
(the marshalling layer under aiormq and aio-pika) supplies the method table and the generic argument marshalling, and
`fastpath` hand-codes the two commands every message passes through (Basic.Publish in, Basic.Deliver out).

Faults in received bytes raise `AmqpProtocolError` with the reply code for `connection.close` (all of them are
connection exceptions in AMQP 0-9-1); after one the codec refuses further input, and the commands decoded before the
fault in the same call are on the error as `events_before_error`. A wrong protocol header raises
`ProtocolHeaderMismatch`: the adapter writes the 0-9-1 header back and closes (spec 4.2.2). Asking to send something
AMQP cannot carry raises `AmqpEncodeError` (our bug, not the peer's).

Memory stays bounded: a frame's size is checked against the negotiated frame-max as soon as its 7-byte header is in,
before its payload is buffered, so the codec never holds more than one frame beyond the frames it completes; content
bodies over `max_body_size` are refused at the content header (`ContentRejectedEvent`, 406 like RabbitMQ's
max_message_size) and their body frames dropped as they arrive.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pamqp import base, commands

from .fastpath import (
    BASIC_CLASS_ID,
    BASIC_DELIVER_INDEX,
    BASIC_PUBLISH_INDEX,
    CONTENT_HEADER_STRUCT,
    FRAME_BODY,
    FRAME_END,
    FRAME_END_BYTE,
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    FRAME_HEADER_STRUCT,
    FRAME_HEARTBEAT,
    FRAME_METHOD,
    FRAME_OVERHEAD,
    METHOD_ID_STRUCT,
    FastPathError,
    decode_basic_properties,
    decode_basic_publish,
    encode_basic_deliver_frame,
    encode_basic_properties,
    encode_deliver_frame,
)
from .reply_codes import (
    PROTOCOL_HEADER,
    AmqpEncodeError,
    AmqpProtocolError,
    ProtocolHeaderMismatch,
    ReplyCode,
)

# Spec 4.2.3: until frame-max is negotiated both peers accept frames of up to 4096 octets; no peer negotiates less.
FRAME_MIN_SIZE = 4096
# RabbitMQ 4's default max_message_size: a content header announcing a larger body is refused with 406.
DEFAULT_MAX_BODY_SIZE = 16 * 1024 * 1024
MAX_CHANNEL = 0xFFFF
CONNECTION_CLASS_ID = commands.Connection.frame_id

HEARTBEAT_FRAME = FRAME_HEADER_STRUCT.pack(FRAME_HEARTBEAT, 0, 0) + FRAME_END_BYTE
_KNOWN_FRAME_TYPES = frozenset({FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT})
_TUNE_INDEXES = frozenset({commands.Connection.Tune.index, commands.Connection.TuneOk.index})

# Which side may send which method (the spec's chassis; Connection.Blocked/Unblocked and UpdateSecret are RabbitMQ's
# extensions, Basic.Ack/Nack go both ways with publisher confirms, Basic.Cancel/CancelOk with consumer_cancel_notify).
# Receiving a method only our own side may send is 503 COMMAND_INVALID.
SENT_BY_SERVER_ONLY = frozenset({
    "Connection.Start", "Connection.Secure", "Connection.Tune", "Connection.OpenOk", "Connection.Blocked",
    "Connection.Unblocked", "Connection.UpdateSecretOk",
    "Channel.OpenOk",
    "Exchange.DeclareOk", "Exchange.DeleteOk", "Exchange.BindOk", "Exchange.UnbindOk",
    "Queue.DeclareOk", "Queue.BindOk", "Queue.PurgeOk", "Queue.DeleteOk", "Queue.UnbindOk",
    "Basic.QosOk", "Basic.ConsumeOk", "Basic.Return", "Basic.Deliver", "Basic.GetOk", "Basic.GetEmpty",
    "Basic.RecoverOk",
    "Tx.SelectOk", "Tx.CommitOk", "Tx.RollbackOk", "Confirm.SelectOk",
})  # fmt: skip
SENT_BY_CLIENT_ONLY = frozenset({
    "Connection.StartOk", "Connection.SecureOk", "Connection.TuneOk", "Connection.Open", "Connection.UpdateSecret",
    "Channel.Open",
    "Exchange.Declare", "Exchange.Delete", "Exchange.Bind", "Exchange.Unbind",
    "Queue.Declare", "Queue.Bind", "Queue.Purge", "Queue.Delete", "Queue.Unbind",
    "Basic.Qos", "Basic.Consume", "Basic.Publish", "Basic.Get", "Basic.Reject", "Basic.RecoverAsync", "Basic.Recover",
    "Tx.Select", "Tx.Commit", "Tx.Rollback", "Confirm.Select",
})  # fmt: skip
SENT_BY_BOTH = frozenset({
    "Connection.Close", "Connection.CloseOk", "Channel.Flow", "Channel.FlowOk", "Channel.Close", "Channel.CloseOk",
    "Basic.Cancel", "Basic.CancelOk", "Basic.Ack", "Basic.Nack",
})  # fmt: skip
# Methods followed by a content header and body frames, by the side that receives them.
CONTENT_METHODS_SENT_BY_CLIENT = frozenset({BASIC_PUBLISH_INDEX})
CONTENT_METHODS_SENT_BY_SERVER = frozenset(
    {commands.Basic.Return.index, BASIC_DELIVER_INDEX, commands.Basic.GetOk.index}
)
CONTENT_METHOD_INDEXES = CONTENT_METHODS_SENT_BY_CLIENT | CONTENT_METHODS_SENT_BY_SERVER

# Everything pamqp's generic decoders let escape on malformed input (its own ValueErrors, plus struct errors, index
# errors from truncated data, overflowing timestamps, tables nested deeper than the recursion limit).
_PAMQP_DECODE_ERRORS = (
    ValueError, TypeError, KeyError, IndexError, struct.error, OverflowError, OSError, RecursionError,
)  # fmt: skip
_PAMQP_ENCODE_ERRORS = (ValueError, TypeError, KeyError, AttributeError, struct.error, OverflowError, OSError)


@dataclass(frozen=True, slots=True)
class ProtocolHeaderEvent:
    """The peer opened with the AMQP 0-9-1 protocol header; the server answers with Connection.Start."""


@dataclass(frozen=True, slots=True)
class MethodEvent:
    """One method without content (everything but Basic.Publish/Return/Deliver/GetOk)."""

    channel: int
    method: base.Frame


@dataclass(frozen=True, slots=True)
class ContentEvent:
    """A content-bearing method with its properties and whole body.

    `raw_properties` is the property flags and list exactly as received, so a delivery can pass them on byte for byte
    (`send_content` accepts them in place of a `Basic.Properties`).
    """

    channel: int
    method: base.Frame
    properties: commands.Basic.Properties
    body: bytes = field(repr=False)  # can be megabytes
    raw_properties: bytes


@dataclass(frozen=True, slots=True)
class ContentRejectedEvent:
    """A content header announced a body over `max_body_size`; the codec drops its body frames as they arrive.

    The adapter closes the channel with `reply_code` (406 PRECONDITION_FAILED, as RabbitMQ does for max_message_size).
    """

    channel: int
    method: base.Frame
    body_size: int
    reply_code: ReplyCode
    reply_text: str


@dataclass(frozen=True, slots=True)
class HeartbeatEvent:
    """A heartbeat frame (channel 0, empty payload)."""


Event = ProtocolHeaderEvent | MethodEvent | ContentEvent | ContentRejectedEvent | HeartbeatEvent
_HEARTBEAT_EVENT = HeartbeatEvent()


class _PendingContent:
    """A content-bearing method on one channel waiting for its header and body frames."""

    __slots__ = ("method", "properties", "raw_properties", "body_size", "received", "chunks", "discard")

    def __init__(self, method: base.Frame) -> None:
        self.method = method
        self.properties: commands.Basic.Properties | None = None  # None until the content header arrives
        self.raw_properties = b""
        self.body_size = 0
        self.received = 0
        self.chunks: list[bytes] = []
        self.discard = False


class _AmqpCodec:
    """Framing, content assembly and encoding shared by both sides; subclasses say what the peer may send."""

    _expects_protocol_header: bool
    _peer_must_not_send: frozenset[str]
    _content_methods: frozenset[int]

    def __init__(self, *, frame_max: int = FRAME_MIN_SIZE, max_body_size: int = DEFAULT_MAX_BODY_SIZE) -> None:
        self._buffer = bytearray()
        self._awaiting_protocol_header = self._expects_protocol_header
        self._pending: dict[int, _PendingContent] = {}
        self._discarding: set[int] = set()  # channels being closed: their content is dropped, never buffered
        self._error: AmqpProtocolError | ProtocolHeaderMismatch | None = None
        self.max_body_size = max_body_size
        self.set_frame_max(frame_max)

    # ------------------------------------------------------------------ negotiation

    @property
    def frame_max(self) -> int:
        """The largest frame (header, payload and frame-end octet) accepted from the peer."""
        return self._max_payload + FRAME_OVERHEAD

    def set_frame_max(self, frame_max: int) -> None:
        """Accept frames up to `frame_max` octets from now on (the codec also applies Tune/TuneOk by itself)."""
        if frame_max < FRAME_MIN_SIZE:
            # 0 means "no limit" in AMQP; a bounded buffer needs a number.
            raise ValueError(f"frame_max {frame_max} is below the protocol minimum {FRAME_MIN_SIZE} (or unbounded)")
        self._max_payload = frame_max - FRAME_OVERHEAD

    @property
    def buffered_bytes(self) -> int:
        """Bytes of an incomplete frame held between calls (never more than one frame-max)."""
        return len(self._buffer)

    # ------------------------------------------------------------------ channels being closed

    def discard_channel(self, channel: int) -> None:
        """The adapter closed `channel` (sent Channel.Close): content on it, in flight or still to come until
        `resume_channel`, is dropped as it arrives instead of being assembled (methods still come out, so the
        adapter sees Channel.CloseOk)."""
        self._discarding.add(channel)
        pending = self._pending.get(channel)
        if pending is not None:
            pending.discard = True
            pending.chunks = []

    def resume_channel(self, channel: int) -> None:
        """`channel` is closed (Channel.CloseOk arrived) and may be opened again: its content is assembled again."""
        self._discarding.discard(channel)

    # ------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed received bytes; return every command they complete, in order.

        Raises `ProtocolHeaderMismatch` or `AmqpProtocolError` on the first fault; the codec then stays failed.
        """
        if self._error is not None:
            raise self._refusal()
        if data.__class__ is not bytes:
            data = bytes(data)  # bodies are sliced from the input and must come out as immutable bytes
        events: list[Event] = []
        if self._awaiting_protocol_header:
            data = self._receive_protocol_header(data, events)
            if self._awaiting_protocol_header:
                return events
        if self._buffer:
            self._buffer += data
            buffer: bytes | memoryview = memoryview(self._buffer)
        else:
            # Common case: no partial frame pending, so decode straight from the caller's bytes.
            buffer = data
        position = 0
        try:
            position = self._decode_frames(buffer, events)
        except AmqpProtocolError as error:
            error.events_before_error = events
            if buffer is not data:
                buffer.release()  # before _fail empties the bytearray under it
            self._fail(error)
            raise
        finally:
            if buffer is not data:
                buffer.release()  # type: ignore[union-attr]  # a bytearray cannot be resized while viewed
        if buffer is data:
            if position < len(data):
                self._buffer += data[position:]
        elif position:
            del self._buffer[:position]
        return events

    def _receive_protocol_header(self, data: bytes, events: list[Event]) -> bytes:
        """Collect the 8-byte protocol header, failing at the first byte that cannot be part of it."""
        self._buffer += data
        received = bytes(self._buffer[: len(PROTOCOL_HEADER)])
        if not PROTOCOL_HEADER.startswith(received):
            error = ProtocolHeaderMismatch(received)
            self._fail(error)
            raise error
        if len(received) < len(PROTOCOL_HEADER):
            return b""
        self._awaiting_protocol_header = False
        events.append(ProtocolHeaderEvent())
        rest = bytes(self._buffer[len(PROTOCOL_HEADER) :])
        self._buffer.clear()
        return rest

    def _fail(self, error: AmqpProtocolError | ProtocolHeaderMismatch) -> None:
        self._error = error
        self._buffer.clear()
        self._pending.clear()

    def _refusal(self) -> AmqpProtocolError | ProtocolHeaderMismatch:
        error = self._error
        if isinstance(error, ProtocolHeaderMismatch):
            return ProtocolHeaderMismatch(error.received)
        assert error is not None
        return AmqpProtocolError(
            error.reply_code, f"stream already failed: {error.reply_text}", channel=error.channel,
            class_id=error.class_id, method_id=error.method_id,
        )  # fmt: skip

    def _decode_frames(self, buffer: bytes | memoryview, events: list[Event]) -> int:
        """Decode every complete frame in `buffer`; return how many bytes they used."""
        available = len(buffer)
        position = 0
        unpack_header = FRAME_HEADER_STRUCT.unpack_from
        while available - position >= FRAME_HEADER_SIZE:
            frame_type, channel, size = unpack_header(buffer, position)
            # Both checks run on the 7-byte header alone, before any payload is buffered.
            if size > self._max_payload:
                raise AmqpProtocolError(
                    ReplyCode.FRAME_ERROR,
                    f"frame of {size + FRAME_OVERHEAD} octets is over the negotiated frame-max {self.frame_max}",
                    channel=channel,
                )
            if frame_type not in _KNOWN_FRAME_TYPES:
                raise AmqpProtocolError(ReplyCode.FRAME_ERROR, f"unknown frame type {frame_type}", channel=channel)
            end = position + FRAME_HEADER_SIZE + size
            if end >= available:
                break  # the frame-end octet is not in yet
            if buffer[end] != FRAME_END:
                raise AmqpProtocolError(
                    ReplyCode.FRAME_ERROR, f"frame-end octet is 0x{buffer[end]:02X}, not 0xCE", channel=channel
                )
            payload = bytes(buffer[position + FRAME_HEADER_SIZE : end])
            position = end + 1
            if frame_type == FRAME_METHOD:
                self._method_frame(channel, payload, events)
            elif frame_type == FRAME_BODY:
                self._body_frame(channel, payload, events)
            elif frame_type == FRAME_HEADER:
                self._content_header_frame(channel, payload, events)
            else:
                if channel != 0 or size != 0:
                    raise AmqpProtocolError(
                        ReplyCode.FRAME_ERROR,
                        f"heartbeat frame must be on channel 0 with an empty payload (channel {channel}, size {size})",
                        channel=channel,
                    )
                events.append(_HEARTBEAT_EVENT)
        return position

    def _method_frame(self, channel: int, payload: bytes, events: list[Event]) -> None:
        pending = self._pending.get(channel)
        if pending is not None and pending.discard:
            # Rejected content the adapter is closing the channel over: a client that stops sending its body and
            # answers (Channel.CloseOk) has abandoned it, which is no protocol error.
            del self._pending[channel]
        elif pending is not None:
            raise AmqpProtocolError(
                ReplyCode.UNEXPECTED_FRAME,
                f"method frame while {pending.method.name} content on channel {channel} is incomplete",
                channel=channel, class_id=pending.method.index >> 16, method_id=pending.method.index & 0xFFFF,
            )  # fmt: skip
        if len(payload) < 4:
            raise AmqpProtocolError(ReplyCode.SYNTAX_ERROR, "method frame shorter than its class and method ids",
                                    channel=channel)  # fmt: skip
        (index,) = METHOD_ID_STRUCT.unpack_from(payload)
        class_id, method_id = index >> 16, index & 0xFFFF
        if index == BASIC_PUBLISH_INDEX:
            try:
                method: base.Frame = decode_basic_publish(payload)
            except FastPathError as error:
                raise AmqpProtocolError(ReplyCode.SYNTAX_ERROR, str(error), channel=channel, class_id=class_id,
                                        method_id=method_id) from None  # fmt: skip
        else:
            method_class = commands.INDEX_MAPPING.get(index)
            if method_class is None:
                raise AmqpProtocolError(ReplyCode.NOT_IMPLEMENTED, f"unknown class {class_id} method {method_id}",
                                        channel=channel, class_id=class_id, method_id=method_id)  # fmt: skip
            method = method_class.__new__(method_class)  # skip the constructor: unmarshal sets every argument
            try:
                method.unmarshal(payload[4:])
            except _PAMQP_DECODE_ERRORS as error:
                raise AmqpProtocolError(
                    ReplyCode.SYNTAX_ERROR, f"malformed {method.name} arguments: {error}", channel=channel,
                    class_id=class_id, method_id=method_id,
                ) from None  # fmt: skip
        if method.name in self._peer_must_not_send:
            raise AmqpProtocolError(ReplyCode.COMMAND_INVALID, f"{method.name} may not be sent by the peer",
                                    channel=channel, class_id=class_id, method_id=method_id)  # fmt: skip
        if (class_id == CONNECTION_CLASS_ID) != (channel == 0):
            raise AmqpProtocolError(
                ReplyCode.COMMAND_INVALID,
                f"{method.name} on channel {channel}: connection methods use channel 0, all others a channel above 0",
                channel=channel, class_id=class_id, method_id=method_id,
            )  # fmt: skip
        if index in self._content_methods:
            pending = self._pending[channel] = _PendingContent(method)
            pending.discard = channel in self._discarding
            return
        if index in _TUNE_INDEXES:
            self._received_tune(method)
        events.append(MethodEvent(channel, method))

    def _received_tune(self, method: base.Frame) -> None:
        """Apply a negotiated frame-max the moment it is read, so frames later in the same read are checked by it.

        Only the server side settles frame-max on a received method (TuneOk); the client settles it when it sends.
        """

    def _content_header_frame(self, channel: int, payload: bytes, events: list[Event]) -> None:
        pending = self._pending.get(channel)
        if pending is None or pending.properties is not None:
            raise AmqpProtocolError(
                ReplyCode.UNEXPECTED_FRAME,
                f"content header on channel {channel} without a content method before it"
                if pending is None else f"second content header for {pending.method.name} on channel {channel}",
                channel=channel,
            )  # fmt: skip
        method = pending.method
        class_id, method_id = method.index >> 16, method.index & 0xFFFF
        if len(payload) < CONTENT_HEADER_STRUCT.size + 2:
            raise AmqpProtocolError(ReplyCode.SYNTAX_ERROR, "content header shorter than its fixed fields",
                                    channel=channel, class_id=class_id, method_id=method_id)  # fmt: skip
        header_class_id, _weight, body_size = CONTENT_HEADER_STRUCT.unpack_from(payload)
        if header_class_id != BASIC_CLASS_ID:
            raise AmqpProtocolError(
                ReplyCode.UNEXPECTED_FRAME, f"content header of class {header_class_id} after {method.name}",
                channel=channel, class_id=class_id, method_id=method_id,
            )  # fmt: skip
        raw_properties = payload[CONTENT_HEADER_STRUCT.size :]
        try:
            properties = decode_basic_properties(raw_properties)
        except (FastPathError, *_PAMQP_DECODE_ERRORS) as error:
            raise AmqpProtocolError(ReplyCode.SYNTAX_ERROR, f"malformed content header: {error}", channel=channel,
                                    class_id=class_id, method_id=method_id) from None  # fmt: skip
        pending.properties = properties
        pending.raw_properties = raw_properties
        pending.body_size = body_size
        if pending.discard:  # a channel being closed
            if body_size == 0:
                del self._pending[channel]
        elif body_size > self.max_body_size:
            pending.discard = True
            events.append(ContentRejectedEvent(
                channel, method, body_size, ReplyCode.PRECONDITION_FAILED,
                f"message size {body_size} is larger than configured max size {self.max_body_size}",
            ))  # fmt: skip
        elif body_size == 0:
            del self._pending[channel]
            events.append(ContentEvent(channel, method, pending.properties, b"", pending.raw_properties))

    def _body_frame(self, channel: int, payload: bytes, events: list[Event]) -> None:
        pending = self._pending.get(channel)
        if pending is None or pending.properties is None:
            raise AmqpProtocolError(
                ReplyCode.UNEXPECTED_FRAME,
                f"content body on channel {channel} without a content method before it" if pending is None
                else f"content body on channel {channel} before the content header of {pending.method.name}",
                channel=channel,
            )  # fmt: skip
        received = pending.received + len(payload)
        if received > pending.body_size:
            method = pending.method
            raise AmqpProtocolError(
                ReplyCode.UNEXPECTED_FRAME,
                f"content body frames of {method.name} on channel {channel} exceed the announced {pending.body_size}"
                " octets",
                channel=channel, class_id=method.index >> 16, method_id=method.index & 0xFFFF,
            )  # fmt: skip
        pending.received = received
        if not pending.discard:
            pending.chunks.append(payload)
        if received == pending.body_size:
            del self._pending[channel]
            if not pending.discard:
                chunks = pending.chunks
                body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                events.append(ContentEvent(channel, pending.method, pending.properties, body, pending.raw_properties))

    # ------------------------------------------------------------------ sending

    def send_method(self, channel: int, method: base.Frame) -> bytes:
        """The method frame for a method without content. Raises AmqpEncodeError."""
        _check_channel(channel)
        if method.index in CONTENT_METHOD_INDEXES:
            raise AmqpEncodeError(f"{method.name} carries content: encode it with send_content")
        if method.index in _TUNE_INDEXES:
            self._sending_tune(method)
        return _method_frame(channel, method)

    def _sending_tune(self, method: base.Frame) -> None:
        """Note the frame-max our side proposes (server, Tune) or settles on (client, TuneOk); see the subclasses."""

    def send_content(
        self,
        channel: int,
        method: base.Frame,
        properties: commands.Basic.Properties | bytes,
        body: bytes,
        frame_max: int | None = None,
    ) -> bytes:
        """Method frame, content header and body frames of at most `frame_max` octets each (the negotiated frame-max
        by default). `properties` may be the raw property flags and list from `ContentEvent.raw_properties`.

        Raises AmqpEncodeError.
        """
        _check_channel(channel)
        if channel == 0:
            raise AmqpEncodeError("content is never sent on channel 0")
        if method.index not in CONTENT_METHOD_INDEXES:
            raise AmqpEncodeError(f"{method.name} carries no content: encode it with send_method")
        if frame_max is None:
            frame_max = self.frame_max
        elif frame_max < FRAME_MIN_SIZE:
            raise AmqpEncodeError(f"frame_max {frame_max} is below the protocol minimum {FRAME_MIN_SIZE}")
        if method.index == BASIC_DELIVER_INDEX:
            try:
                method_frame = encode_basic_deliver_frame(channel, method)
            except FastPathError as error:
                raise AmqpEncodeError(str(error)) from None
        else:
            method_frame = _method_frame(channel, method)
        if len(method_frame) > frame_max:
            raise AmqpEncodeError(f"{method.name} frame of {len(method_frame)} octets is over frame-max {frame_max}")
        return self._content(channel, method_frame, properties, body, frame_max)

    def send_deliver(self, channel: int, consumer_tag: bytes, delivery_tag: int, redelivered: bool, address: bytes,
                     properties: commands.Basic.Properties | bytes, body: bytes) -> bytes:
        """Basic.Deliver with its content, the hot path of `send_content`: `consumer_tag` and `address` (exchange
        and routing key) are pre-encoded short strings (`fastpath.short_string`), the channel is one the adapter
        opened. Raises AmqpEncodeError."""
        method_frame = encode_deliver_frame(channel, consumer_tag, delivery_tag, redelivered, address)
        frame_max = self.frame_max
        if len(method_frame) > frame_max:
            raise AmqpEncodeError(f"Basic.Deliver frame of {len(method_frame)} octets is over frame-max {frame_max}")
        return self._content(channel, method_frame, properties, body, frame_max)

    def _content(self, channel: int, method_frame: bytes, properties: commands.Basic.Properties | bytes,
                 body: bytes, frame_max: int) -> bytes:
        max_payload = frame_max - FRAME_OVERHEAD
        if properties.__class__ is bytes:
            raw_properties = properties
        else:
            raw_properties = _marshal_properties(properties)  # type: ignore[arg-type]
        body_size = len(body)
        header_payload_size = CONTENT_HEADER_STRUCT.size + len(raw_properties)
        if header_payload_size > max_payload:
            raise AmqpEncodeError(f"content header of {header_payload_size} octets does not fit frame-max {frame_max}")
        parts = [
            method_frame,
            FRAME_HEADER_STRUCT.pack(FRAME_HEADER, channel, header_payload_size),
            CONTENT_HEADER_STRUCT.pack(BASIC_CLASS_ID, 0, body_size),
            raw_properties,
            FRAME_END_BYTE,
        ]
        if body_size <= max_payload:
            if body_size:
                parts += (FRAME_HEADER_STRUCT.pack(FRAME_BODY, channel, body_size), body, FRAME_END_BYTE)
        else:
            view = memoryview(body)
            pack_header = FRAME_HEADER_STRUCT.pack
            for start in range(0, body_size, max_payload):
                chunk = view[start : start + max_payload]
                parts += (pack_header(FRAME_BODY, channel, len(chunk)), chunk, FRAME_END_BYTE)
        return b"".join(parts)

    @staticmethod
    def send_heartbeat() -> bytes:
        """A heartbeat frame."""
        return HEARTBEAT_FRAME


def _check_channel(channel: int) -> None:
    if not 0 <= channel <= MAX_CHANNEL:
        raise AmqpEncodeError(f"channel {channel} is outside 0..{MAX_CHANNEL}")


def _method_frame(channel: int, method: base.Frame) -> bytes:
    try:
        payload = METHOD_ID_STRUCT.pack(method.index) + method.marshal()
    except _PAMQP_ENCODE_ERRORS as error:
        raise AmqpEncodeError(f"cannot encode {method.name}: {error}") from None
    return b"".join((FRAME_HEADER_STRUCT.pack(FRAME_METHOD, channel, len(payload)), payload, FRAME_END_BYTE))


def _marshal_properties(properties: commands.Basic.Properties) -> bytes:
    try:
        return encode_basic_properties(properties)
    except (FastPathError, *_PAMQP_ENCODE_ERRORS) as error:
        raise AmqpEncodeError(f"cannot encode Basic.Properties: {error}") from None


class AmqpServerCodec(_AmqpCodec):
    """The broker's side: expects the protocol header first, then frames a client may send.

    The frame-max this side offers in Connection.Tune (sent through `send_method`) becomes the limit for received
    frames as soon as the client's Connection.TuneOk is read: the client's value when it is lower, never below 4096.
    """

    _expects_protocol_header = True
    _peer_must_not_send = SENT_BY_SERVER_ONLY
    _content_methods = CONTENT_METHODS_SENT_BY_CLIENT

    def __init__(self, *, frame_max: int = FRAME_MIN_SIZE, max_body_size: int = DEFAULT_MAX_BODY_SIZE) -> None:
        self._offered_frame_max: int | None = None
        super().__init__(frame_max=frame_max, max_body_size=max_body_size)

    def _sending_tune(self, method: base.Frame) -> None:
        if not isinstance(method, commands.Connection.Tune):
            return  # TuneOk is the client's; send_method's direction is not policed for our own side
        if method.frame_max < FRAME_MIN_SIZE:
            raise AmqpEncodeError(
                f"Connection.Tune frame_max {method.frame_max}: the server always offers a bound of at least "
                f"{FRAME_MIN_SIZE} (0 would mean unbounded frames)"
            )
        self._offered_frame_max = method.frame_max

    def _received_tune(self, method: base.Frame) -> None:
        if self._offered_frame_max is None or not isinstance(method, commands.Connection.TuneOk):
            return
        # 0 from the client accepts our offer; a higher value is the adapter's to refuse, the codec keeps our bound.
        requested = method.frame_max or self._offered_frame_max
        self.set_frame_max(max(FRAME_MIN_SIZE, min(requested, self._offered_frame_max)))


class AmqpClientCodec(_AmqpCodec):
    """A client's side, for tests and tools: no protocol header arrives, content comes with Return/Deliver/GetOk.

    The frame-max it settles on in Connection.TuneOk (sent through `send_method`) becomes its limit for received frames.
    """

    _expects_protocol_header = False
    _peer_must_not_send = SENT_BY_CLIENT_ONLY
    _content_methods = CONTENT_METHODS_SENT_BY_SERVER

    @staticmethod
    def send_protocol_header() -> bytes:
        """The 8 octets a client opens the connection with."""
        return PROTOCOL_HEADER

    def _sending_tune(self, method: base.Frame) -> None:
        if isinstance(method, commands.Connection.TuneOk):
            if method.frame_max < FRAME_MIN_SIZE:
                raise AmqpEncodeError(f"Connection.TuneOk frame_max {method.frame_max} is unbounded or below "
                                      f"{FRAME_MIN_SIZE}")  # fmt: skip
            self.set_frame_max(method.frame_max)
