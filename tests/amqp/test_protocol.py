"""AMQP adapter protocol tests: a scripted client over StringTransport and MemoryReactorClock, in-memory broker."""

from __future__ import annotations

import struct

from pamqp import commands

from tidegate.adapters.amqp.codec import PROTOCOL_HEADER, ContentEvent
from tidegate.adapters.amqp.reply_codes import ReplyCode
from tidegate.core.model import Message

from .protocol_helpers import World, plain

Basic, Queue, Exchange, Channel, Connection = (commands.Basic, commands.Queue, commands.Exchange, commands.Channel,
                                               commands.Connection)


def amqplain(user: str, password: str) -> bytes:
    from pamqp import encode
    return encode.field_table({"LOGIN": user, "PASSWORD": password})[4:]


# ------------------------------------------------------------------------------------------------ connection

def test_wrong_protocol_header_gets_the_0_9_1_header_back_and_the_socket_closed():
    client = World().client(handshake=False)
    client.raw(b"AMQP\x01\x01\x00\x0a")
    assert client.transport.value() == PROTOCOL_HEADER
    assert client.transport.disconnecting


def test_handshake_offers_plain_and_amqplain_capabilities_and_negotiated_limits():
    world = World(frame_max=65536, channel_max=100, heartbeat=30)
    client = world.client(handshake=False)
    client.raw(PROTOCOL_HEADER)
    start = client.expect(Connection.Start)[0]
    assert start.mechanisms.split() == ["PLAIN", "AMQPLAIN"]
    capabilities = start.server_properties["capabilities"]
    for name in ("publisher_confirms", "exchange_exchange_bindings", "basic.nack", "consumer_cancel_notify",
                 "connection.blocked", "authentication_failure_close", "per_consumer_qos"):
        assert capabilities[name] is True
    client.send(0, Connection.StartOk(mechanism="AMQPLAIN", response=amqplain("guest", "guest").decode("latin-1")))
    tune = client.expect(Connection.Tune)[0]
    assert (tune.channel_max, tune.frame_max, tune.heartbeat) == (100, 65536, 30)


def test_guest_from_another_host_is_refused_with_403_access_refused():
    client = World().client("10.1.2.3", handshake=False)
    client.raw(PROTOCOL_HEADER)
    client.expect(Connection.Start)
    client.send(0, Connection.StartOk(mechanism="PLAIN", response=plain()))
    close = client.expect(Connection.Close)[0]
    assert close.reply_code == ReplyCode.ACCESS_REFUSED
    assert close.reply_text.startswith("ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN")
    assert client.transport.disconnecting


def test_a_wrong_password_is_refused_with_403():
    client = World().client(handshake=False)
    client.raw(PROTOCOL_HEADER)
    client.expect(Connection.Start)
    client.send(0, Connection.StartOk(mechanism="PLAIN", response=plain("guest", "nope")))
    assert client.expect(Connection.Close)[0].reply_code == ReplyCode.ACCESS_REFUSED


def test_an_unknown_virtual_host_is_530_not_allowed():
    client = World().client(handshake=False)
    client.raw(PROTOCOL_HEADER)
    client.expect(Connection.Start)
    client.send(0, Connection.StartOk(mechanism="PLAIN", response=plain()))
    client.expect(Connection.Tune)
    client.send(0, Connection.TuneOk(channel_max=10, frame_max=131072, heartbeat=0))
    client.send(0, Connection.Open(virtual_host="/other"))
    close = client.expect(Connection.Close)[0]
    assert close.reply_code == ReplyCode.NOT_ALLOWED


def test_handshake_frames_pipelined_in_one_read_are_all_answered_in_order():
    world = World()
    client = world.client(handshake=False)
    c = client.codec
    client.raw(PROTOCOL_HEADER)
    client.expect(Connection.Start)
    client.raw(c.send_method(0, Connection.StartOk(mechanism="PLAIN", response=plain()))
               + c.send_method(0, Connection.TuneOk(channel_max=0, frame_max=131072, heartbeat=0))
               + c.send_method(0, Connection.Open()) + c.send_method(1, Channel.Open()))
    client.expect(Connection.Tune, Connection.OpenOk, Channel.OpenOk)


def test_heartbeats_are_sent_every_half_interval_and_a_silent_client_is_dropped_after_two():
    world = World(heartbeat=10)
    client = world.client(handshake=False)
    client.handshake(heartbeat=10)
    world.clock.advance(5)
    assert client.transport.value().endswith(client.codec.send_heartbeat())
    assert not client.transport.disconnecting
    world.clock.advance(16)
    assert not client.protocol.connected_ or client.transport.disconnecting or client.protocol.closing


def test_client_close_is_answered_with_close_ok():
    client = World().client()
    client.send(0, Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0))
    client.expect(Connection.CloseOk)
    assert client.transport.disconnecting


