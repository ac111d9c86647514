"""The protocol-free engine of `tidegate bench`: start producer and consumer workers, pace and watch them, collect
what they saw and turn it into one report (throughput, latency, loss, duplication).

Workers are processes by default: on a 2-core machine one Python process cannot both produce and consume at full
speed under the GIL. Each worker runs one role of the driver class `run_bench` was given (`driver.py` says what a
driver is; `native.py` and `mqtt.py` are the drivers). Workers report progress through shared counters every
TICK_S and their final tallies (`delivery.py`) through a queue; the parent merges the tallies into the report.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from .delivery import check_delivery, check_fan_out
from .driver import (
    FIELD_ACKED,
    FIELD_FAILED,
    FIELD_READY,
    FIELD_RECEIVED,
    FIELD_SENT,
    FIELDS_PER_WORKER,
    SEND_DRAIN_TIMEOUT_S,
    TICK_S,
    BenchError,
    BenchOptions,
    Driver,
    WorkerContext,
    WorkerShared,
)
from .latency import merged

REPORT_EVERY_S = 1.0
READY_TIMEOUT_S = 60.0  # workers start (spawned interpreters import Twisted) and consumers get their queues
RESULT_TIMEOUT_S = 60.0
RESULT_GRACE_S = 5.0
WORKER_STOP_TIMEOUT_S = 60.0


def worker_main(driver_class: type[Driver], options: BenchOptions, shared: WorkerShared, role: str, index: int,
                slot: int) -> None:
    """Entry point of a worker process or thread: run the driver role, post its result (or its error)."""
    driver = driver_class()
    ctx = WorkerContext(options, shared, role, index, slot)
    try:
        result = driver.run_producer(ctx) if role == "producer" else driver.run_consumer(ctx)
    except BaseException as exc:  # reported to the parent, which decides the exit code
        result = {"error": f"{type(exc).__name__}: {exc}"}
        if role == "producer":
            ctx.publish(ready=1)  # do not keep the parent waiting for a producer that will never be ready
    shared.results.put((role, index, result))


class BenchRun:
    """One run of `driver_class` with `options`: `run()` returns the report."""

    def __init__(self, options: BenchOptions, driver_class: type[Driver], progress: Callable[[str], None]) -> None:
        self.options = options
        self.driver_class = driver_class
        # How many consumers receive each message, asked of the parent's own instance of the driver.
        self.copies = driver_class().copies(options)
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
        args = (self.driver_class, self.options, self.shared, role, index, slot)
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
                worker.join(WORKER_STOP_TIMEOUT_S)
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
        expected = acked * self.copies
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
        latency = merged([r["latency"] for r in consumers])
        ack_latency = merged([r["ack_latency"] for r in producers])
        copies = self.copies
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


def run_bench(driver_class: type[Driver], options: BenchOptions, progress: Callable[[str], None]) -> dict[str, Any]:
    """Prepare the broker through the driver, run the workers, return the report (`BenchRun._final_report`)."""
    driver_class().prepare(options)
    return BenchRun(options, driver_class, progress).run()
