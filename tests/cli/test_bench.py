"""`tidegate bench`: the engine pieces (limiter, histogram, loss/duplicate check) and end-to-end runs."""

from __future__ import annotations

import json
import subprocess
import sys

from tidegate.gateway.bench.delivery import (
    MIN_SIZE,
    PAYLOAD_HEADER,
    PAYLOAD_MAGIC,
    ConsumerTally,
    SequenceBitmap,
    check_delivery,
    encode_payload,
)
from tidegate.gateway.bench.driver import RateLimiter
from tidegate.gateway.bench.latency import BenchLatencies
from tidegate.gateway.bench.mqtt import MqttDriver, run_mqtt_command
from tidegate.gateway.bench.mqtt_conns import run_conns_command
from tidegate.gateway.bench.mqtt_storm import run_storm_command
from tidegate.gateway.bench.native import NativeDriver, run_native_command
from tidegate.gateway.bench.registry import COMMANDS
from tidegate.gateway.cli import build_parser

BENCH_TIMEOUT_S = 120


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_rate_limiter_paces_to_the_rate_in_small_bursts() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1000, clock=clock, sleep=clock.sleep)
    for _ in range(2000):
        limiter.acquire()
    # 2000 units at 1000/s end two seconds in (within one pacing slack), never sleeping long.
    assert 1.99 <= clock.now - 100.0 <= 2.0
    assert max(clock.slept) < 0.01


def test_rate_limiter_with_rate_zero_never_sleeps() -> None:
    clock = FakeClock()
    limiter = RateLimiter(0, clock=clock, sleep=clock.sleep)
    for _ in range(100):
        limiter.acquire(10)
    assert clock.slept == []


def test_rate_limiter_does_not_burst_to_recover_a_long_stall() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1000, clock=clock, sleep=clock.sleep)
    limiter.acquire()
    clock.now += 5.0  # the producer stalled for 5 s
    for _ in range(1000):
        limiter.acquire()
    assert clock.now - 105.0 >= 0.89  # at most 0.1 s of catch-up, the rest is paced


def test_histogram_percentiles_are_within_two_percent_and_never_above_the_max() -> None:
    histogram = BenchLatencies()
    for micros in range(1, 100_001):
        histogram.record(micros)
    assert histogram.count == 100_000
    for fraction, exact in ((0.5, 50_000), (0.99, 99_000), (0.999, 99_900)):
        assert exact <= histogram.percentile(fraction) <= exact * 1.02
    assert histogram.percentile(1.0) == histogram.max_us == 100_000
    small = BenchLatencies()
    small.record(7)
    assert small.percentile(0.5) == 7


def test_histogram_buckets_are_contiguous_and_bounds_contain_their_values() -> None:
    for micros in list(range(0, 5000)) + [10**6, 10**7 + 3, 2**40]:
        bucket = BenchLatencies.bucket_of(micros)
        assert BenchLatencies.upper_bound(bucket) >= micros
        assert bucket == 0 or BenchLatencies.upper_bound(bucket - 1) < micros


def test_histograms_merge_by_adding_counts() -> None:
    a, b = BenchLatencies(), BenchLatencies()
    for v in (10, 20):
        a.record(v)
    b.record(5000)
    a.merge(BenchLatencies.from_state(b.to_state()))
    assert a.count == 3 and a.max_us == 5000 and a.percentile(0.5) == 20


def test_sequence_bitmap_reports_duplicates_and_grows() -> None:
    bitmap = SequenceBitmap()
    assert bitmap.add(0) and bitmap.add(100_000)
    assert not bitmap.add(100_000)
    assert bitmap.as_int() == (1 << 100_000) | 1


def bits(*seqs: int) -> bytes:
    bitmap = SequenceBitmap()
    for s in seqs:
        bitmap.add(s)
    return bytes(bitmap.bits)


def test_check_delivery_counts_lost_duplicated_and_unacknowledged_messages() -> None:
    acked = {0: bits(0, 1, 2, 3), 1: bits(0, 1)}
    consumer_a = {0: bits(0, 1), 1: bits(0)}
    consumer_b = {0: bits(1, 2, 9)}  # 1 again (a duplicate across consumers), 9 never acked; 3 and 1/1 are lost
    check = check_delivery(acked, [consumer_a, consumer_b], local_duplicates=2)
    assert (check.acked, check.unique, check.lost, check.duplicated, check.received_unacked) == (6, 5, 2, 3, 1)


