"""Metrics reach prometheus_client when it is installed, and cost nothing when disabled."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import REGISTRY

from featuredao import FeatureService
from featuredao.demo import demo_config
from featuredao.metrics import Metrics


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


COUNTED = {
    "requests": ("featuredao_requests_total", {"view": "user_profile"}),
    "requested": ("featuredao_keys_total", {"view": "item_features", "outcome": "requested"}),
    "found": ("featuredao_keys_total", {"view": "item_features", "outcome": "found"}),
    "l1_hit": ("featuredao_cache_total", {"view": "item_features", "level": "l1", "outcome": "hit"}),
    "l1_miss": ("featuredao_cache_total", {"view": "item_features", "level": "l1", "outcome": "miss"}),
    "user_latency": ("featuredao_read_seconds_count", {"view": "user_profile"}),
    "item_latency": ("featuredao_read_seconds_count", {"view": "item_features"}),
}


def test_service_reads_are_counted(tmp_path: Path) -> None:
    cfg = demo_config(str(tmp_path / "f.db"))
    cfg["views"][1]["cache"] = {"l1": {"ttl_s": 60}, "negative_ttl_s": 60}
    # This test counts reads, not deadlines: a cold first read on a loaded machine may miss the demo's 200 ms.
    for view in cfg["views"]:
        view["timeout_ms"] = 2000
    cfg["service"]["deadline_ms"] = 4000
    # Counters are process-wide and other tests count too: every assertion is on the change.
    before = {name: sample(metric, **labels) for name, (metric, labels) in COUNTED.items()}
    with FeatureService.from_config(cfg) as service:
        assert service.runtime is not None
        for name in ("user_profile", "item_features"):
            service.runtime.daos[name].prepare()  # type: ignore[attr-defined]
        service.runtime.daos["item_features"].upsert([(1, {})])  # item 1 exists, item 2 does not
        service.fetch("u1", [1, 2])
        service.fetch("u1", [1, 2])  # served from L1 (item 2 negatively cached)
    delta = {name: sample(metric, **labels) - before[name] for name, (metric, labels) in COUNTED.items()}
    assert delta == {"requests": 2, "requested": 4, "found": 2, "l1_hit": 2, "l1_miss": 2,
                     "user_latency": 2, "item_latency": 2}


def test_disabled_metrics_record_nothing() -> None:
    off = Metrics.disabled()
    assert not off.enabled
    off.read("v", 0.1, 1, 1)
    off.cache("v", "l1", "hit")
    off.breaker_state("s", "open")
