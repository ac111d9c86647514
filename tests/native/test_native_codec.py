"""Byte-level tests of the native codec: fixtures run whole, byte by byte and with trailing data; bad input."""

from __future__ import annotations

import struct

import pytest

from tidegate.adapters.native import frames as f
from tidegate.adapters.native.codec import (
    FrameTooLarge,
    MalformedFrame,
    NativeCodec,
    ProtocolError,
    Role,
    State,
    UnsupportedVersion,
    encode_frame,
)
from tidegate.adapters.native.errors import ErrorCode
from tidegate.core.model import Message

HELLO_HEX = "0000000e" "01" "00" "00000001" "0001" "0001" "61" "0001" "62"
HELLO = f.Hello(request_id=1, version=1, client_id="a", client_name="b")

# SEND of topic "T", body "hi", key "k", property a=b, broker-chosen queue (-1), request id 2
SEND_HEX = (
    "00000050" "20" "00" "00000002"  # length 80, type SEND, flags 0, request id 2
    "ffffffff"  # queue_id -1
    + "0000000000000000" * 4  # born_ts, deliver_at, expires_at, store_ts
    + "00000001"  # flags PERSISTENT
    "0001540000000000000000"  # topic "T"; subject, tag, group, msg_id ""
    "00000001" "00016b"  # keys ["k"]
    "00000001" "000161" "000162"  # properties {"a": "b"}
    "00000002" "6869"  # body "hi"
)
SEND = f.Send(request_id=2, message=Message(topic="T", body=b"hi", keys=("k",), properties={"a": "b"}))

PING_HEX = "00000006" "03" "00" "00000007"
ERROR_HEX = "0000000d" "05" "00" "00000009" "000b" "0003" "6e6f21"  # TOPIC_NOT_FOUND "no!"
HELLO_OK_HEX = "00000014" "02" "00" "00000001" "0001" "0002" "7631" "00100000" "00007530"

SERVER_FIXTURES = [(HELLO_HEX, HELLO), (SEND_HEX, SEND), (PING_HEX, f.Ping(request_id=7))]
CLIENT_FIXTURES = [
    (HELLO_OK_HEX, f.HelloOk(request_id=1, version=1, server_version="v1", max_frame=1 << 20, heartbeat_ms=30000)),
    (ERROR_HEX, f.Error(request_id=9, code=ErrorCode.TOPIC_NOT_FOUND, message="no!")),
]


def open_codec(role: Role, max_frame: int = 1 << 20) -> NativeCodec:
    codec = NativeCodec(role, max_frame=max_frame)
    codec.state = State.OPEN
    return codec


def feed(codec: NativeCodec, data: bytes, chunk: int | None) -> list[f.Frame]:
    if chunk is None:
        return codec.receive_data(data)
    out: list[f.Frame] = []
    for i in range(0, len(data), chunk):
        out += codec.receive_data(data[i : i + chunk])
    return out


@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_server_fixtures_decode_whole_and_in_pieces(chunk: int | None) -> None:
    """The client->server fixtures decode to the same frames whether fed whole, byte by byte or in 3s."""
    codec = NativeCodec(Role.SERVER)
    data = b"".join(bytes.fromhex(h) for h, _ in SERVER_FIXTURES)
    assert feed(codec, data, chunk) == [frame for _, frame in SERVER_FIXTURES]
    assert codec.buffered == 0


@pytest.mark.parametrize("chunk", [None, 1])
def test_client_fixtures_decode_whole_and_byte_by_byte(chunk: int | None) -> None:
    """The server->client fixtures (HELLO_OK, then an ERROR) decode identically whole and byte by byte."""
    codec = NativeCodec(Role.CLIENT)
    data = b"".join(bytes.fromhex(h) for h, _ in CLIENT_FIXTURES)
    assert feed(codec, data, chunk) == [frame for _, frame in CLIENT_FIXTURES]
    assert codec.send_max_frame == 1 << 20  # learned from HELLO_OK


@pytest.mark.parametrize("hex_frame,frame", SERVER_FIXTURES + CLIENT_FIXTURES)
def test_fixtures_encode_to_the_documented_bytes(hex_frame: str, frame: f.Frame) -> None:
    """Encoding each fixture frame produces exactly the documented bytes."""
    assert encode_frame(frame).hex() == hex_frame