def test_a_method_on_an_unopened_channel_is_a_504_channel_error():
    client = World().client()
    client.send(3, Queue.Declare(queue="q"))
    close = client.expect(Connection.Close)[0]
    assert close.reply_code == ReplyCode.CHANNEL_ERROR


def test_a_second_channel_open_is_a_504_channel_error():
    client = World().client()
    client.open_channel(1)
    client.send(1, Channel.Open())
    assert client.expect(Connection.Close)[0].reply_code == ReplyCode.CHANNEL_ERROR


# ------------------------------------------------------------------------------------------------ declarations

def test_queue_declare_bind_publish_consume_ack():
    world = World()
    client = world.client()
    ch = client.open_channel()
    client.call(ch, Exchange.Declare(exchange="logs", exchange_type="topic", durable=True), Exchange.DeclareOk)
    ok = client.call(ch, Queue.Declare(queue="q", durable=True), Queue.DeclareOk)
    assert (ok.queue, ok.message_count, ok.consumer_count) == ("q", 0, 0)
    client.call(ch, Queue.Bind(queue="q", exchange="logs", routing_key="app.*.error"), Queue.BindOk)
    client.publish(ch, "logs", "app.web.error", b"boom", commands.Basic.Properties(content_type="text/plain",
                                                                                 delivery_mode=2))
    client.publish(ch, "logs", "app.web.info", b"ignored")
    events = client.consume(ch, queue="q", consumer_tag="c1")
    assert len(events) == 1
    deliver = events[0].method
    assert (deliver.consumer_tag, deliver.exchange, deliver.routing_key, deliver.redelivered) == \
        ("c1", "logs", "app.web.error", False)
    assert events[0].body == b"boom" and events[0].properties.content_type == "text/plain"
    client.send(ch, Basic.Ack(delivery_tag=deliver.delivery_tag))
    assert client.methods() == []


def test_redeclaring_a_queue_with_other_properties_is_406_precondition_failed():
    client = World().client()
    ch = client.open_channel()
    client.call(ch, Queue.Declare(queue="q", durable=True), Queue.DeclareOk)
    client.send(ch, Queue.Declare(queue="q", durable=False))
    close = client.expect(Channel.Close)[0]
    assert close.reply_code == ReplyCode.PRECONDITION_FAILED
    assert close.reply_text == ("PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'q' in vhost '/': "
                                "received 'false' but current is 'true'")
    assert (close.class_id, close.method_id) == (50, 10)
    client.send(ch, Channel.CloseOk())
    # the connection carries on: the channel number can be opened again
    client.open_channel(ch)


def test_unknown_queue_and_exchange_are_404_not_found():
    client = World().client()
    ch = client.open_channel()
    client.send(ch, Queue.Declare(queue="missing", passive=True))
    close = client.expect(Channel.Close)[0]
    assert (close.reply_code, close.reply_text) == (404, "NOT_FOUND - no queue 'missing' in vhost '/'")
    client.send(ch, Channel.CloseOk())
    client.open_channel(ch)
    client.publish(ch, "nowhere", "k", b"x")
    close = client.expect(Channel.Close)[0]
    assert (close.reply_code, close.reply_text) == (404, "NOT_FOUND - no exchange 'nowhere' in vhost '/'")


def test_methods_on_a_closing_channel_are_ignored_until_close_ok():
    client = World().client()
    ch = client.open_channel()
    client.send(ch, Queue.Declare(queue="missing", passive=True))
    client.expect(Channel.Close)
    client.send(ch, Queue.Declare(queue="other"))
    client.publish(ch, "", "other", b"x")
    assert client.methods() == []


def test_an_exclusive_queue_used_from_another_connection_is_405_resource_locked():
    world = World()
    owner, other = world.client(), world.client()
    owner.open_channel()
    other.open_channel()
    owner.call(1, Queue.Declare(queue="mine", exclusive=True), Queue.DeclareOk)
    other.send(1, Basic.Consume(queue="mine"))
    assert other.expect(Channel.Close)[0].reply_code == ReplyCode.RESOURCE_LOCKED


def test_exclusive_queues_are_deleted_when_their_connection_closes():
    world = World()
    owner = world.client()
    owner.open_channel()
    owner.call(1, Queue.Declare(queue="mine", exclusive=True), Queue.DeclareOk)
    owner.transport.loseConnection()
    owner.protocol.connectionLost(None)
    assert "mine" not in world.factory.registry.queues


def test_server_named_queues_start_with_amq_gen():
    client = World().client()
    client.open_channel()
    ok = client.call(1, Queue.Declare(queue="", exclusive=True), Queue.DeclareOk)
    assert ok.queue.startswith("amq.gen-")


def test_declaring_an_amq_prefixed_exchange_is_403():
    client = World().client()
    client.open_channel()
    client.send(1, Exchange.Declare(exchange="amq.mine", exchange_type="direct"))
    assert client.expect(Channel.Close)[0].reply_code == ReplyCode.ACCESS_REFUSED


