"""Prometheus metrics when prometheus_client is installed; silent no-ops when it is not."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
"""Seconds: the request path lives between half a millisecond and a couple of seconds."""


def families(build: Callable[[Any], dict[str, Any]]) -> Callable[[], dict[str, Any] | None]:
    """A getter that creates ``build(prometheus_client)``'s metric families once per process (the
    registry refuses duplicates); it returns None when prometheus_client is not installed."""
    lock = threading.Lock()
    made: list[dict[str, Any]] = []

    def get() -> dict[str, Any] | None:
        with lock:
            if not made:
                try:
                    import prometheus_client
                except ImportError:
                    return None
                made.append(build(prometheus_client))
            return made[0]

    return get


def _core(prom: Any) -> dict[str, Any]:
    return {
        "requests": prom.Counter("featuredao_requests", "Reads per view", ["view"]),
        "latency": prom.Histogram("featuredao_read_seconds", "Read latency per view", ["view"],
                                  buckets=LATENCY_BUCKETS),
        "errors": prom.Counter("featuredao_errors", "Failed reads by kind", ["view", "kind"]),
        "fallbacks": prom.Counter("featuredao_fallbacks", "Reads sent to a fallback view",
                                  ["view", "fallback"]),
        "breaker": prom.Gauge("featuredao_breaker_open", "1 when the source's breaker is not closed",
                              ["source", "state"]),
        "cache": prom.Counter("featuredao_cache", "Cache lookups per level and outcome",
                              ["view", "level", "outcome"]),
        "keys": prom.Counter("featuredao_keys", "Keys requested and found", ["view", "outcome"]),
        "sync_rows": prom.Counter("featuredao_sync_rows", "Rows of sync jobs by outcome",
                                  ["job", "target", "outcome"]),
        "sync_lag": prom.Gauge("featuredao_sync_lag_seconds", "Change-to-target delay of sync jobs",
                               ["job", "target"]),
    }


_create = families(_core)


class Metrics:
    """What featuredao records; every method is a no-op without prometheus_client.

    The families are made on the first thing recorded, not when the service is built: importing
    prometheus_client is about a tenth of a service's start-up.
    """

    def __init__(self, enabled: bool = True) -> None:
        self._enabled = enabled
        self._m: dict[str, Any] | None = None
        self._reads: dict[str, tuple[Any, Any, Any, Any]] = {}
        """Per view, the children ``read`` records into: ``labels()`` costs more than the recording."""

    def _families(self) -> dict[str, Any] | None:
        if self._m is None and self._enabled:
            self._m = _create()
            self._enabled = self._m is not None
        return self._m

    @classmethod
    def disabled(cls) -> Metrics:
        """A recorder that records nothing."""
        return cls(enabled=False)

    @property
    def enabled(self) -> bool:
        """True when prometheus_client is recording."""
        return self._families() is not None

    def read(self, view: str, seconds: float, requested: int, found: int) -> None:
        """One read of a view: its latency and how many keys it found."""
        children = self._reads.get(view)
        if children is None:
            m = self._m or self._families()
            if m is None:
                return
            keys = m["keys"]
            children = self._reads[view] = (m["requests"].labels(view), m["latency"].labels(view),
                                            keys.labels(view, "requested"), keys.labels(view, "found"))
        count, latency, asked, got = children
        count.inc()
        latency.observe(seconds)
        asked.inc(requested)
        got.inc(found)

    def error(self, view: str, kind: str) -> None:
        """A failed read (kind: timeout, unavailable, circuit_open, query_error, ...)."""
        m = self._m or self._families()
        if m is not None:
            m["errors"].labels(view, kind).inc()

    def fallback(self, view: str, fallback: str) -> None:
        """Keys of ``view`` sent to ``fallback``."""
        m = self._m or self._families()
        if m is not None:
            m["fallbacks"].labels(view, fallback).inc()

    def breaker_state(self, source: str, state: str) -> None:
        """The breaker of ``source`` moved to ``state``."""
        m = self._m or self._families()
        if m is not None:
            for s in ("closed", "open", "half_open"):
                m["breaker"].labels(source, s).set(1.0 if s == state else 0.0)

    def cache(self, view: str, level: str, outcome: str, count: int = 1) -> None:
        """Cache lookups and L2 writes: level l1/l2, outcome hit (a cached missing key too), miss, stale,
        error, or dropped (L2 writes the full write-back queue refused)."""
        m = self._m or self._families()
        if m is not None and count:
            m["cache"].labels(view, level, outcome).inc(count)

    def sync_rows(self, job: str, target: str, outcome: str, count: int = 1) -> None:
        """Rows of a sync job: outcome read/written/deleted/filtered/failed (target "" for reads)."""
        m = self._m or self._families()
        if m is not None and count:
            m["sync_rows"].labels(job, target, outcome).inc(count)

    def sync_lag(self, job: str, target: str, seconds: float) -> None:
        """Seconds between a change in the source and its write into the target."""
        m = self._m or self._families()
        if m is not None:
            m["sync_lag"].labels(job, target).set(seconds)
