"""MQTT reason codes (5.0), the 3.1.1 CONNACK return codes, and the error the codec raises.

MQTT 5 gives one byte-sized Reason Code to every acknowledgement and to DISCONNECT/AUTH; MQTT 3.1/3.1.1 only has
CONNACK return codes 0..5 and SUBACK return codes 0, 1, 2 and 0x80. The codec raises `MqttProtocolError` with the
MQTT 5 code that describes the fault; the adapter puts it in a DISCONNECT or CONNACK (or, for a 3.1.1 client, maps it
with `connack_return_code` / closes the connection, since 3.1.1 has no DISCONNECT reason).
"""

from __future__ import annotations

from enum import IntEnum


class ReasonCode(IntEnum):
    """Every MQTT 5.0 reason code (spec 2.4). 0x00 doubles as Success, Normal disconnection and Granted QoS 0."""

    SUCCESS = 0x00
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    DISCONNECT_WITH_WILL_MESSAGE = 0x04
    NO_MATCHING_SUBSCRIBERS = 0x10
    NO_SUBSCRIPTION_EXISTED = 0x11
    CONTINUE_AUTHENTICATION = 0x18
    RE_AUTHENTICATE = 0x19
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BANNED = 0x8A
    SERVER_SHUTTING_DOWN = 0x8B
    BAD_AUTHENTICATION_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99
    RETAIN_NOT_SUPPORTED = 0x9A
    QOS_NOT_SUPPORTED = 0x9B
    USE_ANOTHER_SERVER = 0x9C
    SERVER_MOVED = 0x9D
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    CONNECTION_RATE_EXCEEDED = 0x9F
    MAXIMUM_CONNECT_TIME = 0xA0
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2

    @property
    def is_error(self) -> bool:
        # Spec 2.4: values below 0x80 report success, 0x80 and above report failure.
        return self >= 0x80


class ConnackReturnCode(IntEnum):
    """MQTT 3.1 / 3.1.1 CONNACK return codes (3.1.1 section 3.2.2.3)."""

    ACCEPTED = 0
    UNACCEPTABLE_PROTOCOL_VERSION = 1
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_USER_NAME_OR_PASSWORD = 4
    NOT_AUTHORIZED = 5


# 3.1.1 SUBACK has a single failure code; 0..2 are the granted QoS like in 5.0.
SUBACK_FAILURE_V311 = 0x80

_CONNACK_RETURN_CODE_FOR_REASON: dict[int, ConnackReturnCode] = {
    ReasonCode.SUCCESS: ConnackReturnCode.ACCEPTED,
    ReasonCode.UNSUPPORTED_PROTOCOL_VERSION: ConnackReturnCode.UNACCEPTABLE_PROTOCOL_VERSION,
    ReasonCode.CLIENT_IDENTIFIER_NOT_VALID: ConnackReturnCode.IDENTIFIER_REJECTED,
    ReasonCode.SERVER_UNAVAILABLE: ConnackReturnCode.SERVER_UNAVAILABLE,
    ReasonCode.SERVER_BUSY: ConnackReturnCode.SERVER_UNAVAILABLE,
    ReasonCode.SERVER_SHUTTING_DOWN: ConnackReturnCode.SERVER_UNAVAILABLE,
    ReasonCode.USE_ANOTHER_SERVER: ConnackReturnCode.SERVER_UNAVAILABLE,
    ReasonCode.SERVER_MOVED: ConnackReturnCode.SERVER_UNAVAILABLE,
    ReasonCode.CONNECTION_RATE_EXCEEDED: ConnackReturnCode.SERVER_UNAVAILABLE,
    ReasonCode.QUOTA_EXCEEDED: ConnackReturnCode.SERVER_UNAVAILABLE,
    ReasonCode.BAD_USER_NAME_OR_PASSWORD: ConnackReturnCode.BAD_USER_NAME_OR_PASSWORD,
    ReasonCode.BAD_AUTHENTICATION_METHOD: ConnackReturnCode.BAD_USER_NAME_OR_PASSWORD,
    ReasonCode.NOT_AUTHORIZED: ConnackReturnCode.NOT_AUTHORIZED,
    ReasonCode.BANNED: ConnackReturnCode.NOT_AUTHORIZED,
}

