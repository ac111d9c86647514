"""The listener's shared idle timer: exact deadlines per connection behind one reactor timer."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock

from tidegate.adapters.idle_timers import COMPACT_AFTER, IdleTimers


class Watched:
    """A connection as the timers see it: the armed entry and the check, which records when it ran."""

    def __init__(self, clock: MemoryReactorClock, rearm: IdleTimers | None = None, again: float = 0.0) -> None:
        self._idle_timer = None
        self.clock = clock
        self.checked: list[float] = []
        self.rearm, self.again = rearm, again

    def _check_idle(self) -> None:
        self.checked.append(self.clock.seconds())
        if self.rearm is not None and self.again:
            self.rearm.arm(self, self.again)
            self.again = 0.0


def setup(start: float = 1_700_000_000.0) -> tuple[MemoryReactorClock, IdleTimers]:
    clock = MemoryReactorClock()
    clock.advance(start)
    return clock, IdleTimers(clock)


def test_each_deadline_fires_at_its_own_time_behind_a_single_reactor_timer():
    clock, timers = setup()
    start = clock.seconds()
    connections = [Watched(clock) for _ in range(3)]
    for connection, seconds in zip(connections, (15.0, 5.0, 10.0), strict=True):
        timers.arm(connection, seconds)
    assert len(clock.getDelayedCalls()) == 1 and len(timers) == 3
    clock.advance(5.0)
    assert [c.checked for c in connections] == [[], [start + 5.0], []]
    clock.advance(4.999)
    assert connections[2].checked == []
    clock.advance(0.001)
    assert connections[2].checked == [start + 10.0]
    clock.advance(5.0)
    assert connections[0].checked == [start + 15.0]
    assert not clock.getDelayedCalls() and len(timers) == 0


def test_a_cancelled_or_rearmed_deadline_does_not_fire():
    clock, timers = setup()
    cancelled, rearmed = Watched(clock), Watched(clock)
    timers.arm(cancelled, 5.0)
    timers.arm(rearmed, 5.0)
    timers.cancel(cancelled)
    clock.advance(3.0)
    timers.arm(rearmed, 5.0)  # moves its deadline to t=8
    clock.advance(2.0)
    assert cancelled.checked == [] and rearmed.checked == []
    clock.advance(3.0)
    assert rearmed.checked == [clock.seconds()] and cancelled.checked == []


def test_a_check_may_rearm_its_connection_from_inside_the_timer():
    clock, timers = setup()
    connection = Watched(clock)
    connection.rearm, connection.again = timers, 4.0
    timers.arm(connection, 6.0)
    clock.advance(6.0)
    clock.advance(4.0)
    assert len(connection.checked) == 2 and connection.checked[1] - connection.checked[0] == 4.0
    assert not clock.getDelayedCalls()


def test_an_earlier_deadline_moves_the_reactor_timer_forward():
    clock, timers = setup()
    late, early = Watched(clock), Watched(clock)
    timers.arm(late, 100.0)
    timers.arm(early, 1.0)
    clock.advance(1.0)
    assert early.checked and not late.checked
    assert len(clock.getDelayedCalls()) == 1


def test_when_nothing_live_is_left_no_reactor_timer_remains_and_stale_entries_are_compacted():
    clock, timers = setup()
    connections = [Watched(clock) for _ in range(COMPACT_AFTER * 4)]
    for connection in connections:
        timers.arm(connection, 30.0)
    for connection in connections[: COMPACT_AFTER * 3]:
        timers.cancel(connection)
    assert len(timers) == COMPACT_AFTER and len(timers._heap) < COMPACT_AFTER * 3  # rebuilt along the way
    for connection in connections[COMPACT_AFTER * 3:]:
        timers.cancel(connection)
    assert not clock.getDelayedCalls() and not timers._heap


def test_stop_forgets_every_deadline():
    clock, timers = setup()
    connection = Watched(clock)
    timers.arm(connection, 5.0)
    timers.stop()
    clock.advance(10.0)
    assert connection.checked == [] and connection._idle_timer is None and not clock.getDelayedCalls()
