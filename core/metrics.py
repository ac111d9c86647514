"""Plain counters the core and adapters bump on hot paths; the gateway exports them to Prometheus at scrape time.

Nothing here imports prometheus-client: a counter is a dict entry or an int, so counting costs one addition.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field

from tidegate.core.model import RESERVED_TOPIC, is_private_topic

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(slots=True)
class LatencyHistogram:
    """Cumulative-at-export histogram in seconds, Prometheus bucket layout."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.total += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, n in zip(self.buckets, self.counts, strict=False):
            running += n
            out.append((repr(bound), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out

    def quantile(self, q: float) -> float:
        """Upper bucket bound below which a fraction q of observations fall (coarse, for humans)."""
        if not self.count:
            return 0.0
        target, running = q * self.count, 0
        for bound, n in zip(self.buckets, self.counts, strict=False):
            running += n
            if running >= target:
                return bound
        return float("inf")


SECURITY_LABEL_PAIRS = 256  # distinct (listener, cause) pairs per security counter; more fold into "other"


@dataclass(slots=True)
class SecurityMetrics:
    """Security counters by listener and a cause/action word: bounded label sets (never user names or client ids).

    `failed_logins[(listener, cause)]`, `denials[(listener, action)]`, `limit_hits[(listener, cause)]`; each counter
    keeps at most SECURITY_LABEL_PAIRS label pairs, later new pairs count under ("other", "other")."""

    failed_logins: defaultdict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    denials: defaultdict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    limit_hits: defaultdict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    @staticmethod
    def _bump(counter: defaultdict[tuple[str, str], int], listener: str, word: str) -> None:
        key = (listener or "unknown", word or "unknown")
        if key not in counter and len(counter) >= SECURITY_LABEL_PAIRS:
            key = ("other", "other")
        counter[key] += 1

    def login_failed(self, listener: str, cause: str) -> None:
        self._bump(self.failed_logins, listener, cause)

    def denied(self, listener: str, action: str) -> None:
        self._bump(self.denials, listener, action)

    def limit_hit(self, listener: str, cause: str) -> None:
        """A limit refused something (message size, connection or publish rate, ...): `cause` names the limit."""
        self._bump(self.limit_hits, listener, cause)


DELETED_TOPICS = "%DELETED%"  # where counts of deleted public topics go (exported under the label "other")
MAX_UNFOLDED_PRIVATE = 256  # private topic keys a counter holds before they are folded into their kind
MAX_DELETED_NOTED = 10_000  # deleted topic names kept for the exporter until it next reads them


def private_kind(topic: str) -> str | None:
    """`%MQTT%` for `%MQTT%dev1` (a private topic: MQTT session queue, AMQP queue, ...); None for other names."""
    if not topic.startswith("%") or not is_private_topic(topic):  # the first test keeps public topics cheap
        return None
    match = RESERVED_TOPIC.match(topic)
    return match.group(0) if match is not None else None


class TopicCounter(dict[str, int]):
    """Counts by topic whose memory does not grow with client ids.

    Private topics (`%MQTT%<client id>`, `%AMQP%<queue>`: one per session) are folded into one key per kind
    (`%MQTT%`). Hot paths keep writing `counter[topic] += n`; a new key costs one `__missing__` call, which folds
    the private keys seen so far once more than MAX_UNFOLDED_PRIVATE have gathered, so at most that many live
    next to the public topics (an active session's key comes back until the next fold). Sums are unchanged."""

    __slots__ = ("_private",)

    def __init__(self) -> None:
        super().__init__()
        self._private: list[str] = []  # private keys not folded yet

    def __missing__(self, topic: str) -> int:
        if private_kind(topic) is not None:
            if len(self._private) >= MAX_UNFOLDED_PRIVATE:
                self.fold_private()
            self._private.append(topic)  # after the fold: the caller is about to store this key
        return 0

    def fold_private(self) -> None:
        """Move every private topic's count into its kind's key."""
        for topic in self._private:
            value = self.pop(topic, 0)
            kind = private_kind(topic)
            if value and kind is not None and kind != topic:
                self[kind] = self.get(kind, 0) + value
        self._private.clear()

    def forget(self, topic: str) -> None:
        """A deleted topic: its count moves to its kind (private) or to DELETED_TOPICS, so sums stay monotonic."""
        value = self.pop(topic, 0)
        if value:
            key = private_kind(topic) or DELETED_TOPICS
            if key != topic:
                self[key] = self.get(key, 0) + value


@dataclass(slots=True)
class CoreMetrics:
    # by topic; private topics fold into one key per kind (`%MQTT%`), deleted topics into DELETED_TOPICS
    messages_in: TopicCounter = field(default_factory=TopicCounter)
    bytes_in: TopicCounter = field(default_factory=TopicCounter)
    messages_out: TopicCounter = field(default_factory=TopicCounter)
    bytes_out: TopicCounter = field(default_factory=TopicCounter)
    connections: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))  # by protocol, current
    connections_total: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    append_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    fsync_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    redeliveries: int = 0
    dead_lettered: int = 0
    security: SecurityMetrics = field(default_factory=SecurityMetrics)
    # names of topics deleted since the exporter last asked (it frees their labels); bounded
    deleted_topics: set[str] = field(default_factory=set)

    def topic_counters(self) -> tuple[TopicCounter, ...]:
        return self.messages_in, self.bytes_in, self.messages_out, self.bytes_out

    def forget_topic(self, topic: str) -> None:
        """The topic was deleted: stop keeping counters under its name (Broker.delete_topic calls this)."""
        for counter in self.topic_counters():
            counter.forget(topic)
        if len(self.deleted_topics) < MAX_DELETED_NOTED:
            self.deleted_topics.add(topic)

    def take_deleted_topics(self) -> set[str]:
        """The topics deleted since the last call (the exporter frees their labels)."""
        taken, self.deleted_topics = self.deleted_topics, set()
        return taken

    def fold_private(self) -> None:
        for counter in self.topic_counters():
            counter.fold_private()
