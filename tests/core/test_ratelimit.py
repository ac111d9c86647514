"""Client-caused log lines: one per cause per interval with a count, clipped arguments, bounded causes."""

import logging

from tidegate.core.ratelimit import ClientLog, clip


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def test_first_line_of_a_cause_is_written_then_one_per_interval_with_the_count(caplog):
    clock = Clock()
    client_log = ClientLog(logging.getLogger("t.rl"), clock, interval_s=10)
    with caplog.at_level(logging.INFO, logger="t.rl"):
        assert client_log.warn("drop", "dropped publish to %s", "a")
        for _ in range(500):
            assert not client_log.warn("drop", "dropped publish to %s", "a")
        assert client_log.warn("other", "a different cause is not held back")
        clock.now = 10.0
        assert client_log.warn("drop", "dropped publish to %s", "b")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["dropped publish to a", "a different cause is not held back",
                     "dropped publish to b (500 similar lines suppressed in the last 10s)"]


def test_unbounded_client_data_is_clipped_in_the_line(caplog):
    client_log = ClientLog(logging.getLogger("t.rl2"), Clock())
    with caplog.at_level(logging.INFO, logger="t.rl2"):
        client_log.warn("topic", "bad topic %s", "x" * 60_000)
    assert len(caplog.records[0].getMessage()) < 300
    assert clip("y" * 10, 4) == "yyyy...(6 more chars)"


def test_the_set_of_causes_is_bounded():
    client_log = ClientLog(logging.getLogger("t.rl3"), Clock(), max_causes=3)
    for i in range(100):
        client_log.warn(f"cause-{i}", "x")
    assert len(client_log._causes) == 3
