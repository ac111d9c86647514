"""The reactor-lag probe measures how late it fires and warns once when a turn is too long."""

import logging

from twisted.internet.testing import MemoryReactorClock

from tidegate.gateway.reactor_lag import ReactorLagProbe


def test_a_stalled_turn_is_measured_and_logged_once(caplog):
    clock = MemoryReactorClock()
    probe = ReactorLagProbe(clock, interval_s=0.25, warn_s=0.1)
    probe.start()
    clock.advance(0.25)  # on time
    assert probe.histogram.count == 1 and probe.worst_s == 0.0
    with caplog.at_level(logging.WARNING, logger="tidegate.reactor"):
        clock.advance(2.25)  # the reactor did something else for 2 s past the due time
        clock.advance(0.25)
    assert probe.histogram.count == 3
    assert 1.99 <= probe.worst_s <= 2.01
    assert [r.getMessage()[:30] for r in caplog.records] == ["the reactor was busy for 2.000"]
    probe.stop()
    assert not clock.getDelayedCalls()