def test_trailing_partial_frame_stays_buffered_until_completed() -> None:
    """Bytes of an incomplete next frame are kept and decoded once the rest arrives."""
    codec = NativeCodec(Role.SERVER)
    ping = bytes.fromhex(PING_HEX)
    assert codec.receive_data(bytes.fromhex(HELLO_HEX) + ping[:5]) == [HELLO]
    assert codec.buffered == 5
    assert codec.receive_data(ping[5:]) == [f.Ping(request_id=7)]
    assert codec.buffered == 0


def test_oneway_flag_is_decoded() -> None:
    """The ONEWAY header flag survives a round trip and is exposed as `frame.oneway`."""
    codec = open_codec(Role.SERVER)
    frame = f.Send(request_id=3, flags=f.FrameFlag.ONEWAY, message=Message(topic="T"))
    (decoded,) = codec.receive_data(encode_frame(frame))
    assert decoded.oneway and decoded == frame


def test_oversize_length_is_rejected_before_the_body_arrives() -> None:
    """A length prefix above max_frame raises FRAME_TOO_LARGE (fatal) from the 4 prefix bytes alone."""
    codec = NativeCodec(Role.SERVER, max_frame=1024)
    with pytest.raises(FrameTooLarge) as info:
        codec.receive_data(struct.pack(">I", 1025))
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE and info.value.fatal
    assert codec.state is State.CLOSED and codec.buffered == 0
    assert codec.receive_data(b"\x00" * 100) == []  # the stream is no longer trusted


def test_frames_before_an_error_are_handed_back() -> None:
    """Frames decoded in the same call before a fatal error are carried on the error, not lost."""
    codec = NativeCodec(Role.SERVER, max_frame=1024)
    with pytest.raises(FrameTooLarge) as info:
        codec.receive_data(bytes.fromhex(HELLO_HEX + PING_HEX) + struct.pack(">I", 5000))
    assert info.value.frames_before == [HELLO, f.Ping(request_id=7)]


def test_length_shorter_than_header_is_fatal_malformed() -> None:
    """A length below the 6-byte header cannot be framed: MALFORMED_FRAME and the stream is closed."""
    codec = NativeCodec(Role.SERVER)
    with pytest.raises(MalformedFrame) as info:
        codec.receive_data(struct.pack(">I", 3) + b"abc")
    assert info.value.fatal and info.value.code == ErrorCode.MALFORMED_FRAME


def _raw(type_code: int, request_id: int, body: bytes, flags: int = 0) -> bytes:
    return struct.pack(">IBBI", 6 + len(body), type_code, flags, request_id) + body


@pytest.mark.parametrize(
    "raw,reason",
    [
        (_raw(0x7F, 5, b""), "unknown frame type"),
        (_raw(0x12, 5, b"\x00\x09ab"), "needs 9 bytes"),  # TOPIC_DELETE name claims 9 bytes, has 2
        (_raw(0x12, 5, b"\x00\x01a\xff"), "trailing"),  # one byte after the last field
        (_raw(0x12, 5, b"\x00\x02\xc3\x28"), "UTF-8"),
        (_raw(0x13, 5, b"\x02"), "bool"),
        (_raw(0x30, 5, b"\x00\x01g\x00\x01t\x00\x00\x07"), "Mode"),  # SUBSCRIBE with mode 7
    ],
)
def test_malformed_body_is_reported_with_its_request_id_and_decoding_continues(raw: bytes, reason: str) -> None:
    """A bad body inside a well-framed frame is MALFORMED_FRAME for that request only; the next frame decodes."""
    codec = open_codec(Role.SERVER)
    with pytest.raises(MalformedFrame) as info:
        codec.receive_data(raw + bytes.fromhex(PING_HEX))
    assert reason in info.value.message
    assert info.value.request_id == 5 and not info.value.fatal
    assert codec.receive_data(b"") == [f.Ping(request_id=7)]


def test_unknown_protocol_version_is_fatal_unsupported_version() -> None:
    """HELLO with a version the server does not speak raises UNSUPPORTED_VERSION (fatal)."""
    codec = NativeCodec(Role.SERVER)
    with pytest.raises(UnsupportedVersion) as info:
        codec.receive_data(encode_frame(f.Hello(request_id=1, version=99)))
    assert info.value.fatal and info.value.code == ErrorCode.UNSUPPORTED_VERSION and info.value.request_id == 1


