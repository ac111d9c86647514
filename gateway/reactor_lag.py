"""Reactor lag: how late a periodic probe fires, so a stalled event loop shows up in /metrics and in the log.

Every connection shares one reactor thread: a turn that takes 2 s (a blocking file rewrite, a quadratic listing)
delays every client's packets by 2 s. The probe asks to run every `interval_s`; the difference between when it
ran and when it was due is the time the reactor was busy elsewhere. It feeds a histogram
(`tidegate_reactor_lag_seconds`) and writes one warning line when a turn exceeds `warn_s` (rate-limited).
"""

from __future__ import annotations

import logging
import select
from collections.abc import Callable
from typing import Any

from tidegate.core.metrics import LatencyHistogram
from tidegate.core.ratelimit import ClientLog

log = logging.getLogger("tidegate.reactor")

LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ReactorLagProbe:
    def __init__(self, clock: Any, *, interval_s: float = 0.25, warn_s: float = 0.1) -> None:
        self.clock = clock
        self.interval_s = interval_s
        self.warn_s = warn_s
        self.histogram = LatencyHistogram(buckets=LAG_BUCKETS, counts=[0] * (len(LAG_BUCKETS) + 1))
        self.worst_s = 0.0
        self._due = 0.0
        self._call: Any = None
        self._log = ClientLog(log, clock.seconds, interval_s=60.0)

    def start(self) -> None:
        self._schedule()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self) -> None:
        self._due = self.clock.seconds() + self.interval_s
        self._call = self.clock.callLater(self.interval_s, self._fire)

    def _fire(self) -> None:
        lag = max(0.0, self.clock.seconds() - self._due)
        self.histogram.observe(lag)
        self.worst_s = max(self.worst_s, lag)
        if lag >= self.warn_s:
            self._log.warn("reactor-lag", "the reactor was busy for %.3fs: every connection waited that long "
                           "(see tidegate_reactor_lag_seconds)", lag)
        self._schedule()


def reactor_idle_probe(reactor: Any) -> Callable[[], bool] | None:
    """A probe that is true when no I/O event waits for the reactor, or None when the reactor cannot be asked.

    On Twisted's epoll reactor: a non-blocking `epoll_wait` (timeout 0, at most one event) on the reactor's own
    epoll set. Its registrations are level-triggered, so looking does not consume an event: the reactor's next poll
    still sees it. A thread's pending `callFromThread` shows up too (the waker is in the set), and so does a
    transport with bytes waiting to be written. About one system call, cheaper than the thread hand-off it saves
    (core/flush.py, inline fsync when idle).
    """
    poller = getattr(reactor, "_poller", None)
    if not isinstance(poller, getattr(select, "epoll", ())):
        return None
    poll = poller.poll

    def idle() -> bool:
        try:
            return not poll(0, 1)
        except (OSError, ValueError):  # closed at shutdown (ValueError): not idle, the thread path is always safe
            return False

    return idle
