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
from collections.abc import Sequence
from enum import StrEnum

from tidegate.adapters.native.frames import (
    BOTH,
    CLIENT,
    FRAME_TYPES,
    SERVER,
    SUPPORTED_VERSIONS,
    Error,
    Frame,
    FrameValueError,
    Hello,
    HelloOk,
    Reader,
    Truncated,
)
from tidegate.core.errors import ErrorCode, TidegateError

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
        super().__init__(message, code)
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
        for name, kind in frame.SPEC:
            kind.write(out, getattr(frame, name))
        HEADER.pack_into(out, 0, len(out) - LENGTH_SIZE, frame.TYPE, frame.flags, frame.request_id)
    except struct.error as exc:
        raise FrameValueError(f"{type(frame).__name__}: value out of range for its wire type: {exc}") from None
    return bytes(out)


def decode_body(cls: type[Frame], view: memoryview, pos: int, end: int, flags: int, request_id: int) -> Frame:
    """Decode the body at view[pos:end] as `cls`; every byte must be consumed."""
    r = Reader(view, pos, end)
    # Built without __init__: each value was range/type-checked as it was read, so validating again is waste.
    frame = object.__new__(cls)
    setattr_ = object.__setattr__
    setattr_(frame, "request_id", request_id)
    setattr_(frame, "flags", flags)
    for name, kind in cls.SPEC:
        setattr_(frame, name, kind.read(r))
    if r.pos != end:
        raise Truncated(f"{end - r.pos} trailing bytes after the last field")
    return frame


class NativeCodec:
    """One connection's codec. `receive_data` buffers at most one frame (bounded by `max_frame`)."""

    def __init__(self, role: Role | str = Role.SERVER, *, max_frame: int = DEFAULT_MAX_FRAME,
                 send_max_frame: int | None = None) -> None:
        self.role = Role(role)
        self.max_frame = max_frame  # limit on frames we receive (checked before buffering their bodies)
        self.send_max_frame = send_max_frame  # limit the peer announced for what we send (None = no check)
        self.state = State.AWAIT_HELLO
        self.peer_version = 0
        self._buffer = bytearray()
        self._peer_sender = PEER_SENDS[self.role]

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
        with memoryview(buf) as view:
            while size - pos >= LENGTH_SIZE:
                length, = struct.unpack_from(">I", view, pos)
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
                _, type_code, flags, request_id = HEADER.unpack_from(view, pos)
                start = pos + HEADER_SIZE
                pos = end
                try:
                    frames.append(self._decode(type_code, view, start, end, flags, request_id))
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
]
