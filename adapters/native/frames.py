"""Native protocol frames: one frozen, slotted dataclass per wire frame, with its field layout beside it.

Every wire field is declared with `wire(KIND)`; the field order in the class is the order on the wire. The
codec (`codec.py`) encodes and decodes any frame from that declaration, so adding a frame is adding a class.
The frame layout is documented for other-language clients in docs/native-protocol.md; keep both in step.

This module is pure data: no sockets, no reactor, no broker. It only borrows the `Message` value type and the
error codes from the core, which are plain Python. The bytes of a `Message` (the field every hot frame carries)
come from the hand-tuned helpers in `fastpath.py`; `FrameValueError` and `Truncated` live in `errors.py`, below
both, and are re-exported here.
"""

from __future__ import annotations

import struct
from dataclasses import MISSING, dataclass, field, fields
from enum import IntEnum, IntFlag
from typing import Any, ClassVar

from tidegate.adapters.native.errors import ErrorCode, FrameValueError, Truncated
from tidegate.adapters.native.fastpath import message_bytes, read_message
from tidegate.core.model import Message

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({PROTOCOL_VERSION})

U8 = struct.Struct(">B")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
I32 = struct.Struct(">i")
I64 = struct.Struct(">q")


class FrameFlag(IntFlag):
    NONE = 0
    ONEWAY = 0x01  # the sender wants no response on success (one-way send, credit grants)


class Mode(IntEnum):
    CLUSTERING = 0
    BROADCASTING = 1


class Ack(IntEnum):
    OFFSET = 0
    MESSAGE = 1


class Status(IntEnum):
    FOUND = 0
    NO_NEW = 1
    OFFSET_MOVED = 2


class ResetTo(IntEnum):
    EARLIEST = 0
    LATEST = 1
    TIMESTAMP = 2


# --------------------------------------------------------------------------------------------- field kinds
class Reader:
    """A cursor over one frame body. Every read checks the frame end, never the buffer end."""

    __slots__ = ("view", "pos", "end")

    def __init__(self, view: memoryview, pos: int, end: int) -> None:
        self.view = view
        self.pos = pos
        self.end = end

    def take(self, n: int) -> int:
        start = self.pos
        stop = start + n
        if stop > self.end:
            raise Truncated(f"field needs {n} bytes, {self.end - start} left")
        self.pos = stop
        return start

    def unpack(self, st: struct.Struct) -> tuple[Any, ...]:
        start = self.pos
        stop = start + st.size
        if stop > self.end:
            raise Truncated(f"field needs {st.size} bytes, {self.end - start} left")
        self.pos = stop
        return st.unpack_from(self.view, start)

    def string(self) -> str:
        view, pos, end = self.view, self.pos, self.end
        start = pos + 2
        if start > end:
            raise Truncated(f"string length needs 2 bytes, {end - pos} left")
        stop = start + ((view[pos] << 8) | view[pos + 1])
        if stop > end:
            raise Truncated(f"string needs {stop - start} bytes, {end - start} left")
        self.pos = stop
        try:
            return str(view[start:stop], "utf-8")
        except UnicodeDecodeError as exc:
            raise FrameValueError(f"string is not valid UTF-8: {exc.reason}") from None

    def blob(self) -> bytes:
        (n,) = self.unpack(U32)
        start = self.take(n)
        return bytes(self.view[start : start + n])


def put_string(out: bytearray, value: str) -> None:
    data = value.encode("utf-8")
    if len(data) > 0xFFFF:
        raise FrameValueError(f"string of {len(data)} bytes exceeds the 65535-byte wire limit")
    out += U16.pack(len(data))
    out += data


class Kind:
    """How one field travels. `check` validates a constructed value; `write`/`read` do the bytes."""

    name = "?"

    def check(self, value: Any) -> Any:
        return value

    def write(self, out: bytearray, value: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, r: Reader) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


class IntKind(Kind):
    def __init__(self, name: str, st: struct.Struct, lo: int, hi: int) -> None:
        self.name, self.st, self.lo, self.hi = name, st, lo, hi

    def check(self, value: Any) -> Any:
        if not isinstance(value, int) or isinstance(value, bool) or not self.lo <= value <= self.hi:
            raise FrameValueError(f"{value!r} is not a {self.name}")
        return value

    def write(self, out: bytearray, value: Any) -> None:
        out += self.st.pack(value)

    def read(self, r: Reader) -> Any:
        return r.unpack(self.st)[0]


