"""Metrics reach prometheus_client when it is installed, and cost nothing when disabled."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import REGISTRY

from featuredao import FeatureService
from featuredao.demo import demo_config
from featuredao.metrics import Metrics


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_service_reads_are_counted(tmp_path: Path) -> None:
    cfg = demo_config(str(tmp_path / "f.db"))
    cfg["views"][1]["cache"] = {"l1": {"ttl_s": 60}, "negative_ttl_s": 60}
    before = sample("featuredao_requests_total", view="user_profile")
    with FeatureService.from_config(cfg) as service:
        assert service.runtime is not None
        for name in ("user_profile", "item_features"):
            service.runtime.daos[name].prepare()  # type: ignore[attr-defined]
        service.fetch("u1", [1, 2])
        service.fetch("u1", [1, 2])
    assert sample("featuredao_requests_total", view="user_profile") == before + 2
    assert sample("featuredao_keys_total", view="item_features", outcome="requested") >= 4
    assert sample("featuredao_cache_total", view="item_features", level="l1", outcome="hit") >= 2
    assert sample("featuredao_read_seconds_count", view="user_profile") >= 2


def test_disabled_metrics_record_nothing() -> None:
    off = Metrics.disabled()
    assert not off.enabled
    off.read("v", 0.1, 1, 1)
    off.cache("v", "l1", "hit")
    off.breaker_state("s", "open")
