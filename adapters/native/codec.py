"""Sans-IO codec of the Tidegate native protocol: bytes in, frames out; frames in, bytes out.

Wire layout of every frame (docs/native-protocol.md has the full reference):

    u32 length      number of bytes after this field (header + body), big-endian
    u8  type        frame type code (frames.FRAME_TYPES)
    u8  flags       FrameFlag bits (ONEWAY)
    u32 request_id  pairs responses with requests; 0 on server pushes
    ... body        the frame's wire fields, in declaration order

The codec also owns the connection rules (one transition table): a server-side codec accepts only HELLO first
and only client frames afterwards; a client-side codec accepts HELLO_OK or ERROR first and only server frames
afterwards. Rule breaches raise `ProtocolError`s that name the state, the frame and the side, and carry the wire
code the peer must be told. No sockets, no reactor, no broker.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any, NamedTuple

from tidegate.adapters.native.errors import ErrorCode, FrameValueError, Truncated
from tidegate.adapters.native.fastpath import (
    message_bytes,
    read_message,
    read_string,
    slot_setter,
    wire_name,
    wire_string,
)
from tidegate.adapters.native.frames import (
    BOTH,
    CLIENT,
    FRAME_TYPES,
    SERVER,
    SUPPORTED_VERSIONS,
    Deliver,
    DeliveryRecord,
    Error,
    Frame,
    Hello,
    HelloOk,
    Reader,
    Send,
    SendBatch,
    SendBatchOk,
    SendOk,
    SendReceipt,
)
from tidegate.core.errors import TidegateError
from tidegate.core.model import Message, MessageFlag

HEADER = struct.Struct(">IBBI")
HEADER_SIZE = HEADER.size  # 10
LENGTH_SIZE = 4
MIN_LENGTH = HEADER_SIZE - LENGTH_SIZE  # a frame with an empty body
DEFAULT_MAX_FRAME = 8 * 1024 * 1024


class ProtocolError(TidegateError):
    """The peer broke the protocol. `fatal` means the byte stream can no longer be trusted: close after
    reporting. `request_id` is the id of the offending frame when its header could be read (else 0), so the
    error response can be paired. `frames_before` holds frames decoded in the same call before the failure,
    which the caller must still handle."""

    code = ErrorCode.BAD_REQUEST
    fatal = False

    def __init__(self, message: str, *, request_id: int = 0, fatal: bool | None = None,
                 code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.request_id = request_id
        if fatal is not None:
            self.fatal = fatal
        self.frames_before: list[Frame] = []


class MalformedFrame(ProtocolError):
    code = ErrorCode.MALFORMED_FRAME


class FrameTooLarge(ProtocolError):
    code = ErrorCode.FRAME_TOO_LARGE
    fatal = True


class UnsupportedVersion(ProtocolError):
    code = ErrorCode.UNSUPPORTED_VERSION
    fatal = True


class Role(StrEnum):
    CLIENT = "client"
    SERVER = "server"


class State(StrEnum):
    AWAIT_HELLO = "await-hello"  # server: nothing received yet; client: HELLO sent, awaiting HELLO_OK
    OPEN = "open"
    CLOSED = "closed"  # a fatal error was raised; nothing more is decoded


# The transition table: (role, state) -> {frame class allowed first: next state}. In OPEN, any frame the
# other side may send is allowed and keeps the state (checked through Frame.SENDER).
HANDSHAKE: dict[tuple[Role, State], dict[type[Frame], State]] = {
    (Role.SERVER, State.AWAIT_HELLO): {Hello: State.OPEN},
    (Role.CLIENT, State.AWAIT_HELLO): {HelloOk: State.OPEN, Error: State.AWAIT_HELLO},
}
PEER_SENDS = {Role.SERVER: CLIENT, Role.CLIENT: SERVER}


def encode_frame(frame: Frame) -> bytes:
    """Encode one frame (no size limit, no state): the building block of `NativeCodec.encode`."""
    out = bytearray(HEADER_SIZE)
    try:
        spec = frame.SPEC
        if frame.TAIL and not any(getattr(frame, name) for name, _, _ in frame.TAIL):
            spec = frame.REQUIRED  # an empty optional tail stays off the wire
        for name, kind in spec:
            kind.write(out, getattr(frame, name))
        HEADER.pack_into(out, 0, len(out) - LENGTH_SIZE, frame.TYPE, frame.flags, frame.request_id)
    except struct.error as exc:
        raise FrameValueError(f"{type(frame).__name__}: value out of range for its wire type: {exc}") from None
    return bytes(out)


_header_pack = HEADER.pack
_header_unpack = HEADER.unpack_from
_I32_UNPACK = struct.Struct(">i").unpack_from
_SEND_PREFIX = struct.Struct(">IBBIi")  # header + queue_id
_send_prefix_pack = _SEND_PREFIX.pack
_SEND_OK_TAIL = struct.Struct(">Iq")  # queue_id, queue_offset
_send_ok_tail_pack = _SEND_OK_TAIL.pack
_send_ok_tail_unpack = _SEND_OK_TAIL.unpack_from
_new = object.__new__
_tuple_new = tuple.__new__
# The hand-written decoders write the fields of frozen frames through their slot descriptors: cheaper than
# object.__setattr__ (no attribute-name lookup per field), same effect.
_set_Deliver_flags = slot_setter(Deliver, "flags")
_set_Deliver_messages = slot_setter(Deliver, "messages")
_set_Deliver_request_id = slot_setter(Deliver, "request_id")
_set_Deliver_subscription_id = slot_setter(Deliver, "subscription_id")
_set_DeliveryRecord_attempt = slot_setter(DeliveryRecord, "attempt")
_set_DeliveryRecord_message = slot_setter(DeliveryRecord, "message")
_set_DeliveryRecord_queue_id = slot_setter(DeliveryRecord, "queue_id")
_set_DeliveryRecord_queue_offset = slot_setter(DeliveryRecord, "queue_offset")
_set_DeliveryRecord_receipt = slot_setter(DeliveryRecord, "receipt")
_set_DeliveryRecord_topic = slot_setter(DeliveryRecord, "topic")
_set_Send_flags = slot_setter(Send, "flags")
_set_Send_message = slot_setter(Send, "message")
_set_Send_queue_id = slot_setter(Send, "queue_id")
_set_Send_request_id = slot_setter(Send, "request_id")
_set_SendBatch_flags = slot_setter(SendBatch, "flags")
_set_SendBatch_messages = slot_setter(SendBatch, "messages")
_set_SendBatch_queue_id = slot_setter(SendBatch, "queue_id")
_set_SendBatch_request_id = slot_setter(SendBatch, "request_id")
_set_SendBatchOk_flags = slot_setter(SendBatchOk, "flags")
_set_SendBatchOk_request_id = slot_setter(SendBatchOk, "request_id")
_set_SendBatchOk_results = slot_setter(SendBatchOk, "results")
_set_SendOk_flags = slot_setter(SendOk, "flags")
_set_SendOk_msg_id = slot_setter(SendOk, "msg_id")
_set_SendOk_queue_id = slot_setter(SendOk, "queue_id")
_set_SendOk_queue_offset = slot_setter(SendOk, "queue_offset")
_set_SendOk_request_id = slot_setter(SendOk, "request_id")
_set_SendOk_topic = slot_setter(SendOk, "topic")
_set_SendReceipt_msg_id = slot_setter(SendReceipt, "msg_id")
_set_SendReceipt_queue_id = slot_setter(SendReceipt, "queue_id")
_set_SendReceipt_queue_offset = slot_setter(SendReceipt, "queue_offset")
_set_SendReceipt_topic = slot_setter(SendReceipt, "topic")
SEND_TYPE = Send.TYPE
SEND_OK_TYPE = SendOk.TYPE
SEND_BATCH_TYPE = SendBatch.TYPE
SEND_BATCH_OK_TYPE = SendBatchOk.TYPE
DELIVER_TYPE = Deliver.TYPE
_DELIVERY_POSITION = struct.Struct(">Iq")  # queue_id, queue_offset (after the queue's topic)
_delivery_position_pack = _DELIVERY_POSITION.pack
_u16_pack = struct.Struct(">H").pack
_I32_U32_UNPACK = struct.Struct(">iI").unpack_from
_u32_pack = struct.Struct(">I").pack
_u32_unpack = struct.Struct(">I").unpack_from
_u32_u32_unpack = struct.Struct(">II").unpack_from


def encode_send(request_id: int, flags: int, queue_id: int, message: Message) -> bytes:
    """The bytes of SEND without building the frame object (the producer hot path); same checks as
    `encode_frame(Send(...))` on the values that matter."""
    data = message_bytes(message)
    try:
        return b"".join((_send_prefix_pack(len(data) + 10, SEND_TYPE, flags, request_id, queue_id), data))
    except struct.error as exc:
        raise FrameValueError(f"Send: value out of range for its wire type: {exc}") from None


_plain_send_packs: dict[str, tuple[Callable[..., bytes], bytes]] = {}
_PERSISTENT = int(MessageFlag.PERSISTENT)


def _topic_packer(cache: dict[str, tuple[Callable[..., bytes], bytes]], topic: str,
                  layout: str) -> tuple[Callable[..., bytes], bytes]:
    """The `pack` of `layout` (a struct format with `{}` where the topic's length goes) for `topic`, and the topic's
    wire bytes, cached per topic in `cache` (at most 4,096 topics: a client cycling names only refills it)."""
    topic_wire = wire_name(topic)
    if len(cache) >= 4096:
        cache.clear()
    entry = cache[topic] = (struct.Struct(layout.format(len(topic_wire))).pack, topic_wire)
    return entry


def encode_plain_send(request_id: int, flags: int, queue_id: int, topic: str, body: bytes, born_ts: int) -> bytes:
    """The bytes of SEND for a message that is only a topic, a body and its born_ts (persistent, no tag, keys,
    properties, delay or expiry): what `encode_send` gives for `Message(topic, body, born_ts=born_ts)`, from one
    cached struct per topic and without the Message object (the SDK's `send_async` hot path)."""
    # header, queue_id, the message's fixed part, the topic, subject/tag/group/msg_id/keys/properties all empty,
    # the body's length
    pack, topic_wire = _plain_send_packs.get(topic) or _topic_packer(_plain_send_packs, topic, ">IBBIiqqqqI{}s16xI")
    size = len(body)
    try:
        return pack(len(topic_wire) + size + 66, SEND_TYPE, flags, request_id, queue_id, born_ts, 0, 0, 0,
                    _PERSISTENT, topic_wire, size) + body
    except struct.error as exc:
        raise FrameValueError(f"Send: value out of range for its wire type: {exc}") from None


_plain_message_packs: dict[str, tuple[Callable[..., bytes], bytes]] = {}


def encode_plain_send_batch(request_id: int, flags: int, queue_id: int, topic: str, bodies: Sequence[bytes],
                            born_ts: int) -> bytes:
    """The bytes of SEND_BATCH for messages that are only a topic (the same for all), a body and `born_ts`
    (persistent, nothing else): what `encode_send_batch` gives for `Message(topic, body, born_ts=born_ts)` of
    each body, from one cached struct per topic and one `pack` per message, without Message objects."""
    # the message's fixed part, the topic, subject/tag/group/msg_id/keys/properties all empty, body length
    pack, topic_wire = _plain_message_packs.get(topic) or _topic_packer(_plain_message_packs, topic,
                                                                        ">qqqqI{}s16xI")
    parts = [b"", _u32_pack(len(bodies))]
    append = parts.append
    try:
        for body in bodies:
            append(pack(born_ts, 0, 0, 0, _PERSISTENT, topic_wire, len(body)))
            append(body)
        size = sum(map(len, parts))
        parts[0] = _send_prefix_pack(size + 10, SEND_BATCH_TYPE, flags, request_id, queue_id)
    except struct.error as exc:
        raise FrameValueError(f"SendBatch: value out of range for its wire type: {exc}") from None
    return b"".join(parts)


def encode_send_ok(request_id: int, msg_id: str, topic: str, queue_id: int, queue_offset: int) -> bytes:
    """The bytes of SEND_OK without building the frame object (the broker's acknowledgement hot path)."""
    try:
        body = b"".join((wire_string(msg_id), wire_name(topic), _send_ok_tail_pack(queue_id, queue_offset)))
        return _header_pack(len(body) + 6, SEND_OK_TYPE, 0, request_id) + body
    except struct.error as exc:
        raise FrameValueError(f"SendOk: value out of range for its wire type: {exc}") from None


_batch_ok_packs: dict[tuple[int, str], tuple[Callable[..., bytes], bytes]] = {}


def _batch_ok_pack(id_len: int, topic: str) -> tuple[Callable[..., bytes], bytes]:
    """The packer of one SEND_BATCH_OK receipt (msg_id of `id_len` bytes, this topic), bounded cache."""
    topic_wire = wire_name(topic)
    packer = struct.Struct(f">H{id_len}s{len(topic_wire)}sIq")
    if len(_batch_ok_packs) >= 4096:
        _batch_ok_packs.clear()
    entry = _batch_ok_packs[id_len, topic] = (packer.pack, topic_wire)
    return entry


def encode_send_batch_ok(request_id: int, results: Sequence[Any]) -> bytes:
    """The bytes of SEND_BATCH_OK for objects with msg_id/topic/queue_id/queue_offset (core SendResults): one
    cached struct `pack` per receipt."""
    packs = _batch_ok_packs
    try:
        parts = [b"", _u32_pack(len(results))]
        append = parts.append
        for r in results:
            msg_id = r.msg_id.encode("utf-8")
            pack, topic_wire = packs.get((len(msg_id), r.topic)) or _batch_ok_pack(len(msg_id), r.topic)
            append(pack(len(msg_id), msg_id, topic_wire, r.queue_id, r.queue_offset))
        size = sum(map(len, parts))
        parts[0] = _header_pack(size + 6, SEND_BATCH_OK_TYPE, 0, request_id)
        return b"".join(parts)
    except struct.error as exc:
        raise FrameValueError(f"SendBatchOk: value out of range for its wire type: {exc}") from None


_deliver_packs: dict[tuple[str, int], tuple[Callable[..., bytes], bytes]] = {}


def _deliver_pack(topic: str, id_len: int) -> tuple[Callable[..., bytes], bytes]:
    """The packer of one DELIVER record of the stored shape for this topic and a msg_id of `id_len` bytes:
    queue topic, queue_id, queue_offset, no receipt, attempt, the message's fixed part, its topic (the queue's),
    subject/tag/group empty, msg_id, no keys or properties, the body's length. Bounded cache."""
    topic_wire = wire_name(topic)
    n = len(topic_wire)
    packer = struct.Struct(f">{n}sIq2xHqqqqI{n}s6xH{id_len}s8xI")
    if len(_deliver_packs) >= 4096:
        _deliver_packs.clear()
    entry = _deliver_packs[topic, id_len] = (packer.pack, topic_wire)
    return entry


def encode_deliver(subscription_id: int, deliveries: Sequence[Any]) -> bytes:
    """The bytes of a DELIVER push for core `Delivered` values, without building DeliveryRecord objects (the
    broker's delivery hot path). Same bytes as `encode_frame(Deliver(...))`."""
    return _encode_deliver_records(subscription_id, len(deliveries), (
        (d.queue, d.queue_offset, d.attempt, d.receipt, d.message) for d in deliveries))


def encode_deliver_runs(subscription_id: int, runs: Sequence[Any], count: int) -> bytes:
    """`encode_deliver` for core `DeliveryRun`s (queue, offsets, messages: offset mode, first attempt, no
    receipt) holding `count` messages: byte for byte the DELIVER of the same messages as `Delivered` values,
    without them."""
    return _encode_deliver_records(subscription_id, count, (
        (queue, offset, 1, None, m) for queue, offsets, messages in runs
        for offset, m in zip(offsets, messages, strict=True)))


def _encode_deliver_records(subscription_id: int, count: int, records: Iterable[tuple[Any, int, int, Any, Any]]
                            ) -> bytes:
    """DELIVER of `count` records (queue, queue offset, attempt, receipt, message). A stored message delivered from
    its own queue in offset mode (no receipt; only topic, msg_id and body) is one cached struct `pack` plus its
    body; anything else is encoded field by field."""
    packs = _deliver_packs
    try:
        parts = [b"", _u32_pack(subscription_id), _u32_pack(count)]
        append = parts.append
        for queue, offset, attempt, receipt, m in records:
            topic = queue.topic
            if not receipt and m.msg_id and m.topic == topic and not (m.subject or m.tag or m.group or m.keys
                                                                      or m.properties):
                msg_id = m.msg_id.encode("utf-8")
                id_len = len(msg_id)
                if id_len <= 0xFFFF:
                    pack, topic_wire = packs.get((topic, id_len)) or _deliver_pack(topic, id_len)
                    body = m.body
                    append(pack(topic_wire, queue.queue_id, offset, attempt, m.born_ts, m.deliver_at,
                                m.expires_at, m.store_ts, m.flags, topic_wire, id_len, msg_id, len(body)))
                    append(body)
                    continue
            append(wire_name(topic))
            append(_delivery_position_pack(queue.queue_id, offset))
            append(wire_string(receipt) if receipt else b"\x00\x00")
            append(_u16_pack(attempt))
            append(message_bytes(m))
        size = sum(map(len, parts))
        parts[0] = _header_pack(size + 6, DELIVER_TYPE, 0, 0)
        return b"".join(parts)
    except struct.error as exc:
        raise FrameValueError(f"Deliver: value out of range for its wire type: {exc}") from None


def encode_send_batch(request_id: int, flags: int, queue_id: int, messages: Sequence[Message]) -> bytes:
    """The bytes of SEND_BATCH without building the frame object."""
    parts = [_u32_pack(len(messages))]
    parts += [message_bytes(m) for m in messages]
    body = b"".join(parts)
    try:
        return _send_prefix_pack(len(body) + 10, SEND_BATCH_TYPE, flags, request_id, queue_id) + body
    except struct.error as exc:
        raise FrameValueError(f"SendBatch: value out of range for its wire type: {exc}") from None


def _decode_send_batch(view: memoryview, pos: int, end: int, flags: int, request_id: int) -> Frame:
    if pos + 8 > end:
        raise Truncated(f"field needs 4 bytes, {end - pos if pos + 4 > end else end - pos - 4} left")
    queue_id, n = _I32_U32_UNPACK(view, pos)
    pos += 8
    messages = []
    append = messages.append
    for _ in range(n):
        message, pos = read_message(view, pos, end)
        append(message)
    if pos != end:
        raise Truncated(f"{end - pos} trailing bytes after the last field")
    frame = _new(SendBatch)
    _set_SendBatch_request_id(frame, request_id)
    _set_SendBatch_flags(frame, flags)
    _set_SendBatch_queue_id(frame, queue_id)
    _set_SendBatch_messages(frame, tuple(messages))
    return frame


def _decode_send_batch_ok(view: memoryview, pos: int, end: int, flags: int, request_id: int) -> Frame:
    if pos + 4 > end:
        raise Truncated(f"field needs 4 bytes, {end - pos} left")
    (n,) = _u32_unpack(view, pos)
    pos += 4
    receipts = []
    last_topic_bytes = b""
    last_topic = ""
    for _ in range(n):
        msg_id, pos = read_string(view, pos, end)
        # The topic repeats on every receipt: decoded once per run of equal topics.
        start = pos + 2
        stop = start + ((view[pos] << 8) | view[pos + 1]) if start <= end else end + 1
        if stop + 12 <= end:
            topic_bytes = bytes(view[start:stop])
            if topic_bytes != last_topic_bytes:
                last_topic, _ = read_string(view, pos, stop)
                last_topic_bytes = topic_bytes
            topic = last_topic
            pos = stop
        else:
            topic, pos = read_string(view, pos, end)
            if pos + 12 > end:  # the generic decoder's words: queue_id (u32), then queue_offset (i64)
                if pos + 4 > end:
                    raise Truncated(f"field needs 4 bytes, {end - pos} left")
                raise Truncated(f"field needs 8 bytes, {end - pos - 4} left")
        queue_id, queue_offset = _send_ok_tail_unpack(view, pos)
        pos += 12
        receipt = _new(SendReceipt)
        _set_SendReceipt_msg_id(receipt, msg_id)
        _set_SendReceipt_topic(receipt, topic)
        _set_SendReceipt_queue_id(receipt, queue_id)
        _set_SendReceipt_queue_offset(receipt, queue_offset)
        receipts.append(receipt)
    if pos != end:
        raise Truncated(f"{end - pos} trailing bytes after the last field")
    frame = _new(SendBatchOk)
    _set_SendBatchOk_request_id(frame, request_id)
    _set_SendBatchOk_flags(frame, flags)
    _set_SendBatchOk_results(frame, tuple(receipts))
    return frame


_SEND_HEAD = struct.Struct(">iqqqqIH")  # queue_id, the message's fixed part, the topic's length
_send_head_unpack = _SEND_HEAD.unpack_from
_PLAIN_TAIL = struct.Struct(">QQI")  # subject/tag/group/msg_id lengths, keys + properties counts, body length
_plain_tail_unpack = _PLAIN_TAIL.unpack_from


class SendRequest(NamedTuple):
    """A SEND as the broker's codec gives it (`decode_send_request`, installed through `open_decoders`): the
    fields of the `Send` frame that the server reads, with the same names and values, in a tuple (a third of
    the cost of the frozen frame). Not a wire frame of its own: it is a SEND."""

    request_id: int
    flags: int
    queue_id: int
    message: Message


def decode_send_request(view: memoryview, pos: int, end: int, flags: int, request_id: int) -> SendRequest:
    """A SEND body as a `SendRequest`: the producer's shape (a topic and a body, nothing else) exactly filling the
    frame in two unpacks and no nested call; anything else (or any doubt) through the general path, which reports
    the errors. `_decode_send` (the `Send` frame) is this plus the frame."""
    if pos + 42 <= end:
        queue_id, born_ts, deliver_at, expires_at, store_ts, message_flags, n = _send_head_unpack(view, pos)
        start = pos + 42
        stop = start + n
        if stop + 20 <= end:
            lengths, counts, size = _plain_tail_unpack(view, stop)
            if not lengths and not counts and stop + 20 + size == end:
                try:
                    topic = str(view[start:stop], "utf-8")
                except UnicodeDecodeError:
                    pass
                else:
                    # positional: core.model.Message field order
                    return _tuple_new(SendRequest, (request_id, flags, queue_id, Message(
                        topic, bytes(view[stop + 20:end]), "", "", (), {}, born_ts, deliver_at, expires_at, "",
                        message_flags, "", store_ts)))
    if pos + 4 > end:
        raise Truncated(f"field needs 4 bytes, {end - pos} left")
    (queue_id,) = _I32_UNPACK(view, pos)
    message, pos = read_message(view, pos + 4, end)
    if pos != end:
        raise Truncated(f"{end - pos} trailing bytes after the last field")
    return _tuple_new(SendRequest, (request_id, flags, queue_id, message))


def _decode_send(view: memoryview, pos: int, end: int, flags: int, request_id: int) -> Frame:
    # The producer's shape (a topic and a body, nothing else) exactly filling the frame is read inline by
    # `decode_send_request`; anything else (or any doubt) takes the general path there, which reports errors.
    request = decode_send_request(view, pos, end, flags, request_id)
    frame = _new(Send)
    _set_Send_request_id(frame, request_id)
    _set_Send_flags(frame, flags)
    _set_Send_queue_id(frame, request.queue_id)
    _set_Send_message(frame, request.message)
    return frame


_topic_names: dict[bytes, str] = {}  # a topic's UTF-8 bytes -> the str, for answers that repeat it; bounded


def _decode_send_ok(view: memoryview, pos: int, end: int, flags: int, request_id: int) -> Frame:
    # The usual frame, both strings in bounds and the 12-byte tail exactly at the end: inline, the topic's str
    # reused from a cache; anything else (or any doubt) through the general path below, which reports errors.
    topic: str | None = None
    id_start = pos + 2
    if id_start <= end:
        id_stop = id_start + ((view[pos] << 8) | view[pos + 1])
        topic_start = id_stop + 2
        if topic_start <= end:
            topic_stop = topic_start + ((view[id_stop] << 8) | view[id_stop + 1])
            if topic_stop + 12 == end:
                topic_bytes = bytes(view[topic_start:topic_stop])
                try:
                    msg_id = str(view[id_start:id_stop], "utf-8")
                    topic = _topic_names.get(topic_bytes)
                    if topic is None:
                        topic = str(topic_bytes, "utf-8")
                        if len(_topic_names) >= 4096:
                            _topic_names.clear()
                        _topic_names[topic_bytes] = topic
                    tail = topic_stop
                except UnicodeDecodeError:
                    topic = None
    if topic is None:
        msg_id, pos = read_string(view, pos, end)
        topic, pos = read_string(view, pos, end)
        if pos + 12 > end:
            raise Truncated(f"field needs 12 bytes, {end - pos} left")
        if pos + 12 != end:
            raise Truncated(f"{end - pos - 12} trailing bytes after the last field")
        tail = pos
    queue_id, queue_offset = _send_ok_tail_unpack(view, tail)
    frame = _new(SendOk)
    _set_SendOk_request_id(frame, request_id)
    _set_SendOk_flags(frame, flags)
    _set_SendOk_msg_id(frame, msg_id)
    _set_SendOk_topic(frame, topic)
    _set_SendOk_queue_id(frame, queue_id)
    _set_SendOk_queue_offset(frame, queue_offset)
    return frame


def record_head_truncated(start: int, stop: int, end: int) -> Truncated:
    """The error of a DELIVER record whose topic (`start`:`stop`), queue_id or queue_offset runs past `end`: the
    words of the general decoder, for the inline decoders (`_decode_deliver`, the SDK's `core_deliver_decoder`)."""
    if stop > end:
        return Truncated(f"string needs {stop - start} bytes, {end - start} left")
    if stop + 4 > end:
        return Truncated(f"field needs 4 bytes, {end - stop} left")
    return Truncated(f"field needs 8 bytes, {end - stop - 4} left")


def record_topic_text(topic_bytes: bytes) -> str:
    """A DELIVER record's topic as text, or the general decoder's error (decoded once per run of one topic)."""
    try:
        return str(topic_bytes, "utf-8")
    except UnicodeDecodeError as exc:
        raise FrameValueError(f"string is not valid UTF-8: {exc.reason}") from None


def _decode_deliver(view: memoryview, pos: int, end: int, flags: int, request_id: int) -> Frame:
    """DELIVER (the consumer's hot path): DeliveryRecords built without their per-field Kinds; the queue's topic
    decoded once per run of records from the same topic."""
    if pos + 8 > end:
        raise Truncated(f"field needs 4 bytes, {end - pos if pos + 4 > end else end - pos - 4} left")
    subscription_id, n = _u32_u32_unpack(view, pos)
    pos += 8
    records = []
    append = records.append
    last_topic_bytes = b""
    last_topic = ""
    for _ in range(n):
        start = pos + 2
        if start > end:
            raise Truncated(f"string length needs 2 bytes, {end - pos} left")
        stop = start + ((view[pos] << 8) | view[pos + 1])
        if stop + 12 > end:  # the topic, queue_id and queue_offset
            raise record_head_truncated(start, stop, end)
        # Compared as bytes, never kept as a memoryview slice: a slice alive in a traceback would pin the codec's
        # buffer (it could not be resized after an error).
        topic_bytes = bytes(view[start:stop])
        if topic_bytes != last_topic_bytes:
            last_topic = record_topic_text(topic_bytes)
            last_topic_bytes = topic_bytes
        queue_id, queue_offset = _send_ok_tail_unpack(view, stop)
        pos = stop + 12
        if pos + 2 <= end and view[pos] == 0 and view[pos + 1] == 0:  # no receipt (offset mode)
            receipt = ""
            pos += 2
        else:
            receipt, pos = read_string(view, pos, end)
        if pos + 2 > end:
            raise Truncated(f"field needs 2 bytes, {end - pos} left")
        attempt = (view[pos] << 8) | view[pos + 1]
        message, pos = read_message(view, pos + 2, end)
        record = _new(DeliveryRecord)
        _set_DeliveryRecord_topic(record, last_topic)
        _set_DeliveryRecord_queue_id(record, queue_id)
        _set_DeliveryRecord_queue_offset(record, queue_offset)
        _set_DeliveryRecord_receipt(record, receipt)
        _set_DeliveryRecord_attempt(record, attempt)
        _set_DeliveryRecord_message(record, message)
        append(record)
    if pos != end:
        raise Truncated(f"{end - pos} trailing bytes after the last field")
    frame = _new(Deliver)
    _set_Deliver_request_id(frame, request_id)
    _set_Deliver_flags(frame, flags)
    _set_Deliver_subscription_id(frame, subscription_id)
    _set_Deliver_messages(frame, tuple(records))
    return frame


# Hand-written decoders of the hot frames; every other frame decodes through its SPEC.
FAST_DECODERS: dict[type[Frame], Callable[[memoryview, int, int, int, int], Frame]] = {
    Send: _decode_send,
    SendOk: _decode_send_ok,
    SendBatch: _decode_send_batch,
    SendBatchOk: _decode_send_batch_ok,
    Deliver: _decode_deliver,
}


def _spec_decoder(cls: type[Frame]) -> Callable[[memoryview, int, int, int, int], Frame]:
    fast = FAST_DECODERS.get(cls)
    if fast is not None:
        return fast
    return lambda view, pos, end, flags, request_id: decode_body(cls, view, pos, end, flags, request_id)


def _open_decoders(peer_sender: str) -> dict[int, Callable[[memoryview, int, int, int, int], Frame]]:
    """type code -> decoder of every frame a peer may send once the connection is open: what `_transition` lets
    through in State.OPEN without a change of state (HELLO and HELLO_OK are handshake-only)."""
    return {code: _spec_decoder(cls) for code, cls in FRAME_TYPES.items()
            if (cls.SENDER == peer_sender or cls.SENDER == BOTH) and cls is not Hello and cls is not HelloOk}


def decode_body(cls: type[Frame], view: memoryview, pos: int, end: int, flags: int, request_id: int) -> Frame:
    """Decode the body at view[pos:end] as `cls`; every byte must be consumed."""
    fast = FAST_DECODERS.get(cls)
    if fast is not None:
        return fast(view, pos, end, flags, request_id)
    r = Reader(view, pos, end)
    # Built without __init__: each value was range/type-checked as it was read, so validating again is waste.
    frame = object.__new__(cls)
    setattr_ = object.__setattr__
    setattr_(frame, "request_id", request_id)
    setattr_(frame, "flags", flags)
    for name, kind in cls.REQUIRED:
        setattr_(frame, name, kind.read(r))
    if cls.TAIL:
        ended = r.pos == end  # a peer from before the optional tail existed
        for name, kind, default in cls.TAIL:
            setattr_(frame, name, default if ended else kind.read(r))
    if r.pos != end:
        raise Truncated(f"{end - r.pos} trailing bytes after the last field")
    return frame


OPEN_DECODERS = {role: _open_decoders(PEER_SENDS[role]) for role in Role}


class NativeCodec:
    """One connection's codec. `receive_data` buffers at most one frame (bounded by `max_frame`)."""

    def __init__(self, role: Role | str = Role.SERVER, *, max_frame: int = DEFAULT_MAX_FRAME,
                 send_max_frame: int | None = None,
                 open_decoders: Mapping[int, Callable[[memoryview, int, int, int, int], Any]] | None = None
                 ) -> None:
        self.role = Role(role)
        self.max_frame = max_frame  # limit on frames we receive (checked before buffering their bodies)
        self.send_max_frame = send_max_frame  # limit the peer announced for what we send (None = no check)
        self.state = State.AWAIT_HELLO
        self.peer_version = 0
        self._buffer = bytearray()
        self._peer_sender = PEER_SENDS[self.role]
        self._open_decoders = OPEN_DECODERS[self.role]
        if open_decoders:
            # Decoders replacing the table's for frame types the peer may send once open (the SDK's consumers
            # decode DELIVER straight into their own values); `decoder(view, start, end, flags, request_id)`
            # raises Truncated/FrameValueError like the hand-written ones, which become MalformedFrame.
            unknown = set(open_decoders) - set(self._open_decoders)
            if unknown:
                raise ValueError(f"frame types {sorted(unknown)} are not frames a {self._peer_sender} sends "
                                 "once the connection is open")
            self._open_decoders = {**self._open_decoders, **open_decoders}

    # ------------------------------------------------------------------------------------------- outbound
    def encode(self, frame: Frame) -> bytes:
        data = encode_frame(frame)
        if self.send_max_frame is not None and len(data) - LENGTH_SIZE > self.send_max_frame:
            raise FrameTooLarge(f"{type(frame).__name__} is {len(data) - LENGTH_SIZE} bytes; the peer accepts "
                                f"at most {self.send_max_frame}", request_id=frame.request_id, fatal=False)
        return data

    def encode_many(self, frames: Sequence[Frame]) -> list[bytes]:
        return [self.encode(f) for f in frames]

    # -------------------------------------------------------------------------------------------- inbound
    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def receive_data(self, data: bytes) -> list[Frame]:
        """Decode every complete frame in the buffer plus `data`.

        On a protocol error the bad frame is skipped (non-fatal) or decoding stops for good (fatal); the raised
        error carries the frames decoded before it in `frames_before`. After a non-fatal error, call
        `receive_data(b"")` to continue with the bytes that followed the bad frame.
        """
        if self.state is State.CLOSED:
            return []
        buf = self._buffer
        buf += data
        frames: list[Frame] = []
        pos = 0
        size = len(buf)
        error: ProtocolError | None = None
        append = frames.append
        open_decoders = self._open_decoders
        open_state = State.OPEN
        header_unpack = _header_unpack
        with memoryview(buf) as view:
            while size - pos >= LENGTH_SIZE:
                length, = _u32_unpack(view, pos)
                if length > self.max_frame:
                    error = FrameTooLarge(f"frame of {length} bytes exceeds the maximum of {self.max_frame}")
                    break
                if length < MIN_LENGTH:
                    error = MalformedFrame(f"frame length {length} is shorter than the {MIN_LENGTH}-byte header",
                                           fatal=True)
                    break
                end = pos + LENGTH_SIZE + length
                if end > size:
                    break
                _, type_code, flags, request_id = header_unpack(view, pos)
                start = pos + HEADER_SIZE
                pos = end
                # Open connection, a frame type the peer may send: straight to its decoder (no state transition).
                decode = open_decoders.get(type_code) if self.state is open_state else None
                try:
                    if decode is not None:
                        try:
                            append(decode(view, start, end, flags, request_id))
                        except (Truncated, FrameValueError, struct.error) as exc:
                            raise MalformedFrame(f"{FRAME_TYPES[type_code].__name__}: {exc}",
                                                 request_id=request_id) from None
                    else:
                        append(self._decode(type_code, view, start, end, flags, request_id))
                except ProtocolError as exc:
                    error = exc
                    break
        if error is not None and error.fatal:
            self.state = State.CLOSED
            buf.clear()
        else:
            del buf[:pos]
        if error is not None:
            error.frames_before = frames
            raise error
        return frames

    def _decode(self, type_code: int, view: memoryview, start: int, end: int, flags: int,
                request_id: int) -> Frame:
        cls = FRAME_TYPES.get(type_code)
        if cls is None:
            raise MalformedFrame(f"unknown frame type 0x{type_code:02x}", request_id=request_id)
        try:
            frame = decode_body(cls, view, start, end, flags, request_id)
        except (Truncated, FrameValueError, struct.error) as exc:
            raise MalformedFrame(f"{cls.__name__}: {exc}", request_id=request_id) from None
        self._transition(frame)
        return frame

    def _transition(self, frame: Frame) -> None:
        cls = type(frame)
        if self.state is State.OPEN:
            if cls.SENDER != self._peer_sender and cls.SENDER != BOTH:
                raise ProtocolError(f"{self.role.value} in state {self.state.value} received {cls.__name__}, "
                                    f"which only the {cls.SENDER} sends", request_id=frame.request_id)
            if cls is Hello or cls is HelloOk:
                raise ProtocolError(f"{self.role.value} in state {self.state.value} received a second "
                                    f"{cls.__name__}", request_id=frame.request_id)
            return
        allowed = HANDSHAKE[(self.role, self.state)]
        if cls not in allowed:
            expected = " or ".join(c.__name__ for c in allowed)
            raise ProtocolError(f"{self.role.value} in state {self.state.value} received {cls.__name__}; "
                                f"expected {expected}", request_id=frame.request_id, fatal=True)
        if cls is Hello:
            if frame.version not in SUPPORTED_VERSIONS:
                raise UnsupportedVersion(f"protocol version {frame.version} is not supported; this server "
                                         f"speaks {sorted(SUPPORTED_VERSIONS)}", request_id=frame.request_id)
            self.peer_version = frame.version
        elif cls is HelloOk:
            self.peer_version = frame.version
            if frame.max_frame:
                self.send_max_frame = frame.max_frame
        self.state = allowed[cls]


__all__ = [
    "DEFAULT_MAX_FRAME",
    "HEADER",
    "FrameTooLarge",
    "MalformedFrame",
    "NativeCodec",
    "ProtocolError",
    "Role",
    "State",
    "UnsupportedVersion",
    "decode_body",
    "encode_frame",
    "encode_send",
    "encode_plain_send_batch",
    "encode_send_batch",
    "encode_send_batch_ok",
    "encode_send_ok",
]