def test_an_unknown_exchange_type_is_a_503_connection_error():
    client = World().client()
    client.open_channel()
    client.send(1, Exchange.Declare(exchange="x", exchange_type="weird"))
    assert client.expect(Connection.Close)[0].reply_code == ReplyCode.COMMAND_INVALID


def test_queue_delete_if_empty_refuses_a_queue_with_messages():
    client = World().client()
    client.open_channel()
    client.call(1, Queue.Declare(queue="q"), Queue.DeclareOk)
    client.publish(1, "", "q", b"x")
    client.send(1, Queue.Delete(queue="q", if_empty=True))
    assert client.expect(Channel.Close)[0].reply_code == ReplyCode.PRECONDITION_FAILED


def test_deleting_a_queue_cancels_its_consumers_with_basic_cancel():
    world = World()
    consumer, admin = world.client(), world.client()
    consumer.open_channel()
    admin.open_channel()
    consumer.call(1, Queue.Declare(queue="q"), Queue.DeclareOk)
    consumer.call(1, Basic.Consume(queue="q", consumer_tag="c"), Basic.ConsumeOk)
    ok = admin.call(1, Queue.Delete(queue="q"), Queue.DeleteOk)
    assert ok.message_count == 0
    cancel = consumer.expect(Basic.Cancel)[0]
    assert cancel.consumer_tag == "c"


def test_purge_removes_ready_messages_and_counts_them():
    client = World().client()
    client.open_channel()
    client.call(1, Queue.Declare(queue="q"), Queue.DeclareOk)
    for i in range(3):
        client.publish(1, "", "q", b"%d" % i)
    assert client.call(1, Queue.Declare(queue="q", passive=True), Queue.DeclareOk).message_count == 3
    assert client.call(1, Queue.Purge(queue="q"), Queue.PurgeOk).message_count == 3
    client.send(1, Basic.Get(queue="q"))
    client.expect(Basic.GetEmpty)


# ------------------------------------------------------------------------------------------------ delivery

def _queue_with(client, name: str, bodies: list[bytes]) -> None:
    client.call(1, Queue.Declare(queue=name), Queue.DeclareOk)
    for body in bodies:
        client.publish(1, "", name, body)


def test_basic_get_and_get_empty_and_the_message_count():
    client = World().client()
    client.open_channel()
    _queue_with(client, "q", [b"a", b"b"])
    events = []
    client.send(1, Basic.Get(queue="q", no_ack=True))
    events = client.received()
    ok = events[0].method
    assert isinstance(ok, Basic.GetOk) and events[0].body == b"a" and ok.message_count == 1
    assert (ok.exchange, ok.routing_key) == ("", "q")
    client.send(1, Basic.Get(queue="q", no_ack=True))
    assert client.received()[0].body == b"b"
    client.send(1, Basic.Get(queue="q", no_ack=True))
    client.expect(Basic.GetEmpty)


def test_nack_with_requeue_redelivers_with_redelivered_set():
    client = World().client()
    client.open_channel()
    _queue_with(client, "q", [b"a"])
    client.send(1, Basic.Get(queue="q"))
    first = client.received()[0].method
    client.send(1, Basic.Nack(delivery_tag=first.delivery_tag, requeue=True))
    client.send(1, Basic.Get(queue="q"))
    again = client.received()[0].method
    assert again.redelivered is True and again.delivery_tag == first.delivery_tag + 1


def test_reject_without_requeue_drops_the_message():
    client = World().client()
    client.open_channel()
    _queue_with(client, "q", [b"a"])
    client.send(1, Basic.Get(queue="q"))
    tag = client.received()[0].method.delivery_tag
    client.send(1, Basic.Reject(delivery_tag=tag, requeue=False))
    client.send(1, Basic.Get(queue="q"))
    client.expect(Basic.GetEmpty)


def test_an_unknown_delivery_tag_is_406():
    client = World().client()
    client.open_channel()
    client.send(1, Basic.Ack(delivery_tag=42))
    close = client.expect(Channel.Close)[0]
    assert (close.reply_code, close.reply_text) == (406, "PRECONDITION_FAILED - unknown delivery tag 42")


def test_prefetch_limits_unacked_deliveries_per_consumer_and_ack_returns_credit():
    client = World().client()
    client.open_channel()
    _queue_with(client, "q", [b"%d" % i for i in range(5)])
    client.call(1, Basic.Qos(prefetch_count=2), Basic.QosOk)
    got = client.consume(1, queue="q", consumer_tag="c")
    assert [e.body for e in got] == [b"0", b"1"]
    client.send(1, Basic.Ack(delivery_tag=got[1].method.delivery_tag, multiple=True))
    got = [e for e in client.received() if isinstance(e, ContentEvent)]
    assert [e.body for e in got] == [b"2", b"3"]


def test_global_prefetch_is_shared_by_the_channels_consumers():
    client = World().client()
    client.open_channel()
    _queue_with(client, "a", [b"a1", b"a2", b"a3"])
    _queue_with(client, "b", [b"b1", b"b2", b"b3"])
    client.call(1, Basic.Qos(prefetch_count=3, global_=True), Basic.QosOk)
    got = client.consume(1, queue="a", consumer_tag="ca")
    got += client.consume(1, queue="b", consumer_tag="cb")
    assert len(got) == 3


