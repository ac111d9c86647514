"""Message properties the adapters write for their own bookkeeping, which no client may set itself.

The MQTT adapter stamps `mqtt-publisher` (No Local), `mqtt-retain` (Retain As Published), `mqtt-payload-format`
and `mqtt-correlation-encoding`; the AMQP adapter keeps a publisher's raw content-header properties in
`amqp-properties`. A client that could set them would forge what other clients are told (an `mqtt-publisher`
naming a victim suppressed delivery to the victim's No Local subscription; an `amqp-properties` value replaces the
properties AMQP consumers see). Every adapter strips them from what a client sends (MQTT user properties, native
properties, AMQP headers) before the adapter stamps its own.
"""

from __future__ import annotations

from tidegate.core.model import Message

RESERVED_PREFIX = "mqtt-"  # every MQTT adapter bookkeeping property, today's and future ones
RESERVED_NAMES = frozenset({"amqp-properties"})


def is_reserved_property(key: str) -> bool:
    return key.startswith(RESERVED_PREFIX) or key in RESERVED_NAMES


def strip_reserved_properties(messages: list[Message]) -> None:
    """Remove reserved properties from messages a client sent (in place: the messages are fresh from the wire).
    One prefix test per property; messages without properties cost one truth test."""
    for message in messages:
        props = message.properties
        if props:
            for key in [k for k in props if k.startswith(RESERVED_PREFIX) or k in RESERVED_NAMES]:
                del props[key]