class BoolKind(Kind):
    name = "bool"

    def check(self, value: Any) -> Any:
        if not isinstance(value, bool):
            raise FrameValueError(f"{value!r} is not a bool")
        return value

    def write(self, out: bytearray, value: Any) -> None:
        out.append(1 if value else 0)

    def read(self, r: Reader) -> Any:
        (v,) = r.unpack(U8)
        if v > 1:
            raise FrameValueError(f"bool byte is {v}, expected 0 or 1")
        return v == 1


class EnumKind(Kind):
    def __init__(self, enum: type[IntEnum]) -> None:
        self.enum = enum
        self.name = f"u8 {enum.__name__}"

    def check(self, value: Any) -> Any:
        try:
            return self.enum(value)
        except ValueError:
            raise FrameValueError(f"{value!r} is not a {self.enum.__name__}") from None

    def write(self, out: bytearray, value: Any) -> None:
        out.append(value)

    def read(self, r: Reader) -> Any:
        (v,) = r.unpack(U8)
        return self.check(v)


class StrKind(Kind):
    name = "string"

    def check(self, value: Any) -> Any:
        if not isinstance(value, str):
            raise FrameValueError(f"{value!r} is not a string")
        return value

    def write(self, out: bytearray, value: Any) -> None:
        put_string(out, value)

    def read(self, r: Reader) -> Any:
        return r.string()


class BytesKind(Kind):
    name = "bytes"

    def check(self, value: Any) -> Any:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise FrameValueError(f"{type(value).__name__} is not bytes")
        return bytes(value)

    def write(self, out: bytearray, value: Any) -> None:
        out += U32.pack(len(value))
        out += value

    def read(self, r: Reader) -> Any:
        return r.blob()


class ListKind(Kind):
    """u32 count, then the items. Decoded as a tuple so frames stay immutable and comparable."""

    def __init__(self, item: Kind) -> None:
        self.item = item
        self.name = f"list<{item.name}>"

    def check(self, value: Any) -> Any:
        if not isinstance(value, list | tuple):
            raise FrameValueError(f"{type(value).__name__} is not a list")
        return tuple(value)

    def write(self, out: bytearray, value: Any) -> None:
        out += U32.pack(len(value))
        write = self.item.write
        for item in value:
            write(out, item)

    def read(self, r: Reader) -> Any:
        (n,) = r.unpack(U32)
        read = self.item.read
        return tuple([read(r) for _ in range(n)])


class MapKind(Kind):
    """u32 count, then key string, value string pairs."""

    name = "map<string,string>"

    def check(self, value: Any) -> Any:
        if not isinstance(value, dict):
            raise FrameValueError(f"{type(value).__name__} is not a string map")
        return value

    def write(self, out: bytearray, value: Any) -> None:
        out += U32.pack(len(value))
        for k, v in value.items():
            put_string(out, k)
            put_string(out, v)

    def read(self, r: Reader) -> Any:
        (n,) = r.unpack(U32)
        string = r.string
        result = {}
        for _ in range(n):
            k = string()
            result[k] = string()
        return result


class MessageKind(Kind):
    """Every field of core.model.Message, fixed-width part first (written by hand: this is the hot path)."""

    name = "message"

    def check(self, value: Any) -> Any:
        if not isinstance(value, Message):
            raise FrameValueError(f"{type(value).__name__} is not a Message")
        return value

    def write(self, out: bytearray, m: Message) -> None:
        out += message_bytes(m)

    def read(self, r: Reader) -> Message:
        message, r.pos = read_message(r.view, r.pos, r.end)
        return message


class RecordKind(Kind):
    """A nested record: its own wire fields, in order, with no header."""

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.name = cls.__name__

    def check(self, value: Any) -> Any:
        if not isinstance(value, self.cls):
            raise FrameValueError(f"{type(value).__name__} is not a {self.cls.__name__}")
        return value

    def write(self, out: bytearray, value: Any) -> None:
        for name, kind in self.cls.SPEC:
            kind.write(out, getattr(value, name))

    def read(self, r: Reader) -> Any:
        obj = object.__new__(self.cls)
        for name, kind in self.cls.SPEC:
            _set(obj, name, kind.read(r))
        return obj