def test_closing_a_channel_returns_unacked_messages_as_redelivered():
    world = World()
    client = world.client()
    client.open_channel()
    _queue_with(client, "q", [b"a"])
    assert [e.body for e in client.consume(1, queue="q", consumer_tag="c")] == [b"a"]
    client.call(1, Channel.Close(reply_code=200, class_id=0, method_id=0), Channel.CloseOk)
    client.open_channel(2)
    client.send(2, Basic.Get(queue="q"))
    event = client.received()[0]
    assert event.body == b"a" and event.method.redelivered is True


def test_basic_recover_requeues_everything_unacked():
    client = World().client()
    client.open_channel()
    _queue_with(client, "q", [b"a"])
    client.send(1, Basic.Get(queue="q"))
    client.received()
    client.call(1, Basic.Recover(requeue=True), Basic.RecoverOk)
    client.send(1, Basic.Get(queue="q"))
    assert client.received()[0].method.redelivered is True


def test_no_ack_consumers_get_everything_without_acking():
    client = World().client()
    client.open_channel()
    _queue_with(client, "q", [b"%d" % i for i in range(10)])
    assert len(client.consume(1, queue="q", no_ack=True)) == 10


def test_delivery_stops_while_the_transport_is_paused_and_resumes_after():
    world = World()
    client = world.client()
    client.open_channel()
    client.call(1, Queue.Declare(queue="q"), Queue.DeclareOk)
    client.call(1, Basic.Consume(queue="q", no_ack=True), Basic.ConsumeOk)
    client.protocol.pauseProducing()
    client.publish(1, "", "q", b"x")
    assert [e for e in client.received() if isinstance(e, ContentEvent)] == []
    client.protocol.resumeProducing()
    assert [e.body for e in client.received() if isinstance(e, ContentEvent)] == [b"x"]


def test_exclusive_consumer_refuses_a_second_consumer_with_403():
    client = World().client()
    client.open_channel()
    client.call(1, Queue.Declare(queue="q"), Queue.DeclareOk)
    client.call(1, Basic.Consume(queue="q", exclusive=True), Basic.ConsumeOk)
    client.send(1, Basic.Consume(queue="q"))
    assert client.expect(Channel.Close)[0].reply_code == ReplyCode.ACCESS_REFUSED


def test_auto_delete_queue_goes_when_its_last_consumer_cancels():
    world = World()
    client = world.client()
    client.open_channel()
    client.call(1, Queue.Declare(queue="q", auto_delete=True), Queue.DeclareOk)
    client.call(1, Basic.Consume(queue="q", consumer_tag="c"), Basic.ConsumeOk)
    client.call(1, Basic.Cancel(consumer_tag="c"), Basic.CancelOk)
    assert "q" not in world.factory.registry.queues


# ------------------------------------------------------------------------------------------------ publishing

def test_mandatory_unroutable_publish_comes_back_as_basic_return_312():
    client = World().client()
    client.open_channel()
    client.publish(1, "amq.direct", "nobody", b"lost", mandatory=True)
    event = client.received()[0]
    assert isinstance(event.method, Basic.Return) and event.method.reply_code == 312 and event.body == b"lost"
    client.publish(1, "", "no-such-queue", b"lost", mandatory=True)
    assert isinstance(client.received()[0].method, Basic.Return)


def test_publisher_confirms_ack_once_durable_with_multiple():
    world = World()
    client = world.client()
    client.open_channel()
    client.call(1, commands.Confirm.Select(), commands.Confirm.SelectOk)
    client.call(1, Queue.Declare(queue="q", durable=True), Queue.DeclareOk)
    props = commands.Basic.Properties(delivery_mode=2)
    client.raw(b"".join(client.codec.send_content(1, Basic.Publish(exchange="", routing_key="q"), props, b"%d" % i)
                        for i in range(3)))
    acks = client.expect(Basic.Ack)
    assert acks[0].delivery_tag == 3 and acks[0].multiple is True


def test_transactions_publish_on_commit_and_discard_on_rollback():
    client = World().client()
    client.open_channel()
    client.call(1, Queue.Declare(queue="q"), Queue.DeclareOk)
    client.call(1, commands.Tx.Select(), commands.Tx.SelectOk)
    client.publish(1, "", "q", b"kept")
    assert client.call(1, Queue.Declare(queue="q", passive=True), Queue.DeclareOk).message_count == 0
    client.call(1, commands.Tx.Commit(), commands.Tx.CommitOk)
    client.publish(1, "", "q", b"dropped")
    client.call(1, commands.Tx.Rollback(), commands.Tx.RollbackOk)
    assert client.call(1, Queue.Declare(queue="q", passive=True), Queue.DeclareOk).message_count == 1