def test_consumer_tally_reads_the_payload_header_and_ignores_foreign_messages() -> None:
    tally = ConsumerTally()
    body = encode_payload(3, 41, b"\x00" * (256 - MIN_SIZE))
    assert len(body) == 256 and PAYLOAD_HEADER.unpack_from(body)[:3] == (PAYLOAD_MAGIC, 3, 41)
    tally.record(body)
    tally.record(body)
    tally.record(b"not from the bench")
    assert (tally.received, tally.duplicates, tally.foreign) == (2, 1, 1)
    assert tally.latency.count == 2


def test_bench_registry_routes_each_driver_name_to_its_command() -> None:
    """`tidegate bench` offers the registered drivers in order, each subcommand runs its own module's handler with
    its own flags, and the engine drivers are the classes those handlers hand to run_bench."""
    assert list(COMMANDS) == ["native", "mqtt", "mqtt-conns", "mqtt-storm", "amqp"]
    parser = build_parser()
    native = parser.parse_args(["bench", "native", "--batch", "5", "--spawn-broker"])
    assert (native.handler, native.protocol, native.batch, native.spawn_broker) == (run_native_command, "native", 5,
                                                                                    True)
    mqtt = parser.parse_args(["bench", "mqtt", "--qos", "2", "--shared"])
    assert (mqtt.handler, mqtt.protocol, mqtt.qos, mqtt.shared) == (run_mqtt_command, "mqtt", 2, True)
    conns = parser.parse_args(["bench", "mqtt-conns", "--count", "3"])
    assert (conns.handler, conns.count) == (run_conns_command, 3)
    storm = parser.parse_args(["bench", "mqtt-storm", "--count", "7", "--persistent", "--client-prefix", "p"])
    assert (storm.handler, storm.count, storm.persistent, storm.client_prefix) == (run_storm_command, 7, True, "p")
    assert (NativeDriver.name, MqttDriver.name) == ("native", "mqtt")


def run_bench(*argv: str) -> tuple[dict[str, object], str]:
    completed = subprocess.run([sys.executable, "-m", "tidegate.gateway", "bench", "native", *argv, "--json"],
                               capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return json.loads(completed.stdout), completed.stderr


def test_bench_with_a_spawned_broker_reports_no_loss_and_no_duplicates() -> None:
    report, progress = run_bench("--spawn-broker", "--duration", "2", "--rate", "500")
    assert report["errors"] == []
    assert report["lost"] == 0 and report["duplicated"] == 0
    # 500 msg/s for 2 s; pacing may be a few messages ahead or behind at the edges.
    assert 900 <= report["acked"] <= 1100
    assert report["received"] == report["unique"] == report["acked"]
    assert report["options"]["broker_flush"] == "sync"
    assert report["latency_ms"]["count"] == report["received"]
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"] <= report["latency_ms"]["max"]
    assert "spawned broker (flush=sync)" in progress and "produce]" in progress


def test_bench_batches_against_a_running_broker_with_thread_workers(broker_address: str) -> None:
    report, _ = run_bench("--server", broker_address, "--duration", "1", "--batch", "20", "--producers", "2",
                          "--consumers", "2", "--queues", "4", "--workers", "thread")
    assert report["errors"] == []
    assert report["acked"] > 0 and report["acked"] % 20 == 0
    assert report["lost"] == 0 and report["duplicated"] == 0
    assert report["unique"] == report["acked"]


def test_bench_against_an_unreachable_broker_fails_with_one_line() -> None:
    completed = subprocess.run([sys.executable, "-m", "tidegate.gateway", "bench", "native", "--server",
                                "127.0.0.1:1", "--duration", "1"], capture_output=True, text=True,
                               timeout=BENCH_TIMEOUT_S)
    assert completed.returncode == 1
    assert completed.stderr.startswith("error:") and "Traceback" not in completed.stderr


def test_bench_backlog_mode_consumes_everything_produced_before_the_consumers_started(broker_address: str) -> None:
    report, progress = run_bench("--server", broker_address, "--duration", "1", "--rate", "300", "--backlog",
                                 "--workers", "thread")
    assert report["errors"] == []
    assert report["acked"] > 0 and report["lost"] == 0 and report["unique"] == report["acked"]
    assert "drain]" in progress or report["consume_seconds"] < 1
