"""Durability: a failed fsync is fatal to the promise; nothing it covered is ever acknowledged, not even later."""

from twisted.internet.testing import MemoryReactorClock

from tidegate.core.flush import Durability
from tidegate.core.model import Message, QueueRef
from tidegate.core.storage.memory import MemoryMessageStore


class FlakySyncStore(MemoryMessageStore):
    """fsync fails the first `failures` times, then 'succeeds' (as Linux may after dropping dirty pages)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.sync_calls = 0

    def sync(self) -> int:
        self.sync_calls += 1
        if self.failures:
            self.failures -= 1
            raise OSError(5, "Input/output error")
        return super().sync()


def append(store: MemoryMessageStore) -> int:
    result = store.append(Message("t", b"x"), [QueueRef("t", 0)])
    return result.commit_offset + result.size


def test_a_failed_fsync_is_never_retried_into_an_acknowledgement():
    clock = MemoryReactorClock()
    store = FlakySyncStore(failures=1)
    durability = Durability(store, clock, run_in_thread=None)
    acked: list[str] = []
    durability.when_durable(append(store), lambda: acked.append("first"))
    clock.advance(0)
    assert acked == [] and store.sync_calls == 1
    for _ in range(10):  # time passes, more appends ask for flushes: none may run
        durability.when_durable(append(store), lambda: acked.append("later"))
        clock.advance(1)
    assert acked == [] and store.sync_calls == 1
    assert durability.health() == (False, "fsync failed ([Errno 5] Input/output error); restart to recover")
    durability.close()  # shutdown does not sync its way past the failure either
    assert acked == [] and store.sync_calls == 1


def test_a_failed_periodic_fsync_stops_the_async_flusher_and_reports_it():
    clock = MemoryReactorClock()
    store = FlakySyncStore(failures=1)
    durability = Durability(store, clock, run_in_thread=None, mode="async", interval_ms=100)
    append(store)
    clock.advance(0.1)
    clock.advance(1)
    assert store.sync_calls == 1
    assert not durability.health()[0]


def test_a_healthy_durability_reports_ready():
    durability = Durability(MemoryMessageStore(), MemoryReactorClock(), run_in_thread=None)
    assert durability.health() == (True, "")