def test_fanout_and_direct_exchanges_route_through_core_bindings():
    client = World().client()
    client.open_channel()
    client.call(1, Exchange.Declare(exchange="f", exchange_type="fanout"), Exchange.DeclareOk)
    for q in ("q1", "q2"):
        client.call(1, Queue.Declare(queue=q), Queue.DeclareOk)
        client.call(1, Queue.Bind(queue=q, exchange="f", routing_key=""), Queue.BindOk)
    client.call(1, Queue.Bind(queue="q1", exchange="amq.direct", routing_key="k"), Queue.BindOk)
    client.publish(1, "f", "anything", b"fan")
    client.publish(1, "amq.direct", "k", b"direct")
    assert client.call(1, Queue.Declare(queue="q1", passive=True), Queue.DeclareOk).message_count == 2
    assert client.call(1, Queue.Declare(queue="q2", passive=True), Queue.DeclareOk).message_count == 1


def test_headers_exchange_matches_all_or_any():
    client = World().client()
    client.open_channel()
    for q, match in (("all", "all"), ("any", "any")):
        client.call(1, Queue.Declare(queue=q), Queue.DeclareOk)
        client.call(1, Queue.Bind(queue=q, exchange="amq.headers", arguments={"x-match": match, "a": "1", "b": "2"}),
                    Queue.BindOk)
    client.publish(1, "amq.headers", "", b"one", commands.Basic.Properties(headers={"a": "1"}))
    client.publish(1, "amq.headers", "", b"both", commands.Basic.Properties(headers={"a": "1", "b": "2"}))
    assert client.call(1, Queue.Declare(queue="all", passive=True), Queue.DeclareOk).message_count == 1
    assert client.call(1, Queue.Declare(queue="any", passive=True), Queue.DeclareOk).message_count == 2


def test_exchange_to_exchange_bindings_and_alternate_exchange():
    client = World().client()
    client.open_channel()
    client.call(1, Exchange.Declare(exchange="alt", exchange_type="fanout"), Exchange.DeclareOk)
    client.call(1, Exchange.Declare(exchange="main", exchange_type="direct",
                                    arguments={"alternate-exchange": "alt"}), Exchange.DeclareOk)
    client.call(1, Exchange.Declare(exchange="down", exchange_type="direct"), Exchange.DeclareOk)
    client.call(1, Exchange.Bind(destination="down", source="main", routing_key="k"), Exchange.BindOk)
    client.call(1, Queue.Declare(queue="down-q"), Queue.DeclareOk)
    client.call(1, Queue.Bind(queue="down-q", exchange="down", routing_key="k"), Queue.BindOk)
    client.call(1, Queue.Declare(queue="alt-q"), Queue.DeclareOk)
    client.call(1, Queue.Bind(queue="alt-q", exchange="alt", routing_key=""), Queue.BindOk)
    client.publish(1, "main", "k", b"via-e2e")
    client.publish(1, "main", "other", b"via-alternate")
    assert client.call(1, Queue.Declare(queue="down-q", passive=True), Queue.DeclareOk).message_count == 1
    assert client.call(1, Queue.Declare(queue="alt-q", passive=True), Queue.DeclareOk).message_count == 1


def test_dead_letter_exchange_gets_rejected_messages_with_x_death():
    client = World().client()
    client.open_channel()
    client.call(1, Queue.Declare(queue="dead"), Queue.DeclareOk)
    client.call(1, Queue.Declare(queue="work", arguments={"x-dead-letter-exchange": "",
                                                          "x-dead-letter-routing-key": "dead"}), Queue.DeclareOk)
    client.publish(1, "", "work", b"bad")
    client.send(1, Basic.Get(queue="work"))
    tag = client.received()[0].method.delivery_tag
    client.send(1, Basic.Reject(delivery_tag=tag, requeue=False))
    client.world.turn()
    client.send(1, Basic.Get(queue="dead", no_ack=True))
    event = client.received()[0]
    assert event.body == b"bad"
    death = event.properties.headers["x-death"][0]
    assert death["reason"] == "rejected" and death["queue"] == "work"


def test_amq_topic_publish_meets_core_topic_and_subject_both_ways():
    world = World()
    client = world.client()
    client.open_channel()
    client.call(1, Queue.Declare(queue="q"), Queue.DeclareOk)
    client.call(1, Queue.Bind(queue="q", exchange="amq.topic", routing_key="sensors.*.temp"), Queue.BindOk)
    client.publish(1, "amq.topic", "sensors.kitchen.temp", b"21",
                   commands.Basic.Properties(headers={"unit": "C"}, delivery_mode=2, content_type="text/plain"))
    stored = world.broker.list_by_time("sensors", 0, 2**62)
    assert [(m.subject, m.body, m.properties) for m in stored] == \
        [("kitchen/temp", b"21", {"unit": "C", "content-type": "text/plain"})]
    # a native publish to topic `sensors`, subject `hall/temp`, reaches the AMQP queue as amq.topic sensors.hall.temp
    world.broker.publish([Message(topic="sensors", subject="hall/temp", body=b"19", properties={"k": "v"})])
    world.turn()
    client.send(1, Basic.Get(queue="q", no_ack=True))
    client.send(1, Basic.Get(queue="q", no_ack=True))
    events = client.received()
    assert [(e.method.exchange, e.method.routing_key, e.body) for e in events] == \
        [("amq.topic", "sensors.kitchen.temp", b"21"), ("amq.topic", "sensors.hall.temp", b"19")]
    assert events[1].properties.headers == {"k": "v"} and events[1].properties.delivery_mode == 2


