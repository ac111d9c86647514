"""Latency percentiles of a bench run: a histogram every worker fills and the parent merges, and the report line.

`BenchLatencies` is not `tidegate.core.metrics.LatencyHistogram`: that one exports Prometheus buckets in seconds
(a dozen fixed bounds, fine for dashboards); this one keeps microsecond values at about 1.6% precision so the
report can give p50/p99/p99.9, and pickles small enough to travel from worker processes to the parent.
"""

from __future__ import annotations

from typing import Any


class BenchLatencies:
    """Log-linear histogram of microsecond values: exact below 128 µs, then 64 buckets per power of two
    (relative error under 1.6%). Sparse, so it pickles small and merges by adding counts."""

    SUB_BUCKETS = 64
    LINEAR_LIMIT = 2 * SUB_BUCKETS

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.max_us = 0

    @classmethod
    def bucket_of(cls, micros: int) -> int:
        if micros < cls.LINEAR_LIMIT:
            return max(0, micros)
        shift = micros.bit_length() - 7
        return cls.LINEAR_LIMIT + (shift - 1) * cls.SUB_BUCKETS + ((micros >> shift) - cls.SUB_BUCKETS)

    @classmethod
    def upper_bound(cls, bucket: int) -> int:
        if bucket < cls.LINEAR_LIMIT:
            return bucket
        shift, rest = divmod(bucket - cls.LINEAR_LIMIT, cls.SUB_BUCKETS)
        shift += 1
        return ((rest + cls.SUB_BUCKETS + 1) << shift) - 1

    def record(self, micros: int) -> None:
        bucket = self.bucket_of(micros)
        self.counts[bucket] = self.counts.get(bucket, 0) + 1
        self.count += 1
        if micros > self.max_us:
            self.max_us = micros

    def merge(self, other: BenchLatencies) -> None:
        for bucket, n in other.counts.items():
            self.counts[bucket] = self.counts.get(bucket, 0) + n
        self.count += other.count
        self.max_us = max(self.max_us, other.max_us)

    def percentile(self, fraction: float) -> int:
        """The smallest bucket bound at or below which `fraction` of the values lie (never above the max)."""
        if not self.count:
            return 0
        wanted = max(1, int(fraction * self.count + 0.999999))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= wanted:
                return min(self.upper_bound(bucket), self.max_us)
        return self.max_us

    def summary_ms(self) -> dict[str, float | int]:
        return {"count": self.count, "p50": self.percentile(0.50) / 1000, "p99": self.percentile(0.99) / 1000,
                "p999": self.percentile(0.999) / 1000, "max": self.max_us / 1000}

    def to_state(self) -> dict[str, Any]:
        return {"counts": self.counts, "count": self.count, "max_us": self.max_us}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> BenchLatencies:
        latencies = cls()
        latencies.counts = dict(state["counts"])
        latencies.count = state["count"]
        latencies.max_us = state["max_us"]
        return latencies


def merged(states: list[dict[str, Any]]) -> BenchLatencies:
    """One histogram from the `to_state()` of every worker."""
    total = BenchLatencies()
    for state in states:
        total.merge(BenchLatencies.from_state(state))
    return total


def latency_line(label: str, percentiles: dict[str, float]) -> str:
    """One report line of latency percentiles in ms (shared by every bench driver)."""
    p = percentiles
    return f"  {label} latency ms: p50 {p['p50']:.3f}  p99 {p['p99']:.3f}  p999 {p['p999']:.3f}  max {p['max']:.3f}"
