"""Hypothesis against the AMQP adapter: whatever a client sends, no exception escapes the protocol (no traceback
reaches a client), and the broker keeps serving another connection afterwards."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import commands

from .protocol_helpers import World

names = st.sampled_from(["q", "x", "", "amq.topic", "amq.direct", "amq.gen-1", "a.b", "z" * 125, "a:b"])
keys = st.sampled_from(["", "a", "a.b", "a.*", "#", "*.b", "a/b", "x+y", "k#"])
flags = st.booleans()
tags = st.integers(min_value=0, max_value=5)
channels = st.sampled_from([1, 2])

client_methods = st.one_of(
    st.builds(commands.Exchange.Declare, exchange=names, exchange_type=st.sampled_from(
        ["direct", "fanout", "topic", "headers"]), passive=flags, durable=flags, auto_delete=flags),
    st.builds(commands.Exchange.Delete, exchange=names, if_unused=flags),
    st.builds(commands.Exchange.Bind, destination=names, source=names, routing_key=keys),
    st.builds(commands.Queue.Declare, queue=names, passive=flags, durable=flags, exclusive=flags,
              auto_delete=flags),
    st.builds(commands.Queue.Bind, queue=names, exchange=names, routing_key=keys),
    st.builds(commands.Queue.Unbind, queue=names, exchange=names, routing_key=keys),
    st.builds(commands.Queue.Purge, queue=names),
    st.builds(commands.Queue.Delete, queue=names, if_unused=flags, if_empty=flags),
    st.builds(commands.Basic.Qos, prefetch_count=st.integers(0, 3), global_=flags),
    st.builds(commands.Basic.Consume, queue=names, consumer_tag=st.sampled_from(["", "c"]), no_ack=flags,
              exclusive=flags),
    st.builds(commands.Basic.Cancel, consumer_tag=st.sampled_from(["", "c"])),
    st.builds(commands.Basic.Get, queue=names, no_ack=flags),
    st.builds(commands.Basic.Ack, delivery_tag=tags, multiple=flags),
    st.builds(commands.Basic.Nack, delivery_tag=tags, multiple=flags, requeue=flags),
    st.builds(commands.Basic.Reject, delivery_tag=tags, requeue=flags),
    st.builds(commands.Basic.Recover, requeue=flags),
    st.builds(commands.Confirm.Select),
    st.builds(commands.Tx.Select),
    st.builds(commands.Tx.Commit),
    st.builds(commands.Tx.Rollback),
    st.builds(commands.Channel.Flow, active=flags),
    st.builds(commands.Channel.Open),
    st.builds(commands.Channel.CloseOk),
)
steps = st.lists(st.tuples(channels, st.one_of(client_methods, st.tuples(names, keys, flags))), max_size=25)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps)
def test_any_sequence_of_client_methods_never_raises_and_the_broker_keeps_serving(script):
    world = World()
    client = world.client()
    client.open_channel(1)
    for channel, step in script:
        if client.closed:
            break
        if isinstance(step, tuple):
            exchange, key, mandatory = step
            client.publish(channel, exchange, key, b"body", mandatory=mandatory)
        else:
            client.send(channel, step)
        client.received()
    other = world.client()
    other.open_channel(1)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_after_the_handshake_never_raise(data):
    world = World()
    client = world.client()
    client.open_channel(1)
    client.raw(data)
    client.transport.clear()
    world.client()
