"""Sync flush, inline when idle: with an idleness probe, an fsync that starts while no other event waits runs on the
reactor thread and releases its acknowledgements in the same turn; under load (the probe says events are ready) it
goes to the flush thread with group commit as before; an inline fsync slower than the stall limit pauses inlining;
an inline fsync error is as fatal as a thread's.

The flush thread is the fake executor of test_flush_latency.py (work runs when submitted, its result arrives when
the test says the thread finished); the fsync duration comes from a fake timer the store advances.
"""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock

from tidegate.core.flush import Durability
from tidegate.core.model import Message, QueueRef
from tidegate.core.storage.memory import MemoryMessageStore

from .test_flush_latency import FakeFsyncThread, FsyncedStore


class FakeTimer:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TimedStore(FsyncedStore):
    """fsyncs take `fsync_s` of the fake timer; `sync_log` (the log alone) is what an inline fsync must call."""

    def __init__(self, timer: FakeTimer, fsync_s: float = 0.0001) -> None:
        super().__init__()
        self.timer = timer
        self.fsync_s = fsync_s
        self.sync_log_calls = 0
        self.full_sync_calls = 0
        self.fail_with: OSError | None = None

    def sync_log(self) -> int:
        self.sync_log_calls += 1
        self.timer.now += self.fsync_s
        if self.fail_with is not None:
            raise self.fail_with
        self.proven = self.end_offset
        return self.proven

    def sync(self) -> int:
        self.full_sync_calls += 1
        return super().sync()


class Probe:
    def __init__(self, idle: bool = True) -> None:
        self.idle = idle
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.idle


def append(store: MemoryMessageStore) -> int:
    result = store.append(Message("t", b"x"), [QueueRef("t", 0)])
    return result.commit_offset + result.size


def setup(idle: bool = True, fsync_s: float = 0.0001):
    clock, timer = MemoryReactorClock(), FakeTimer()
    store = TimedStore(timer, fsync_s)
    thread = FakeFsyncThread(store)
    probe = Probe(idle)
    durability = Durability(store, clock, run_in_thread=thread, inline_when_idle=probe, inline_stall_s=0.002,
                            inline_pause_s=10.0, timer=timer)
    return clock, store, thread, probe, durability


def test_an_fsync_started_on_an_idle_reactor_runs_inline_and_acks_at_the_end_of_the_same_turn():
    clock, store, thread, probe, durability = setup(idle=True)
    acked: list[int] = []
    durable_seen: list[int] = []
    durability.on_durable(durable_seen.append)
    end = append(store)
    durability.when_durable(end, lambda: acked.append(1))
    assert acked == []  # not in the middle of the turn: the rest of the turn may still join this fsync
    clock.advance(0)
    assert acked == [1] and durable_seen == [end]
    assert thread.started == 0 and probe.calls == 1
    assert (durability.inline_syncs, durability.thread_syncs) == (1, 0)
    assert durability.metrics.fsync_latency.count == 1


def test_an_inline_fsync_syncs_the_log_only_leaving_index_and_checkpoint_writes_to_the_periodic_flush():
    clock, store, thread, probe, durability = setup(idle=True)
    durability.when_durable(append(store), lambda: None)
    clock.advance(0)
    assert store.sync_log_calls == 1 and store.full_sync_calls == 0


def test_records_appended_in_the_same_turn_share_one_inline_fsync():
    clock, store, thread, probe, durability = setup(idle=True)
    acked: list[int] = []
    for n in (1, 2, 3):
        durability.when_durable(append(store), lambda n=n: acked.append(n))
    clock.advance(0)
    assert acked == [1, 2, 3] and store.sync_log_calls == 1


def test_under_load_the_fsync_goes_to_the_flush_thread_with_group_commit():
    clock, store, thread, probe, durability = setup(idle=False)
    acked: list[int] = []
    durability.when_durable(append(store), lambda: acked.append(1))
    clock.advance(0)
    assert thread.started == 1 and acked == [] and store.sync_log_calls == 0
    for n in (2, 3):  # arrive while the thread's fsync runs: they share the next one
        durability.when_durable(append(store), lambda n=n: acked.append(n))
        clock.advance(0)
    assert thread.started == 1
    thread.finish()
    assert acked == [1]
    clock.advance(0)
    assert thread.started == 2
    thread.finish()
    assert acked == [1, 2, 3] and (durability.inline_syncs, durability.thread_syncs) == (0, 2)


def test_the_policy_follows_the_probe_from_one_fsync_to_the_next():
    clock, store, thread, probe, durability = setup(idle=False)
    durability.when_durable(append(store), lambda: None)
    clock.advance(0)
    thread.finish()
    probe.idle = True  # the load went away
    acked: list[int] = []
    durability.when_durable(append(store), lambda: acked.append(2))
    clock.advance(0)
    assert acked == [2] and thread.started == 1 and durability.inline_syncs == 1


