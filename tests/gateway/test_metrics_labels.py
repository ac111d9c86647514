"""/metrics labels are bounded and carry no MQTT client ids (issue 9 finding: every MQTT session added
`%MQTT%<client id>` series and 200 random first levels made 200 label series)."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tidegate.core.api import AckMode, ConsumeMode, GroupInfo, QueueProgress
from tidegate.core.metrics import CoreMetrics
from tidegate.core.model import QueueRef
from tidegate.gateway.metrics import TidegateCollector, build_registry


def label_values(registry, family_name: str, label: str) -> dict[str, float]:
    text = generate_latest(registry).decode("utf-8")
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == family_name and label in sample.labels:
                out[sample.labels[label]] = sample.value
    return out


def test_client_ids_never_become_labels_and_topics_are_bounded() -> None:
    metrics = CoreMetrics()
    for n in range(200):
        metrics.messages_in[f"random{n:03d}"] += 1
    metrics.messages_in["orders"] += 1000
    for client in ("alice-phone", "bob-laptop"):
        metrics.messages_out[f"%MQTT%{client}"] += 5
    sessions = [GroupInfo(name=f"%MQTT%{c}", mode=ConsumeMode.CLUSTERING, ack=AckMode.MESSAGE, topics=[f"%MQTT%{c}"],
                          members=[c]) for c in ("alice-phone", "bob-laptop")]
    sessions[0].progress.append(QueueProgress(QueueRef("%MQTT%alice-phone", 0), 3, 10, 0, "alice-phone"))
    collector = TidegateCollector(metrics, uptime=lambda: 1.0, groups=lambda: sessions, max_topic_labels=10)
    registry = build_registry(collector)
    text = generate_latest(registry).decode("utf-8")
    assert "alice-phone" not in text and "bob-laptop" not in text
    topics = label_values(registry, "tidegate_messages_in_total", "topic")
    assert len(topics) == 11 and topics["orders"] == 1000 and topics["other"] == 191  # 10 labels (orders first) + other
    assert label_values(registry, "tidegate_messages_out_total", "topic") == {"%MQTT%": 10}
    assert label_values(registry, "tidegate_consumer_members", "group") == {"%MQTT%": 2}
    assert label_values(registry, "tidegate_consumer_lag", "group") == {"%MQTT%": 7}


def test_a_label_once_given_is_kept_so_counters_stay_monotonic() -> None:
    metrics = CoreMetrics()
    metrics.messages_in["first"] += 1
    registry = build_registry(TidegateCollector(metrics, uptime=lambda: 1.0, max_topic_labels=1))
    assert label_values(registry, "tidegate_messages_in_total", "topic") == {"first": 1}
    metrics.messages_in["busier"] += 100
    assert label_values(registry, "tidegate_messages_in_total", "topic") == {"first": 1, "other": 100}