def test_properties_the_core_cannot_hold_come_back_byte_for_byte():
    client = World().client()
    client.open_channel()
    client.call(1, Queue.Declare(queue="q"), Queue.DeclareOk)
    props = commands.Basic.Properties(headers={"n": 7, "nested": {"a": [1, "x"]}}, priority=3, app_id="app",
                                      message_type="t", delivery_mode=1, expiration="60000")
    client.publish(1, "", "q", b"x", props)
    client.send(1, Basic.Get(queue="q", no_ack=True))
    event = client.received()[0]
    from tidegate.adapters.amqp.codec import _marshal_properties
    assert event.raw_properties == _marshal_properties(props)


def test_durable_declarations_survive_a_restart_and_transient_ones_do_not():
    from tidegate.adapters.amqp.server import AmqpServerFactory
    from tidegate.core.security.gate import AllowAllGate

    world = World()
    client = world.client()
    client.open_channel()
    client.call(1, Exchange.Declare(exchange="dx", exchange_type="direct", durable=True), Exchange.DeclareOk)
    client.call(1, Exchange.Declare(exchange="tx", exchange_type="direct", durable=False), Exchange.DeclareOk)
    client.call(1, Queue.Declare(queue="dq", durable=True), Queue.DeclareOk)
    client.call(1, Queue.Declare(queue="tq", durable=False), Queue.DeclareOk)
    client.call(1, Queue.Bind(queue="dq", exchange="dx", routing_key="k"), Queue.BindOk)
    client.call(1, Queue.Bind(queue="dq", exchange="tx", routing_key="k"), Queue.BindOk)
    again = AmqpServerFactory(world.broker, AllowAllGate(), world.clock, world.factory.settings)
    assert "dx" in again.registry.exchanges and "tx" not in again.registry.exchanges
    assert "dq" in again.registry.queues and "tq" not in again.registry.queues
    assert [(b.source, b.destination) for b in again.registry.bindings.values()] == [("dx", "dq")]
    assert "%AMQP%tq" not in {t.name for t in world.broker.list_topics(include_internal=True)}


def test_an_auto_delete_exchange_goes_with_its_last_binding():
    world = World()
    client = world.client()
    client.open_channel()
    client.call(1, Exchange.Declare(exchange="ad", exchange_type="fanout", auto_delete=True), Exchange.DeclareOk)
    client.call(1, Queue.Declare(queue="q"), Queue.DeclareOk)
    client.call(1, Queue.Bind(queue="q", exchange="ad", routing_key=""), Queue.BindOk)
    client.call(1, Queue.Unbind(queue="q", exchange="ad", routing_key=""), Queue.UnbindOk)
    assert "ad" not in world.factory.registry.exchanges


class DenyingGate:
    """Allows everything but the (action, resource name) pairs given."""

    version = 0

    def __init__(self, *denied: tuple[str, str]) -> None:
        from tidegate.core.security.gate import AllowAllGate

        self.denied = set(denied)
        self.inner = AllowAllGate()

    def authenticate(self, credentials):
        return self.inner.authenticate(credentials)

    def check(self, principal, action, resource, source):
        from tidegate.core.security.gate import ALLOW, Decision

        return Decision(False, "denied") if (action.value, resource.name) in self.denied else ALLOW


def test_every_client_action_is_authorized_before_it_happens():
    """Denied by the gate: the queue is not created, the message is not stored, the consumer is not attached (403)."""
    gate = DenyingGate(("Create", "%AMQP%forbidden"), ("Pub", "secret/x"), ("Sub", "%AMQP%guarded/#"))
    world = World(gate=gate)
    client = world.client()
    client.open_channel()
    client.send(1, Queue.Declare(queue="forbidden"))
    assert client.expect(Channel.Close)[0].reply_code == ReplyCode.ACCESS_REFUSED
    assert "forbidden" not in world.factory.registry.queues
    client.send(1, Channel.CloseOk())
    client.open_channel(1)
    client.publish(1, "amq.topic", "secret.x", b"no")
    assert client.expect(Channel.Close)[0].reply_code == ReplyCode.ACCESS_REFUSED
    assert "secret" not in {t.name for t in world.broker.list_topics()}  # never published, so never created
    client.send(1, Channel.CloseOk())
    client.open_channel(1)
    client.call(1, Queue.Declare(queue="guarded"), Queue.DeclareOk)
    client.send(1, Basic.Consume(queue="guarded"))
    assert client.expect(Channel.Close)[0].reply_code == ReplyCode.ACCESS_REFUSED
    assert not world.factory.registry.queues["guarded"].consumers