def test_a_slow_inline_fsync_pauses_inlining_so_one_slow_disk_cannot_stall_every_connection_again():
    clock, store, thread, probe, durability = setup(idle=True, fsync_s=0.005)  # above the 2 ms stall limit
    acked: list[int] = []
    durability.when_durable(append(store), lambda: acked.append(1))
    clock.advance(0)
    assert acked == [1] and durability.inline_pauses == 1  # the slow one still acknowledged what it proved
    clock.advance(5)
    durability.when_durable(append(store), lambda: acked.append(2))
    clock.advance(0)
    assert thread.started == 1 and acked == [1]  # paused: the idle reactor hands the fsync to the thread
    thread.finish()
    assert acked == [1, 2]
    clock.advance(5)  # the pause (10 s) is over
    store.fsync_s = 0.0001
    durability.when_durable(append(store), lambda: acked.append(3))
    clock.advance(0)
    assert acked == [1, 2, 3] and thread.started == 1 and durability.inline_syncs == 2
    assert durability.inline_pauses == 1


def test_an_inline_fsync_at_the_stall_limit_does_not_pause():
    clock, store, thread, probe, durability = setup(idle=True, fsync_s=0.002)
    for _ in range(3):
        durability.when_durable(append(store), lambda: None)
        clock.advance(0)
    assert durability.inline_syncs == 3 and durability.inline_pauses == 0


def test_an_inline_fsync_error_is_fatal_no_ack_ever_no_further_fsync_and_not_ready():
    clock, store, thread, probe, durability = setup(idle=True)
    store.fail_with = OSError(5, "Input/output error")
    acked: list[str] = []
    durable_seen: list[int] = []
    durability.on_durable(durable_seen.append)
    durability.when_durable(append(store), lambda: acked.append("first"))
    clock.advance(0)
    assert acked == [] and durable_seen == [] and store.sync_log_calls == 1
    store.fail_with = None  # Linux may report success next time after dropping the pages: never ask again
    for _ in range(5):
        durability.when_durable(append(store), lambda: acked.append("later"))
        clock.advance(1)
    assert acked == [] and store.sync_log_calls == 1 and thread.started == 0
    assert durability.health() == (False, "fsync failed ([Errno 5] Input/output error); restart to recover")
    durability.close()  # shutdown does not sync past the failure either
    assert acked == [] and store.full_sync_calls == 0


def test_without_a_probe_every_fsync_goes_to_the_thread_as_before():
    clock, timer = MemoryReactorClock(), FakeTimer()
    store = TimedStore(timer)
    thread = FakeFsyncThread(store)
    durability = Durability(store, clock, run_in_thread=thread, timer=timer)
    durability.when_durable(append(store), lambda: None)
    clock.advance(0)
    assert thread.started == 1 and store.sync_log_calls == 0 and durability.inline_syncs == 0


def test_the_pause_doubles_while_inline_fsyncs_stay_slow_and_resets_after_a_fast_one():
    clock, timer = MemoryReactorClock(), FakeTimer()
    store = TimedStore(timer, fsync_s=0.005)
    thread = FakeFsyncThread(store)
    durability = Durability(store, clock, run_in_thread=thread, inline_when_idle=Probe(True), inline_stall_s=0.002,
                            inline_pause_s=1.0, inline_max_pause_s=4.0, timer=timer)

    def one_message() -> str:
        """Append, end the turn; 'inline' or 'thread' for where the fsync ran (a thread fsync is finished)."""
        started = thread.started
        durability.when_durable(append(store), lambda: None)
        clock.advance(0)
        if thread.started > started:
            thread.finish()
            return "thread"
        return "inline"

    assert one_message() == "inline"  # slow: 1 s pause
    clock.advance(0.9)
    assert one_message() == "thread"
    clock.advance(0.1)
    assert one_message() == "inline"  # slow again: 2 s
    clock.advance(1.9)
    assert one_message() == "thread"
    clock.advance(0.1)
    assert one_message() == "inline"  # slow again: 4 s, the maximum
    clock.advance(4)
    assert one_message() == "inline"  # slow again: still 4 s
    clock.advance(3.9)
    assert one_message() == "thread"
    clock.advance(0.1)
    store.fsync_s = 0.0001
    assert one_message() == "inline"  # fast: the next slow one pauses for 1 s again
    store.fsync_s = 0.005
    assert one_message() == "inline"
    clock.advance(1)
    assert one_message() == "inline"
    assert durability.inline_pauses == 6  # every slow inline fsync paused, the last one for 2 s


def test_a_failing_durability_listener_does_not_withhold_the_acknowledgements(caplog):
    """Listeners (visibility, deliveries) run before the acknowledgements: one that raises is logged, and the
    records it was told about are acknowledged all the same."""
    clock, store, thread, probe, durability = setup(idle=True)
    acked: list[int] = []

    def broken_listener(durable: int) -> None:
        raise RuntimeError("listener bug")

    durability.on_durable(broken_listener)
    durability.when_durable(append(store), lambda: acked.append(1))
    clock.advance(0)
    assert acked == [1]
    assert "a durability listener failed" in caplog.text
