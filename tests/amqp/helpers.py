"""Shared helpers for the AMQP codec tests: comparable views of events and codecs in a known state."""

from __future__ import annotations

from tidegate.adapters.amqp.codec import (
    PROTOCOL_HEADER,
    AmqpClientCodec,
    AmqpServerCodec,
    ContentEvent,
    ContentRejectedEvent,
    MethodEvent,
)


def method_fields(method: object) -> tuple[str, dict[str, object]]:
    """A pamqp method (or Basic.Properties) as its name and argument values (pamqp objects compare by identity)."""
    return method.name, dict(method)  # type: ignore[attr-defined, call-overload]


def describe(event: object) -> tuple[object, ...]:
    """An event as plain, comparable data."""
    if isinstance(event, MethodEvent):
        return ("method", event.channel, method_fields(event.method))
    if isinstance(event, ContentEvent):
        return ("content", event.channel, method_fields(event.method), method_fields(event.properties), event.body,
                event.raw_properties)  # fmt: skip
    if isinstance(event, ContentRejectedEvent):
        return ("rejected", event.channel, method_fields(event.method), event.body_size, event.reply_code)
    return (type(event).__name__,)


def describe_all(events: list[object]) -> list[tuple[object, ...]]:
    return [describe(event) for event in events]


def open_server_codec(**options: int) -> AmqpServerCodec:
    """A server codec that has already read the protocol header."""
    codec = AmqpServerCodec(**options)
    codec.receive_data(PROTOCOL_HEADER)
    return codec


def client_codec(**options: int) -> AmqpClientCodec:
    return AmqpClientCodec(**options)
