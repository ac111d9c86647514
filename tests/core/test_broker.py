"""The core broker over the in-memory stores, driven by a MemoryReactorClock (no sockets, no sleeps)."""

import pytest

from tidegate.core.api import AckMode, ConsumeMode, PullStatus
from tidegate.core.broker import BrokerConfig
from tidegate.core.errors import (
    InvalidFilter,
    InvalidName,
    InvalidReceipt,
    MessageTooLarge,
    OffsetOutOfRange,
    QueueNotFound,
    TidegateError,
    TopicExists,
    TopicNotFound,
)
from tidegate.core.model import Message, QueueRef
from tidegate.core.testing import RecordingSink, make_broker


def send(broker, clock, topic, *bodies, **fields):
    results = broker.publish([Message(topic=topic, body=b, **fields) for b in bodies])
    clock.advance(0)  # runs the group-commit flush and delivery wake-ups
    return results


def test_topic_crud_and_errors(broker):
    cfg = broker.create_topic("orders", queues=3)
    assert (cfg.name, cfg.queues, cfg.perm) == ("orders", 3, "rw")
    with pytest.raises(TopicExists):
        broker.create_topic("orders")
    with pytest.raises(InvalidName):
        broker.create_topic("bad name!")
    assert broker.update_topic("orders", queues=5).queues == 5
    assert [t.name for t in broker.list_topics()] == ["orders"]
    broker.delete_topic("orders")
    with pytest.raises(TopicNotFound):
        broker.get_topic("orders")


def test_publish_round_robins_queues_and_pull_reads_back(broker, clock):
    broker.create_topic("t", queues=2)
    results = send(broker, clock, "t", b"a", b"b", b"c")
    assert [(r.queue_id, r.queue_offset) for r in results] == [(0, 0), (1, 0), (0, 1)]
    pulled = broker.pull(QueueRef("t", 0), 0, 10)
    assert pulled.status is PullStatus.FOUND
    assert [d.message.body for d in pulled.messages] == [b"a", b"c"]
    assert pulled.next_offset == 2
    assert broker.pull(QueueRef("t", 0), 2).status is PullStatus.NO_NEW
    with pytest.raises(OffsetOutOfRange):
        broker.pull(QueueRef("t", 0), 3)
    with pytest.raises(QueueNotFound):
        broker.pull(QueueRef("t", 7), 0)


def test_bad_messages_raise_and_store_nothing(broker, clock):
    broker.create_topic("t", queues=1)
    with pytest.raises(MessageTooLarge):
        broker.publish([Message("t", b"ok"), Message("t", b"x" * (4 * 1024 * 1024 + 1))])
    with pytest.raises(InvalidName):
        broker.publish([Message("no spaces", b"x")])
    assert broker.store.end_offset == 0


def test_auto_create_can_be_switched_off(clock):
    b = make_broker(clock, config=BrokerConfig(auto_create_topics=False))
    with pytest.raises(TopicNotFound):
        b.publish([Message("nope", b"x")])
    b.close()


def test_sync_flush_acknowledges_and_shows_messages_only_after_fsync(broker, clock):
    broker.create_topic("t", queues=1)
    [r] = broker.publish([Message("t", b"x")])
    acked = []
    broker.when_durable(r.commit_end, lambda: acked.append(True))
    assert acked == []
    assert broker.pull(QueueRef("t", 0), 0).status is PullStatus.NO_NEW  # not yet on disk
    clock.advance(0)
    assert acked == [True]
    assert broker.pull(QueueRef("t", 0), 0).messages[0].message.body == b"x"


def test_fifo_group_keeps_one_queue(broker, clock):
    broker.create_topic("t", queues=8)
    results = send(broker, clock, "t", *[b"%d" % i for i in range(10)], group="order-42")
    assert len({r.queue_id for r in results}) == 1


def test_bindings_fan_out_as_index_entries(broker, clock):
    broker.create_topic("T", queues=1)
    broker.create_topic("%SESSION%a", queues=1, internal=True)
    broker.create_topic("%SESSION%b", queues=1, internal=True)
    broker.bind("T/+/b", QueueRef("%SESSION%a", 0))
    broker.bind("T/#", QueueRef("%SESSION%b", 0))
    [r] = send(broker, clock, "T", b"hello", subject="x/b")
    send(broker, clock, "T", b"other", subject="x/c")
    a = broker.pull(QueueRef("%SESSION%a", 0), 0).messages
    b = broker.pull(QueueRef("%SESSION%b", 0), 0).messages
    assert [d.message.body for d in a] == [b"hello"]
    assert [d.message.body for d in b] == [b"hello", b"other"]
    assert a[0].message.msg_id == r.msg_id  # the same stored message, not a copy
    assert broker.store.stats().end_offset < 3 * 200
    broker.unbind("T/#", QueueRef("%SESSION%b", 0))
    assert broker.bindings() == [("T/+/b", QueueRef("%SESSION%a", 0))]


