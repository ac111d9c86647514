"""CoreMetrics does not grow with client ids or deleted topics (issue 9: the per-topic counters kept every
`%MQTT%<client id>` session topic and every topic ever seen), and the exporter's label limits come from config."""

from __future__ import annotations

from prometheus_client import generate_latest
from twisted.internet.testing import MemoryReactorClock

from tidegate.core.metrics import DELETED_TOPICS, MAX_UNFOLDED_PRIVATE, CoreMetrics, private_kind
from tidegate.core.model import Message
from tidegate.core.testing import make_broker
from tidegate.gateway.app import TidegateProcess
from tidegate.gateway.config import ConfigError, load_config, parse_set_option
from tidegate.gateway.metrics import TidegateCollector, build_registry


def test_private_kind_names_only_private_topics() -> None:
    assert private_kind("%MQTT%dev1") == "%MQTT%"
    assert private_kind("%AMQP%orders-q") == "%AMQP%"
    assert private_kind("orders") is None
    assert private_kind("%DLQ%group") is None  # dead-letter topics are public: they keep their own counters


def test_session_topics_fold_into_one_key_per_kind_and_sums_stay() -> None:
    metrics = CoreMetrics()
    for n in range(10 * MAX_UNFOLDED_PRIVATE):
        metrics.messages_out[f"%MQTT%client-{n}"] += 2
        metrics.bytes_out[f"%MQTT%client-{n}"] += 10
    metrics.messages_out["orders"] += 7
    assert len(metrics.messages_out) <= MAX_UNFOLDED_PRIVATE + 2
    assert len(metrics.bytes_out) <= MAX_UNFOLDED_PRIVATE + 2
    assert sum(metrics.messages_out.values()) == 20 * MAX_UNFOLDED_PRIVATE + 7
    metrics.fold_private()
    assert dict(metrics.messages_out) == {"%MQTT%": 20 * MAX_UNFOLDED_PRIVATE, "orders": 7}


def test_deleted_topics_leave_no_counters_behind_and_sums_stay_monotonic() -> None:
    broker = make_broker(MemoryReactorClock())
    try:
        for n in range(50):
            broker.publish([Message(f"t{n}", b"abc")])
        broker.publish([Message("kept", b"abcd")])
        for n in range(50):
            broker.delete_topic(f"t{n}")
        metrics = broker.metrics
        assert dict(metrics.messages_in) == {"kept": 1, DELETED_TOPICS: 50}
        assert dict(metrics.bytes_in) == {"kept": 4, DELETED_TOPICS: 150}
    finally:
        broker.close()


def test_a_deleted_topic_gives_its_label_back_and_is_summed_under_other() -> None:
    metrics = CoreMetrics()
    metrics.messages_in["a"] += 5
    metrics.messages_in["b"] += 3
    collector = TidegateCollector(metrics, uptime=lambda: 1.0, max_topic_labels=1)
    registry = build_registry(collector)
    text = generate_latest(registry).decode()
    assert 'tidegate_messages_in_total{topic="a"} 5.0' in text
    metrics.forget_topic("a")
    metrics.messages_in["c"] += 1
    text = generate_latest(registry).decode()
    assert 'topic="a"' not in text
    assert 'tidegate_messages_in_total{topic="c"} 1.0' in text  # the freed label went to a name not seen before
    assert 'tidegate_messages_in_total{topic="other"} 8.0' in text  # b (3) and the deleted a (5)
    assert DELETED_TOPICS not in text


def test_the_other_series_never_decreases_when_a_label_is_freed() -> None:
    """A name once summed under `other` is never promoted: its count leaving `other` would read as a reset."""
    metrics = CoreMetrics()
    metrics.messages_in["small"] += 1
    metrics.messages_in["big"] += 100
    metrics.messages_in["tiny"] += 1
    collector = TidegateCollector(metrics, uptime=lambda: 1.0, max_topic_labels=1)
    registry = build_registry(collector)

    def other() -> float:
        value = registry.get_sample_value("tidegate_messages_in_total", {"topic": "other"})
        return 0.0 if value is None else value

    generate_latest(registry)
    assert registry.get_sample_value("tidegate_messages_in_total", {"topic": "big"}) == 100
    seen = [other()]
    metrics.forget_topic("big")
    metrics.messages_in["small"] += 50  # heavier now, but already folded: stays under other
    seen.append(other())
    metrics.messages_in["fresh"] += 1
    seen.append(other())
    assert seen == sorted(seen) and seen[-1] == 152
    assert registry.get_sample_value("tidegate_messages_in_total", {"topic": "small"}) is None
    assert registry.get_sample_value("tidegate_messages_in_total", {"topic": "fresh"}) == 1


def test_label_limits_come_from_the_admin_listener_section() -> None:
    config = load_config(environ={"TIDEGATE_LISTENERS__ADMIN__METRICS_MAX_GROUP_LABELS": "7"},
                         overrides=[parse_set_option("listeners.admin.metrics_max_topic_labels=3")]).config
    process = TidegateProcess(config, MemoryReactorClock())
    assert process.collector.topic_labels.limit == 3
    assert process.collector.group_labels.limit == 7
    defaults = TidegateProcess(load_config(environ={}).config, MemoryReactorClock())
    assert defaults.collector.topic_labels.limit == 100 and defaults.collector.group_labels.limit == 100


def test_label_limits_are_validated() -> None:
    import pytest

    with pytest.raises(ConfigError, match="listeners.admin.metrics_max_topic_labels must be 0-100000"):
        load_config(environ={}, overrides=[parse_set_option("listeners.admin.metrics_max_topic_labels=-1")])
