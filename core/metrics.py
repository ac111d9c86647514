"""Plain counters the core and adapters bump on hot paths; the gateway exports them to Prometheus at scrape time.

Nothing here imports prometheus-client: a counter is a dict entry or an int, so counting costs one addition.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field

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


@dataclass(slots=True)
class CoreMetrics:
    messages_in: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))  # by topic
    bytes_in: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    messages_out: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes_out: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    connections: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))  # by protocol, current
    connections_total: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    append_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    fsync_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    redeliveries: int = 0
    dead_lettered: int = 0
    security: SecurityMetrics = field(default_factory=SecurityMetrics)
