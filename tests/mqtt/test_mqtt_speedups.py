"""The optional compiled MQTT hot path (adapters/mqtt/_mqtt_speedups.pyx) against its pure-Python twins: the
read decoder (`MqttCodec._decode_fast`) gives the same items and the same faults on random packet streams cut into
random reads, and the 3.1.1 one-pass writer (`Outbound._deliver_v311`) gives a subscriber the same bytes.

The comparisons skip when the extension was not built (no C compiler at install time), except under CI=true on a
machine with a C compiler, where a missing extension fails. `make test` runs the MQTT hot-path tests a second time
with TIDEGATE_NO_EXTENSIONS=1, so they also run against the pure-Python code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidegate.adapters.mqtt import speedups as hot_path
from tidegate.adapters.mqtt.codec import (
    Connect,
    MqttCodec,
    MqttProtocolError,
    Puback,
    Publish,
    Pubrec,
    Subscribe,
    TopicSubscription,
)
from tidegate.adapters.mqtt.inbound import Inbound
from tidegate.adapters.mqtt.outbound import Outbound
from tidegate.adapters.mqtt.properties import encode_variable_byte_integer

ENV_VAR = "TIDEGATE_NO_EXTENSIONS"
speedups = hot_path.compiled
disabled = hot_path.extensions_disabled()
needs_extension = pytest.mark.skipif(
    speedups is None, reason=f"{ENV_VAR} is set" if disabled else "compiled accelerator not built (no C compiler?)")


def test_extension_is_built_in_ci_when_a_compiler_is_present() -> None:
    """Under CI=true with a C compiler on PATH (and the switch not set) the MQTT accelerator must be in use."""
    if os.environ.get("CI") != "true" or disabled or not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("only enforced under CI=true with a C compiler")
    assert speedups is not None, "CI has a C compiler but the MQTT accelerator was not built: see pip's output"


def test_compiled_twins_are_installed_unless_switched_off() -> None:
    """speedups.py installs the compiled decoder, stager, writer and settler when the extension loaded, else
    keeps the Python ones."""
    compiled = speedups is not None
    assert not (compiled and disabled)
    assert (MqttCodec._decode_fast is not hot_path.py_decode_fast) == compiled
    assert (Outbound._deliver_v311 is not hot_path.py_deliver_v311) == compiled
    assert (Outbound.on_pubacks is not hot_path.py_on_pubacks) == compiled
    assert (Inbound.stage_plain is not hot_path.py_stage_plain) == compiled


@needs_extension
def test_environment_switch_selects_pure_python_in_a_fresh_interpreter() -> None:
    """TIDEGATE_NO_EXTENSIONS=1 leaves the pure-Python hot path in place."""
    code = ("from tidegate.adapters.mqtt import speedups as s; "
            "print(s.codec.MqttCodec._decode_fast is s.py_decode_fast, "
            "s.outbound.Outbound._deliver_v311 is s.py_deliver_v311)")
    for value, pure in (("1", "True True"), ("0", "False False")):
        env = {**os.environ, ENV_VAR: value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == pure


# --- the decoder --------------------------------------------------------------------------------------------------


def _publish_bytes(level: int, topic: bytes, qos: int, packet_id: int, flags: int, payload: bytes,
                   properties: bytes) -> bytes:
    """A PUBLISH built by hand, so that invalid names, ids and property blocks come out as they are."""
    variable = len(topic).to_bytes(2, "big") + topic + (packet_id.to_bytes(2, "big") if qos else b"")
    if level == 5:
        variable += properties
    body = variable + payload
    return bytes([0x30 | qos << 1 | flags]) + encode_variable_byte_integer(len(body)) + body


_topics = st.sampled_from([b"a", b"a/b", b"sensors/x/temp", "é/ü".encode(), b"a/+", b"#", b"", b"t" * 300,
                           b"x\x00y", b"\xff\xfe"])
_publishes = st.tuples(st.just("publish"), st.tuples(
    _topics, st.integers(0, 2), st.sampled_from([0, 1, 2, 255, 256, 65535]), st.sampled_from([0, 0, 0, 1, 8, 9]),
    # payload sizes around the one-, two- and three-byte remaining lengths
    st.one_of(st.binary(max_size=40), st.integers(100, 140).map(bytes), st.integers(16370, 16400).map(bytes)),
    st.sampled_from([b"\x00", b"\x00", b"\x02\x01\x01", b"\x05"])))
_raw = st.sampled_from([
    b"\x40\x02\x00\x07",  # PUBACK
    b"\x40\x02\x00\x00",  # PUBACK with packet id 0
    b"\x40\x03\x00\x01\x00",  # PUBACK with a reason code
    b"\x41\x02\x00\x01",  # PUBACK with flags
    b"\x32\x03\x00\x05a",  # topic runs past the end
    b"\x30\x01\x00",  # topic length runs past the end
    b"\x30\x00",  # no topic at all
    b"\x32\x80\x00",  # remaining length not minimally encoded
    b"\x30\x80\x80\x80\x80\x01",  # a fifth length byte
    b"\x30\xff\xff\xff\x7f",  # the largest length: over any maximum packet size
    b"\x00\x00",  # packet type 0
    b"\xc0\x00",  # PINGREQ
])


def _encode(level: int, spec: tuple) -> bytes:
    kind, value = spec
    if kind == "publish":
        topic, qos, packet_id, flags, payload, properties = value
        return _publish_bytes(level, topic, qos, packet_id, flags, payload, properties)
    if kind == "codec":
        client = MqttCodec(server_side=False)
        client.protocol_level = level
        return client.encode(value)
    return value


_specs = st.one_of(_publishes, _publishes, st.tuples(st.just("raw"), _raw), st.tuples(st.just("codec"), st.sampled_from(
    [Puback(3), Pubrec(4), Subscribe(5, (TopicSubscription("a/#", 1),))])))


def _connected(level: int, max_packet_size: int) -> MqttCodec:
    codec = MqttCodec(max_packet_size=max_packet_size) if max_packet_size else MqttCodec()
    client = MqttCodec(server_side=False)
    codec.receive_data(client.encode(Connect("c", protocol_level=level)))
    return codec


def _run(decode, level: int, max_packet_size: int, chunks: list[bytes]) -> tuple:
    """Items of every read through `decode`; a fault ends it as (message, reason code, items before it)."""
    codec = _connected(level, max_packet_size)
    got: list = []
    for chunk in chunks:
        try:
            got += codec._receive(chunk, lambda buffer, packets: decode(codec, buffer, packets))
        except MqttProtocolError as error:
            return got + error.packets_before_error, (error.message, error.reason_code)
    return got, None


@needs_extension
@settings(max_examples=400, deadline=None)
@given(level=st.sampled_from([3, 4, 5]), specs=st.lists(_specs, max_size=12),
       cuts=st.lists(st.integers(0, 40000), max_size=4), max_packet_size=st.sampled_from([0, 0, 200, 16384]))
def test_compiled_decoder_gives_the_same_items_and_faults(level, specs, cuts, max_packet_size) -> None:
    """Random streams of plain and non-plain PUBLISHes (bad names, ids 0, DUP/retain, v5 properties, one- to
    three-byte lengths), PUBACKs, other packets and malformed bytes, cut into random reads: the same items, the
    same fault (message and reason code) and the same items before it."""
    data = b"".join(_encode(level, spec) for spec in specs)
    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert (_run(speedups.decode_fast, level, max_packet_size, chunks)
            == _run(hot_path.py_decode_fast, level, max_packet_size, chunks))


@needs_extension
def test_compiled_decoder_reuses_the_topic_of_the_previous_publish_only_when_equal() -> None:
    """The compiled decoder skips the name lookup for a topic equal to the previous one: names of one length
    that differ still come out as their own."""
    codec = _connected(4, 0)
    data = b"".join(_publish_bytes(4, topic, 1, i + 1, 0, b"p", b"") for i, topic in
                    enumerate([b"a/1", b"a/1", b"a/2", b"a/1", b"b/2"]))
    items = codec._receive(data, lambda buffer, packets: speedups.decode_fast(codec, buffer, packets))
    assert [item[0] for item in items] == ["a/1", "a/1", "a/2", "a/1", "b/2"]


# --- the 3.1.1 writer ---------------------------------------------------------------------------------------------

def _subscriber_bytes(make_env, level: int) -> list[bytes]:
    """What a subscriber reads, read by read, through deliveries that take the one-pass writer (QoS 0 and 1, one
    to three remaining-length bytes, several topics, messages past 16 and 64 KiB, a full window, redelivery with
    DUP after a reconnect) and ones that leave it."""
    env = make_env()
    sub, pub = env.client(level), env.client(level)
    sub.connect("sub", clean=False)
    pub.connect("pub")
    sub.send(Subscribe(1, (TopicSubscription("d/#", 1), TopicSubscription("q/#", 0))))
    env.pump()
    reads = [sub.transport.value()]
    sub.transport.clear()
    messages = [Publish(topic, bytes([i % 256]) * size, qos, packet_id=i + 1 if qos else None)
                for i, (topic, size, qos) in enumerate(
                    [("d/x", 10, 1), ("d/x", 200, 1), ("q/y", 5, 0), ("d/z", 20_000, 1), ("q/y", 300, 1),
                     ("d/x", 16_370, 1), ("q/z", 1, 0), ("d/big", 70_000, 1), ("q/big", 70_000, 0)] * 4)]
    pub.send(*messages)
    env.pump()
    reads.append(sub.transport.value())
    sub.transport.clear()
    sub.drop()  # nothing acknowledged: the QoS 1 messages come again, with DUP and the same packet ids
    again = env.client(level)
    again.send(Connect("sub", protocol_level=level, clean_start=False))
    env.pump()
    reads.append(again.transport.value())  # CONNACK and the redeliveries
    again.transport.clear()
    for packet in again.codec.receive_data(reads[-1]):
        if isinstance(packet, Publish) and packet.qos:
            again.send(Puback(packet.packet_id))
    env.pump()
    reads.append(again.transport.value())
    reads.append(pub.transport.value())  # the publisher's PUBACKs
    return reads


@needs_extension
@pytest.mark.parametrize("level", [3, 4])
def test_compiled_writer_sends_the_same_bytes(level, make_env, monkeypatch) -> None:
    """A subscriber reads byte for byte the same (and the publisher gets the same PUBACKs) through the compiled
    hot path as through the Python one."""
    compiled = _subscriber_bytes(make_env, level)
    monkeypatch.setattr(Outbound, "_deliver_v311", hot_path.py_deliver_v311)
    monkeypatch.setattr(MqttCodec, "_decode_fast", hot_path.py_decode_fast)
    monkeypatch.setattr(Outbound, "on_pubacks", hot_path.py_on_pubacks)
    monkeypatch.setattr(Inbound, "stage_plain", hot_path.py_stage_plain)
    pure = _subscriber_bytes(make_env, level)
    assert compiled == pure
    assert b"\x3a" in b"".join(compiled[2:3]), "the redelivery carries DUP"
