"""Resource alarms (core/alarms.py): the protocol-free hub adapters subscribe to, and the monitor's checks."""

from __future__ import annotations

from twisted.internet.task import Clock

from tidegate.core.alarms import ResourceAlarms, ResourceMonitor, disk_check, memory_check


def test_listeners_hear_raise_and_clear_once_each_and_can_unsubscribe():
    alarms = ResourceAlarms()
    heard: list[tuple[bool, str]] = []
    unsubscribe = alarms.subscribe(lambda alarmed, reason: heard.append((alarmed, reason)))
    alarms.set("memory", True, "rss high")
    alarms.set("memory", True, "rss high")  # unchanged: not repeated
    alarms.set("storage", False)  # was not raised: nothing to say
    assert heard == [(True, "memory: rss high")]
    assert alarms.alarmed and alarms.active == {"memory": "rss high"}
    alarms.set("memory", False)
    assert heard[-1] == (False, "") and not alarms.alarmed
    unsubscribe()
    alarms.set("memory", True, "again")
    assert len(heard) == 2


def test_a_failing_listener_does_not_keep_others_from_hearing():
    alarms = ResourceAlarms()
    heard: list[bool] = []

    def broken(alarmed: bool, reason: str) -> None:
        raise RuntimeError("boom")

    alarms.subscribe(broken)
    alarms.subscribe(lambda alarmed, reason: heard.append(alarmed))
    alarms.set("storage", True, "disk full")
    assert heard == [True]


def test_memory_check_compares_resident_memory_with_the_watermark_and_zero_is_off():
    rss = [100]
    check = memory_check(150, rss=lambda: rss[0])
    assert check() == (True, "")
    rss[0] = 150
    ok, why = check()
    assert not ok and "150" in why
    assert memory_check(0, rss=lambda: 10**12)() == (True, "")


def test_disk_check_alarms_below_the_free_limit(tmp_path):
    free = [10_000]
    check = disk_check(tmp_path, 5_000, free=lambda path: free[0])
    assert check()[0]
    free[0] = 4_999
    assert not check()[0]
    assert disk_check(tmp_path, 0)() == (True, "")
    assert not disk_check(tmp_path, 10**18)()[0]  # the real file system has less than an exabyte free


def test_monitor_polls_its_checks_on_the_clock_and_raises_and_clears_alarms():
    clock = Clock()
    alarms = ResourceAlarms()
    healthy = [True]
    monitor = ResourceMonitor(alarms, clock, {"storage": [lambda: (healthy[0], "" if healthy[0] else "fsync failed")],
                                              "memory": [lambda: (True, "")]}, interval_s=2.0)
    monitor.start()
    assert not alarms.alarmed
    healthy[0] = False
    clock.advance(2.0)
    assert alarms.active == {"storage": "fsync failed"}
    healthy[0] = True
    clock.advance(2.0)
    assert not alarms.alarmed
    monitor.stop()
    assert not clock.getDelayedCalls()


def test_a_check_that_raises_is_logged_not_an_alarm():
    clock = Clock()
    alarms = ResourceAlarms()

    def probe() -> tuple[bool, str]:
        raise OSError("no /proc")

    ResourceMonitor(alarms, clock, {"memory": [probe]}).start()
    assert not alarms.alarmed
