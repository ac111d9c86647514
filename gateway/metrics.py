"""Prometheus export of the core's plain counters, read only when /metrics is scraped.

The core and adapters bump ints and dicts in `tidegate.core.metrics.CoreMetrics` on their hot paths; nothing
there knows about prometheus-client. This collector turns those values, the consumer groups' progress and the
store's statistics into metric families at scrape time, so publishing a message never touches a Prometheus object.
The collector lives on its own `CollectorRegistry`, never the process-global one, so several brokers (tests) can
coexist in one interpreter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from tidegate.core.api import GroupInfo
from tidegate.core.metrics import CoreMetrics, LatencyHistogram, SecurityMetrics
from tidegate.core.storage.api import RecoveryReport, StoreStats

log = logging.getLogger("tidegate.metrics")

PREFIX = "tidegate"


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
    ) -> None:
        self.core = core
        self._uptime = uptime
        self._groups = groups
        self._store_stats = store_stats
        self._reactor_lag = reactor_lag
        self._recovery = recovery

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
        for attr, name, doc in (
            ("messages_in", "messages_in", "Messages accepted from producers, by topic."),
            ("bytes_in", "bytes_in", "Message body bytes accepted from producers, by topic."),
            ("messages_out", "messages_out", "Messages delivered to consumers, by topic."),
            ("bytes_out", "bytes_out", "Message body bytes delivered to consumers, by topic."),
        ):
            family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["topic"])
            # Copy before iterating: an adapter may add a topic while this generator is suspended.
            for topic, value in sorted(dict(getattr(self.core, attr)).items()):
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
        for group in sorted(groups, key=lambda g: g.name):
            lag.add_metric([group.name], group.lag)
            inflight.add_metric([group.name], group.inflight)
            members.add_metric([group.name], len(group.members))
            for progress in group.progress:
                labels = [group.name, progress.queue.topic, str(progress.queue.queue_id)]
                queue_lag.add_metric(labels, progress.lag)
                committed.add_metric(labels, progress.committed)
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
