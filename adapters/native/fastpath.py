"""Hand-tuned byte helpers of the native protocol: a `Message` and a string to and from wire bytes, without the
per-field `Kind` objects of the frame table.

Why they exist: every SEND, SEND_BATCH, DELIVER and PULL_OK carries messages, so these functions run once per
message on both the broker and the SDK. Measured with timeit on a plain 256-byte message, the generic way (a
`RecordKind` of the 13 message fields, one `Kind.write`/`Kind.read` per field) took ~15 µs to encode and ~27 µs to
decode; these take ~1.3 µs and ~4 µs (on a busy 2-core machine: the ratios are what matters). Even so the native
codec is ~15% of the broker's CPU in profiles of `tidegate bench native` (docs/performance.md, "Where the time
goes"). So they pack the fixed-width part with one precompiled struct, cache the length-prefixed bytes of topic
names, and decode a message that has only a topic and a body (the common case) with two `unpack_from` calls.

The bytes are exactly what the field declarations in `frames.py` describe (`MessageKind` delegates here), with the
same checks: a field running past its frame raises `Truncated`, a value the wire cannot carry `FrameValueError`.
tests/native/test_native_fastpath.py and test_native_codec.py hold them to that. The frame-level hot paths
(`encode_send`, `encode_deliver`, the SEND/SEND_OK decoders) are in `codec.py` and are built on these.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

from tidegate.adapters.native.errors import FrameValueError, Truncated
from tidegate.core.model import Message

# born_ts, deliver_at, expires_at, store_ts, flags: the fixed part of every message, packed in one call
MESSAGE_FIXED = struct.Struct(">qqqqI")
_fixed_pack = MESSAGE_FIXED.pack
_fixed_unpack = MESSAGE_FIXED.unpack_from
_u16_pack = struct.Struct(">H").pack
_u32_pack = struct.Struct(">I").pack
_u32_unpack = struct.Struct(">I").unpack_from
_EMPTY_STRING = b"\x00\x00"
_NO_KEYS_NO_PROPS = b"\x00\x00\x00\x00\x00\x00\x00\x00"
_wire_strings: dict[str, bytes] = {}  # topic names repeat on every message: length-prefixed bytes, cached


def wire_string(value: str) -> bytes:
    """The wire form of a string: u16 length, then UTF-8."""
    if not value:
        if not isinstance(value, str):
            raise FrameValueError(f"{value!r} is not a string")
        return _EMPTY_STRING
    data = value.encode("utf-8")
    if len(data) > 0xFFFF:
        raise FrameValueError(f"string of {len(data)} bytes exceeds the 65535-byte wire limit")
    return _u16_pack(len(data)) + data


def wire_name(value: str) -> bytes:
    """`wire_string` for names that repeat (topics): cached, bounded."""
    data = _wire_strings.get(value)
    if data is None:
        data = wire_string(value)
        if len(_wire_strings) >= 4096:
            _wire_strings.clear()
        _wire_strings[value] = data
    return data


def slot_setter(cls: type, name: str) -> Callable[[Any, Any], None]:
    """The setter of field `name` of a slotted class (its slot descriptor's `__set__`), found along the MRO. The
    hot decoders fill frozen frames with these: like `object.__setattr__` they bypass the frozen check, but
    without looking the attribute name up on every call (about a third cheaper per field)."""
    for klass in cls.__mro__:
        descriptor = klass.__dict__.get(name)
        if descriptor is not None:
            if not hasattr(descriptor, "__set__") or type(descriptor).__name__ != "member_descriptor":
                raise TypeError(f"{cls.__name__}.{name} is not a slot")
            return descriptor.__set__
    raise AttributeError(f"{cls.__name__} has no slot {name!r}")


_PLAIN_TAIL = struct.Struct(">16xI")  # subject, tag, group, msg_id all "", no keys, no properties; body length
_plain_tail_pack = _PLAIN_TAIL.pack
_id_head_pack = struct.Struct(">6xH").pack  # subject, tag, group all ""; the msg_id's length
_id_tail_pack = struct.Struct(">8xI").pack  # no keys, no properties; body length


def message_bytes(m: Message) -> bytes:
    """The wire form of a Message (the SEND hot path: one join, cached topic, no per-field objects)."""
    try:
        fixed = _fixed_pack(m.born_ts, m.deliver_at, m.expires_at, m.store_ts, m.flags)
    except struct.error as exc:
        raise FrameValueError(f"message timestamps/flags out of range: {exc}") from None
    body = m.body
    topic = _wire_strings.get(m.topic) or wire_name(m.topic)
    keys = m.keys
    props = m.properties
    if not (m.subject or m.tag or m.group or keys or props):
        msg_id = m.msg_id
        if not msg_id:
            return b"".join((fixed, topic, _plain_tail_pack(len(body)), body))
        # a stored message (DELIVER, PULL_OK): only its id besides topic and body; ids are short ASCII
        data = msg_id.encode("utf-8")
        if len(data) <= 0xFFFF:
            return b"".join((fixed, topic, _id_head_pack(len(data)), data, _id_tail_pack(len(body)), body))
    if keys or props:
        parts = [_u32_pack(len(keys))]
        parts += [wire_string(key) for key in keys]
        parts.append(_u32_pack(len(props)))
        for k, v in props.items():
            parts.append(wire_string(k))
            parts.append(wire_string(v))
        tail = b"".join(parts)
    else:
        tail = _NO_KEYS_NO_PROPS
    return b"".join((fixed, topic,
                     wire_string(m.subject) if m.subject else _EMPTY_STRING,
                     wire_string(m.tag) if m.tag else _EMPTY_STRING,
                     wire_string(m.group) if m.group else _EMPTY_STRING,
                     wire_string(m.msg_id) if m.msg_id else _EMPTY_STRING,
                     tail, _u32_pack(len(body)), body))


def read_string(view: memoryview, pos: int, end: int) -> tuple[str, int]:
    """A string at view[pos:], not past `end`: (value, position after it)."""
    start = pos + 2
    if start > end:
        raise Truncated(f"string length needs 2 bytes, {end - pos} left")
    stop = start + ((view[pos] << 8) | view[pos + 1])
    if stop > end:
        raise Truncated(f"string needs {stop - start} bytes, {end - start} left")
    if stop == start:
        return "", stop
    try:
        return str(view[start:stop], "utf-8"), stop
    except UnicodeDecodeError as exc:
        raise FrameValueError(f"string is not valid UTF-8: {exc.reason}") from None


_FIXED_TOPIC_LEN = struct.Struct(">qqqqIH")  # fixed part + the topic's length
_fixed_topic_len_unpack = _FIXED_TOPIC_LEN.unpack_from
_PLAIN_TAIL_READ = struct.Struct(">QQI")  # the 4 string lengths, keys count + properties count, body length
_plain_tail_unpack = _PLAIN_TAIL_READ.unpack_from
_id_tail_unpack = struct.Struct(">QI").unpack_from  # after a msg_id: keys count + properties count, body length


def read_message(view: memoryview, pos: int, end: int) -> tuple[Message, int]:
    """A Message at view[pos:], not past `end`: (message, position after it). Same checks as `Reader`."""
    # Fast paths: only a topic and a body (what producers send), or a topic, a msg_id and a body (a stored message
    # as DELIVER and PULL_OK carry it); no subject/tag/group, keys or properties; everything in bounds.
    if pos + 38 <= end:
        born_ts, deliver_at, expires_at, store_ts, flags, n = _fixed_topic_len_unpack(view, pos)
        start = pos + 38
        stop = start + n
        if stop + 20 <= end:
            lengths, counts, size = _plain_tail_unpack(view, stop)
            body_start = stop + 20
            if lengths and lengths <= 0xFFFF:  # only the msg_id's length is set (the stored shape); `counts` and
                # `size` were read from inside the msg_id: the real ones follow it
                id_end = stop + 8 + lengths
                if id_end + 12 <= end:
                    counts, size = _id_tail_unpack(view, id_end)
                    body_start = id_end + 12
                    body_end = body_start + size
                    if not counts and body_end <= end:
                        try:
                            topic = str(view[start:stop], "utf-8")
                            msg_id = str(view[id_end - lengths:id_end], "utf-8")
                        except UnicodeDecodeError:
                            pass  # the full path below reports it
                        else:
                            return Message(topic, bytes(view[body_start:body_end]), "", "", (), {}, born_ts,
                                           deliver_at, expires_at, "", flags, msg_id, store_ts), body_end
            elif not lengths and not counts:
                body_end = body_start + size
                if body_end <= end:
                    try:
                        topic = str(view[start:stop], "utf-8")
                    except UnicodeDecodeError:
                        pass  # the full path below reports it
                    else:
                        return Message(topic, bytes(view[body_start:body_end]), "", "", (), {}, born_ts,
                                       deliver_at, expires_at, "", flags, "", store_ts), body_end
    return _read_message(view, pos, end)


def _read_message(view: memoryview, pos: int, end: int) -> tuple[Message, int]:
    stop = pos + 36
    if stop > end:
        raise Truncated(f"field needs 36 bytes, {end - pos} left")
    born_ts, deliver_at, expires_at, store_ts, flags = _fixed_unpack(view, pos)
    pos = stop
    strings = []
    for _ in range(5):  # topic, subject, tag, group, msg_id
        start = pos + 2
        if start > end:
            raise Truncated(f"string length needs 2 bytes, {end - pos} left")
        stop = start + ((view[pos] << 8) | view[pos + 1])
        if stop == start:
            strings.append("")
        elif stop > end:
            raise Truncated(f"string needs {stop - start} bytes, {end - start} left")
        else:
            try:
                strings.append(str(view[start:stop], "utf-8"))
            except UnicodeDecodeError as exc:
                raise FrameValueError(f"string is not valid UTF-8: {exc.reason}") from None
        pos = stop
    topic, subject, tag, group, msg_id = strings
    if pos + 4 > end:
        raise Truncated(f"field needs 4 bytes, {end - pos} left")
    (n,) = _u32_unpack(view, pos)
    pos += 4
    if n:
        key_list = []
        for _ in range(n):
            key, pos = read_string(view, pos, end)
            key_list.append(key)
        keys: tuple[str, ...] = tuple(key_list)
    else:
        keys = ()
    if pos + 4 > end:
        raise Truncated(f"field needs 4 bytes, {end - pos} left")
    (n,) = _u32_unpack(view, pos)
    pos += 4
    props = {}
    for _ in range(n):
        k, pos = read_string(view, pos, end)
        props[k], pos = read_string(view, pos, end)
    if pos + 4 > end:
        raise Truncated(f"field needs 4 bytes, {end - pos} left")
    (n,) = _u32_unpack(view, pos)
    pos += 4
    stop = pos + n
    if stop > end:
        raise Truncated(f"field needs {n} bytes, {end - pos} left")
    body = bytes(view[pos:stop])
    # positional: topic, body, subject, tag, keys, properties, born_ts, deliver_at, expires_at, group, flags,
    # msg_id, store_ts (core.model.Message field order)
    return Message(topic, body, subject, tag, keys, props, born_ts, deliver_at, expires_at, group, flags, msg_id,
                   store_ts), stop


_send_ok_packs: dict[tuple[int, str], tuple[Callable[..., bytes], bytes, int]] = {}


def _send_ok_pack(id_len: int, topic: str) -> tuple[Callable[..., bytes], bytes, int]:
    """The packer of a whole SEND_OK frame for a msg_id of `id_len` bytes and this topic (the topic's wire bytes a
    fixed-width field), the topic's wire bytes and the frame's length field. Bounded cache."""
    topic_wire = wire_name(topic)
    # header (length, type, flags, request_id), msg_id (u16 length + bytes), topic, queue_id u32, queue_offset i64
    packer = struct.Struct(f">IBBIH{id_len}s{len(topic_wire)}sIq")
    if len(_send_ok_packs) >= 4096:
        _send_ok_packs.clear()
    entry = _send_ok_packs[id_len, topic] = (packer.pack, topic_wire, packer.size - 4)
    return entry


def encode_send_oks(frame_type: int, requests: Sequence[Any], results: Sequence[Any], skip_flags: int) -> bytes:
    """The SEND_OK frames answering a run of SENDs, joined: one per request whose flags have none of `skip_flags`
    (ONEWAY), for core results with msg_id/topic/queue_id/queue_offset. Byte for byte what `encode_send_ok`
    gives one at a time, with one cached struct `pack` per frame instead of four encodes and two joins."""
    out = []
    packs = _send_ok_packs
    try:
        for request, r in zip(requests, results, strict=True):
            if request.flags & skip_flags:
                continue
            msg_id = r.msg_id.encode("utf-8")
            entry = packs.get((len(msg_id), r.topic)) or _send_ok_pack(len(msg_id), r.topic)
            pack, topic_wire, frame_len = entry
            out.append(pack(frame_len, frame_type, 0, request.request_id, len(msg_id), msg_id, topic_wire,
                            r.queue_id, r.queue_offset))
    except struct.error as exc:
        raise FrameValueError(f"SendOk: value out of range for its wire type: {exc}") from None
    return b"".join(out)