def test_publishes_of_one_read_are_stored_together_and_a_refused_one_keeps_those_before_it():
    """Three publishes in one read, the second over the core's body limit: the first is stored, the channel closes
    with 406 at the second, the third is dropped with the closed channel."""
    world = World()
    world.broker.config.max_body = 10
    client = world.client()
    client.open_channel()
    client.call(1, Queue.Declare(queue="q"), Queue.DeclareOk)
    publish = Basic.Publish(exchange="", routing_key="q")
    client.raw(b"".join(client.codec.send_content(1, publish, commands.Basic.Properties(), body)
                        for body in (b"small", b"far too large for the limit", b"after")))
    close = client.expect(Channel.Close)[0]
    assert close.reply_code == ReplyCode.PRECONDITION_FAILED
    client.send(1, Channel.CloseOk())
    client.open_channel(1)
    client.send(1, Basic.Get(queue="q", no_ack=True))
    assert client.received()[0].body == b"small"
    client.send(1, Basic.Get(queue="q", no_ack=True))
    client.expect(Basic.GetEmpty)


def test_x_expires_deletes_a_queue_unused_for_that_long():
    world = World()
    client = world.client()
    client.open_channel()
    client.call(1, Queue.Declare(queue="temp", arguments={"x-expires": 5000}), Queue.DeclareOk)
    world.clock.advance(4)
    client.call(1, Queue.Declare(queue="temp", passive=True), Queue.DeclareOk)  # a use restarts the countdown
    world.clock.advance(4)
    assert "temp" in world.factory.registry.queues
    world.clock.advance(1.5)
    assert "temp" not in world.factory.registry.queues


def test_x_expires_never_deletes_a_queue_with_consumers():
    world = World()
    client = world.client()
    client.open_channel()
    client.call(1, Queue.Declare(queue="temp", arguments={"x-expires": 1000}), Queue.DeclareOk)
    client.consume(1, queue="temp", consumer_tag="c")
    world.clock.advance(5)
    assert "temp" in world.factory.registry.queues


def test_x_single_active_consumer_delivers_to_the_oldest_consumer_and_fails_over():
    world = World()
    first, second = world.client(), world.client()
    first.open_channel()
    second.open_channel()
    first.call(1, Queue.Declare(queue="sac", arguments={"x-single-active-consumer": True}), Queue.DeclareOk)
    first.consume(1, queue="sac", consumer_tag="one")
    second.consume(1, queue="sac", consumer_tag="two")
    for i in range(3):
        first.publish(1, "", "sac", b"%d" % i)
    assert [e.body for e in first.received() if isinstance(e, ContentEvent)] == [b"0", b"1", b"2"]
    assert second.received() == []
    first.call(1, Basic.Cancel(consumer_tag="one"), Basic.CancelOk)
    first.publish(1, "", "sac", b"3")
    assert [e.body for e in second.received() if isinstance(e, ContentEvent)] == [b"3"]


def test_x_max_length_drops_the_oldest_messages():
    world = World()
    client = world.client()
    client.open_channel()
    client.call(1, Queue.Declare(queue="bounded", arguments={"x-max-length": 2}), Queue.DeclareOk)
    for i in range(5):
        client.publish(1, "", "bounded", b"%d" % i)
    world.turn()
    bodies = []
    for _ in range(3):
        client.send(1, Basic.Get(queue="bounded", no_ack=True))
        bodies += [e.body for e in client.received() if isinstance(e, ContentEvent)]
    assert bodies == [b"3", b"4"]


def test_a_consumer_that_never_reads_gets_about_one_credit_chunk_whatever_its_prefetch():
    """Unlimited prefetch, 200 messages of 64 KiB queued, the client reads nothing: once the transport pauses, delivery
    stops, so the connection holds about one credit chunk (1 MiB), not 12.5 MiB."""
    from tidegate.adapters.amqp.channel import CREDIT_CHUNK_BYTES

    world = World()
    client = world.client()
    client.open_channel()
    client.call(1, Queue.Declare(queue="big"), Queue.DeclareOk)
    body = b"x" * 65536
    for _ in range(200):
        client.publish(1, "", "big", body)
    transport, protocol = client.transport, client.protocol
    original_write = transport.writeSequence

    def write_and_pause(chunks):
        original_write(chunks)
        if len(transport.value()) > 65536 and not protocol.paused:
            protocol.pauseProducing()

    transport.writeSequence = write_and_pause
    transport.write = lambda data: write_and_pause([data])
    client.send(1, Basic.Consume(queue="big", consumer_tag="slow"))
    for _ in range(5):
        world.turn()
    written = len(transport.value())
    assert 65536 < written <= CREDIT_CHUNK_BYTES + 2 * len(body)