def test_clustering_offset_mode_splits_queues_and_rebalances(broker, clock):
    broker.create_topic("t", queues=4)
    s1, s2 = RecordingSink(), RecordingSink()
    sub1 = broker.subscribe("g", "t", s1, client_id="c1", start="earliest")
    sub2 = broker.subscribe("g", "t", s2, client_id="c2", start="earliest")
    assert sorted(map(str, s1.assigned + s2.assigned)) == [f"t:{i}" for i in range(4)]
    assert not set(s1.assigned) & set(s2.assigned)
    sub1.grant(100)
    sub2.grant(100)
    send(broker, clock, "t", *[b"%d" % i for i in range(8)])
    got = sorted(s1.bodies + s2.bodies)
    assert got == sorted(b"%d" % i for i in range(8))  # each message exactly once
    # c1 commits what it got; c2 commits nothing and leaves: its queues go to c1 from the committed offset
    for d in s1.delivered:
        sub1.commit(d.queue, d.queue_offset + 1)
    c2_got = list(s2.bodies)
    sub2.close()
    clock.advance(0)
    assert sorted(map(str, s1.assigned)) == [f"t:{i}" for i in range(4)]
    redelivered = s1.bodies[len(got) - len(c2_got):]
    assert sorted(redelivered) == sorted(c2_got)  # uncommitted: delivered again (at least once)
    for d in s1.delivered:
        sub1.commit(d.queue, d.queue_offset + 1)
    info = broker.group_info("g")
    assert info.lag == 0 and info.members == ["c1"]


def test_broadcasting_gives_every_member_everything(broker, clock):
    broker.create_topic("t", queues=2)
    sinks = [RecordingSink() for _ in range(3)]
    for i, s in enumerate(sinks):
        broker.subscribe("b", "t", s, client_id=f"c{i}", mode=ConsumeMode.BROADCASTING, start="earliest").grant(50)
    send(broker, clock, "t", b"1", b"2", b"3")
    for s in sinks:
        assert sorted(s.bodies) == [b"1", b"2", b"3"]


def test_credit_bounds_deliveries(broker, clock):
    broker.create_topic("t", queues=1)
    sink = RecordingSink()
    sub = broker.subscribe("g", "t", sink, client_id="c", start="earliest")
    send(broker, clock, "t", *[b"%d" % i for i in range(10)])
    assert sink.delivered == []  # no credit yet
    sub.grant(3)
    clock.advance(0)
    assert sink.bodies == [b"0", b"1", b"2"]
    sub.grant(100)
    clock.advance(0)
    assert len(sink.delivered) == 10


def test_tag_filter_is_applied_on_the_broker(broker, clock):
    broker.create_topic("t", queues=1)
    sink = RecordingSink()
    broker.subscribe("g", "t", sink, client_id="c", filter_expr="A || B", start="earliest").grant(10)
    for tag in ["A", "C", "B", "", "A"]:
        send(broker, clock, "t", tag.encode(), tag=tag)
    assert sink.bodies == [b"A", b"B", b"A"]
    with pytest.raises(InvalidFilter):
        broker.subscribe("g2", "t", RecordingSink(), client_id="c", filter_expr="A ||")


def test_new_group_starts_latest_unless_asked(broker, clock):
    broker.create_topic("t", queues=1)
    send(broker, clock, "t", b"old")
    late, early = RecordingSink(), RecordingSink()
    broker.subscribe("late", "t", late, client_id="c").grant(10)
    broker.subscribe("early", "t", early, client_id="c", start="earliest").grant(10)
    send(broker, clock, "t", b"new")
    assert late.bodies == [b"new"]
    assert early.bodies == [b"old", b"new"]


def test_message_mode_ack_redelivery_and_dead_letter(clock):
    broker = make_broker(clock, config=BrokerConfig(max_attempts=3))
    broker.create_topic("t", queues=1)
    sink = RecordingSink()
    sub = broker.subscribe("g", "t", sink, client_id="c", ack=AckMode.MESSAGE, invisible_ms=5000, start="earliest")
    sub.grant(100)
    send(broker, clock, "t", b"keep", b"done")
    keep, done = sink.delivered
    sub.ack(done.receipt)
    with pytest.raises(InvalidReceipt):
        sub.ack(done.receipt)  # acked twice
    clock.advance(4.9)
    assert len(sink.delivered) == 2
    clock.advance(0.2)  # invisibility timeout passes: redelivered with attempt 2
    clock.advance(0)
    assert [(d.message.body, d.attempt) for d in sink.delivered[2:]] == [(b"keep", 2)]
    with pytest.raises(InvalidReceipt):
        sub.ack(keep.receipt)  # the first receipt is stale now
    sub.nack(sink.delivered[-1].receipt)  # attempt 3 now
    clock.advance(0)
    assert sink.delivered[-1].attempt == 3
    sub.nack(sink.delivered[-1].receipt)  # beyond max_attempts: dead-lettered
    clock.advance(0)
    assert len(sink.delivered) == 4
    dlq = broker.pull(QueueRef("%DLQ%g", 0), 0).messages
    assert [d.message.body for d in dlq] == [b"keep"]
    assert dlq[0].message.properties["DLQ_ORIGIN_TOPIC"] == "t"
    assert broker.committed_offsets("g")[QueueRef("t", 0)] == 2
    broker.close()


