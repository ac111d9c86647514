"""Every method in pamqp's command table round-trips through the codec, in the direction(s) the protocol allows.

The list is generated from `pamqp.commands.INDEX_MAPPING`, so a method pamqp adds is tested (and must be placed in
the codec's direction table) without editing this file.
"""

from __future__ import annotations

import datetime
import inspect
import warnings

import pytest
from pamqp import base, commands

from tidegate.adapters.amqp.codec import (
    CONTENT_METHOD_INDEXES,
    SENT_BY_BOTH,
    SENT_BY_CLIENT_ONLY,
    SENT_BY_SERVER_ONLY,
    AmqpProtocolError,
    AmqpServerCodec,
    ReplyCode,
)

from .helpers import client_codec, describe_all, method_fields, open_server_codec

# A value per AMQP argument type, different from pamqp's defaults so a round trip proves the argument travelled.
SAMPLE_BY_TYPE = {
    "shortstr": "sample.name-1",
    "longstr": "long string value",
    "octet": 7,
    "short": 513,
    "long": 70_000,
    "longlong": 2**40 + 3,
    "bit": True,
    "table": {"key": "value", "number": 5, "flag": True, "nested": {"inner": "x"}},
    "timestamp": datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC),
}
# Deprecated or reserved arguments the specification pins to one value (pamqp validates them): keep pamqp's default.
RESERVED = {"ticket", "out_of_band", "cluster_id", "capabilities", "insist", "known_hosts", "channel_id"}

ALL_METHODS = sorted(commands.INDEX_MAPPING.values(), key=lambda method_class: method_class.index)


def sample_method(method_class: type[base.Frame]) -> base.Frame:
    """An instance with every argument filled in (required ones included)."""
    parameters = inspect.signature(method_class.__init__).parameters
    arguments = {}
    for name in method_class.__slots__:
        if name in parameters and name not in RESERVED:
            arguments[name] = SAMPLE_BY_TYPE[method_class.amqp_type(name)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Basic.RecoverAsync is deprecated in 0-9-1
        return method_class(**arguments)


def channel_for(method_class: type[base.Frame]) -> int:
    return 0 if method_class.index >> 16 == commands.Connection.frame_id else 5


def method_id(method_class: type[base.Frame]) -> str:
    return method_class.name


def test_direction_table_places_every_pamqp_method_exactly_once():
    names = {method_class.name for method_class in ALL_METHODS}
    assert SENT_BY_SERVER_ONLY | SENT_BY_CLIENT_ONLY | SENT_BY_BOTH == names
    assert not SENT_BY_SERVER_ONLY & SENT_BY_CLIENT_ONLY
    assert not (SENT_BY_SERVER_ONLY | SENT_BY_CLIENT_ONLY) & SENT_BY_BOTH


def encode(codec, method: base.Frame, channel: int) -> bytes:
    if method.index in CONTENT_METHOD_INDEXES:
        properties = commands.Basic.Properties(content_type="application/json", message_id="m-1")
        return codec.send_content(channel, method, properties, b'{"k": 1}')
    return codec.send_method(channel, method)


def expected_events(method: base.Frame, channel: int) -> list[tuple[object, ...]]:
    if method.index in CONTENT_METHOD_INDEXES:
        return [("content", channel, method_fields(method))]
    return [("method", channel, method_fields(method))]


def comparable(events):
    return [event[:3] for event in describe_all(events)]


@pytest.mark.parametrize("method_class", [m for m in ALL_METHODS if m.name not in SENT_BY_SERVER_ONLY], ids=method_id)
def test_method_a_client_may_send_round_trips_to_the_server_codec(method_class):
    method = sample_method(method_class)
    channel = channel_for(method_class)
    data = encode(client_codec(), method, channel)
    assert comparable(open_server_codec().receive_data(data)) == expected_events(method, channel)


@pytest.mark.parametrize("method_class", [m for m in ALL_METHODS if m.name not in SENT_BY_CLIENT_ONLY], ids=method_id)
def test_method_a_server_may_send_round_trips_to_the_client_codec(method_class):
    method = sample_method(method_class)
    channel = channel_for(method_class)
    data = encode(AmqpServerCodec(frame_max=65536), method, channel)
    assert comparable(client_codec().receive_data(data)) == expected_events(method, channel)


@pytest.mark.parametrize("method_class", [m for m in ALL_METHODS if m.name in SENT_BY_SERVER_ONLY], ids=method_id)
def test_server_only_method_received_by_the_server_is_command_invalid(method_class):
    """A client sending e.g. Basic.Deliver or Connection.Start gets 503 COMMAND_INVALID naming the method."""
    method = sample_method(method_class)
    channel = channel_for(method_class)
    data = AmqpServerCodec().send_method(channel, method) if method.index not in CONTENT_METHOD_INDEXES else (
        AmqpServerCodec().send_content(channel, method, commands.Basic.Properties(), b"x"))  # fmt: skip
    with pytest.raises(AmqpProtocolError) as caught:
        open_server_codec().receive_data(data)
    assert caught.value.reply_code == ReplyCode.COMMAND_INVALID
    assert (caught.value.class_id << 16 | caught.value.method_id) == method_class.index
    assert method_class.name in caught.value.reply_text


@pytest.mark.parametrize(
    "method_class", [commands.Channel.Open, commands.Basic.Ack, commands.Queue.Declare], ids=method_id
)
def test_channel_method_on_channel_zero_is_command_invalid(method_class):
    data = client_codec().send_method(0, sample_method(method_class))
    with pytest.raises(AmqpProtocolError) as caught:
        open_server_codec().receive_data(data)
    assert caught.value.reply_code == ReplyCode.COMMAND_INVALID


def test_connection_method_on_a_channel_above_zero_is_command_invalid():
    data = client_codec().send_method(3, commands.Connection.CloseOk())
    with pytest.raises(AmqpProtocolError) as caught:
        open_server_codec().receive_data(data)
    assert caught.value.reply_code == ReplyCode.COMMAND_INVALID
    assert caught.value.channel == 3
