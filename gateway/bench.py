"""`tidegate bench`: an end-to-end load generator that measures throughput, latency, loss and duplication.

The engine here is protocol-free: a rate limiter, a latency histogram, a loss/duplicate checker over per-producer
sequence bitmaps, worker orchestration (processes by default: on a 2-core machine one Python process cannot both
produce and consume at full speed under the GIL) and a reporter. A *driver* supplies the protocol part: how to
prepare the topic, how a producer sends and how a consumer receives. `bench native` uses the SDK; `bench mqtt` and
`bench amqp` are meant to be further drivers registered in `DRIVERS` with the same engine.

Every message body starts with a fixed header (magic, producer index, sequence number, send time in ns since the
epoch), padded to --size. Consumers compute end-to-end latency from it (producer and consumers share the machine's
clock; against a remote --server the clocks must be synchronised) and mark the sequence in a bitmap per producer.
At the end the bitmaps are merged: a sequence acknowledged but never seen is lost, one seen twice is duplicated.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import queue
import shutil
import struct
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tidegate.gateway.testing import BrokerProcess

EXIT_OK = 0
EXIT_FAILURE = 1

PAYLOAD_HEADER = struct.Struct("<4sIQQ")  # magic, producer index, sequence, send time (ns since the epoch)
PAYLOAD_MAGIC = b"TGB1"
MIN_SIZE = PAYLOAD_HEADER.size

# Shared counters: one row per worker, written by the worker's ticker thread, read by the reporter.
FIELD_SENT, FIELD_ACKED, FIELD_FAILED, FIELD_RECEIVED, FIELD_READY = range(5)
FIELDS_PER_WORKER = 5
TICK_S = 0.1
REPORT_EVERY_S = 1.0

READY_TIMEOUT_S = 60.0  # workers start (spawned interpreters import Twisted) and consumers get their queues
SEND_DRAIN_TIMEOUT_S = 30.0  # after the run, how long a producer waits for answers to requests in flight
RESULT_TIMEOUT_S = 60.0
RESULT_GRACE_S = 5.0
BROKER_STOP_TIMEOUT_S = 60.0
# A limiter that fell behind (GC pause, slow broker) may catch up this much, not more, so it never bursts for long.
MAX_CATCH_UP_S = 0.1
# Sleeping is only worth it when ahead by more than this: sleep granularity on Linux is ~50-100 µs.
PACING_SLACK_S = 0.002


# ============================================================================================ engine: pieces
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


class LatencyHistogram:
    """Log-linear histogram of microsecond values: exact below 128 µs, then 64 buckets per power of two
    (relative error under 1.6%). Sparse, so it pickles small and merges by adding counts."""

    SUB_BUCKETS = 64
    LINEAR_LIMIT = 2 * SUB_BUCKETS

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.max_us = 0

    @classmethod
    def bucket_of(cls, micros: int) -> int:
        if micros < cls.LINEAR_LIMIT:
            return max(0, micros)
        shift = micros.bit_length() - 7
        return cls.LINEAR_LIMIT + (shift - 1) * cls.SUB_BUCKETS + ((micros >> shift) - cls.SUB_BUCKETS)

    @classmethod
    def upper_bound(cls, bucket: int) -> int:
        if bucket < cls.LINEAR_LIMIT:
            return bucket
        shift, rest = divmod(bucket - cls.LINEAR_LIMIT, cls.SUB_BUCKETS)
        shift += 1
        return ((rest + cls.SUB_BUCKETS + 1) << shift) - 1

    def record(self, micros: int) -> None:
        bucket = self.bucket_of(micros)
        self.counts[bucket] = self.counts.get(bucket, 0) + 1
        self.count += 1
        if micros > self.max_us:
            self.max_us = micros

    def merge(self, other: LatencyHistogram) -> None:
        for bucket, n in other.counts.items():
            self.counts[bucket] = self.counts.get(bucket, 0) + n
        self.count += other.count
        self.max_us = max(self.max_us, other.max_us)

    def percentile(self, fraction: float) -> int:
        """The smallest bucket bound at or below which `fraction` of the values lie (never above the max)."""
        if not self.count:
            return 0
        wanted = max(1, int(fraction * self.count + 0.999999))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= wanted:
                return min(self.upper_bound(bucket), self.max_us)
        return self.max_us

    def summary_ms(self) -> dict[str, float | int]:
        return {"count": self.count, "p50": self.percentile(0.50) / 1000, "p99": self.percentile(0.99) / 1000,
                "p999": self.percentile(0.999) / 1000, "max": self.max_us / 1000}

    def to_state(self) -> dict[str, Any]:
        return {"counts": self.counts, "count": self.count, "max_us": self.max_us}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> LatencyHistogram:
        histogram = cls()
        histogram.counts = dict(state["counts"])
        histogram.count = state["count"]
        histogram.max_us = state["max_us"]
        return histogram


class SequenceBitmap:
    """One bit per sequence number, growing as needed. Serialised as bytes; bit `seq` of the little-endian integer
    is sequence `seq`, so merging is integer `|`, `&` and `bit_count`."""

    __slots__ = ("bits",)

    def __init__(self, data: bytes = b"") -> None:
        self.bits = bytearray(data)

    def add(self, seq: int) -> bool:
        """Mark `seq`; False if it was already marked (a duplicate)."""
        index = seq >> 3
        bits = self.bits
        if index >= len(bits):
            bits.extend(bytes(max(index + 1 - len(bits), len(bits))))
        mask = 1 << (seq & 7)
        if bits[index] & mask:
            return False
        bits[index] |= mask
        return True

    def as_int(self) -> int:
        return int.from_bytes(self.bits, "little")


@dataclass(slots=True)
class DeliveryCheck:
    """Loss and duplication over every producer's acknowledged set and every consumer's seen set."""

    acked: int = 0
    unique: int = 0
    lost: int = 0
    duplicated: int = 0
    received_unacked: int = 0  # seen but never acknowledged to the producer (a send that timed out yet was stored)


def check_delivery(acked: dict[int, bytes], seen_by_consumer: list[dict[int, bytes]],
                   local_duplicates: int) -> DeliveryCheck:
    result = DeliveryCheck(duplicated=local_duplicates)
    producers = set(acked) | {p for seen in seen_by_consumer for p in seen}
    for producer in producers:
        acked_set = int.from_bytes(acked.get(producer, b""), "little")
        union = 0
        for seen in seen_by_consumer:
            bits = int.from_bytes(seen.get(producer, b""), "little")
            result.duplicated += (union & bits).bit_count()  # the same message at two consumers
            union |= bits
        result.acked += acked_set.bit_count()
        result.unique += union.bit_count()
        result.lost += (acked_set & ~union).bit_count()
        result.received_unacked += (union & ~acked_set).bit_count()
    return result


def check_fan_out(acked: dict[int, bytes], seen_by_consumer: list[dict[int, bytes]],
                  local_duplicates: int) -> DeliveryCheck:
    """Like `check_delivery`, for consumers that each must see every message (MQTT non-shared subscribers):
    counts are deliveries, so a message one of three subscribers missed is one lost delivery."""
    result = DeliveryCheck(duplicated=local_duplicates)
    producers = set(acked) | {p for seen in seen_by_consumer for p in seen}
    for producer in producers:
        acked_set = int.from_bytes(acked.get(producer, b""), "little")
        result.acked += acked_set.bit_count() * len(seen_by_consumer)
        for seen in seen_by_consumer:
            bits = int.from_bytes(seen.get(producer, b""), "little")
            result.unique += bits.bit_count()
            result.lost += (acked_set & ~bits).bit_count()
            result.received_unacked += (bits & ~acked_set).bit_count()
    return result


def encode_payload(producer: int, seq: int, padding: bytes) -> bytes:
    return PAYLOAD_HEADER.pack(PAYLOAD_MAGIC, producer, seq, time.time_ns()) + padding


class ConsumerTally:
    """What one consumer worker saw: latency, per-producer sequence bitmaps, duplicates, foreign messages."""

    def __init__(self) -> None:
        self.latency = LatencyHistogram()
        self.seen: dict[int, SequenceBitmap] = {}
        self.received = 0
        self.duplicates = 0
        self.foreign = 0  # messages on the topic that no bench producer of this run wrote
        self.first_ns = 0
        self.last_ns = 0

    def record(self, body: bytes) -> None:
        now = time.time_ns()
        if len(body) < MIN_SIZE or body[:4] != PAYLOAD_MAGIC:
            self.foreign += 1
            return
        _, producer, seq, sent_ns = PAYLOAD_HEADER.unpack_from(body)
        self.received += 1
        if not self.first_ns:
            self.first_ns = now
        self.last_ns = now
        self.latency.record(max(0, now - sent_ns) // 1000)
        bitmap = self.seen.get(producer)
        if bitmap is None:
            bitmap = self.seen[producer] = SequenceBitmap()
        if not bitmap.add(seq):
            self.duplicates += 1

    def result(self) -> dict[str, Any]:
        return {"received": self.received, "duplicates": self.duplicates, "foreign": self.foreign,
                "first_ns": self.first_ns, "last_ns": self.last_ns, "latency": self.latency.to_state(),
                "seen": {p: bytes(b.bits) for p, b in self.seen.items()}}


class ProducerTally:
    """What one producer worker did: sent, acknowledged (bitmap), failed, ack latency."""

    def __init__(self) -> None:
        self.sent = 0
        self.acked = 0
        self.failed = 0
        self.acked_seqs = SequenceBitmap()
        self.ack_latency = LatencyHistogram()
        self.first_error = ""
        self.first_ns = 0
        self.last_ack_ns = 0

    def on_acked(self, seq: int, count: int, sent_perf_ns: int) -> None:
        now = time.perf_counter_ns()
        for s in range(seq, seq + count):
            self.acked_seqs.add(s)
        self.acked += count
        self.ack_latency.record((now - sent_perf_ns) // 1000)
        self.last_ack_ns = time.time_ns()

    def on_failed(self, count: int, error: BaseException) -> None:
        self.failed += count
        if not self.first_error:
            self.first_error = f"{type(error).__name__}: {error}"

    def result(self) -> dict[str, Any]:
        return {"sent": self.sent, "acked": self.acked, "failed": self.failed, "first_error": self.first_error,
                "first_ns": self.first_ns, "last_ack_ns": self.last_ack_ns,
                "ack_latency": self.ack_latency.to_state(), "acked_seqs": bytes(self.acked_seqs.bits)}


# ======================================================================================== engine: options
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
    """The protocol part of a benchmark. Workers instantiate their driver from DRIVERS by name."""

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


# ================================================================================================ native
class NativeDriver(Driver):
    name = "native"

    def prepare(self, options: BenchOptions) -> None:
        from tidegate.client import Admin
        from tidegate.core.errors import TopicExists

        with Admin(options.server, client_id="bench-admin") as admin:
            try:
                admin.create_topic(options.topic, options.queues)
            except TopicExists:
                if admin.describe_topic(options.topic).topic.queues != options.queues:
                    admin.update_topic(options.topic, queues=options.queues)

    def run_producer(self, ctx: WorkerContext) -> dict[str, Any]:
        from tidegate.adapters.native import frames as f
        from tidegate.client import Producer, build_message

        options = ctx.options
        tally = ProducerTally()
        padding = b"\x00" * (options.size - MIN_SIZE)
        batch = options.batch
        # The window counts requests: one message each, or one batch each (at least two batches so the broker
        # always has the next one while it answers the last).
        window_size = max(2, options.inflight // batch) if batch > 1 else options.inflight
        window = threading.BoundedSemaphore(window_size)
        limiter = RateLimiter(options.rate / options.producers if options.rate else 0)
        producer = Producer(options.server, client_id=f"bench-producer-{ctx.index}-{uuid.uuid4().hex[:6]}")
        producer.start()
        try:
            with ctx.ticker(lambda: {"sent": tally.sent, "acked": tally.acked, "failed": tally.failed}):
                ctx.publish(ready=1)
                ctx.shared.go.wait()
                deadline = ctx.run_deadline()
                tally.first_ns = time.time_ns()
                seq = 0
                topic = options.topic
                while time.monotonic() < deadline:
                    limiter.acquire(batch)
                    if not window.acquire(timeout=SEND_DRAIN_TIMEOUT_S):
                        raise TimeoutError(f"no send answered within {SEND_DRAIN_TIMEOUT_S}s")
                    started = time.perf_counter_ns()
                    if batch == 1:
                        producer.send_async(topic, encode_payload(ctx.index, seq, padding),
                                            self._on_sent(tally, window, seq, 1, started))
                    else:
                        messages = [build_message(topic, encode_payload(ctx.index, s, padding))
                                    for s in range(seq, seq + batch)]
                        # The SDK has no send_batch_async: submit the SEND_BATCH frame on its connection directly.
                        future = producer.conn.submit(f.SendBatch, queue_id=-1, messages=messages)
                        callback = self._on_sent(tally, window, seq, batch, started)
                        future.add_done_callback(lambda fut, cb=callback: cb(fut.exception() or fut.result()))
                    seq += batch
                    tally.sent = seq
                for _ in range(window_size):
                    if not window.acquire(timeout=SEND_DRAIN_TIMEOUT_S):
                        raise TimeoutError(f"sends still unanswered {SEND_DRAIN_TIMEOUT_S}s after the run")
        finally:
            producer.close()
        return tally.result()

    @staticmethod
    def _on_sent(tally: ProducerTally, window: threading.BoundedSemaphore, seq: int, count: int,
                 started: int) -> Callable[[Any], None]:
        def done(result: Any) -> None:
            # Runs on the SDK reader thread.
            if isinstance(result, BaseException):
                tally.on_failed(count, result)
            else:
                tally.on_acked(seq, count, started)
            window.release()

        return done

    def run_consumer(self, ctx: WorkerContext) -> dict[str, Any]:
        from tidegate.client import PushConsumer

        options = ctx.options
        tally = ConsumerTally()
        consumer = PushConsumer(options.group, options.topic, lambda d: tally.record(d.message.body),
                                address=options.server, start="earliest" if options.backlog else "latest",
                                credit=CONSUMER_CREDIT,
                                client_id=f"bench-consumer-{ctx.index}-{uuid.uuid4().hex[:6]}")
        consumer.start()
        try:
            with ctx.ticker(lambda: {"received": tally.received, "ready": len(consumer.assigned)}):
                ctx.shared.stop.wait()
        finally:
            consumer.close()
        return tally.result()


# Messages the broker may push ahead to one bench consumer: enough to cover a reactor turn at full rate.
CONSUMER_CREDIT = 2048

DRIVERS: dict[str, type[Driver]] = {"native": NativeDriver}


def _register_drivers() -> None:
    """Drivers living in their own modules import the engine from here and add themselves to DRIVERS when they
    finish loading (whichever module is imported first)."""
    from . import bench_mqtt  # noqa: F401


# ============================================================================================ orchestration
def worker_main(options: BenchOptions, shared: WorkerShared, role: str, index: int, slot: int) -> None:
    """Entry point of a worker process or thread: run the driver role, post its result (or its error)."""
    driver = DRIVERS[options.protocol]()
    ctx = WorkerContext(options, shared, role, index, slot)
    try:
        result = driver.run_producer(ctx) if role == "producer" else driver.run_consumer(ctx)
    except BaseException as exc:  # reported to the parent, which decides the exit code
        result = {"error": f"{type(exc).__name__}: {exc}"}
        if role == "producer":
            ctx.publish(ready=1)  # do not keep the parent waiting for a producer that will never be ready
    shared.results.put((role, index, result))


class BenchError(Exception):
    """The benchmark could not run (broker unreachable, a worker failed to start)."""


class BenchRun:
    def __init__(self, options: BenchOptions, progress: Callable[[str], None]) -> None:
        self.options = options
        self.progress = progress
        self.use_processes = options.workers == "process"
        self.mp = multiprocessing.get_context("spawn")
        workers = options.producers + options.consumers
        self.shared = WorkerShared(counters=self.mp.Array("q", workers * FIELDS_PER_WORKER, lock=False),
                                   go=self.mp.Event(), stop=self.mp.Event(), start_at=self.mp.Value("d", 0.0),
                                   results=self.mp.Queue())
        self.workers: list[Any] = []
        self.started_roles: set[tuple[str, int]] = set()
        self.results: dict[tuple[str, int], dict[str, Any]] = {}
        self._last_progress: dict[str, int] = {}

    # --- counters
    def _total(self, field_index: int, first_slot: int, count: int) -> int:
        counters = self.shared.counters
        return sum(counters[(first_slot + i) * FIELDS_PER_WORKER + field_index] for i in range(count))

    def producer_total(self, field_index: int) -> int:
        return self._total(field_index, 0, self.options.producers)

    def consumer_total(self, field_index: int) -> int:
        return self._total(field_index, self.options.producers, self.options.consumers)

    # --- workers
    def _start(self, role: str, index: int, slot: int) -> None:
        args = (self.options, self.shared, role, index, slot)
        worker: Any
        if self.use_processes:
            worker = self.mp.Process(target=worker_main, args=args, name=f"bench-{role}-{index}", daemon=True)
        else:
            worker = threading.Thread(target=worker_main, args=args, name=f"bench-{role}-{index}", daemon=True)
        worker.start()
        self.workers.append(worker)
        self.started_roles.add((role, index))

    def _collect(self, timeout: float) -> None:
        try:
            role, index, result = self.shared.results.get(timeout=timeout)
        except queue.Empty:
            return
        self.results[(role, index)] = result

    def _errors(self) -> list[str]:
        return [f"{role} {index}: {r['error']}" for (role, index), r in sorted(self.results.items()) if "error" in r]

    def _wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self._errors():
                raise BenchError(f"{what}: " + "; ".join(self._errors()))
            if time.monotonic() >= deadline:
                raise BenchError(f"{what}: not done within {timeout:.0f}s")
            self._collect(TICK_S)

    def run(self) -> dict[str, Any]:
        options = self.options
        started = time.time()
        self.load_before = os.getloadavg()
        try:
            if not options.backlog:
                self._start_consumers()
            for i in range(options.producers):
                self._start("producer", i, i)
            self._wait_until(lambda: self.producer_total(FIELD_READY) == options.producers, READY_TIMEOUT_S,
                             "producers connecting")
            started = time.time()
            self.shared.start_at.value = started
            self.shared.go.set()
            self._report_while_producing(started)
            if options.backlog:
                self._start_consumers()
            self._drain(started)
        finally:
            self.shared.stop.set()
            self.shared.go.set()  # a producer still waiting to start must not hang
            self._gather_results()
            for worker in self.workers:
                worker.join(BROKER_STOP_TIMEOUT_S)
                if self.use_processes and worker.is_alive():
                    worker.terminate()
        return self._final_report(started)

    def _start_consumers(self) -> None:
        for i in range(self.options.consumers):
            self._start("consumer", i, self.options.producers + i)
        # Producing starts only once every queue has a consumer, so "latest" misses nothing.
        self._wait_until(self._consumers_assigned, READY_TIMEOUT_S, "consumers joining the group")

    def _consumers_assigned(self) -> bool:
        options = self.options
        if not options.consumers:
            return True
        counters = self.shared.counters
        assigned = [counters[(options.producers + i) * FIELDS_PER_WORKER + FIELD_READY]
                    for i in range(options.consumers)]
        # During a rebalance members briefly overlap or miss queues; the settled state covers each queue once.
        every_member_busy = all(assigned) if options.consumers <= options.queues else True
        return sum(assigned) == options.queues and every_member_busy

    def _producers_done(self) -> bool:
        return all(("producer", i) in self.results for i in range(self.options.producers))

    def _progress_line(self, started: float, last: dict[str, int], phase: str) -> dict[str, int]:
        now = {"sent": self.producer_total(FIELD_SENT), "acked": self.producer_total(FIELD_ACKED),
               "failed": self.producer_total(FIELD_FAILED), "received": self.consumer_total(FIELD_RECEIVED)}
        elapsed = time.time() - started
        rates = {k: now[k] - last.get(k, 0) for k in now}
        self.progress(f"[{elapsed:5.1f}s {phase}] sent {rates['sent']:>7}/s  acked {rates['acked']:>7}/s  "
                      f"received {rates['received']:>7}/s  unacked {now['sent'] - now['acked'] - now['failed']:>6}  "
                      f"backlog {max(0, now['acked'] - now['received']):>7}  failed {now['failed']}")
        return now

    def _report_while_producing(self, started: float) -> None:
        last: dict[str, int] = {}
        next_report = time.monotonic() + REPORT_EVERY_S
        hard_stop = time.monotonic() + self.options.duration + SEND_DRAIN_TIMEOUT_S + READY_TIMEOUT_S
        while not self._producers_done():
            if time.monotonic() >= hard_stop:
                raise BenchError("producers did not finish")
            self._collect(max(0.0, min(TICK_S, next_report - time.monotonic())))
            if time.monotonic() >= next_report:
                last = self._progress_line(started, last, "produce")
                next_report += REPORT_EVERY_S
        errors = [e for e in self._errors() if e.startswith("producer")]
        if errors:
            raise BenchError("; ".join(errors))
        self._last_progress = last

    def _drain(self, started: float) -> None:
        """Let consumers catch up: until they received every acknowledged message, or stop making progress."""
        last = self._last_progress
        acked = self.producer_total(FIELD_ACKED)
        received = self.consumer_total(FIELD_RECEIVED)
        idle_since = time.monotonic()
        next_report = time.monotonic() + REPORT_EVERY_S
        drain_timeout = self.options.drain_timeout
        expected = acked * DRIVERS[self.options.protocol]().copies(self.options)
        while self.options.consumers and received < expected and time.monotonic() - idle_since < drain_timeout:
            self._collect(TICK_S)
            now_received = self.consumer_total(FIELD_RECEIVED)
            if now_received != received:
                received, idle_since = now_received, time.monotonic()
            if time.monotonic() >= next_report:
                last = self._progress_line(started, last, "drain")
                next_report += REPORT_EVERY_S

    def _gather_results(self) -> None:
        expected = self.started_roles
        deadline = time.monotonic() + RESULT_TIMEOUT_S
        while not expected <= set(self.results) and time.monotonic() < deadline:
            if not any(w.is_alive() for w in self.workers):
                # A result can still be in the queue's feeder thread after its worker ended; a worker that crashed
                # never sends one. Wait a little for the former, not the full timeout for the latter.
                deadline = min(deadline, time.monotonic() + RESULT_GRACE_S)
            self._collect(TICK_S)

    def _final_report(self, started: float) -> dict[str, Any]:
        options = self.options
        errors = self._errors()
        producers = [r for (role, _), r in sorted(self.results.items()) if role == "producer" and "error" not in r]
        consumers = [r for (role, _), r in sorted(self.results.items()) if role == "consumer" and "error" not in r]
        if len(consumers) < options.consumers:
            errors.append(f"{options.consumers - len(consumers)} consumer(s) reported no result")
        latency, ack_latency = LatencyHistogram(), LatencyHistogram()
        for r in consumers:
            latency.merge(LatencyHistogram.from_state(r["latency"]))
        for r in producers:
            ack_latency.merge(LatencyHistogram.from_state(r["ack_latency"]))
        copies = DRIVERS[options.protocol]().copies(options)
        check = (check_delivery if copies == 1 else check_fan_out)(
            {i: r["acked_seqs"] for i, r in enumerate(producers)}, [r["seen"] for r in consumers],
            sum(r["duplicates"] for r in consumers))
        start_ns = int(started * 1e9)
        produce_end = max((r["last_ack_ns"] for r in producers), default=0)
        first_receive = min((r["first_ns"] for r in consumers if r["first_ns"]), default=0)
        last_receive = max((r["last_ns"] for r in consumers), default=0)
        produce_s = (produce_end - start_ns) / 1e9 if produce_end > start_ns else 0.0
        consume_s = (last_receive - first_receive) / 1e9 if last_receive > first_receive else 0.0
        acked = sum(r["acked"] for r in producers)
        received = sum(r["received"] for r in consumers)
        for r in producers:
            if r["first_error"]:
                errors.append(f"a send failed: {r['first_error']}")
                break
        return {
            "protocol": options.protocol,
            "options": {k: v for k, v in asdict(options).items() if k != "extra"} | options.extra,
            "sent": sum(r["sent"] for r in producers),
            "acked": acked,
            "failed": sum(r["failed"] for r in producers),
            "received": received,
            "unique": check.unique,
            # Without consumers nothing can be checked: None rather than counting every message as lost.
            "lost": check.lost if options.consumers else None,
            "duplicated": check.duplicated if options.consumers else None,
            "received_unacked": check.received_unacked if options.consumers else None,
            "foreign": sum(r["foreign"] for r in consumers),
            "produce_seconds": round(produce_s, 3),
            "consume_seconds": round(consume_s, 3),
            "produce_msgs_per_s": round(acked / produce_s) if produce_s else 0,
            "consume_msgs_per_s": round(check.unique / consume_s) if consume_s else 0,
            # Deliveries per second over all consumers: equals consume_msgs_per_s unless every consumer gets every
            # message (copies > 1, MQTT fan-out), where it is copies times that.
            "copies": copies,
            "deliveries_per_s": round(received / consume_s) if consume_s else 0,
            "produce_mib_per_s": round(acked * options.size / produce_s / 2**20, 2) if produce_s else 0.0,
            "latency_ms": latency.summary_ms(),
            "ack_latency_ms": ack_latency.summary_ms(),
            "errors": errors,
            # The 1-minute load average before the run tells whether something else competed for the CPUs.
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform(), "loadavg_before": round(self.load_before[0], 2)},
        }


def run_bench(options: BenchOptions, progress: Callable[[str], None]) -> dict[str, Any]:
    DRIVERS[options.protocol]().prepare(options)
    return BenchRun(options, progress).run()


# ============================================================================================ spawned broker
class SpawnedBroker(BrokerProcess):
    """A temporary `tidegate serve` for one bench run, in a temporary data dir removed afterwards.

    With `profile_path`, the broker runs under cProfile and writes its profile there when it stops.
    """

    def __init__(self, flush: str, *, listeners: tuple[str, ...] = ("native",), profile_path: str = "",
                 extra_settings: tuple[str, ...] = ()) -> None:
        args = ["--flush", flush, "--log-level", "warning"]
        for setting in extra_settings:
            args += ["--set", setting]
        root = Path(tempfile.mkdtemp(prefix="tidegate-bench-"))
        super().__init__(root / "data", *args, listeners=(*listeners, "admin"), profile_path=profile_path)

    def __enter__(self) -> SpawnedBroker:
        try:
            self.start()
        except AssertionError as exc:  # the broker died or never listened: say why, in one line
            self.__exit__()
            raise BenchError(f"the spawned broker did not start: {str(exc).splitlines()[0]}") from None
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            super().__exit__(*exc_info)
        finally:
            shutil.rmtree(self.data_dir.parent, ignore_errors=True)


# ================================================================================================== CLI
SERVER_ENV = "TIDEGATE_SERVER"
DEFAULT_SERVER = "127.0.0.1:10911"


def register(commands: argparse._SubParsersAction) -> None:
    from tidegate.gateway.cli import OneLineArgumentParser

    bench = commands.add_parser("bench", help="measure throughput, latency, loss and duplication end to end")
    protocols = bench.add_subparsers(dest="bench_protocol", metavar="{" + ",".join(DRIVERS) + "}", required=True,
                                     parser_class=OneLineArgumentParser)
    common = common_bench_options()
    native = protocols.add_parser("native", parents=[common], help="the native protocol through the Python SDK")
    native.add_argument("--batch", type=_at_least(1), default=1, metavar="K",
                        help="send batches of K messages (one SEND_BATCH frame each); default 1")
    native.set_defaults(handler=run_bench_command, protocol="native")
    from .bench_mqtt import register_commands

    register_commands(protocols)


def common_bench_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--server", metavar="HOST:PORT", default=None,
                        help=f"broker address (default: ${SERVER_ENV} or {DEFAULT_SERVER}); ignored with "
                             "--spawn-broker")
    parent.add_argument("--producers", type=_at_least(1), default=1, metavar="N", help="producer workers (1)")
    parent.add_argument("--consumers", type=_at_least(0), default=1, metavar="M", help="consumer workers (1)")
    parent.add_argument("--size", type=_at_least(MIN_SIZE), default=256, metavar="BYTES",
                        help=f"message body size, at least {MIN_SIZE} (default 256)")
    parent.add_argument("--rate", type=float, default=0.0, metavar="R",
                        help="messages per second in total; 0 = as fast as possible (default)")
    parent.add_argument("--duration", type=float, default=10.0, metavar="S", help="seconds of producing (10)")
    parent.add_argument("--topic", default="", help="topic (default: a new bench-<random> topic)")
    parent.add_argument("--queues", type=_at_least(1), default=8, metavar="N", help="queues of the topic (8)")
    parent.add_argument("--inflight", type=_at_least(1), default=512, metavar="N",
                        help="unacknowledged messages per producer (pipelining window, default 512)")
    parent.add_argument("--drain-timeout", type=float, default=10.0, metavar="S",
                        help="after producing, wait this long without progress for consumers to catch up (10)")
    parent.add_argument("--backlog", action="store_true",
                        help="produce first, then consume the backlog from the earliest offset (measures the "
                             "consume rate alone; end-to-end latency then includes the wait)")
    parent.add_argument("--workers", choices=("process", "thread"), default="process",
                        help="run producers and consumers as processes (default; sidesteps the GIL) or threads")
    parent.add_argument("--spawn-broker", action="store_true",
                        help="start a temporary `tidegate serve` (ephemeral ports, temp data dir) and stop it after")
    parent.add_argument("--flush", choices=("sync", "async"), default="sync",
                        help="with --spawn-broker: the broker's storage.flush (default sync)")
    parent.add_argument("--profile-broker", metavar="FILE", default="",
                        help="with --spawn-broker: run the broker under cProfile, write the profile to FILE")
    parent.add_argument("--json", action="store_true", help="print the final report as JSON")
    return parent


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected at least {minimum}, got {text}")
        return value

    return parse


def options_from_args(args: argparse.Namespace, server: str) -> BenchOptions:
    from tidegate.gateway.cli import UsageError

    if args.duration <= 0:
        raise UsageError("--duration must be above 0")
    if args.rate < 0:
        raise UsageError("--rate must be 0 (unlimited) or more")
    if (args.flush != "sync" or args.profile_broker) and not args.spawn_broker:
        raise UsageError("--flush and --profile-broker apply to a broker started with --spawn-broker")
    run_id = uuid.uuid4().hex[:8]
    return BenchOptions(protocol=args.protocol, server=server, producers=args.producers, consumers=args.consumers,
                        size=args.size, rate=args.rate, duration=args.duration, batch=getattr(args, "batch", 1),
                        topic=args.topic or f"bench-{run_id}", queues=args.queues, inflight=args.inflight,
                        drain_timeout=args.drain_timeout, backlog=args.backlog, workers=args.workers,
                        group=f"bench-{run_id}",
                        extra={"spawned_broker": args.spawn_broker,
                               "broker_flush": args.flush if args.spawn_broker else "unknown"})


def run_bench_command(args: argparse.Namespace) -> int:
    from tidegate.core.errors import TidegateError

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        if args.spawn_broker:
            profile = os.path.abspath(args.profile_broker) if args.profile_broker else ""
            with SpawnedBroker(args.flush, profile_path=profile) as broker:
                options = options_from_args(args, broker.addresses[args.protocol])
                progress(f"spawned broker (flush={args.flush}) on {options.server}")
                report = run_bench(options, progress)
        else:
            server = args.server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER
            report = run_bench(options_from_args(args, server), progress)
    except TidegateError as exc:
        print(f"error: {exc.message} ({exc.code.name})", file=sys.stderr)
        return EXIT_FAILURE
    except (BenchError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        sys.stdout.write(format_report(report))
    return EXIT_FAILURE if report["errors"] or report["lost"] else EXIT_OK


def format_report(report: dict[str, Any]) -> str:
    options = report["options"]
    lat, ack = report["latency_ms"], report["ack_latency_ms"]
    lines = [
        f"tidegate bench {report['protocol']}: {options['producers']} producer(s), {options['consumers']} "
        f"consumer(s), {options['size']} B, batch {options['batch']}, rate {options['rate'] or 'max'}, "
        f"{options['duration']}s, {options['queues']} queues, {options['workers']} workers, "
        f"flush {options['broker_flush']}",
        f"  sent {report['sent']}  acked {report['acked']}  failed {report['failed']}  received {report['received']}"
        f"  lost {report['lost']}  duplicated {report['duplicated']}",
        f"  produce {report['produce_msgs_per_s']} msg/s ({report['produce_mib_per_s']} MiB/s)  consume "
        f"{report['consume_msgs_per_s']} msg/s",
        latency_line("end-to-end", lat),
        latency_line("send-to-ack", ack),
    ]
    lines += [f"  error: {e}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


def latency_line(label: str, percentiles: dict[str, float]) -> str:
    """One report line of latency percentiles in ms (shared by every bench driver)."""
    p = percentiles
    return f"  {label} latency ms: p50 {p['p50']:.3f}  p99 {p['p99']:.3f}  p999 {p['p999']:.3f}  max {p['max']:.3f}"


_register_drivers()
