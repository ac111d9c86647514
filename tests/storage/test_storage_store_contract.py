"""MessageStore contract: the same behaviour from the file store and its in-memory twin."""

from __future__ import annotations

import pytest

from tidegate.core.errors import InvalidName, MessageNotFound, MessageTooLarge, OffsetOutOfRange, ShuttingDown
from tidegate.core.model import Message, QueueRef, tag_hash
from tidegate.core.storage.api import QueueBounds

Q0 = QueueRef("orders", 0)
Q1 = QueueRef("orders", 1)
SESSION = QueueRef("%MQTT%client-1", 0)


def full_message(n: int = 0) -> Message:
    return Message(
        topic="orders",
        body=b"body-%d" % n,
        subject="eu/paris",
        tag="created",
        keys=(f"order-{n}", "customer-7"),
        properties={"content-type": "application/json", "k": "v\u00e9"},
        born_ts=1_600_000_000_000 + n,
        deliver_at=1_700_000_100_000,
        expires_at=1_700_000_900_000,
        group="fifo-1",
        flags=1,
    )


def test_append_then_read_round_trips_every_message_field(store, clock):
    message = full_message()
    result = store.append(message, [Q0])
    assert message.msg_id == result.msg_id and message.store_ts == result.store_ts == clock.now_ms
    [entry] = store.read_index(Q0, 0, 10)
    assert (entry.queue_offset, entry.commit_offset, entry.size) == (0, result.commit_offset, result.size)
    assert entry.tag_hash == tag_hash("created")
    read = store.read_message(entry.commit_offset, entry.size)
    for name in ("topic", "body", "subject", "tag", "keys", "properties", "born_ts", "deliver_at", "expires_at",
                 "group", "flags", "msg_id", "store_ts"):
        assert getattr(read, name) == getattr(message, name), name
    assert store.read_message(entry.commit_offset) == read  # size is optional


def test_fan_out_stores_once_and_gives_each_destination_its_own_queue_offset(store):
    store.append(Message("orders", b"a"), [Q0])
    store.append(Message("orders", b"b"), [Q0])
    result = store.append(Message("orders", b"fan"), [Q0, Q1, SESSION])
    assert result.queue_offsets == (2, 0, 0)
    pairs = zip([Q0, Q1, SESSION], (2, 0, 0), strict=True)
    commits = {store.read_index(q, off, 1)[0].commit_offset for q, off in pairs}
    assert commits == {result.commit_offset}
    assert store.queue_bounds(Q0) == QueueBounds(0, 3)
    assert store.queue_bounds(SESSION) == QueueBounds(0, 1)
    assert set(store.queues()) == {Q0, Q1, SESSION}


def test_the_same_queue_named_twice_gets_two_consecutive_entries(store):
    result = store.append(Message("orders", b"twice"), [Q0, Q0])
    assert result.queue_offsets == (0, 1)
    assert store.queue_bounds(Q0).max_offset == 2


