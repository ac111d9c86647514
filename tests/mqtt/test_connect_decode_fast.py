"""CONNECT decoding builds its `Connect` without re-running `Connect.__post_init__` (adapters/mqtt/codec.py
`_decoded_connect`): the packet is the one `Connect(...)` makes from the same fields, and every CONNECT that the
constructor's checks refuse is still refused by the decoder."""

from __future__ import annotations

import pytest

from tidegate.adapters.mqtt.codec import MqttCodec
from tidegate.adapters.mqtt.packets import Connect, Will
from tidegate.adapters.mqtt.properties import Properties
from tidegate.adapters.mqtt.reason_codes import MqttProtocolError, ReasonCode

CONNECTS = [
    Connect("c1", protocol_level=3, clean_start=True, keep_alive=0),
    Connect("resume-7", protocol_level=4, clean_start=False, keep_alive=600),
    Connect("", protocol_level=4, clean_start=True, keep_alive=65535),
    Connect("ü-ñ-€", protocol_level=4, username="user", password=b"secret",
            will=Will("last/words", b"bye", 1, True)),
    Connect("v5", protocol_level=5, clean_start=False, keep_alive=30, username="u",
            properties=Properties(session_expiry_interval=3600, receive_maximum=10,
                                  authentication_method="SCRAM", authentication_data=b"\x01\x02",
                                  user_properties=(("k", "v"),)),
            will=Will("w/t", b"", 2, False, Properties(will_delay_interval=5, content_type="text/plain"))),
    Connect("v5-password-only", protocol_level=5, password=b"token"),
]


@pytest.mark.parametrize("connect", CONNECTS, ids=lambda c: f"{c.protocol_level}-{c.client_id or 'empty'}")
def test_a_decoded_connect_is_the_one_the_constructor_makes(connect: Connect) -> None:
    client = MqttCodec(server_side=False)
    client.protocol_level = connect.protocol_level
    (decoded,) = MqttCodec().receive_data(client.encode(connect))
    assert type(decoded) is Connect
    assert decoded == connect
    assert hash(decoded) == hash(connect)
    assert decoded.protocol_name == connect.protocol_name
    with pytest.raises(AttributeError):
        decoded.client_id = "changed"  # type: ignore[misc]  # still frozen


def _v5_connect_with_auth_data_only() -> bytes:
    properties = bytes([0x16, 0x00, 0x02, 0x01, 0x02])  # Authentication Data, no Authentication Method
    body = b"\x00\x04MQTT\x05\x02\x00\x3c" + bytes([len(properties)]) + properties + b"\x00\x02id"
    return bytes([0x10, len(body)]) + body


def test_authentication_data_without_a_method_is_still_refused() -> None:
    with pytest.raises(MqttProtocolError) as refused:
        MqttCodec().receive_data(_v5_connect_with_auth_data_only())
    assert refused.value.reason_code == ReasonCode.PROTOCOL_ERROR
    assert "authentication data without an authentication method" in refused.value.message
    assert refused.value.protocol_level == 5


@pytest.mark.parametrize("body, reason", [
    (b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x03a\x00b", ReasonCode.MALFORMED_PACKET),  # U+0000 in the client id
    (b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x03\xed\xa0\x80", ReasonCode.MALFORMED_PACKET),  # a surrogate (CESU)
    (b"\x00\x04MQTT\x04\x42\x00\x3c\x00\x01a\x00\x01p", ReasonCode.PROTOCOL_ERROR),  # password, no user name
    (b"\x00\x04MQTT\x07\x02\x00\x3c\x00\x01a", ReasonCode.UNSUPPORTED_PROTOCOL_VERSION),  # no such level
])
def test_what_the_constructor_refuses_the_decoder_refuses(body: bytes, reason: ReasonCode) -> None:
    with pytest.raises(MqttProtocolError) as refused:
        MqttCodec().receive_data(bytes([0x10, len(body)]) + body)
    assert refused.value.reason_code == reason
