"""The Prometheus collector reads CoreMetrics, groups and store stats at scrape time, on its own registry."""

from __future__ import annotations

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tidegate.core.api import AckMode, ConsumeMode, GroupInfo, QueueProgress
from tidegate.core.metrics import CoreMetrics
from tidegate.core.model import QueueRef
from tidegate.core.storage.api import StoreStats
from tidegate.gateway.metrics import TidegateCollector, build_registry


def samples(registry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode("utf-8")
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def populated_metrics() -> CoreMetrics:
    metrics = CoreMetrics()
    metrics.messages_in["orders"] += 3
    metrics.bytes_in["orders"] += 300
    metrics.messages_out["orders"] += 2
    metrics.bytes_out["orders"] += 200
    metrics.connections["native"] = 2
    metrics.connections_total["native"] = 5
    metrics.append_latency.observe(0.0002)
    metrics.append_latency.observe(0.003)
    metrics.fsync_latency.observe(0.02)
    metrics.redeliveries = 7
    metrics.dead_lettered = 1
    return metrics


def test_counters_gauges_and_histograms_come_from_core_metrics() -> None:
    registry = build_registry(TidegateCollector(populated_metrics(), uptime=lambda: 12.5))
    values = samples(registry)
    assert values[("tidegate_messages_in_total", (("topic", "orders"),))] == 3
    assert values[("tidegate_bytes_in_total", (("topic", "orders"),))] == 300
    assert values[("tidegate_messages_out_total", (("topic", "orders"),))] == 2
    assert values[("tidegate_bytes_out_total", (("topic", "orders"),))] == 200
    assert values[("tidegate_connections", (("protocol", "native"),))] == 2
    assert values[("tidegate_connections_accepted_total", (("protocol", "native"),))] == 5
    assert values[("tidegate_redeliveries_total", ())] == 7
    assert values[("tidegate_dead_lettered_total", ())] == 1
    assert values[("tidegate_uptime_seconds", ())] == 12.5
    assert values[("tidegate_append_latency_seconds_count", ())] == 2
    assert values[("tidegate_append_latency_seconds_bucket", (("le", "0.00025"),))] == 1
    assert values[("tidegate_append_latency_seconds_bucket", (("le", "0.005"),))] == 2
    assert values[("tidegate_append_latency_seconds_bucket", (("le", "+Inf"),))] == 2
    assert abs(values[("tidegate_append_latency_seconds_sum", ())] - 0.0032) < 1e-9
    assert values[("tidegate_fsync_latency_seconds_count", ())] == 1


def test_values_are_read_at_scrape_time_not_at_registration() -> None:
    metrics = CoreMetrics()
    registry = build_registry(TidegateCollector(metrics, uptime=lambda: 0.0))
    assert ("tidegate_messages_in_total", (("topic", "late"),)) not in samples(registry)
    metrics.messages_in["late"] += 1
    assert samples(registry)[("tidegate_messages_in_total", (("topic", "late"),))] == 1


def test_consumer_lag_per_group_and_per_queue_and_store_stats() -> None:
    group = GroupInfo(
        name="billing", mode=ConsumeMode.CLUSTERING, ack=AckMode.OFFSET, topics=["orders"], members=["c1", "c2"],
        progress=[
            QueueProgress(QueueRef("orders", 0), committed=10, max_offset=15, min_offset=0),
            QueueProgress(QueueRef("orders", 1), committed=3, max_offset=3, min_offset=0),
        ],
        inflight=4,
    )
    stats = StoreStats(segments=3, disk_bytes=4096, end_offset=900, durable_offset=850, min_offset=0)
    registry = build_registry(TidegateCollector(CoreMetrics(), uptime=lambda: 1.0, groups=lambda: [group],
                                                store_stats=lambda: stats))
    values = samples(registry)
    assert values[("tidegate_consumer_lag", (("group", "billing"),))] == 5
    assert values[("tidegate_consumer_queue_lag", (("group", "billing"), ("queue", "0"), ("topic", "orders")))] == 5
    assert values[("tidegate_consumer_queue_lag", (("group", "billing"), ("queue", "1"), ("topic", "orders")))] == 0
    assert values[("tidegate_consumer_committed_offset",
                   (("group", "billing"), ("queue", "0"), ("topic", "orders")))] == 10
    assert values[("tidegate_consumer_inflight", (("group", "billing"),))] == 4
    assert values[("tidegate_consumer_members", (("group", "billing"),))] == 2
    assert values[("tidegate_store_segments", ())] == 3
    assert values[("tidegate_store_disk_bytes", ())] == 4096
    assert values[("tidegate_store_durable_offset", ())] == 850
    assert values[("tidegate_store_unsynced_bytes", ())] == 50


def test_a_failing_source_leaves_the_rest_of_the_scrape_intact() -> None:
    def broken_groups():
        raise RuntimeError("broker not ready")

    registry = build_registry(TidegateCollector(populated_metrics(), uptime=lambda: 2.0, groups=broken_groups))
    values = samples(registry)
    assert values[("tidegate_messages_in_total", (("topic", "orders"),))] == 3
    assert values[("tidegate_uptime_seconds", ())] == 2.0


def test_every_metric_is_prefixed_and_nothing_lands_in_the_global_registry() -> None:
    registry = build_registry(TidegateCollector(populated_metrics(), uptime=lambda: 1.0))
    names = {name for name, _ in samples(registry)}
    assert names and all(name.startswith("tidegate_") for name in names)
    assert b"tidegate_" not in generate_latest(REGISTRY)