UINT8 = IntKind("u8", U8, 0, 0xFF)
UINT16 = IntKind("u16", U16, 0, 0xFFFF)
UINT32 = IntKind("u32", U32, 0, 0xFFFFFFFF)
INT32 = IntKind("i32", I32, -(2**31), 2**31 - 1)
INT64 = IntKind("i64", I64, -(2**63), 2**63 - 1)
BOOL = BoolKind()
STR = StrKind()
BYTES = BytesKind()
STRLIST = ListKind(STR)
STRMAP = MapKind()
MESSAGE = MessageKind()


def wire(kind: Kind, default: Any = MISSING, default_factory: Any = MISSING, *, optional_tail: bool = False) -> Any:
    """Declare a dataclass field that travels on the wire as `kind`.

    `optional_tail` fields come last: they are left off the wire when every one of them is empty (falsy), and a
    frame that ends before them decodes with their defaults, so peers from before they existed still agree."""
    metadata = {"kind": kind, "optional_tail": optional_tail}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _spec(cls: type) -> tuple[tuple[str, Kind], ...]:
    return tuple((f.name, f.metadata["kind"]) for f in fields(cls) if "kind" in f.metadata)


_set = object.__setattr__  # decoding fills frozen instances directly: every value was checked as it was read


def _validate(obj: Any) -> None:
    # Called from __post_init__: normalise enums and lists, reject values the wire cannot carry.
    for name, kind in obj.SPEC:
        value = getattr(obj, name)
        checked = kind.check(value)
        if checked is not value:
            object.__setattr__(obj, name, checked)


# -------------------------------------------------------------------------------------------------- records
@dataclass(frozen=True, slots=True, kw_only=True)
class WireRecord:
    SPEC: ClassVar[tuple[tuple[str, Kind], ...]] = ()

    def __post_init__(self) -> None:
        _validate(self)


def record(cls: type) -> type:
    cls.SPEC = _spec(cls)
    return cls


@record
@dataclass(frozen=True, slots=True, kw_only=True)
class TopicInfo(WireRecord):
    name: str = wire(STR)
    queues: int = wire(UINT16)
    perm: str = wire(STR, "rw")
    retention_ms: int = wire(INT64, 0)
    internal: bool = wire(BOOL, False)
    created_ts: int = wire(INT64, 0)


@record
@dataclass(frozen=True, slots=True, kw_only=True)
class QueueRange(WireRecord):
    queue_id: int = wire(UINT32)
    min_offset: int = wire(INT64)
    max_offset: int = wire(INT64)


@record
@dataclass(frozen=True, slots=True, kw_only=True)
class SendReceipt(WireRecord):
    msg_id: str = wire(STR)
    topic: str = wire(STR)
    queue_id: int = wire(UINT32)
    queue_offset: int = wire(INT64)


@record
@dataclass(frozen=True, slots=True, kw_only=True)
class QueueName(WireRecord):
    topic: str = wire(STR)
    queue_id: int = wire(UINT32)


@record
@dataclass(frozen=True, slots=True, kw_only=True)
class QueueOffset(WireRecord):
    topic: str = wire(STR)
    queue_id: int = wire(UINT32)
    offset: int = wire(INT64)


@record
@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryRecord(WireRecord):
    """One delivered message. `topic`/`queue_id` name the queue it came from, which may differ from
    `message.topic` (retry queues, fan-out destinations); commits and acks refer to the queue."""

    topic: str = wire(STR)
    queue_id: int = wire(UINT32)
    queue_offset: int = wire(INT64)
    receipt: str = wire(STR, "")
    attempt: int = wire(UINT16, 1)
    message: Message = wire(MESSAGE)


@record
@dataclass(frozen=True, slots=True, kw_only=True)
class GroupSummary(WireRecord):
    name: str = wire(STR)
    mode: Mode = wire(EnumKind(Mode), Mode.CLUSTERING)
    ack: Ack = wire(EnumKind(Ack), Ack.OFFSET)
    topics: tuple[str, ...] = wire(STRLIST, ())
    members: tuple[str, ...] = wire(STRLIST, ())
    inflight: int = wire(UINT32, 0)
    lag: int = wire(INT64, 0)


@record
@dataclass(frozen=True, slots=True, kw_only=True)
class ProgressRecord(WireRecord):
    topic: str = wire(STR)
    queue_id: int = wire(UINT32)
    committed: int = wire(INT64)
    min_offset: int = wire(INT64)
    max_offset: int = wire(INT64)
    lag: int = wire(INT64)
    owner: str = wire(STR, "")


# --------------------------------------------------------------------------------------------------- frames
CLIENT, SERVER, BOTH = "client", "server", "both"
FRAME_TYPES: dict[int, type[Frame]] = {}


