"""Latency statistics for the benchmark: an HdrHistogram per (cell, path), never a sorted list.

Latencies are recorded in microseconds into ``HdrHistogram(1, 60_000_000, 3)`` (1 µs to 60 s, three
significant digits: a percentile is within 0.1% of the exact order statistic). The count, the sum and
the maximum are also kept exactly, so ``mean`` and ``max`` are exact, not bucketed.

Each worker thread records into its own :class:`LatencyStats` (no lock on the hot path); the runner
merges them when a cell ends.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

LOWEST_US = 1
HIGHEST_US = 60_000_000
SIGNIFICANT_DIGITS = 3
PERCENTILES: tuple[tuple[str, float], ...] = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9))


def _histogram() -> Any:
    # Imported here: `import featuredao` must stay light, and the bench extra is optional.
    from hdrh.histogram import HdrHistogram

    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)


@dataclass(frozen=True, slots=True)
class Summary:
    """The figures of one (view, batch, concurrency, cache mode, path): latencies in milliseconds."""

    requests: int
    """Successful calls measured (their latency is in the histogram)."""
    keys: int
    """Keys requested by those calls (duplicates and missing keys included)."""
    errors: int
    """Calls that raised (not in the histogram)."""
    degraded: int
    """Successful calls whose result listed at least one degraded entry."""
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    max_ms: float
    rps: float
    """Requests per second one path sustains at this concurrency: concurrency x requests / busy time."""
    keys_per_s: float
    busy_s: float
    """Sum of the measured latencies (seconds spent inside this path's calls, over all threads)."""

    def to_dict(self) -> dict[str, Any]:
        """The record fields, JSON-ready."""
        return asdict(self)


class LatencyStats:
    """Latencies of one path: an HdrHistogram in µs plus exact count, sum and max; not thread-safe."""

    __slots__ = ("_hist", "count", "degraded", "errors", "keys", "max_us", "total_us")

    def __init__(self) -> None:
        self._hist = _histogram()
        self.count = 0
        self.keys = 0
        self.errors = 0
        self.degraded = 0
        self.total_us = 0.0
        self.max_us = 0.0

    def record(self, latency_us: float, keys: int = 1, *, degraded: bool = False) -> None:
        """Record one successful call."""
        # Clamp into the histogram's range: sub-microsecond calls count as 1 µs, beyond 60 s as 60 s.
        self._hist.record_value(min(max(round(latency_us), LOWEST_US), HIGHEST_US))
        self.count += 1
        self.keys += keys
        self.total_us += latency_us
        if latency_us > self.max_us:
            self.max_us = latency_us
        if degraded:
            self.degraded += 1

    def record_error(self) -> None:
        """Count one call that raised."""
        self.errors += 1

    def merge(self, other: LatencyStats) -> None:
        """Add another recorder's figures to this one."""
        self._hist.add(other._hist)
        self.count += other.count
        self.keys += other.keys
        self.errors += other.errors
        self.degraded += other.degraded
        self.total_us += other.total_us
        self.max_us = max(self.max_us, other.max_us)

    def percentile_us(self, percentile: float) -> float:
        """The latency at a percentile (0-100), within the histogram's precision; 0 when empty."""
        if self.count == 0:
            return 0.0
        return float(self._hist.get_value_at_percentile(percentile))

    @property
    def mean_us(self) -> float:
        """Exact mean latency in µs (0 when empty)."""
        return self.total_us / self.count if self.count else 0.0

    def summary(self, concurrency: int) -> Summary:
        """The figures, with throughput by Little's law: ``concurrency / mean latency``.

        Paths are interleaved in one run, so none of them owns the wall clock; the throughput a path
        would sustain with ``concurrency`` threads calling only it is ``concurrency x requests / busy``.
        """
        busy_s = self.total_us / 1e6
        rps = concurrency * self.count / busy_s if busy_s > 0 else 0.0
        kps = concurrency * self.keys / busy_s if busy_s > 0 else 0.0
        pct = {name: self.percentile_us(p) / 1000.0 for name, p in PERCENTILES}
        return Summary(requests=self.count, keys=self.keys, errors=self.errors, degraded=self.degraded,
                       p50_ms=pct["p50"], p90_ms=pct["p90"], p99_ms=pct["p99"], p999_ms=pct["p999"],
                       mean_ms=self.mean_us / 1000.0, max_ms=self.max_us / 1000.0, rps=rps,
                       keys_per_s=kps, busy_s=busy_s)