_REASON_FOR_CONNACK_RETURN_CODE: dict[int, ReasonCode] = {
    ConnackReturnCode.ACCEPTED: ReasonCode.SUCCESS,
    ConnackReturnCode.UNACCEPTABLE_PROTOCOL_VERSION: ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
    ConnackReturnCode.IDENTIFIER_REJECTED: ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
    ConnackReturnCode.SERVER_UNAVAILABLE: ReasonCode.SERVER_UNAVAILABLE,
    ConnackReturnCode.BAD_USER_NAME_OR_PASSWORD: ReasonCode.BAD_USER_NAME_OR_PASSWORD,
    ConnackReturnCode.NOT_AUTHORIZED: ReasonCode.NOT_AUTHORIZED,
}


def connack_return_code(reason: int) -> ConnackReturnCode:
    """The 3.1.1 CONNACK return code that best conveys an MQTT 5 CONNACK reason code.

    3.1.1 has no generic failure code; anything without a closer match is reported as "server unavailable", the
    code that tells a client to retry later rather than to change its credentials or protocol.
    """
    return _CONNACK_RETURN_CODE_FOR_REASON.get(reason, ConnackReturnCode.SERVER_UNAVAILABLE)


def reason_for_connack_return_code(return_code: int) -> ReasonCode:
    """The MQTT 5 reason code equivalent to a 3.1.1 CONNACK return code (used to give Connack one representation)."""
    try:
        return _REASON_FOR_CONNACK_RETURN_CODE[return_code]
    except KeyError:
        raise MqttProtocolError(
            f"CONNACK return code {return_code} is reserved in MQTT 3.1.1", ReasonCode.MALFORMED_PACKET
        ) from None


def _codes(*values: ReasonCode) -> frozenset[int]:
    return frozenset(int(value) for value in values)