@dataclass(frozen=True, slots=True, kw_only=True)
class Frame:
    """Base of every frame. `request_id` pairs a response with its request (0 for server pushes)."""

    TYPE: ClassVar[int] = 0
    SENDER: ClassVar[str] = BOTH
    SPEC: ClassVar[tuple[tuple[str, Kind], ...]] = ()
    REQUIRED: ClassVar[tuple[tuple[str, Kind], ...]] = ()  # SPEC without the optional tail
    TAIL: ClassVar[tuple[tuple[str, Kind, Any], ...]] = ()  # optional tail: (name, kind, default)

    request_id: int = 0
    flags: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.request_id <= 0xFFFFFFFF:
            raise FrameValueError(f"request id {self.request_id} is not a u32")
        if not 0 <= self.flags <= 0xFF:
            raise FrameValueError(f"flags {self.flags} is not a u8")
        _validate(self)

    @property
    def oneway(self) -> bool:
        return bool(self.flags & FrameFlag.ONEWAY)


def frame(type_code: int, sender: str) -> Any:
    """Register a frame class under its wire type code."""

    def register(cls: type[Frame]) -> type[Frame]:
        if type_code in FRAME_TYPES:
            raise RuntimeError(f"frame type 0x{type_code:02x} registered twice")
        cls.TYPE = type_code
        cls.SENDER = sender
        cls.SPEC = _spec(cls)
        tail = [f for f in fields(cls) if f.metadata.get("optional_tail")]
        cls.TAIL = tuple((f.name, f.metadata["kind"], f.default) for f in tail)
        cls.REQUIRED = cls.SPEC[:len(cls.SPEC) - len(tail)]
        if tail and tuple(name for name, _ in cls.SPEC[len(cls.REQUIRED):]) != tuple(f.name for f in tail):
            raise RuntimeError(f"{cls.__name__}: optional_tail fields must come last")
        FRAME_TYPES[type_code] = cls
        return cls

    return register


# --- connection
@frame(0x01, CLIENT)
@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(Frame):
    version: int = wire(UINT16, PROTOCOL_VERSION)
    client_id: str = wire(STR, "")
    client_name: str = wire(STR, "")
    # Credentials (optional tail: a HELLO without them is the anonymous one older clients send).
    username: str = wire(STR, "", optional_tail=True)
    password: bytes = wire(BYTES, b"", optional_tail=True)

    def __repr__(self) -> str:  # never the password in logs or tracebacks
        return (f"Hello(request_id={self.request_id}, version={self.version}, client_id={self.client_id!r}, "
                f"client_name={self.client_name!r}, username={self.username!r}, password=<{len(self.password)} "
                "bytes>)")


@frame(0x02, SERVER)
@dataclass(frozen=True, slots=True, kw_only=True)
class HelloOk(Frame):
    version: int = wire(UINT16, PROTOCOL_VERSION)
    server_version: str = wire(STR, "")
    max_frame: int = wire(UINT32, 0)
    heartbeat_ms: int = wire(UINT32, 0)


@frame(0x03, BOTH)
@dataclass(frozen=True, slots=True, kw_only=True)
class Ping(Frame):
    pass


@frame(0x04, BOTH)
@dataclass(frozen=True, slots=True, kw_only=True)
class Pong(Frame):
    pass


@frame(0x05, SERVER)
@dataclass(frozen=True, slots=True, kw_only=True)
class Error(Frame):
    code: int = wire(UINT16, int(ErrorCode.INTERNAL))
    message: str = wire(STR, "")


@frame(0x06, CLIENT)
@dataclass(frozen=True, slots=True, kw_only=True)
class Bye(Frame):
    pass


@frame(0x07, SERVER)
@dataclass(frozen=True, slots=True, kw_only=True)
class Ok(Frame):
    """The response to requests that return nothing (delete, ack, commit, bye...)."""


# --- topics
@frame(0x10, CLIENT)
@dataclass(frozen=True, slots=True, kw_only=True)
class TopicCreate(Frame):
    name: str = wire(STR)
    queues: int = wire(UINT16, 0)  # 0 = broker default
    perm: str = wire(STR, "rw")
    retention_ms: int = wire(INT64, 0)


@frame(0x11, CLIENT)
@dataclass(frozen=True, slots=True, kw_only=True)
class TopicUpdate(Frame):
    name: str = wire(STR)
    queues: int = wire(UINT16, 0)  # 0 = unchanged
    perm: str = wire(STR, "")  # "" = unchanged
    retention_ms: int = wire(INT64, -1)  # -1 = unchanged