def test_message_mode_close_releases_inflight_to_other_members(broker, clock):
    broker.create_topic("t", queues=1)
    s1, s2 = RecordingSink(), RecordingSink()
    sub1 = broker.subscribe("g", "t", s1, client_id="c1", ack="message", invisible_ms=0, start="earliest")
    sub1.grant(10)
    send(broker, clock, "t", b"x", b"y")
    assert s1.bodies == [b"x", b"y"]
    sub2 = broker.subscribe("g", "t", s2, client_id="c2", ack="message", invisible_ms=0)
    sub2.grant(10)
    clock.advance(3600)
    assert s2.delivered == []  # invisible_ms=0: never times out
    sub1.close()
    clock.advance(0)
    assert [(d.message.body, d.attempt) for d in s2.delivered] == [(b"x", 2), (b"y", 2)]


def test_group_mode_conflict_is_an_error(broker):
    broker.create_topic("t", queues=1)
    broker.subscribe("g", "t", RecordingSink(), client_id="a")
    with pytest.raises(TidegateError):
        broker.subscribe("g", "t", RecordingSink(), client_id="b", ack="message")


def test_reset_offsets_and_lag(broker, clock):
    broker.create_topic("t", queues=1)
    send(broker, clock, "t", b"1", b"2")
    clock.advance(10)
    mid = broker.now_ms()
    send(broker, clock, "t", b"3")
    broker.subscribe("g", "t", RecordingSink(), client_id="c").close()
    q = QueueRef("t", 0)
    assert broker.group_info("g").lag == 0
    assert broker.reset_offsets("g", "t", "earliest") == {q: 0}
    assert broker.group_info("g").lag == 3
    assert broker.reset_offsets("g", "t", mid) == {q: 2}
    assert broker.reset_offsets("g", "t", "latest") == {q: 3}


def test_commit_offset_rejects_out_of_range(broker, clock):
    broker.create_topic("t", queues=1)
    send(broker, clock, "t", b"1")
    with pytest.raises(OffsetOutOfRange):
        broker.commit_offset("g", QueueRef("t", 0), 5)


def test_query_by_id_key_and_time(broker, clock):
    broker.create_topic("t", queues=2)
    [r] = send(broker, clock, "t", b"k", keys=("order-1",))
    send(broker, clock, "t", b"other", keys=("order-2",))
    assert broker.query_by_id(r.msg_id).body == b"k"
    assert [m.body for m in broker.query_by_key("t", "order-1")] == [b"k"]
    now = broker.now_ms()
    assert sorted(m.body for m in broker.list_by_time("t", now - 1000, now + 1000)) == [b"k", b"other"]


def test_offsets_survive_a_broker_restart_on_the_same_metadata(clock):
    from tidegate.core.storage.memory import MemoryMessageStore, MemoryMetadataStore

    store, meta = MemoryMessageStore(), MemoryMetadataStore()
    b1 = make_broker(clock, store=store, metadata=meta)
    b1.create_topic("t", queues=1)
    sink = RecordingSink()
    sub = b1.subscribe("g", "t", sink, client_id="c", start="earliest")
    sub.grant(10)
    send(b1, clock, "t", b"1", b"2")
    sub.commit(QueueRef("t", 0), 1)
    b1.flush_offsets()
    b2 = make_broker(clock, store=store, metadata=meta)
    assert b2.committed_offsets("g") == {QueueRef("t", 0): 1}
    assert b2.get_topic("t").queues == 1


def test_a_pull_only_group_is_known_after_its_first_commit(broker, clock):
    broker.create_topic("t", queues=1)
    send(broker, clock, "t", b"1", b"2")
    broker.commit_offset("puller", QueueRef("t", 0), 1)
    info = broker.group_info("puller")
    assert info.topics == ["t"] and info.lag == 1
    assert "puller" in [g.name for g in broker.list_groups()]