def test_request_before_hello_is_a_fatal_protocol_error_naming_state_and_side() -> None:
    """The server accepts only HELLO first; the error names the side, the state and the frame."""
    codec = NativeCodec(Role.SERVER)
    with pytest.raises(ProtocolError) as info:
        codec.receive_data(bytes.fromhex(SEND_HEX))
    assert info.value.fatal and info.value.code == ErrorCode.BAD_REQUEST
    assert "server in state await-hello received Send; expected Hello" in info.value.message


def test_frame_from_the_wrong_side_is_rejected_without_closing() -> None:
    """A server receiving a server-only frame (DELIVER) reports BAD_REQUEST and keeps the connection."""
    codec = open_codec(Role.SERVER)
    with pytest.raises(ProtocolError) as info:
        codec.receive_data(encode_frame(f.Deliver(request_id=4, subscription_id=1)))
    assert not info.value.fatal and info.value.request_id == 4 and "only the server sends" in info.value.message
    assert codec.state is State.OPEN


def test_second_hello_is_rejected() -> None:
    """HELLO after the handshake is a (non-fatal) protocol error."""
    codec = NativeCodec(Role.SERVER)
    codec.receive_data(bytes.fromhex(HELLO_HEX))
    with pytest.raises(ProtocolError, match="second Hello"):
        codec.receive_data(bytes.fromhex(HELLO_HEX))


def test_client_accepts_error_as_the_handshake_answer() -> None:
    """A client awaiting HELLO_OK may receive ERROR (e.g. UNSUPPORTED_VERSION) and stays in the handshake."""
    codec = NativeCodec(Role.CLIENT)
    (frame,) = codec.receive_data(encode_frame(f.Error(code=ErrorCode.UNSUPPORTED_VERSION, message="v")))
    assert isinstance(frame, f.Error) and codec.state is State.AWAIT_HELLO


@pytest.mark.parametrize(
    "build",
    [
        lambda: f.Ping(request_id=-1),
        lambda: f.Ping(request_id=2**32),
        lambda: f.Credit(subscription_id=1, credit=-5),
        lambda: f.Pull(topic="T", queue_id=0, offset=0, max_count=70000),
        lambda: f.TopicList(include_internal=1),
        lambda: f.Subscribe(group="g", topic="t", mode=5),
        lambda: f.Send(message="not a message"),
        lambda: f.TopicDelete(name=b"bytes"),
    ],
)
def test_frames_validate_on_construction(build) -> None:
    """A frame cannot be built with a value its wire type cannot carry."""
    with pytest.raises(f.FrameValueError):
        build()


def test_oversize_string_is_rejected_on_encode() -> None:
    """Strings travel with a u16 length; a longer one is a FrameValueError, not a corrupt frame."""
    with pytest.raises(f.FrameValueError, match="65535"):
        encode_frame(f.TopicDelete(name="x" * 70000))


def test_encode_respects_the_peer_limit() -> None:
    """After HELLO_OK announced max_frame, a larger outgoing frame raises FRAME_TOO_LARGE (non-fatal)."""
    codec = NativeCodec(Role.CLIENT)
    codec.receive_data(encode_frame(f.HelloOk(request_id=1, max_frame=100)))
    with pytest.raises(FrameTooLarge) as info:
        codec.encode(f.Send(request_id=5, message=Message(topic="T", body=b"x" * 200)))
    assert not info.value.fatal and info.value.request_id == 5
    assert codec.encode(f.Ping(request_id=6)) == encode_frame(f.Ping(request_id=6))


def test_enum_fields_are_normalised_to_their_enum() -> None:
    """Plain ints given for enum fields become the enum, so equality with decoded frames holds."""
    frame = f.Subscribe(group="g", topic="t", mode=1, ack=1)
    assert frame.mode is f.Mode.BROADCASTING and frame.ack is f.Ack.MESSAGE


def test_type_codes_are_unique_and_registered() -> None:
    """Every frame class is registered under its own type code."""
    assert all(cls.TYPE == code for code, cls in f.FRAME_TYPES.items())
    assert len({cls for cls in f.FRAME_TYPES.values()}) == len(f.FRAME_TYPES)


def test_protocol_document_lists_every_frame_and_error_code() -> None:
    """docs/native-protocol.md names every frame type code and every ErrorCode, so it cannot silently drift."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "native-protocol.md").read_text()
    for code, cls in f.FRAME_TYPES.items():
        assert f"| 0x{code:02X} |" in doc and f"`{cls.__name__}`" in doc, cls.__name__
    for error in ErrorCode:
        assert f"| {error.value} | {error.name} |" in doc, error.name
