"""`AmqpServerCodec.send_deliver` (the delivery hot path: pre-encoded consumer tag and address) writes the same
bytes as `send_content` with a pamqp Basic.Deliver, for every body size and frame split."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands

from tidegate.adapters.amqp.codec import AmqpServerCodec
from tidegate.adapters.amqp.fastpath import short_string

names = st.text(max_size=40)
exchanges = st.from_regex(r"[A-Za-z0-9_.:-]{0,40}", fullmatch=True)  # what pamqp accepts as an exchange name


@given(channel=st.integers(1, 65535), tag=names, delivery_tag=st.integers(1, 2**64 - 1),
       redelivered=st.booleans(), exchange=exchanges, key=names, body=st.binary(max_size=10_000),
       raw=st.booleans())
def test_send_deliver_matches_send_content(channel, tag, delivery_tag, redelivered, exchange, key, body, raw):
    codec = AmqpServerCodec()
    codec.set_frame_max(4096)
    properties = commands.Basic.Properties(content_type="text/plain", delivery_mode=2)
    if raw:
        properties = b"\x90\x00\x0atext/plain\x02"
    expected = codec.send_content(channel, commands.Basic.Deliver(tag, delivery_tag, redelivered, exchange, key),
                                  properties, body)
    got = codec.send_deliver(channel, short_string(tag), delivery_tag, redelivered,
                             short_string(exchange) + short_string(key), properties, body)
    assert got == expected
