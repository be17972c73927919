"""The server's own metrics, and ``/metrics`` summed over every worker.

``featuredao serve`` runs prometheus_client in multiprocess mode: the supervisor makes a private
directory (unless ``PROMETHEUS_MULTIPROC_DIR`` is set already: then it uses that one, which should be
empty) and sets ``PROMETHEUS_MULTIPROC_DIR`` before anything imports prometheus_client, so every
process (supervisor and workers) writes its samples to its own files there, and any worker's
``/metrics`` reads them all: counters and histograms are sums over the workers, dead ones included (a
replaced worker's counts are not lost); gauges (the breakers' state) carry a ``pid`` label. A dead
worker's gauges are dropped when it is replaced; a private directory is removed when the server stops.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from featuredao.metrics import LATENCY_BUCKETS, families

ENV = "PROMETHEUS_MULTIPROC_DIR"
OUTCOMES = ("ok", "invalid", "failed")
"""Of a config reload: every worker serves it, the file was rejected, or a worker could not build it."""

def _server(prom: Any) -> dict[str, Any]:
    return {
        "requests": prom.Counter("featuredao_http_requests", "HTTP requests by route and status",
                                 ["route", "code"]),
        "latency": prom.Histogram("featuredao_http_request_seconds", "HTTP request latency by route",
                                  ["route"], buckets=LATENCY_BUCKETS),
        "reloads": prom.Counter("featuredao_config_reloads", "Config reloads by outcome", ["outcome"]),
    }


_create = families(_server)


class ServerMetrics:
    """What the server records; no-ops without prometheus_client."""

    def __init__(self) -> None:
        self._m = _create()

    def request(self, route: str, code: int, seconds: float) -> None:
        """One HTTP request answered."""
        if self._m is not None:
            self._m["requests"].labels(route, str(code)).inc()
            self._m["latency"].labels(route).observe(seconds)

    def reload(self, outcome: str) -> None:
        """One config change seen: ``ok``, ``invalid`` or ``failed``."""
        if self._m is not None:
            self._m["reloads"].labels(outcome).inc()

    def declare_reloads(self) -> None:
        """Show every reload outcome at 0 from the start (a scrape then sees the series before the first)."""
        if self._m is not None:
            for outcome in OUTCOMES:
                self._m["reloads"].labels(outcome)


def exposition() -> tuple[bytes, str]:
    """The Prometheus text of every process of the server (or of this one outside multiprocess mode)."""
    try:
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector
    except ImportError:
        return b"# prometheus_client is not installed\n", "text/plain; charset=utf-8"
    path = os.environ.get(ENV)
    if not path:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST


def forget_process(pid: int) -> None:
    """A worker died: drop its gauges (its counters stay in the sums)."""
    path = os.environ.get(ENV)
    if not path:
        return
    for file in Path(path).glob(f"gauge_*_{pid}.db"):
        file.unlink(missing_ok=True)
