"""Native HELLO carries credentials as an optional tail: old HELLOs still decode, empty credentials stay off the
wire, and the SDK sends what it is given (the broker side is wired in adapters/native/server.py)."""

from __future__ import annotations

import socket
import threading

import pytest

from tidegate.adapters.native import frames as f
from tidegate.adapters.native.codec import NativeCodec, Role, encode_frame
from tidegate.adapters.native.errors import Truncated
from tidegate.client import Connection
from tidegate.core.errors import TidegateError

OLD_HELLO_HEX = "0000000e" "01" "00" "00000001" "0001" "0001" "61" "0001" "62"


def decode(data: bytes) -> list[f.Frame]:
    return NativeCodec(Role.SERVER, max_frame=1 << 20).receive_data(data)


def test_hello_without_credentials_is_byte_for_byte_the_old_hello():
    hello = f.Hello(request_id=1, client_id="a", client_name="b")
    assert encode_frame(hello).hex() == OLD_HELLO_HEX
    [decoded] = decode(bytes.fromhex(OLD_HELLO_HEX))
    assert decoded == hello and decoded.username == "" and decoded.password == b""


def test_hello_with_credentials_round_trips():
    hello = f.Hello(request_id=1, client_id="a", client_name="b", username="alice", password=b"s3cret")
    data = encode_frame(hello)
    assert len(data) == len(bytes.fromhex(OLD_HELLO_HEX)) + 2 + 5 + 4 + 6
    assert decode(data) == [hello]


def test_a_half_tail_is_refused():
    data = bytearray(bytes.fromhex(OLD_HELLO_HEX) + b"\x00\x05alice")  # user name without the password field
    data[0:4] = (len(data) - 4).to_bytes(4, "big")
    with pytest.raises(TidegateError) as info:
        decode(bytes(data))
    assert isinstance(info.value, Truncated) or "bytes" in str(info.value)


def test_repr_never_shows_the_password():
    text = repr(f.Hello(username="alice", password=b"s3cret"))
    assert "s3cret" not in text and "alice" in text


def test_the_blocking_sdk_sends_its_credentials_in_hello():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    received: list[f.Frame] = []

    def accept() -> None:
        conn, _ = server.accept()
        codec = NativeCodec(Role.SERVER, max_frame=1 << 20)
        with conn:
            while not received:
                data = conn.recv(4096)
                if not data:
                    return
                received.extend(codec.receive_data(data))

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        with pytest.raises(TidegateError):  # the stand-in server closes instead of answering HELLO_OK
            Connection(f"127.0.0.1:{server.getsockname()[1]}", client_id="dev1", username="alice",
                       password="s3cret", timeout=5).open()
        thread.join(5)
    finally:
        server.close()
    [hello] = received
    assert isinstance(hello, f.Hello)
    assert (hello.client_id, hello.username, hello.password) == ("dev1", "alice", b"s3cret")