def test_append_batch_matches_appending_one_by_one(store):
    results = store.append_batch([(Message("orders", b"%d" % n), [Q0 if n % 2 else Q1]) for n in range(20)])
    assert [r.queue_offsets for r in results] == [((n // 2),) for n in range(20)]
    assert [r.commit_offset for r in results] == sorted(r.commit_offset for r in results)
    bodies = [store.read_message(e.commit_offset, e.size).body for e in store.read_index(Q0, 0, 100)]
    assert bodies == [b"%d" % n for n in range(1, 20, 2)]
    assert store.append_batch([]) == []


def test_store_time_never_goes_backwards_even_if_the_clock_does(store, clock):
    first = store.append(Message("orders", b"1"), [Q0])
    clock.advance(-5000)
    second = store.append(Message("orders", b"2"), [Q0])
    assert second.store_ts >= first.store_ts


def test_read_index_pages_and_reports_the_end(store):
    for n in range(25):
        store.append(Message("orders", b"%d" % n), [Q0])
    assert [e.queue_offset for e in store.read_index(Q0, 5, 7)] == list(range(5, 12))
    assert [e.queue_offset for e in store.read_index(Q0, 20, 100)] == list(range(20, 25))
    assert store.read_index(Q0, 25, 10) == []
    assert store.read_index(QueueRef("never", 3), 0, 10) == []
    with pytest.raises(OffsetOutOfRange):
        store.read_index(Q0, 26, 10)
    with pytest.raises(OffsetOutOfRange):
        store.read_index(Q0, -1, 10)


def test_lookup_id_finds_the_message_and_rejects_ids_that_do_not_match(store):
    result = store.append(full_message(), [Q0])
    assert store.lookup_id(result.msg_id).body == b"body-0"
    assert store.lookup_id(result.msg_id.lower()).msg_id == result.msg_id
    wrong_time = result.msg_id[:16] + "%08X" % ((int(result.msg_id[16:], 16) + 1) & 0xFFFFFFFF)
    for bad in (wrong_time, "F" * 24, "not-an-id", "1" * 16 + "0" * 8):
        with pytest.raises(MessageNotFound):
            store.lookup_id(bad)


def test_lookup_key_returns_messages_of_that_topic_with_that_key_oldest_first(store):
    for n in range(5):
        store.append(full_message(n), [Q0])
    store.append(Message("other", b"x", keys=("customer-7",)), [QueueRef("other", 0)])
    found = store.lookup_key("orders", "customer-7")
    assert [m.body for m in found] == [b"body-%d" % n for n in range(5)]
    assert [m.body for m in store.lookup_key("orders", "customer-7", limit=2)] == [b"body-3", b"body-4"]
    assert [m.body for m in store.lookup_key("orders", "order-3")] == [b"body-3"]
    assert store.lookup_key("orders", "nobody") == []
    assert [m.topic for m in store.lookup_key("other", "customer-7")] == ["other"]


def test_offset_for_time_finds_the_first_message_stored_at_or_after_a_time(store, clock):
    start = clock.now_ms
    for _ in range(10):
        store.append(Message("orders", b"x"), [Q0])
        clock.advance(1000)
    assert store.offset_for_time(Q0, start - 1) == 0
    assert store.offset_for_time(Q0, start) == 0
    assert store.offset_for_time(Q0, start + 1) == 1
    assert store.offset_for_time(Q0, start + 4500) == 5
    assert store.offset_for_time(Q0, start + 9000) == 9
    assert store.offset_for_time(Q0, start + 10**9) == 10
    assert store.offset_for_time(QueueRef("never", 0), start) == 0


def test_delete_queue_forgets_the_index_but_other_queues_keep_the_shared_record(store):
    result = store.append(Message("orders", b"fan"), [Q0, Q1])
    store.delete_queue(Q0)
    assert Q0 not in set(store.queues())
    assert store.queue_bounds(Q0) == QueueBounds(0, 0)
    assert store.read_index(Q1, 0, 1)[0].commit_offset == result.commit_offset
    assert store.append(Message("orders", b"again"), [Q0]).queue_offsets == (0,)
    store.delete_queue(QueueRef("never", 0))  # unknown queue: nothing to do


def test_a_message_larger_than_a_segment_raises_message_too_large_and_changes_nothing(store):
    store.append(Message("orders", b"small"), [Q0])
    before = store.stats()
    with pytest.raises(MessageTooLarge):
        store.append(Message("orders", b"x" * 5000), [Q0])
    with pytest.raises(MessageTooLarge):
        store.append_batch([(Message("orders", b"ok"), [Q0]), (Message("orders", b"x" * 5000), [Q0])])
    assert store.stats().end_offset == before.end_offset
    assert store.queue_bounds(Q0) == QueueBounds(0, 1)


def test_a_bad_queue_id_is_a_typed_error(store):
    with pytest.raises(InvalidName):
        store.append(Message("orders", b"x"), [QueueRef("orders", -1)])


def test_sync_makes_everything_durable_and_stats_describe_the_log(store):
    for _ in range(30):
        store.append(Message("orders", b"x" * 200), [Q0])
    assert store.durable_offset <= store.end_offset
    assert store.sync() == store.end_offset == store.durable_offset
    stats = store.stats()
    assert stats.segments >= 2 and stats.min_offset == 0
    assert stats.end_offset == store.end_offset and stats.disk_bytes > 0


def test_reading_an_offset_that_is_not_a_record_raises_message_not_found(store):
    result = store.append(Message("orders", b"x" * 100), [Q0])
    for offset in (result.commit_offset + 1, store.end_offset, 10**12):
        with pytest.raises(MessageNotFound):
            store.read_message(offset)


def test_retention_removes_old_segments_and_raises_queue_minimum(store, clock):
    for _ in range(40):
        store.append(Message("orders", b"x" * 300), [Q0])
    clock.advance(10_000)
    for _ in range(3):
        store.append(Message("orders", b"y" * 300), [Q0])
    deleted = store.enforce_retention(clock.now_ms, max_age_ms=5_000, max_bytes=0)
    assert deleted >= 2
    bounds = store.queue_bounds(Q0)
    assert 0 < bounds.min_offset < bounds.max_offset == 43
    with pytest.raises(OffsetOutOfRange):
        store.read_index(Q0, bounds.min_offset - 1, 1)
    first = store.read_index(Q0, bounds.min_offset, 1)[0]
    assert store.read_message(first.commit_offset, first.size).topic == "orders"
    assert store.stats().min_offset > 0


def test_a_closed_store_refuses_appends(store):
    store.close()
    with pytest.raises(ShuttingDown):
        store.append(Message("orders", b"x"), [Q0])


def test_expire_queue_before_drops_entries_stored_before_the_time_and_keeps_the_log(store, clock):
    """Per-topic retention trims the queue's index only: the records stay in the commit log."""
    old = [store.append(Message("orders", b"old-%d" % n), [Q0]) for n in range(5)]
    clock.advance(1_000)
    for n in range(3):
        store.append(Message("orders", b"new-%d" % n), [Q0])
    stats_before = store.stats()
    assert store.expire_queue_before(Q0, clock.now_ms) == 5
    assert store.queue_bounds(Q0) == QueueBounds(5, 8)
    with pytest.raises(OffsetOutOfRange):
        store.read_index(Q0, 4, 1)
    assert [store.read_message(e.commit_offset).body for e in store.read_index(Q0, 5, 10)] == [
        b"new-0", b"new-1", b"new-2"]
    assert store.read_message(old[0].commit_offset).body == b"old-0"  # the log is not touched
    assert store.stats() == stats_before


def test_expire_queue_before_leaves_other_queues_sharing_the_records_alone(store, clock):
    store.append(Message("orders", b"fan"), [Q0, Q1])
    clock.advance(1_000)
    assert store.expire_queue_before(Q0, clock.now_ms) == 1
    assert store.queue_bounds(Q0) == QueueBounds(1, 1)
    assert store.queue_bounds(Q1) == QueueBounds(0, 1)
    assert store.read_message(store.read_index(Q1, 0, 1)[0].commit_offset).body == b"fan"


def test_expire_queue_before_never_lowers_the_minimum_and_ignores_unknown_queues(store, clock):
    for _ in range(3):
        store.append(Message("orders", b"x"), [Q0])
    clock.advance(1_000)
    store.append(Message("orders", b"y"), [Q0])
    assert store.expire_queue_before(Q0, clock.now_ms - 1_000) == 0  # nothing is older than that
    assert store.expire_queue_before(Q0, clock.now_ms) == 3
    assert store.expire_queue_before(Q0, clock.now_ms - 500) == 0
    assert store.queue_bounds(Q0) == QueueBounds(3, 4)
    assert store.expire_queue_before(QueueRef("unknown", 0), clock.now_ms) == 0
    assert store.queue_bounds(QueueRef("unknown", 0)) == QueueBounds(0, 0)


def test_a_queue_expired_to_its_end_keeps_counting_offsets(store, clock):
    for _ in range(4):
        store.append(Message("orders", b"x"), [Q0])
    assert store.expire_queue_before(Q0, clock.now_ms + 1) == 4
    assert store.queue_bounds(Q0) == QueueBounds(4, 4)
    assert store.read_index(Q0, 4, 10) == []
    assert store.append(Message("orders", b"after"), [Q0]).queue_offsets == (4,)
    assert [e.queue_offset for e in store.read_index(Q0, 4, 10)] == [4]


def test_expire_queue_before_on_a_closed_store_raises_shutting_down(store, clock):
    store.append(Message("orders", b"x"), [Q0])
    store.close()
    with pytest.raises(ShuttingDown):
        store.expire_queue_before(Q0, clock.now_ms + 1)