def test_message_mode_spreads_a_burst_over_members_with_credit(broker, clock):
    broker.create_topic("t", queues=1)
    sinks = [RecordingSink() for _ in range(3)]
    for i, sink in enumerate(sinks):
        broker.subscribe("g", "t", sink, client_id=f"c{i}", ack="message", start="earliest").grant(100)
    clock.advance(0)
    send(broker, clock, "t", *[b"%d" % i for i in range(30)])
    for _ in range(5):
        clock.advance(0)
    counts = [len(s.delivered) for s in sinks]
    assert sum(counts) == 30
    assert min(counts) >= 5, counts  # not all to the first member woken
    assert len({b for s in sinks for b in s.bodies}) == 30  # each message to exactly one member


def test_publish_records_append_latency_and_counts(broker, clock):
    send(broker, clock, "t", b"abc", b"de")
    metrics = broker.metrics
    assert metrics.append_latency.count == 1  # one store call for the batch
    assert (metrics.messages_in["t"], metrics.bytes_in["t"]) == (2, 5)


def test_a_mixed_batch_counts_each_topic_in_metrics(broker, clock):
    broker.publish([Message("a", b"1"), Message("b", b"22"), Message("a", b"333")])
    assert dict(broker.metrics.messages_in) == {"a": 2, "b": 1}
    assert dict(broker.metrics.bytes_in) == {"a": 4, "b": 2}


def test_send_result_bound_counts_queues_reached_through_bindings(broker, clock):
    broker.create_topic("T", queues=1)
    broker.create_topic("%Q%a", queues=1, internal=True)
    broker.create_topic("%Q%b", queues=1, internal=True)
    broker.bind("T/x/#", QueueRef("%Q%a", 0))
    broker.bind("T/#", QueueRef("%Q%b", 0))
    broker.bind("T/#", QueueRef("T", 0))  # a binding to the home queue adds nothing
    [both, one, none] = broker.publish([Message("T", b"1", subject="x/y"), Message("T", b"2", subject="z"),
                                        Message("U", b"3")])
    assert (both.bound, one.bound, none.bound) == (2, 1, 0)


def test_send_result_keeps_positional_construction_with_bound_defaulting_to_zero():
    from tidegate.core.api import SendResult

    r = SendResult("id", "t", 0, 1, 2, 3)
    assert r.bound == 0 and r.commit_end == 3


def test_metrics_default_to_the_durability_counters_and_can_be_passed(clock):
    from tidegate.core.broker import Broker
    from tidegate.core.flush import Durability
    from tidegate.core.metrics import CoreMetrics
    from tidegate.core.storage.memory import MemoryMessageStore, MemoryMetadataStore

    store = MemoryMessageStore()
    durability = Durability(store, clock, run_in_thread=None, mode="async")
    assert Broker(store, MemoryMetadataStore(), clock, durability).metrics is durability.metrics
    own = CoreMetrics()
    broker = Broker(store, MemoryMetadataStore(), clock, durability, metrics=own)
    broker.publish([Message("t", b"x")])
    assert own.messages_in["t"] == 1 and durability.metrics.messages_in["t"] == 0
    durability.close()


def test_a_topic_retention_trims_only_that_topics_queues(broker, clock):
    broker.create_topic("short", queues=1, retention_ms=60_000)
    broker.create_topic("long", queues=1)
    send(broker, clock, "short", b"old-1", b"old-2")
    send(broker, clock, "long", b"kept")
    clock.advance(61)
    send(broker, clock, "short", b"new")
    broker.enforce_retention()
    assert [d.message.body for d in broker.pull(QueueRef("short", 0), 2).messages] == [b"new"]
    assert broker.queue_offsets(QueueRef("short", 0)) == (2, 3)
    assert [d.message.body for d in broker.pull(QueueRef("long", 0), 0).messages] == [b"kept"]


def test_message_mode_first_wake_up_with_nothing_waiting_delivers_later_and_waiting_messages_at_once(broker, clock):
    """A new MESSAGE-mode member whose queues are consumed to their end skips its first pump (what every resumed
    MQTT session with an empty queue does): it still gets what is published later, and a member that joins while
    messages (or redeliveries) wait gets them on its first wake-up."""
    broker.create_topic("t", queues=2)
    idle = RecordingSink()
    broker.subscribe("idle", "t", idle, client_id="c0", ack="message", start="latest").grant(10)
    clock.advance(0)
    assert idle.delivered == []
    send(broker, clock, "t", b"a", b"b")
    clock.advance(0)
    assert sorted(idle.bodies) == [b"a", b"b"]
    waiting = RecordingSink()
    first = broker.subscribe("busy", "t", waiting, client_id="c1", ack="message", start="earliest")
    first.grant(10)
    clock.advance(0)
    assert sorted(waiting.bodies) == [b"a", b"b"]
    first.close()  # both come back for the group's next member
    again = RecordingSink()
    broker.subscribe("busy", "t", again, client_id="c2", ack="message", start="earliest").grant(10)
    clock.advance(0)
    assert sorted(again.bodies) == [b"a", b"b"]
