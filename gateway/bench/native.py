"""`tidegate bench native`: the native protocol through the Python SDK (`tidegate.client`).

Producers send with `Producer.send_async` (or `Producer.send_batch_async`: one SEND_BATCH frame per --batch
messages) inside a window of --inflight unanswered requests; consumers are `PushConsumer`s of one consumer group,
so each message reaches one of them. The engine (`engine.py`) does the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

from .arguments import (
    DEFAULT_SERVER,
    EXIT_FAILURE,
    EXIT_OK,
    SERVER_ENV,
    BenchCommand,
    add_spawn_broker_options,
    at_least,
    progress,
)
from .broker import SpawnedBroker
from .delivery import MIN_SIZE, ConsumerTally, ProducerTally, encode_payload
from .driver import SEND_DRAIN_TIMEOUT_S, BenchError, BenchOptions, Driver, RateLimiter, WorkerContext
from .engine import run_bench
from .latency import latency_line
from .plot import add_plot_option, plot_report

# Messages the broker may push ahead to one bench consumer: enough to cover a reactor turn at full rate.
CONSUMER_CREDIT = 2048


class SendWindow:
    """At most `size` requests unanswered: the producer takes a slot per request, the answer (on the SDK's reader
    thread) gives it back. A semaphore costs two Python-level lock-and-condition rounds per message; this costs an
    integer compare on the producer's side and one C lock on the answer's, and touches an Event only when the
    producer really waits (so the load generator's own CPU goes to the protocol, not to the window)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.taken = 0  # written by the producer thread only
        self.returned = 0  # written under _lock (answers may complete on the producer's thread too)
        self._lock = threading.Lock()
        self._waiting = False
        self._wake = threading.Event()

    def acquire(self, timeout: float) -> bool:
        if self.taken - self.returned < self.size:
            self.taken += 1
            return True
        deadline = time.monotonic() + timeout
        try:
            while True:
                self._wake.clear()
                self._waiting = True  # set before the re-check: a release after it sees the flag and wakes us
                if self.taken - self.returned < self.size:
                    self.taken += 1
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._wake.wait(remaining)
        finally:
            self._waiting = False

    def release(self) -> None:
        with self._lock:
            self.returned += 1
        if self._waiting:
            self._wake.set()


def _sent_done(tally: ProducerTally, window: SendWindow, seq: int, count: int, started: int, result: Any) -> None:
    """The answer to one send (or batch) of the bench producer; runs on the SDK reader thread."""
    if isinstance(result, BaseException):
        tally.on_failed(count, result)
    else:
        tally.on_acked(seq, count, started)
    window.release()


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
        from tidegate.client import Producer

        options = ctx.options
        tally = ProducerTally()
        padding = b"\x00" * (options.size - MIN_SIZE)
        batch = options.batch
        # The window counts requests: one message each, or one batch each (at least two batches so the broker
        # always has the next one while it answers the last).
        window_size = max(2, options.inflight // batch) if batch > 1 else options.inflight
        window = SendWindow(window_size)
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
                        producer.send_batch_async(topic, [encode_payload(ctx.index, s, padding)
                                                          for s in range(seq, seq + batch)],
                                                  self._on_sent(tally, window, seq, batch, started))
                    seq += batch
                    tally.sent = seq
                for _ in range(window_size):
                    if not window.acquire(timeout=SEND_DRAIN_TIMEOUT_S):
                        raise TimeoutError(f"sends still unanswered {SEND_DRAIN_TIMEOUT_S}s after the run")
        finally:
            producer.close()
        return tally.result()

    @staticmethod
    def _on_sent(tally: ProducerTally, window: SendWindow, seq: int, count: int,
                 started: int) -> Callable[[Any], None]:
        # A partial, not a closure: one object (and its argument tuple) per send instead of a function and five
        # cells. It lives until the answer comes, so with a window of 512 it is what the garbage collector of the
        # producer process keeps scanning and promoting; fewer objects per send, fewer and shorter collections.
        return partial(_sent_done, tally, window, seq, count, started)

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


# ===================================================================================================== CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", metavar="HOST:PORT", default=None,
                        help=f"broker address (default: ${SERVER_ENV} or {DEFAULT_SERVER}); ignored with "
                             "--spawn-broker")
    parser.add_argument("--producers", type=at_least(1), default=1, metavar="N", help="producer workers (1)")
    parser.add_argument("--consumers", type=at_least(0), default=1, metavar="M", help="consumer workers (1)")
    parser.add_argument("--size", type=at_least(MIN_SIZE), default=256, metavar="BYTES",
                        help=f"message body size, at least {MIN_SIZE} (default 256)")
    parser.add_argument("--rate", type=float, default=0.0, metavar="R",
                        help="messages per second in total; 0 = as fast as possible (default)")
    parser.add_argument("--duration", type=float, default=10.0, metavar="S", help="seconds of producing (10)")
    parser.add_argument("--topic", default="", help="topic (default: a new bench-<random> topic)")
    parser.add_argument("--queues", type=at_least(1), default=8, metavar="N", help="queues of the topic (8)")
    parser.add_argument("--inflight", type=at_least(1), default=512, metavar="N",
                        help="unacknowledged messages per producer (pipelining window, default 512)")
    parser.add_argument("--drain-timeout", type=float, default=10.0, metavar="S",
                        help="after producing, wait this long without progress for consumers to catch up (10)")
    parser.add_argument("--backlog", action="store_true",
                        help="produce first, then consume the backlog from the earliest offset (measures the "
                             "consume rate alone; end-to-end latency then includes the wait)")
    parser.add_argument("--workers", choices=("process", "thread"), default="process",
                        help="run producers and consumers as processes (default; sidesteps the GIL) or threads")
    add_spawn_broker_options(parser)
    parser.add_argument("--json", action="store_true", help="print the final report as JSON")
    add_plot_option(parser)
    parser.add_argument("--batch", type=at_least(1), default=1, metavar="K",
                        help="send batches of K messages (one SEND_BATCH frame each); default 1")
    parser.set_defaults(protocol="native")


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
                        size=args.size, rate=args.rate, duration=args.duration, batch=args.batch,
                        topic=args.topic or f"bench-{run_id}", queues=args.queues, inflight=args.inflight,
                        drain_timeout=args.drain_timeout, backlog=args.backlog, workers=args.workers,
                        group=f"bench-{run_id}",
                        extra={"spawned_broker": args.spawn_broker,
                               "broker_flush": args.flush if args.spawn_broker else "unknown"})


def run_native_command(args: argparse.Namespace) -> int:
    from tidegate.adapters.native.errors import wire_code
    from tidegate.core.errors import TidegateError

    try:
        if args.spawn_broker:
            profile = os.path.abspath(args.profile_broker) if args.profile_broker else ""
            with SpawnedBroker(args.flush, profile_path=profile) as broker:
                options = options_from_args(args, broker.addresses[args.protocol])
                progress(f"spawned broker (flush={args.flush}) on {options.server}")
                report = run_bench(NativeDriver, options, progress)
        else:
            server = args.server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER
            report = run_bench(NativeDriver, options_from_args(args, server), progress)
    except TidegateError as exc:
        print(f"error: {exc.message} ({wire_code(exc).name})", file=sys.stderr)
        return EXIT_FAILURE
    except (BenchError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    plot_report(args.plot, report, "tidegate bench native: latency")
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


COMMAND = BenchCommand("native", "the native protocol through the Python SDK", add_arguments, run_native_command)
