"""The codec drops content on a channel the adapter is closing (`discard_channel`) until `resume_channel`."""

from __future__ import annotations

from pamqp import commands

from tidegate.adapters.amqp.codec import AmqpClientCodec, ContentEvent, MethodEvent

from .helpers import open_server_codec


def publish(client: AmqpClientCodec, channel: int, body: bytes) -> bytes:
    return client.send_content(channel, commands.Basic.Publish(exchange="", routing_key="q"),
                               commands.Basic.Properties(), body)


def test_content_on_a_discarding_channel_is_dropped_and_methods_still_come_out():
    server, client = open_server_codec(), AmqpClientCodec()
    server.discard_channel(1)
    events = server.receive_data(publish(client, 1, b"dropped") + publish(client, 1, b"")
                                 + client.send_method(1, commands.Channel.CloseOk()) + publish(client, 2, b"kept"))
    assert [type(e) for e in events] == [MethodEvent, ContentEvent]
    assert events[1].channel == 2 and events[1].body == b"kept"
    assert server.buffered_bytes == 0


def test_content_half_received_when_the_channel_starts_closing_is_not_kept():
    server, client = open_server_codec(), AmqpClientCodec()
    frames = publish(client, 1, b"x" * 3000)
    server.receive_data(frames[:-1000])
    server.discard_channel(1)
    assert server.receive_data(frames[-1000:]) == []


def test_resume_channel_assembles_content_again():
    server, client = open_server_codec(), AmqpClientCodec()
    server.discard_channel(1)
    server.resume_channel(1)
    [event] = server.receive_data(publish(client, 1, b"again"))
    assert event.body == b"again"