def test_framing_errors_close_the_connection_with_the_codec_reply_code_and_others_keep_being_served():
    """A wrong frame-end octet is 501 FRAME_ERROR in connection.close; another connection carries on."""
    world = World()
    bad, good = world.client(), world.client()
    frame = bad.codec.send_method(0, Connection.Close(reply_code=200, reply_text="", class_id=0, method_id=0))
    bad.raw(frame[:-1] + b"\x00")
    close = bad.expect(Connection.Close)[0]
    assert close.reply_code == ReplyCode.FRAME_ERROR
    good.open_channel()
    good.call(1, Queue.Declare(queue="still-serving"), Queue.DeclareOk)


def test_an_unknown_method_is_540_not_implemented():
    client = World().client()
    client.open_channel()
    payload = struct.pack(">HH", 60, 999)
    client.raw(struct.pack(">BHI", 1, 1, len(payload)) + payload + b"\xce")
    assert client.expect(Connection.Close)[0].reply_code == ReplyCode.NOT_IMPLEMENTED


def test_a_body_over_the_limit_closes_the_channel_with_406_and_the_connection_carries_on():
    world = World(max_message_bytes=1000)
    client = world.client()
    client.open_channel()
    client.publish(1, "", "q", b"x" * 5000)
    close = client.expect(Channel.Close)[0]
    assert close.reply_code == ReplyCode.PRECONDITION_FAILED
    client.send(1, Channel.CloseOk())
    client.open_channel(1)


def test_messages_expired_by_x_message_ttl_are_dead_lettered():
    world = World()
    client = world.client()
    client.open_channel()
    client.call(1, Queue.Declare(queue="expired-here"), Queue.DeclareOk)
    client.call(1, Queue.Declare(queue="short", arguments={"x-message-ttl": 1000, "x-dead-letter-exchange": "",
                                                           "x-dead-letter-routing-key": "expired-here"}),
                Queue.DeclareOk)
    client.publish(1, "", "short", b"stale")
    world.clock.advance(2)
    client.send(1, Basic.Get(queue="short", no_ack=True))
    client.expect(Basic.GetEmpty)
    world.turn()
    client.send(1, Basic.Get(queue="expired-here", no_ack=True))
    event = client.received()[0]
    assert event.body == b"stale" and event.properties.headers["x-death"][0]["reason"] == "expired"


def test_deleting_a_queue_whose_cancelled_consumer_still_holds_messages_leaves_no_core_group_behind():
    world = World()
    client = world.client()
    client.open_channel()
    client.call(1, Queue.Declare(queue="q"), Queue.DeclareOk)
    client.publish(1, "", "q", b"held")
    assert len(client.consume(1, queue="q", consumer_tag="c")) == 1
    client.call(1, Basic.Cancel(consumer_tag="c"), Basic.CancelOk)  # the delivery stays unacked on the channel
    client.call(1, Queue.Delete(queue="q"), Queue.DeleteOk)
    assert "%AMQP%q" not in {g.name for g in world.broker.list_groups()}
    client.send(1, Basic.Ack(delivery_tag=1))  # acking it afterwards is harmless
    assert client.methods() == []


def test_a_subject_too_long_for_an_amqp_routing_key_is_dropped_and_the_channel_goes_on():
    """A native or MQTT subject may be up to 4 KiB; a routing key only 255 bytes. Such a message cannot be carried
    to an AMQP consumer or basic.get: it is dropped for that queue (logged), and later messages still arrive."""
    world = World()
    client = world.client()
    client.open_channel()
    client.call(1, Queue.Declare(queue="q"), Queue.DeclareOk)
    client.call(1, Queue.Bind(queue="q", exchange="amq.topic", routing_key="sensors.#"), Queue.BindOk)
    long_subject = "/".join(["level"] * 60)  # 359 characters: a 367-byte routing key
    world.broker.publish([Message(topic="sensors", subject=long_subject, body=b"long")])
    world.broker.publish([Message(topic="sensors", subject="hall/temp", body=b"short")])
    world.turn()
    client.send(1, Basic.Get(queue="q", no_ack=False))
    assert [type(m) for m in client.methods()] == [Basic.GetEmpty]  # the long one is gone, answered as an empty get
    client.send(1, Basic.Get(queue="q", no_ack=False))
    events = client.received()
    assert [(e.method.routing_key, e.body) for e in events] == [("sensors.hall.temp", b"short")]
    assert events[0].method.delivery_tag == 1  # no delivery tag was spent on the dropped message
    world.broker.publish([Message(topic="sensors", subject=long_subject, body=b"long again")])
    world.broker.publish([Message(topic="sensors", subject="hall/temp", body=b"after")])
    world.turn()
    deliveries = client.consume(1, queue="q")
    assert [(d.method.routing_key, d.body) for d in deliveries] == [("sensors.hall.temp", b"after")]
    assert deliveries[0].method.delivery_tag == 2 and not client.closed
