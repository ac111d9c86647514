"""Malformed MQTT over a raw socket: the offending connection is closed (MQTT 5 clients get the CONNACK/DISCONNECT
reason code the specification names) and a mosquitto_sub client on the same broker keeps receiving."""

from __future__ import annotations

import pytest

MAX_PACKET = 65536
BROKER_ARGS = ("--set", f"listeners.mqtt.max_packet_size={MAX_PACKET}")

CONNACK, DISCONNECT = 0x20, 0xE0
MALFORMED, PROTOCOL_ERROR, TOPIC_NAME_INVALID, PACKET_TOO_LARGE = 0x81, 0x82, 0x90, 0x95


def port_of(broker) -> int:
    return broker.host_port("mqtt")[1]


def reason_codes(packets: list[tuple[int, bytes]]) -> list[tuple[int, int]]:
    """(packet type, reason code) of what the broker sent before closing; CONNACK's code is its second byte."""
    out = []
    for first, body in packets:
        kind = first & 0xF0
        if kind == CONNACK:
            out.append((CONNACK, body[1]))
        elif kind == DISCONNECT:
            out.append((DISCONNECT, body[0] if body else 0))
        else:
            out.append((kind, -1))
    return out


def connect_with_reserved_flag(raw, level):
    return raw.connect_packet("reserved-flag", level, flags=0x03)  # bit 0 of the connect flags is reserved


def publish_with_qos_3(raw, level):
    return raw.publish_packet("alive/qos3", b"x", flags=0x06, level=level)


def garbage(raw, level):
    return b"\xff\xfe\x00 this is not MQTT \x00\x01\x02" * 4


def over_max_packet_size(raw, level):
    # Only the fixed header and a few bytes: the broker must refuse on the announced length, not wait for it.
    return b"\x30" + raw.varint(MAX_PACKET * 4) + raw.mqtt_str("alive/big")


def wildcard_in_topic_name(raw, level):
    return raw.publish_packet("alive/+", b"x", qos=1, level=level)


def second_connect(raw, level):
    return raw.connect_packet("second-connect", level)


# name, builder, CONNECT first?, {level: allowed answers before the close}
CASES = [
    ("CONNECT with the reserved flag bit set", connect_with_reserved_flag, False,
     {4: [[]], 5: [[], [(CONNACK, MALFORMED)]]}),
    ("PUBLISH with QoS 3", publish_with_qos_3, True, {4: [[]], 5: [[(DISCONNECT, MALFORMED)]]}),
    ("garbage bytes instead of CONNECT", garbage, False, {4: [[]], 5: [[]]}),
    ("garbage bytes after CONNECT", garbage, True,
     {4: [[]], 5: [[(DISCONNECT, MALFORMED)], [(DISCONNECT, PROTOCOL_ERROR)]]}),
    ("remaining length over max_packet_size before CONNECT", over_max_packet_size, False,
     {4: [[]], 5: [[], [(CONNACK, PACKET_TOO_LARGE)]]}),
    ("remaining length over max_packet_size after CONNECT", over_max_packet_size, True,
     {4: [[]], 5: [[(DISCONNECT, PACKET_TOO_LARGE)]]}),
    ("PUBLISH topic name with a wildcard", wildcard_in_topic_name, True,
     {4: [[]], 5: [[(DISCONNECT, TOPIC_NAME_INVALID)]]}),
    ("a second CONNECT on one connection", second_connect, True, {4: [[]], 5: [[(DISCONNECT, PROTOCOL_ERROR)]]}),
]


@pytest.mark.parametrize("level", [pytest.param(4, id="mqtt311"), pytest.param(5, id="mqtt5")])
@pytest.mark.parametrize(("name", "build", "connect_first", "allowed"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_closes_only_the_offending_connection(broker, mosquitto, raw_mqtt, name, build, connect_first,
                                                        allowed, level):
    """The broker answers the bad input as the specification says, closes that connection and keeps serving:
    a mosquitto_sub subscribed before still receives the next message."""
    port = port_of(broker)
    topic = f"alive/{level}/{build.__name__}/{int(connect_first)}"
    watcher = mosquitto.sub(port, topic, qos=1)
    raw = raw_mqtt(port)
    if connect_first:
        raw.connect(f"bad-{level}-{build.__name__}", level=level)
    raw.send(build(raw, level))
    answers = reason_codes(raw.read_until_closed())
    assert answers in allowed[level], f"{name} (MQTT level {level}): broker answered {answers}"
    mosquitto.pub(port, topic, "still alive", qos=1)
    [got] = watcher.wait_messages(1)
    assert got.payload == b"still alive"


def test_unsupported_protocol_level_gets_connack_1(raw_mqtt, broker):
    """A CONNECT with protocol level 6 is refused with CONNACK return code 1 (unacceptable protocol version)."""
    raw = raw_mqtt(port_of(broker))
    raw.send(raw.connect_packet("level-6", 6))
    assert reason_codes(raw.read_until_closed()) == [(CONNACK, 0x01)]
