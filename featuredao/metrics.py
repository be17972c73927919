"""Prometheus metrics when prometheus_client is installed; silent no-ops when it is not."""

from __future__ import annotations

import threading
from typing import Any

_lock = threading.Lock()
_families: dict[str, Any] | None = None


def _create() -> dict[str, Any] | None:
    """Create the metric families once per process (prometheus_client refuses duplicates)."""
    global _families
    with _lock:
        if _families is not None:
            return _families
        try:
            from prometheus_client import Counter, Gauge, Histogram
        except ImportError:
            return None
        buckets = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
        _families = {
            "requests": Counter("featuredao_requests", "Reads per view", ["view"]),
            "latency": Histogram("featuredao_read_seconds", "Read latency per view", ["view"],
                                 buckets=buckets),
            "errors": Counter("featuredao_errors", "Failed reads by kind", ["view", "kind"]),
            "fallbacks": Counter("featuredao_fallbacks", "Reads sent to a fallback view",
                                 ["view", "fallback"]),
            "breaker": Gauge("featuredao_breaker_open", "1 when the source's breaker is not closed",
                             ["source", "state"]),
            "cache": Counter("featuredao_cache", "Cache lookups per level and outcome",
                             ["view", "level", "outcome"]),
            "keys": Counter("featuredao_keys", "Keys requested and found", ["view", "outcome"]),
            "sync_rows": Counter("featuredao_sync_rows", "Rows of sync jobs by outcome",
                                 ["job", "target", "outcome"]),
            "sync_lag": Gauge("featuredao_sync_lag_seconds", "Change-to-target delay of sync jobs",
                              ["job", "target"]),
        }
        return _families


class Metrics:
    """What featuredao records; every method is a no-op without prometheus_client."""

    def __init__(self, enabled: bool = True) -> None:
        self._m = _create() if enabled else None

    @classmethod
    def disabled(cls) -> Metrics:
        """A recorder that records nothing."""
        return cls(enabled=False)

    @property
    def enabled(self) -> bool:
        """True when prometheus_client is recording."""
        return self._m is not None

    def read(self, view: str, seconds: float, requested: int, found: int) -> None:
        """One read of a view: its latency and how many keys it found."""
        if self._m is not None:
            self._m["requests"].labels(view).inc()
            self._m["latency"].labels(view).observe(seconds)
            self._m["keys"].labels(view, "requested").inc(requested)
            self._m["keys"].labels(view, "found").inc(found)

    def error(self, view: str, kind: str) -> None:
        """A failed read (kind: timeout, unavailable, circuit_open, query_error, ...)."""
        if self._m is not None:
            self._m["errors"].labels(view, kind).inc()

    def fallback(self, view: str, fallback: str) -> None:
        """Keys of ``view`` sent to ``fallback``."""
        if self._m is not None:
            self._m["fallbacks"].labels(view, fallback).inc()

    def breaker_state(self, source: str, state: str) -> None:
        """The breaker of ``source`` moved to ``state``."""
        if self._m is not None:
            for s in ("closed", "open", "half_open"):
                self._m["breaker"].labels(source, s).set(1.0 if s == state else 0.0)

    def cache(self, view: str, level: str, outcome: str, count: int = 1) -> None:
        """Cache lookups: level l1/l2, outcome hit/miss/negative/stale/error."""
        if self._m is not None and count:
            self._m["cache"].labels(view, level, outcome).inc(count)

    def sync_rows(self, job: str, target: str, outcome: str, count: int = 1) -> None:
        """Rows of a sync job: outcome read/written/deleted/filtered/failed (target "" for reads)."""
        if self._m is not None and count:
            self._m["sync_rows"].labels(job, target, outcome).inc(count)

    def sync_lag(self, job: str, target: str, seconds: float) -> None:
        """Seconds between a change in the source and its write into the target."""
        if self._m is not None:
            self._m["sync_lag"].labels(job, target).set(seconds)
