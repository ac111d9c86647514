"""Index holes (records lost in a crash recovery) are skipped by pull, push delivery and get, never re-read forever."""

import pytest
from twisted.internet.testing import MemoryReactorClock

from tidegate.core.api import AckMode
from tidegate.core.model import Message, QueueRef
from tidegate.core.storage.memory import MemoryMessageStore
from tidegate.core.testing import RecordingSink, make_broker

Q = QueueRef("t", 0)


class HoleyStore(MemoryMessageStore):
    """read_index leaves out the `lost` offsets, as the file store does for holes after recovery."""

    def __init__(self, clock_ms) -> None:
        super().__init__(clock_ms=clock_ms)
        self.lost: set[int] = set()

    def read_index(self, queue, offset, max_entries):
        return [e for e in super().read_index(queue, offset, max_entries) if e.queue_offset not in self.lost]


@pytest.fixture
def env():
    clock = MemoryReactorClock()
    clock.advance(1_700_000_000)
    store = HoleyStore(lambda: int(clock.seconds() * 1000))
    broker = make_broker(clock, store=store)
    broker.create_topic("t", queues=1)
    yield broker, store, clock
    broker.close()


def fill(broker, clock, count):
    broker.publish([Message("t", b"m%03d" % i) for i in range(count)], queue_id=0)
    clock.advance(0)


def test_pull_at_a_hole_returns_the_next_message_instead_of_failing_forever(env):
    broker, store, clock = env
    fill(broker, clock, 5)
    store.lost |= {1, 2}
    result = broker.pull(Q, 1)
    assert [d.queue_offset for d in result.messages] == [3, 4]
    assert result.next_offset == 5


def test_a_window_made_only_of_holes_is_stepped_over(env):
    broker, store, clock = env
    fill(broker, clock, 200)
    store.lost |= set(range(0, 150))
    result = broker.pull(Q, 0, max_count=10)
    assert [d.queue_offset for d in result.messages] == list(range(150, 160))


def test_message_mode_consumers_skip_holes_and_their_commit_passes_them(env):
    broker, store, clock = env
    store.lost |= {0, 1, 130}
    sink = RecordingSink()
    sub = broker.subscribe("g", "t", sink, client_id="c", ack=AckMode.MESSAGE, start="earliest")
    fill(broker, clock, 200)
    sub.grant(1000)
    clock.advance(0)
    got = [d.queue_offset for d in sink.delivered]
    assert got == [o for o in range(200) if o not in store.lost]
    for d in sink.delivered:
        sub.ack(d.receipt)
    broker.flush_offsets()
    assert broker.committed_offsets("g")[Q] == 200


def test_offset_mode_consumers_skip_holes_once(env):
    broker, store, clock = env
    store.lost |= set(range(10, 80))
    sink = RecordingSink()
    sub = broker.subscribe("g2", "t", sink, client_id="c", start="earliest")
    fill(broker, clock, 100)
    sub.grant(1000)
    clock.advance(0)
    got = [d.queue_offset for d in sink.delivered]
    assert got == [o for o in range(100) if o not in store.lost]


def test_get_skips_holes(env):
    broker, store, clock = env
    broker.get("g3", "t", auto_ack=True)  # joins at the end
    fill(broker, clock, 3)
    store.lost |= {0, 1}
    assert broker.get("g3", "t", auto_ack=True).queue_offset == 2
    assert broker.get("g3", "t", auto_ack=True) is None
