"""Run `tidegate` with the reactor's parts timed: where the broker's CPU goes per reactor iteration.

Wraps, for the broker's main thread, the blocking poll (`epoll_wait` alone), the reads (`Connection.doRead`), the
timed calls (`runUntilCurrent`), the fsync's start and completion (`Durability._start_flush`), the delivery pumps
(`Delivery._run_wakes`) and the inline log fsync, and counts calls, thread CPU time and wall time of each. The
table is written to the file named by `TIDEGATE_PARTS` when the broker stops (SIGTERM). Each wrapper costs about a
microsecond: use the counts (iterations, pumps, reads per message) and the split, not the absolute CPU.

    TIDEGATE_PARTS=/tmp/parts.txt python interop/reactor_parts.py serve --data-dir D [--set k=v ...]

docs/performance.md, "Latency at low rate", "Reactor iterations per message" used it at 1,000 msg/s.
"""

from __future__ import annotations

import atexit
import os
import runpy
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import reactor, tcp  # noqa: E402 - after the reactor is installed

import tidegate.core.delivery as delivery_module  # noqa: E402
import tidegate.core.flush as flush_module  # noqa: E402
import tidegate.core.storage.filestore as filestore_module  # noqa: E402

# label -> [calls, thread CPU seconds, wall seconds]
PARTS: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])


def timed(owner: Any, name: str, label: str) -> None:
    """Replace `owner.name` with a wrapper that adds each call's CPU and wall time to PARTS[label]."""
    original: Callable[..., Any] = getattr(owner, name)
    thread_time, perf_counter = time.thread_time, time.perf_counter

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        cpu, wall = thread_time(), perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            part = PARTS[label]
            part[0] += 1
            part[1] += thread_time() - cpu
            part[2] += perf_counter() - wall

    setattr(owner, name, wrapper)


class TimedPoller:
    """The reactor's epoll object, its polls timed (the inline-fsync idleness probe asks the real epoll object
    directly, so the zero-timeout row counts only the reactor's own `poll(0)` after a zero-delay call)."""

    def __init__(self, poller: Any) -> None:
        self._poller = poller

    def __getattr__(self, name: str) -> Any:
        return getattr(self._poller, name)

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list[tuple[int, int]]:
        cpu, wall = time.thread_time(), time.perf_counter()
        events = self._poller.poll(timeout, maxevents)
        part = PARTS["epoll_wait (blocking polls)" if timeout != 0 else "epoll_wait (timeout 0)"]
        part[0] += 1
        part[1] += time.thread_time() - cpu
        part[2] += time.perf_counter() - wall  # mostly idle time
        return events


def main() -> None:
    real_poller = reactor._poller
    reactor._poller = TimedPoller(real_poller)
    import tidegate.gateway.app as app_module
    import tidegate.gateway.reactor_lag as lag_module

    real_probe = lag_module.reactor_idle_probe

    def idle_probe_on_the_real_poller(_reactor: Any) -> Callable[[], bool] | None:
        return real_probe(type("R", (), {"_poller": real_poller})())  # the probe insists on a real epoll object

    app_module.reactor_idle_probe = idle_probe_on_the_real_poller
    timed(tcp.Connection, "doRead", "reads (doRead)")
    timed(flush_module.Durability, "_start_flush", "fsync start and completion (_start_flush)")
    timed(filestore_module.FileMessageStore, "sync_log", "  of which the inline log fsync")
    timed(delivery_module.Delivery, "_run_wakes", "pumps (_run_wakes)")
    timed(reactor, "runUntilCurrent", "timed calls (runUntilCurrent)")
    timed(reactor, "doIteration", "reactor iterations (doIteration: poll + reads)")
    start = time.thread_time()

    def write_table() -> None:
        with open(os.environ["TIDEGATE_PARTS"], "w") as out:
            out.write(f"main thread CPU since start-up {time.thread_time() - start:.3f} s\n")
            for label, (calls, cpu, wall) in sorted(PARTS.items(), key=lambda item: -item[1][1]):
                out.write(f"{label:48s} calls {int(calls):8d}  cpu {cpu:7.3f} s  wall {wall:7.3f} s\n")

    atexit.register(write_table)
    sys.argv = ["tidegate", *sys.argv[1:]]
    runpy.run_module("tidegate.gateway", run_name="__main__")


if __name__ == "__main__":
    main()
