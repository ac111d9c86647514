"""What a bench driver is and what it gets: the `Driver` base class, the run's `BenchOptions`, the `WorkerContext` a
producer or consumer runs in, and the `RateLimiter` that paces producers.

A driver supplies the protocol part of a run: how to prepare the topic, how a producer sends and how a consumer
receives. The engine (`engine.py`) starts workers, each of which instantiates the driver class it was given and
calls `run_producer` or `run_consumer`; nothing here knows a protocol.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

# Shared counters: one row per worker, written by the worker's ticker thread, read by the reporter.
FIELD_SENT, FIELD_ACKED, FIELD_FAILED, FIELD_RECEIVED, FIELD_READY = range(5)
FIELDS_PER_WORKER = 5
TICK_S = 0.1

SEND_DRAIN_TIMEOUT_S = 30.0  # after the run, how long a producer waits for answers to requests in flight
# A limiter that fell behind (GC pause, slow broker) may catch up this much, not more, so it never bursts for long.
MAX_CATCH_UP_S = 0.1
# Sleeping is only worth it when ahead by more than this: sleep granularity on Linux is ~50-100 µs.
PACING_SLACK_S = 0.002


class BenchError(Exception):
    """The benchmark could not run (broker unreachable, a worker failed to start)."""


class RateLimiter:
    """Paces a loop to `rate` units per second (0 = unlimited) in small bursts."""

    def __init__(self, rate: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.clock = clock
        self.sleep = sleep
        self.next_at: float | None = None

    def acquire(self, units: int = 1) -> None:
        if not self.interval:
            return
        now = self.clock()
        if self.next_at is None or now - self.next_at > MAX_CATCH_UP_S:
            self.next_at = now
        ahead = self.next_at - now
        if ahead > PACING_SLACK_S:
            self.sleep(ahead)
        self.next_at += units * self.interval

    def answer_wait(self, *, room_left: bool, paced: bool, producing: bool, window_full: bool, poll_s: float,
                    now: float) -> float:
        """How long a sender's `select` may wait for answers: not at all while it has room to send, until the next
        slot when paced (a full window waits for an answer instead), else one poll interval."""
        if room_left:
            return 0.0
        if paced and producing:
            wait = self.until_next_slot(now)
            return min(poll_s, wait) if wait > 0.0 or not window_full else poll_s
        return poll_s

    def until_next_slot(self, now: float) -> float:
        """Seconds until the next unit is due (0 when due or not started): a paced sender waits this long in
        `select` for answers instead of sleeping in `acquire`, so answers are read (and timed) when they arrive."""
        return 0.0 if self.next_at is None else max(0.0, self.next_at - now)


@dataclass(slots=True)
class BenchOptions:
    protocol: str
    server: str
    producers: int = 1
    consumers: int = 1
    size: int = 256
    rate: float = 0.0  # messages per second in total; 0 = as fast as possible
    duration: float = 10.0
    batch: int = 1
    topic: str = ""
    queues: int = 8
    inflight: int = 512  # messages a producer may have unacknowledged
    drain_timeout: float = 10.0
    backlog: bool = False  # produce first, then start consumers from the earliest offset: measures drain rate
    workers: str = "process"
    group: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class WorkerShared:
    """Everything a worker needs from the parent; picklable for multiprocessing."""

    counters: Any  # multiprocessing Array of int64, FIELDS_PER_WORKER per worker
    go: Any  # Event: producers start sending
    stop: Any  # Event: consumers finish and report
    start_at: Any  # Value('d'): wall-clock time the run starts (set before `go`)
    results: Any  # Queue of (role, index, result dict)


class WorkerContext:
    def __init__(self, options: BenchOptions, shared: WorkerShared, role: str, index: int, slot: int) -> None:
        self.options = options
        self.shared = shared
        self.role = role
        self.index = index
        self.slot = slot

    def publish(self, **values: int) -> None:
        base = self.slot * FIELDS_PER_WORKER
        names = {"sent": FIELD_SENT, "acked": FIELD_ACKED, "failed": FIELD_FAILED, "received": FIELD_RECEIVED,
                 "ready": FIELD_READY}
        for name, value in values.items():
            self.shared.counters[base + names[name]] = value

    @contextmanager
    def ticker(self, read: Callable[[], dict[str, int]]) -> Iterator[None]:
        """Copy the worker's counters to shared memory every TICK_S (a thread, so the hot loop never does it)."""
        done = threading.Event()

        def tick() -> None:
            while not done.wait(TICK_S):
                self.publish(**read())

        thread = threading.Thread(target=tick, name="bench-ticker", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self.publish(**read())

    def run_deadline(self) -> float:
        """Monotonic time at which producing stops (the parent set the common wall-clock start before `go`)."""
        remaining = self.shared.start_at.value + self.options.duration - time.time()
        return time.monotonic() + remaining


class Driver:
    """The protocol part of a benchmark. Each worker process or thread instantiates the driver class the engine
    was given (a class pickles by its module and name, so a spawned worker imports the driver's own module)."""

    name = ""

    def prepare(self, options: BenchOptions) -> None:
        """Runs in the parent before workers start: create the topic, check the broker answers."""

    def run_producer(self, ctx: WorkerContext) -> dict[str, Any]:
        raise NotImplementedError

    def run_consumer(self, ctx: WorkerContext) -> dict[str, Any]:
        raise NotImplementedError

    def copies(self, options: BenchOptions) -> int:
        """How many consumers receive each message: 1 when they share the load (a consumer group, an MQTT shared
        subscription), the number of consumers when each gets everything (MQTT fan-out)."""
        return 1