R = ReasonCode
# Which reason codes each MQTT 5 packet may carry (spec sections 3.2.2.2, 3.4.2.1, 3.5.2.1, 3.6.2.1, 3.7.2.1,
# 3.9.3, 3.11.3, 3.14.2.1, 3.15.2.1). A code outside its packet's set is a protocol error.
CONNACK_REASON_CODES = _codes(
    R.SUCCESS, R.UNSPECIFIED_ERROR, R.MALFORMED_PACKET, R.PROTOCOL_ERROR, R.IMPLEMENTATION_SPECIFIC_ERROR,
    R.UNSUPPORTED_PROTOCOL_VERSION, R.CLIENT_IDENTIFIER_NOT_VALID, R.BAD_USER_NAME_OR_PASSWORD, R.NOT_AUTHORIZED,
    R.SERVER_UNAVAILABLE, R.SERVER_BUSY, R.BANNED, R.BAD_AUTHENTICATION_METHOD, R.TOPIC_NAME_INVALID,
    R.PACKET_TOO_LARGE, R.QUOTA_EXCEEDED, R.PAYLOAD_FORMAT_INVALID, R.RETAIN_NOT_SUPPORTED, R.QOS_NOT_SUPPORTED,
    R.USE_ANOTHER_SERVER, R.SERVER_MOVED, R.CONNECTION_RATE_EXCEEDED,
)  # fmt: skip
PUBACK_REASON_CODES = _codes(
    R.SUCCESS, R.NO_MATCHING_SUBSCRIBERS, R.UNSPECIFIED_ERROR, R.IMPLEMENTATION_SPECIFIC_ERROR, R.NOT_AUTHORIZED,
    R.TOPIC_NAME_INVALID, R.PACKET_IDENTIFIER_IN_USE, R.QUOTA_EXCEEDED, R.PAYLOAD_FORMAT_INVALID,
)  # fmt: skip
PUBREC_REASON_CODES = PUBACK_REASON_CODES
PUBREL_REASON_CODES = _codes(R.SUCCESS, R.PACKET_IDENTIFIER_NOT_FOUND)
PUBCOMP_REASON_CODES = PUBREL_REASON_CODES
SUBACK_REASON_CODES = _codes(
    R.SUCCESS, R.GRANTED_QOS_1, R.GRANTED_QOS_2, R.UNSPECIFIED_ERROR, R.IMPLEMENTATION_SPECIFIC_ERROR,
    R.NOT_AUTHORIZED, R.TOPIC_FILTER_INVALID, R.PACKET_IDENTIFIER_IN_USE, R.QUOTA_EXCEEDED,
    R.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED, R.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED,
    R.WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED,
)  # fmt: skip
UNSUBACK_REASON_CODES = _codes(
    R.SUCCESS, R.NO_SUBSCRIPTION_EXISTED, R.UNSPECIFIED_ERROR, R.IMPLEMENTATION_SPECIFIC_ERROR, R.NOT_AUTHORIZED,
    R.TOPIC_FILTER_INVALID, R.PACKET_IDENTIFIER_IN_USE,
)  # fmt: skip
DISCONNECT_REASON_CODES = _codes(
    R.SUCCESS, R.DISCONNECT_WITH_WILL_MESSAGE, R.UNSPECIFIED_ERROR, R.MALFORMED_PACKET, R.PROTOCOL_ERROR,
    R.IMPLEMENTATION_SPECIFIC_ERROR, R.NOT_AUTHORIZED, R.SERVER_BUSY, R.SERVER_SHUTTING_DOWN, R.KEEP_ALIVE_TIMEOUT,
    R.SESSION_TAKEN_OVER, R.TOPIC_FILTER_INVALID, R.TOPIC_NAME_INVALID, R.RECEIVE_MAXIMUM_EXCEEDED,
    R.TOPIC_ALIAS_INVALID, R.PACKET_TOO_LARGE, R.MESSAGE_RATE_TOO_HIGH, R.QUOTA_EXCEEDED, R.ADMINISTRATIVE_ACTION,
    R.PAYLOAD_FORMAT_INVALID, R.RETAIN_NOT_SUPPORTED, R.QOS_NOT_SUPPORTED, R.USE_ANOTHER_SERVER, R.SERVER_MOVED,
    R.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED, R.CONNECTION_RATE_EXCEEDED, R.MAXIMUM_CONNECT_TIME,
    R.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED, R.WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED,
)  # fmt: skip
AUTH_REASON_CODES = _codes(R.SUCCESS, R.CONTINUE_AUTHENTICATION, R.RE_AUTHENTICATE)
# 3.1.1 SUBACK: granted QoS 0..2 or the single failure code.
SUBACK_RETURN_CODES_V311 = frozenset({0, 1, 2, SUBACK_FAILURE_V311})
del R


class MqttProtocolError(ValueError):
    """Bytes (or a packet being built) that break the MQTT rules.

    `reason_code` is the MQTT 5 reason code the adapter sends in DISCONNECT (or CONNACK when the fault is in CONNECT).
    `protocol_level` is the level the codec knew when the fault was found (None before a CONNECT was read), so the
    adapter can choose between a 3.1.1 and a 5.0 CONNACK when answering a bad CONNECT.
    """

    def __init__(self, message: str, reason_code: ReasonCode, *, protocol_level: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason_code = ReasonCode(reason_code)
        self.protocol_level = protocol_level
        # Packets decoded before the fault in the same receive_data call; the adapter may still act on them.
        self.packets_before_error: list[object] = []

    def __str__(self) -> str:
        return f"{self.message} (reason code 0x{self.reason_code:02X} {self.reason_code.name})"


class MqttEncodeError(MqttProtocolError):
    """Our own side asked to send something the negotiated protocol level cannot carry (blame: local)."""


def malformed(message: str) -> MqttProtocolError:
    return MqttProtocolError(message, ReasonCode.MALFORMED_PACKET)


def protocol_error(message: str) -> MqttProtocolError:
    return MqttProtocolError(message, ReasonCode.PROTOCOL_ERROR)