@frame(0x12, CLIENT)
@dataclass(frozen=True, slots=True, kw_only=True)
class TopicDelete(Frame):
    name: str = wire(STR)


@frame(0x13, CLIENT)
@dataclass(frozen=True, slots=True, kw_only=True)
class TopicList(Frame):
    include_internal: bool = wire(BOOL, False)


@frame(0x14, CLIENT)
@dataclass(frozen=True, slots=True, kw_only=True)
class TopicDescribe(Frame):
    name: str = wire(STR)


@frame(0x18, SERVER)
@dataclass(frozen=True, slots=True, kw_only=True)
class TopicOk(Frame):
    topic: TopicInfo = wire(RecordKind(TopicInfo))


@frame(0x19, SERVER)
@dataclass(frozen=True, slots=True, kw_only=True)
class TopicListOk(Frame):
    topics: tuple[TopicInfo, ...] = wire(ListKind(RecordKind(TopicInfo)), ())


@frame(0x1A, SERVER)
@dataclass(frozen=True, slots=True, kw_only=True)
class TopicDescribeOk(Frame):
    topic: TopicInfo = wire(RecordKind(TopicInfo))
    queues: tuple[QueueRange, ...] = wire(ListKind(RecordKind(QueueRange)), ())


# --- produce
@frame(0x20, CLIENT)
@dataclass(frozen=True, slots=True, kw_only=True)
class Send(Frame):
    queue_id: int = wire(INT32, -1)  # -1 = let the broker choose (group hash or round-robin)
    message: Message = wire(MESSAGE)


@frame(0x21, CLIENT)
@dataclass(frozen=True, slots=True, kw_only=True)
class SendBatch(Frame):
    queue_id: int = wire(INT32, -1)
    messages: tuple[Message, ...] = wire(ListKind(MESSAGE), ())


@frame(0x28, SERVER)
@dataclass(frozen=True, slots=True, kw_only=True)
class SendOk(Frame):
    msg_id: str = wire(STR)
    topic: str = wire(STR)
    queue_id: int = wire(UINT32)
    queue_offset: int = wire(INT64)


@frame(0x29, SERVER)
@dataclass(frozen=True, slots=True, kw_only=True)
class SendBatchOk(Frame):
    results: tuple[SendReceipt, ...] = wire(ListKind(RecordKind(SendReceipt)), ())


# --- consume
@frame(0x30, CLIENT)
@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribe(Frame):
    group: str = wire(STR)
    topic: str = wire(STR)
    client_id: str = wire(STR, "")
    mode: Mode = wire(EnumKind(Mode), Mode.CLUSTERING)
    ack: Ack = wire(EnumKind(Ack), Ack.OFFSET)
    filter_expr: str = wire(STR, "*")
    start: str = wire(STR, "")  # "" = group default, "earliest", "latest"
    invisible_ms: int = wire(UINT32, 0)  # 0 = broker default
    max_attempts: int = wire(UINT16, 0)  # 0 = broker default
    credit: int = wire(UINT32, 0)  # initial credit, saves one CREDIT frame


@frame(0x31, CLIENT)
@dataclass(frozen=True, slots=True, kw_only=True)
class Credit(Frame):
    subscription_id: int = wire(UINT32)
    credit: int = wire(UINT32)


@frame(0x32, CLIENT)
@dataclass(frozen=True, slots=True, kw_only=True)
class AckMessages(Frame):
    subscription_id: int = wire(UINT32)
    receipts: tuple[str, ...] = wire(STRLIST, ())


@frame(0x33, CLIENT)
@dataclass(frozen=True, slots=True, kw_only=True)
class NackMessages(Frame):
    subscription_id: int = wire(UINT32)
    receipts: tuple[str, ...] = wire(STRLIST, ())
    requeue: bool = wire(BOOL, True)
    delay_ms: int = wire(UINT32, 0)


@frame(0x34, CLIENT)
@dataclass(frozen=True, slots=True, kw_only=True)
class Commit(Frame):
    """Commit offsets: through a subscription (subscription_id != 0) or for a group directly (pull consumers)."""

    subscription_id: int = wire(UINT32, 0)
    group: str = wire(STR, "")
    offsets: tuple[QueueOffset, ...] = wire(ListKind(RecordKind(QueueOffset)), ())


