"""Prometheus export of the core's plain counters, read only when /metrics is scraped.

The core and adapters bump ints and dicts in `tidegate.core.metrics.CoreMetrics` on their hot paths; nothing
there knows about prometheus-client. This collector turns those values, the consumer groups' progress and the
store's statistics into metric families at scrape time, so publishing a message never touches a Prometheus object.
The collector lives on its own `CollectorRegistry`, never the process-global one, so several brokers (tests) can
coexist in one interpreter.

Bounded labels: topic and group names are chosen by clients (an MQTT client auto-creates a topic per first level,
every MQTT session is a private `%MQTT%<client id>` topic and group), so labelling every name would put client ids
in labels and grow the series without bound. Private names (the broker's `%KIND%` namespace) are summed under their
kind (`%MQTT%`, `%AMQP%`, ...); other names get a label of their own up to `max_topic_labels` topics and
`max_group_labels` groups, and the rest are summed under `other`. A name keeps its label once it has one (the
busiest names are chosen first), and a name once summed under `other` stays there (a label freed by a deleted topic
goes to a name not seen yet): promoting it would take its count out of `other`, and Prometheus reads a counter that
goes down as a reset. So every series stays a monotonic counter for the life of the process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from tidegate.core.api import GroupInfo
from tidegate.core.metrics import DELETED_TOPICS, CoreMetrics, LatencyHistogram, SecurityMetrics
from tidegate.core.model import RESERVED_TOPIC, is_private_topic
from tidegate.core.storage.api import RecoveryReport, StoreStats

log = logging.getLogger("tidegate.metrics")

PREFIX = "tidegate"
OTHER_LABEL = "other"
DEFAULT_MAX_TOPIC_LABELS = 100
DEFAULT_MAX_GROUP_LABELS = 100


class LabelBudget:
    """Which names get a label of their own: at most `limit`, kept once given; private names fold to their kind."""

    def __init__(self, limit: int) -> None:
        self.limit = max(0, limit)
        self.labelled: set[str] = set()
        self.folded: set[str] = set()  # public names already summed under OTHER_LABEL: never promoted

    def release(self, names: set[str]) -> None:
        """Forget deleted names: their labels are free again (their counts moved to DELETED_TOPICS)."""
        self.labelled.difference_update(names)
        self.folded.difference_update(names)

    def assign(self, weights: dict[str, float]) -> None:
        """Give free labels to the heaviest unlabelled public names in `weights`."""
        free = self.limit - len(self.labelled)
        if free <= 0:
            return
        candidates = [name for name in weights
                      if name not in self.labelled and name not in self.folded and name != DELETED_TOPICS
                      and not is_private_topic(name)]
        candidates.sort(key=lambda name: (-weights[name], name))
        self.labelled.update(candidates[:free])

    def label(self, name: str) -> str:
        if name in self.labelled:
            return name
        if is_private_topic(name) and name != DELETED_TOPICS:
            match = RESERVED_TOPIC.match(name)
            return match.group(0) if match else OTHER_LABEL
        return OTHER_LABEL

    def fold(self, values: dict[str, float]) -> dict[str, float]:
        """`values` summed per label; public names summed under `other` are remembered as folded."""
        out: dict[str, float] = {}
        for name, value in values.items():
            label = self.label(name)
            if label == OTHER_LABEL and name != DELETED_TOPICS:
                self.folded.add(name)
            out[label] = out.get(label, 0) + value
        return out


class TidegateCollector(Collector):
    """Reads `CoreMetrics`, the broker's groups and the store's stats at scrape time.

    `groups` and `store_stats` are callables rather than objects because the admin endpoint is up before the
    store has recovered and the broker exists; until then they return nothing and those families are empty.
    """

    def __init__(
        self,
        core: CoreMetrics,
        *,
        uptime: Callable[[], float],
        groups: Callable[[], Iterable[GroupInfo]] = lambda: (),
        store_stats: Callable[[], StoreStats | None] = lambda: None,
        reactor_lag: LatencyHistogram | None = None,
        recovery: Callable[[], RecoveryReport | None] = lambda: None,
        max_topic_labels: int = DEFAULT_MAX_TOPIC_LABELS,
        max_group_labels: int = DEFAULT_MAX_GROUP_LABELS,
    ) -> None:
        self.core = core
        self._uptime = uptime
        self._groups = groups
        self._store_stats = store_stats
        self._reactor_lag = reactor_lag
        self._recovery = recovery
        self.topic_labels = LabelBudget(max_topic_labels)
        self.group_labels = LabelBudget(max_group_labels)

    def collect(self) -> Iterator[Metric]:
        yield from self._traffic()
        yield from self._connections()
        yield _histogram("append_latency_seconds", "Time to append a message to the commit log.",
                         self.core.append_latency)
        yield _histogram("fsync_latency_seconds", "Time of one commit-log fsync (one group commit).",
                         self.core.fsync_latency)
        if self._reactor_lag is not None:
            yield _histogram("reactor_lag_seconds", "How late a periodic probe ran: time the event loop was busy "
                             "with one turn while every connection waited.", self._reactor_lag)
        yield CounterMetricFamily(f"{PREFIX}_redeliveries", "Messages delivered again after a nack or timeout.",
                                  value=self.core.redeliveries)
        yield CounterMetricFamily(f"{PREFIX}_dead_lettered", "Messages moved to a dead-letter topic.",
                                  value=self.core.dead_lettered)
        yield from _security(self.core.security)
        # A broken source must not take the rest of the scrape down with it: log it and leave its families out.
        try:
            yield from self._consumer_groups(list(self._groups()))
        except Exception:
            log.exception("cannot read consumer groups for /metrics")
        try:
            stats = self._store_stats()
        except Exception:
            log.exception("cannot read store statistics for /metrics")
            stats = None
        if stats is not None:
            yield from _store(stats)
        report = self._recovery()
        if report is not None:
            yield GaugeMetricFamily(f"{PREFIX}_storage_recovery_dropped_bytes", "Bytes of corrupt or torn records "
                                    "the last start-up recovery dropped (0 after a clean shutdown).",
                                    value=report.truncated_bytes + report.dropped_bytes)
            yield GaugeMetricFamily(f"{PREFIX}_storage_recovery_dropped_records", "Records the last start-up "
                                    "recovery dropped.", value=report.dropped_records)
        yield GaugeMetricFamily(f"{PREFIX}_uptime_seconds", "Seconds since the process started.",
                                value=self._uptime())

    def _traffic(self) -> Iterator[Metric]:
        # Deleted topics give their label back (their counts went to DELETED_TOPICS, summed under "other").
        self.topic_labels.release(self.core.take_deleted_topics())
        # Copy before iterating: an adapter may add a topic while this generator is suspended.
        counters = {attr: dict(getattr(self.core, attr)) for attr in ("messages_in", "bytes_in", "messages_out",
                                                                       "bytes_out")}
        weights: dict[str, float] = dict(counters["messages_in"])
        for topic, value in counters["messages_out"].items():
            weights[topic] = weights.get(topic, 0) + value
        self.topic_labels.assign(weights)
        for attr, doc in (
            ("messages_in", "Messages accepted from producers, by topic (bounded label set: see module doc)."),
            ("bytes_in", "Message body bytes accepted from producers, by topic."),
            ("messages_out", "Messages delivered to consumers, by topic."),
            ("bytes_out", "Message body bytes delivered to consumers, by topic."),
        ):
            family = CounterMetricFamily(f"{PREFIX}_{attr}", doc, labels=["topic"])
            for topic, value in sorted(self.topic_labels.fold(counters[attr]).items()):
                family.add_metric([topic], value)
            yield family

    def _connections(self) -> Iterator[Metric]:
        current = GaugeMetricFamily(f"{PREFIX}_connections", "Open client connections, by protocol.",
                                    labels=["protocol"])
        for protocol, value in sorted(dict(self.core.connections).items()):
            current.add_metric([protocol], value)
        yield current
        total = CounterMetricFamily(f"{PREFIX}_connections_accepted", "Client connections accepted, by protocol.",
                                    labels=["protocol"])
        for protocol, value in sorted(dict(self.core.connections_total).items()):
            total.add_metric([protocol], value)
        yield total

    def _consumer_groups(self, groups: list[GroupInfo]) -> Iterator[Metric]:
        lag = GaugeMetricFamily(f"{PREFIX}_consumer_lag", "Messages not yet consumed by a group, all queues.",
                                labels=["group"])
        queue_lag = GaugeMetricFamily(f"{PREFIX}_consumer_queue_lag", "Messages not yet consumed by a group, "
                                      "per queue.", labels=["group", "topic", "queue"])
        committed = GaugeMetricFamily(f"{PREFIX}_consumer_committed_offset", "Next queue offset the group will "
                                      "consume.", labels=["group", "topic", "queue"])
        inflight = GaugeMetricFamily(f"{PREFIX}_consumer_inflight", "Messages delivered and not yet acknowledged "
                                     "(ack mode).", labels=["group"])
        members = GaugeMetricFamily(f"{PREFIX}_consumer_members", "Connected members of a group.", labels=["group"])
        budget = self.group_labels
        budget.assign({group.name: group.lag for group in groups})
        # topics consumed by labelled groups may take free topic labels too (topics without traffic yet)
        self.topic_labels.assign({p.queue.topic: p.lag for group in groups if group.name in budget.labelled
                                  for p in group.progress})
        totals: dict[str, list[float]] = {}  # label -> [lag, inflight, members]
        for group in sorted(groups, key=lambda g: g.name):
            label = budget.label(group.name)
            total = totals.setdefault(label, [0, 0, 0])
            total[0] += group.lag
            total[1] += group.inflight
            total[2] += len(group.members)
            if label != group.name:
                continue  # per-queue series only for groups with a label of their own
            for progress in group.progress:
                topic = self.topic_labels.label(progress.queue.topic)
                if topic != progress.queue.topic:
                    continue
                labels = [group.name, topic, str(progress.queue.queue_id)]
                queue_lag.add_metric(labels, progress.lag)
                committed.add_metric(labels, progress.committed)
        for label, (group_lag, group_inflight, group_members) in sorted(totals.items()):
            lag.add_metric([label], group_lag)
            inflight.add_metric([label], group_inflight)
            members.add_metric([label], group_members)
        yield from (lag, queue_lag, committed, inflight, members)


SECURITY_COUNTERS = (
    ("failed_logins", "security_failed_logins", "cause", "Refused logins (bad password, refused token, anonymous "
     "not allowed here, ...), by listener and cause."),
    ("denials", "security_denials", "action", "Actions the gate refused, by listener and action."),
    ("limit_hits", "security_limit_hits", "cause", "Requests a limit refused (size, rate, count), by listener and "
     "cause."),
)


def _security(security: SecurityMetrics) -> Iterator[Metric]:
    """Security counters: labels are listener names and fixed words only (never users or client ids)."""
    for attr, name, label, doc in SECURITY_COUNTERS:
        family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["listener", label])
        for (listener, word), value in sorted(dict(getattr(security, attr)).items()):
            family.add_metric([listener, word], value)
        yield family


def _histogram(name: str, doc: str, histogram: LatencyHistogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(f"{PREFIX}_{name}", doc, buckets=histogram.cumulative(), sum_value=histogram.total)


def _store(stats: StoreStats) -> Iterator[Metric]:
    yield GaugeMetricFamily(f"{PREFIX}_store_segments", "Commit-log segment files on disk.", value=stats.segments)
    yield GaugeMetricFamily(f"{PREFIX}_store_disk_bytes", "Bytes the store uses on disk.", value=stats.disk_bytes)
    yield GaugeMetricFamily(f"{PREFIX}_store_end_offset", "Commit-log offset after the last appended record.",
                            value=stats.end_offset)
    yield GaugeMetricFamily(f"{PREFIX}_store_durable_offset", "Commit-log offset up to which data is fsynced.",
                            value=stats.durable_offset)
    yield GaugeMetricFamily(f"{PREFIX}_store_unsynced_bytes", "Appended bytes not yet fsynced.",
                            value=max(0, stats.end_offset - stats.durable_offset))


def build_registry(collector: Collector) -> CollectorRegistry:
    """A registry of its own holding `collector` (and nothing from the process-global default registry)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
