"""DELIVER decoded straight into core `Delivered` values, for the SDK's consumers.

A consumer hands its handler `Delivered(message, queue, queue_offset, receipt, attempt)`; decoding a DELIVER into
`DeliveryRecord` frames first and converting them after costs one object per message for nothing. A `Connection`
opened with `core_deliveries=True` (what `PushConsumer` and `SimpleConsumer` do) gives its codec this module's
decoder for DELIVER (`NativeCodec(..., open_decoders={DELIVER_TYPE: core_deliver_decoder()})`): push handlers then
receive a `DeliveredBatch`. The decoder has the codec's checks and errors (tests/native/test_native_pass2.py holds
it to the generic decoder, whole and cut anywhere). It lives here, not in codec.py, because the codec modules stay
free of the core beyond core.model and core.errors (tests/test_layering.py).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from tidegate.adapters.native.codec import DELIVER_TYPE, record_head_truncated, record_topic_text
from tidegate.adapters.native.errors import Truncated
from tidegate.adapters.native.fastpath import read_message, read_string
from tidegate.adapters.native.frames import Deliver, DeliveryRecord
from tidegate.core.api import Delivered
from tidegate.core.model import Message, QueueRef

__all__ = ["DELIVER_TYPE", "DeliveredBatch", "core_deliver_decoder"]

_u32_u32_unpack = struct.Struct(">II").unpack_from
_position_unpack = struct.Struct(">Iq").unpack_from  # queue_id, queue_offset (after the queue's topic)


class DeliveredBatch:
    """A DELIVER as a client codec built with `core_deliveries=True` returns it: the subscription id and the
    messages as core `Delivered` values (what consumers hand to their handlers), decoded straight from the bytes
    without the intermediate `DeliveryRecord`s. Not a wire frame: the Deliver frame it stands for is
    `to_frame()`."""

    __slots__ = ("subscription_id", "deliveries")
    request_id = 0
    flags = 0

    def __init__(self, subscription_id: int, deliveries: list[Delivered]) -> None:
        self.subscription_id = subscription_id
        self.deliveries = deliveries

    def to_frame(self) -> Deliver:
        return Deliver(subscription_id=self.subscription_id, messages=tuple(
            DeliveryRecord(topic=d.queue.topic, queue_id=d.queue.queue_id, queue_offset=d.queue_offset,
                           receipt=d.receipt, attempt=d.attempt, message=d.message) for d in self.deliveries))

    def __repr__(self) -> str:
        return f"DeliveredBatch(subscription_id={self.subscription_id}, {len(self.deliveries)} deliveries)"


# After a record's queue topic, when it has no receipt (offset mode): queue_id, queue_offset, receipt length (0),
# attempt, then the message's born_ts, deliver_at, expires_at, store_ts, flags and its topic's length.
_RECORD_HEAD = struct.Struct(">IqHHqqqqIH")
_record_head_unpack = _RECORD_HEAD.unpack_from
_STORED_MIDDLE = struct.Struct(">Q")  # subject, tag, group lengths (all 0) and the msg_id's length
_stored_middle_unpack = _STORED_MIDDLE.unpack_from
_STORED_TAIL = struct.Struct(">QI")  # keys count + properties count (0), body length
_stored_tail_unpack = _STORED_TAIL.unpack_from
MAX_QUEUE_REFS = 4096


def core_deliver_decoder(queue_refs: dict[tuple[str, int], QueueRef] | None = None
                         ) -> Callable[[memoryview, int, int, int, int], DeliveredBatch]:
    """A DELIVER decoder giving a `DeliveredBatch` of core `Delivered` values (one shared `QueueRef` per queue,
    kept in `queue_refs`). Same values, same checks and same errors as `_decode_deliver` followed by a
    conversion of each record; the stored shape (no receipt, a message with only topic, msg_id and body, whose
    topic is the queue's) is read with three unpacks per message and its topic string reused."""
    refs: dict[tuple[str, int], QueueRef] = {} if queue_refs is None else queue_refs

    def decode(view: memoryview, pos: int, end: int, flags: int, request_id: int) -> DeliveredBatch:
        if pos + 8 > end:
            raise Truncated(f"field needs 4 bytes, {end - pos if pos + 4 > end else end - pos - 4} left")
        subscription_id, n = _u32_u32_unpack(view, pos)
        pos += 8
        out: list[Delivered] = []
        append = out.append
        last_topic_bytes = b""
        last_topic = ""
        for _ in range(n):
            start = pos + 2
            if start > end:
                raise Truncated(f"string length needs 2 bytes, {end - pos} left")
            topic_len = (view[pos] << 8) | view[pos + 1]
            stop = start + topic_len
            if stop + 12 > end:
                raise record_head_truncated(start, stop, end)
            topic_bytes = bytes(view[start:stop])
            if topic_bytes != last_topic_bytes:
                last_topic = record_topic_text(topic_bytes)
                last_topic_bytes = topic_bytes
            # The stored shape, every field in bounds; anything else takes the general path from `stop`.
            if stop + 54 <= end:
                (queue_id, queue_offset, receipt_len, attempt, born_ts, deliver_at, expires_at, store_ts,
                 message_flags, message_topic_len) = _record_head_unpack(view, stop)
                topic_at = stop + 54
                middle = topic_at + message_topic_len
                if not receipt_len and message_topic_len == topic_len and middle + 8 <= end \
                        and view[topic_at:middle] == topic_bytes:
                    (id_len,) = _stored_middle_unpack(view, middle)
                    id_end = middle + 8 + id_len
                    if id_len <= 0xFFFF and id_end + 12 <= end:
                        counts, size = _stored_tail_unpack(view, id_end)
                        body_end = id_end + 12 + size
                        if not counts and body_end <= end:
                            try:
                                msg_id = str(view[middle + 8:id_end], "utf-8") if id_len else ""
                            except UnicodeDecodeError:
                                pass  # the general path reports it
                            else:
                                ref = refs.get((last_topic, queue_id))
                                if ref is None:
                                    if len(refs) >= MAX_QUEUE_REFS:
                                        refs.clear()
                                    ref = refs[last_topic, queue_id] = QueueRef(last_topic, queue_id)
                                # positional: core.model.Message field order, then Delivered's
                                append(Delivered(Message(last_topic, bytes(view[id_end + 12:body_end]), "", "",
                                                         (), {}, born_ts, deliver_at, expires_at, "",
                                                         message_flags, msg_id, store_ts),
                                                 ref, queue_offset, "", attempt))
                                pos = body_end
                                continue
            queue_id, queue_offset = _position_unpack(view, stop)
            pos = stop + 12
            if pos + 2 <= end and view[pos] == 0 and view[pos + 1] == 0:
                receipt = ""
                pos += 2
            else:
                receipt, pos = read_string(view, pos, end)
            if pos + 2 > end:
                raise Truncated(f"field needs 2 bytes, {end - pos} left")
            attempt = (view[pos] << 8) | view[pos + 1]
            message, pos = read_message(view, pos + 2, end)
            ref = refs.get((last_topic, queue_id))
            if ref is None:
                if len(refs) >= MAX_QUEUE_REFS:
                    refs.clear()
                ref = refs[last_topic, queue_id] = QueueRef(last_topic, queue_id)
            append(Delivered(message, ref, queue_offset, receipt, attempt))
        if pos != end:
            raise Truncated(f"{end - pos} trailing bytes after the last field")
        return DeliveredBatch(subscription_id, out)

    return decode
