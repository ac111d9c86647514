"""Group listing and description cost metadata calls linear in the number of groups, never quadratic."""

from collections import Counter

import pytest
from twisted.internet.testing import MemoryReactorClock

from tidegate.core.api import ConsumeMode
from tidegate.core.model import Message, QueueRef
from tidegate.core.storage.memory import MemoryMessageStore, MemoryMetadataStore
from tidegate.core.testing import RecordingSink, make_broker

T0 = 1_700_000_000.0


class CountingMetadata:
    """A MetadataStore that counts every call it forwards."""

    def __init__(self, inner: MemoryMetadataStore) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name):
        target = getattr(self.inner, name)
        if not callable(target):
            return target

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return target(*args, **kwargs)

        return counted


@pytest.fixture
def clock():
    c = MemoryReactorClock()
    c.advance(T0)
    return c


def test_list_groups_and_group_info_read_metadata_linearly(clock):
    n = 300
    store, inner = MemoryMessageStore(), MemoryMetadataStore()
    first = make_broker(clock, store=store, metadata=inner)
    first.create_topic("t", queues=1)
    first.publish([Message("t", b"x"), Message("t", b"y")])
    clock.advance(0)
    for i in range(n):
        first.commit_offset(f"g{i}", QueueRef("t", 0), 1)
    first.flush_offsets()

    meta = CountingMetadata(inner)
    broker = make_broker(clock, store=store, metadata=meta)
    assert meta.calls["get_groups"] == 1  # read once at start
    meta.calls.clear()
    groups = broker.list_groups()
    assert [g.name for g in groups] == sorted(f"g{i}" for i in range(n))
    assert all(g.lag == 1 for g in groups)  # each committed 1 of the 2 messages
    assert meta.calls["get_groups"] == 0
    assert meta.calls["get_offsets"] == n  # one per group, the first time only
    assert sum(meta.calls.values()) == n
    meta.calls.clear()
    broker.list_groups()
    broker.group_info("g7")
    assert sum(meta.calls.values()) == 0  # everything is in memory now


def test_first_commits_of_many_pull_only_groups_never_reread_the_group_table(clock):
    meta = CountingMetadata(MemoryMetadataStore())
    broker = make_broker(clock, metadata=meta)
    broker.create_topic("t", queues=1)
    broker.publish([Message("t", b"x")])
    clock.advance(0)
    meta.calls.clear()
    for i in range(200):
        broker.commit_offset(f"g{i}", QueueRef("t", 0), 1)
    assert meta.calls["get_groups"] == 0
    assert meta.calls["put_group"] == 200  # one row each; a second commit on the same topic writes none
    broker.commit_offset("g0", QueueRef("t", 0), 1)
    assert meta.calls["put_group"] == 200


def test_a_deleted_group_is_gone_from_the_listing_and_its_row_from_metadata(clock):
    inner = MemoryMetadataStore()
    broker = make_broker(clock, metadata=inner)
    broker.create_topic("t", queues=1)
    broker.commit_offset("g", QueueRef("t", 0), 0)
    broker.delete_group("g")
    assert broker.list_groups() == []
    assert inner.get_groups() == []


def test_group_created_ts_is_kept_when_members_come_back(clock):
    inner = MemoryMetadataStore()
    broker = make_broker(clock, metadata=inner)
    broker.create_topic("t", queues=1)
    broker.subscribe("g", "t", RecordingSink(), client_id="c").close()
    created = inner.get_groups()[0]["created_ts"]
    clock.advance(60)
    broker.subscribe("g", "t", RecordingSink(), client_id="c")
    assert inner.get_groups()[0]["created_ts"] == created


def test_broadcasting_group_info_shows_each_member_and_delete_removes_their_offsets(clock):
    inner = MemoryMetadataStore()
    broker = make_broker(clock, metadata=inner)
    broker.create_topic("t", queues=1)
    for client in ("a", "b"):
        broker.subscribe("b", "t", RecordingSink(), client_id=client, mode=ConsumeMode.BROADCASTING,
                         start="earliest").close()
    broker.publish([Message("t", b"x")])
    clock.advance(0)
    info = broker.group_info("b")
    assert sorted((p.owner, p.lag) for p in info.progress) == [("a", 1), ("b", 1)]
    broker.flush_offsets()
    broker.delete_group("b")
    assert inner.get_offsets("b@a") == {} and inner.get_offsets("b@b") == {}


def test_rejoining_a_group_or_getting_from_it_writes_its_row_only_when_it_changes(clock):
    meta = CountingMetadata(MemoryMetadataStore())
    broker = make_broker(clock, metadata=meta)
    broker.create_topic("t", queues=1)
    for _ in range(3):
        broker.subscribe("g", "t", RecordingSink(), client_id="c").close()
    for _ in range(3):
        broker.get("h", "t", auto_ack=True)
    assert meta.calls["put_group"] == 2  # one row each
    broker.subscribe("g", "t", RecordingSink(), client_id="c", ack="message")
    assert meta.calls["put_group"] == 3  # the mode changed