@frame(0x35, CLIENT)
@dataclass(frozen=True, slots=True, kw_only=True)
class Unsubscribe(Frame):
    subscription_id: int = wire(UINT32)


@frame(0x36, CLIENT)
@dataclass(frozen=True, slots=True, kw_only=True)
class Pull(Frame):
    topic: str = wire(STR)
    queue_id: int = wire(UINT32)
    offset: int = wire(INT64)
    max_count: int = wire(UINT16, 32)
    filter_expr: str = wire(STR, "*")


@frame(0x38, SERVER)
@dataclass(frozen=True, slots=True, kw_only=True)
class SubscribeOk(Frame):
    subscription_id: int = wire(UINT32)


@frame(0x39, SERVER)
@dataclass(frozen=True, slots=True, kw_only=True)
class PullOk(Frame):
    status: Status = wire(EnumKind(Status), Status.FOUND)
    next_offset: int = wire(INT64, 0)
    min_offset: int = wire(INT64, 0)
    max_offset: int = wire(INT64, 0)
    messages: tuple[DeliveryRecord, ...] = wire(ListKind(RecordKind(DeliveryRecord)), ())


@frame(0x3A, SERVER)
@dataclass(frozen=True, slots=True, kw_only=True)
class Deliver(Frame):
    """Server push (request id 0): messages for a subscription, never more than its granted credit."""

    subscription_id: int = wire(UINT32)
    messages: tuple[DeliveryRecord, ...] = wire(ListKind(RecordKind(DeliveryRecord)), ())


@frame(0x3B, SERVER)
@dataclass(frozen=True, slots=True, kw_only=True)
class Assignment(Frame):
    """Server push (request id 0): the queues this subscription owns after a rebalance (offset mode)."""

    subscription_id: int = wire(UINT32)
    queues: tuple[QueueName, ...] = wire(ListKind(RecordKind(QueueName)), ())


# --- groups
@frame(0x40, CLIENT)
@dataclass(frozen=True, slots=True, kw_only=True)
class GroupList(Frame):
    pass


@frame(0x41, CLIENT)
@dataclass(frozen=True, slots=True, kw_only=True)
class GroupDescribe(Frame):
    group: str = wire(STR)


@frame(0x42, CLIENT)
@dataclass(frozen=True, slots=True, kw_only=True)
class ResetOffsets(Frame):
    group: str = wire(STR)
    topic: str = wire(STR)
    to: ResetTo = wire(EnumKind(ResetTo), ResetTo.LATEST)
    timestamp_ms: int = wire(INT64, 0)  # used when to == TIMESTAMP


@frame(0x43, CLIENT)
@dataclass(frozen=True, slots=True, kw_only=True)
class GroupDelete(Frame):
    group: str = wire(STR)


@frame(0x48, SERVER)
@dataclass(frozen=True, slots=True, kw_only=True)
class GroupListOk(Frame):
    groups: tuple[GroupSummary, ...] = wire(ListKind(RecordKind(GroupSummary)), ())


@frame(0x49, SERVER)
@dataclass(frozen=True, slots=True, kw_only=True)
class GroupDescribeOk(Frame):
    group: GroupSummary = wire(RecordKind(GroupSummary))
    progress: tuple[ProgressRecord, ...] = wire(ListKind(RecordKind(ProgressRecord)), ())


@frame(0x4A, SERVER)
@dataclass(frozen=True, slots=True, kw_only=True)
class ResetOffsetsOk(Frame):
    offsets: tuple[QueueOffset, ...] = wire(ListKind(RecordKind(QueueOffset)), ())


# --- queries
@frame(0x50, CLIENT)
@dataclass(frozen=True, slots=True, kw_only=True)
class QueryById(Frame):
    msg_id: str = wire(STR)


@frame(0x51, CLIENT)
@dataclass(frozen=True, slots=True, kw_only=True)
class QueryByKey(Frame):
    topic: str = wire(STR)
    key: str = wire(STR)
    limit: int = wire(UINT16, 64)


@frame(0x52, CLIENT)
@dataclass(frozen=True, slots=True, kw_only=True)
class QueryByTime(Frame):
    topic: str = wire(STR)
    start_ms: int = wire(INT64)
    end_ms: int = wire(INT64)
    limit: int = wire(UINT16, 100)


@frame(0x58, SERVER)
@dataclass(frozen=True, slots=True, kw_only=True)
class Messages(Frame):
    messages: tuple[Message, ...] = wire(ListKind(MESSAGE), ())
