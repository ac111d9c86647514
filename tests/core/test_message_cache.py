"""The recent-message cache of core/reader.py is bounded by bytes, evicts oldest first, skips huge messages."""

from __future__ import annotations

import random

import pytest
from twisted.internet.testing import MemoryReactorClock

from tidegate.core.config import BrokerConfig
from tidegate.core.model import Message
from tidegate.core.reader import CACHE_ENTRY_OVERHEAD, QueueReader
from tidegate.core.testing import RecordingSink, make_broker


def charged(reader: QueueReader, sizes: dict[int, int]) -> int:
    return sum(sizes[offset] + CACHE_ENTRY_OVERHEAD for offset in reader.cache)


def test_cached_bytes_never_exceed_the_budget_under_random_sizes():
    budget = 100_000
    reader = QueueReader(store=None, cache_budget=budget)
    rng = random.Random(7)
    sizes: dict[int, int] = {}
    offset = 0
    for _ in range(5_000):
        size = rng.choice((0, 10, 500, 4_000, 20_000, 30_000))
        sizes[offset] = size
        reader.remember(offset, Message("t", b""), size)
        assert reader.cache_bytes <= budget
        assert reader.cache_bytes == charged(reader, sizes)  # the running total is exact
        offset += size + 1


def test_oldest_messages_are_evicted_first_and_only_as_many_as_needed():
    reader = QueueReader(store=None, cache_budget=64 * 1024)
    size = 1024 - CACHE_ENTRY_OVERHEAD  # charged exactly 1 KiB each
    for offset in range(200):
        reader.remember(offset, Message("t", b""), size)
    kept = sorted(reader.cache)
    assert kept == list(range(200 - len(kept), 200))  # a suffix: the newest
    assert 56 <= len(kept) <= 64  # evicted down to 15/16 of the budget at most, never emptied


def test_a_message_above_a_quarter_of_the_budget_is_not_cached():
    reader = QueueReader(store=None, cache_budget=4096)
    reader.remember(0, Message("t", b""), 100)
    reader.remember(1, Message("t", b""), 1024 - CACHE_ENTRY_OVERHEAD)  # exactly a quarter: cached
    reader.remember(2, Message("t", b""), 1025 - CACHE_ENTRY_OVERHEAD)
    assert sorted(reader.cache) == [0, 1]


def test_a_zero_budget_turns_the_cache_off():
    reader = QueueReader(store=None, cache_budget=0)
    reader.remember(0, Message("t", b""), 0)
    assert reader.cache == {} and reader.cache_bytes == 0


@pytest.fixture
def clock():
    c = MemoryReactorClock()
    c.advance(1_000_000)
    return c


def test_publishing_large_messages_keeps_the_broker_cache_within_message_cache_bytes(clock):
    """The issue's case: messages nobody reads used to stay cached up to 8,192 of them, whatever their size."""
    budget = 1024 * 1024
    broker = make_broker(clock, config=BrokerConfig(message_cache_bytes=budget))
    try:
        body = b"m" * (64 * 1024)
        for _ in range(100):
            broker.publish([Message(topic="big", body=body)])
        clock.advance(0)
        cached = broker._reader.cache.values()
        assert 0 < len(cached) < 100
        assert sum(len(m.body) for m in cached) <= budget
        assert broker._reader.cache_bytes <= budget
    finally:
        broker.close()


def test_messages_evicted_from_the_cache_are_still_delivered_from_the_store(clock):
    broker = make_broker(clock, config=BrokerConfig(message_cache_bytes=16 * 1024, default_queues=1))
    try:
        bodies = [f"{i:04d}".encode() * 256 for i in range(50)]  # 1 KiB each: most are evicted
        for body in bodies:
            broker.publish([Message(topic="t", body=body)])
        clock.advance(0)
        assert len(broker._reader.cache) < len(bodies)
        sink = RecordingSink()
        broker.subscribe("g", "t", sink, client_id="c", start="earliest").grant(len(bodies))
        clock.advance(0)
        assert [d.message.body for d in sink.delivered] == bodies
    finally:
        broker.close()
