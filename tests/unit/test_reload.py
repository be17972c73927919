"""FeatureService.reload and build(previous=): what a new config takes over (memory adapter)."""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from featuredao import build
from featuredao.errors import Closed, ConfigError, UsageError
from featuredao.memory import MemorySource
from featuredao.service import FeatureService


def config() -> dict[str, Any]:
    """Items (L1-cached) and item stats on one source, users on another, each store shared by name."""
    tag = uuid.uuid4().hex[:8]
    return {
        "sources": {"a": {"type": "memory", "shared": f"reload-a-{tag}"},
                    "b": {"type": "memory", "shared": f"reload-b-{tag}"}},
        "views": [
            {"name": "items", "entity": "item", "source": "a", "table": "items", "key": "id",
             "key_type": "int", "features": {"price": "float"}, "defaults": {"price": 0.0},
             "cache": {"l1": {"ttl_s": 600}}},
            {"name": "stats", "entity": "item", "source": "a", "table": "stats", "key": "id",
             "key_type": "int", "features": {"ctr": "float"}, "prefix": "s_"},
            {"name": "users", "entity": "user", "source": "b", "table": "users", "key": "id",
             "features": {"age": "int"}, "prefix": "u_"},
        ],
        "service": {"deadline_ms": 500},
    }


def seeded(doc: dict[str, Any]) -> FeatureService:
    service = FeatureService.from_config(doc)
    assert service.runtime is not None
    for dao in service.runtime.daos.values():
        dao.prepare()
    service.runtime.daos["items"].upsert([(1, {"price": 1.5}), (2, {"price": 2.5})])
    service.runtime.daos["stats"].upsert([(1, {"ctr": 0.1})])
    service.runtime.daos["users"].upsert([("u1", {"age": 31})])
    return service


def test_unchanged_source_keeps_its_pool_and_unchanged_view_its_l1() -> None:
    doc = config()
    with seeded(doc) as service:
        assert service.runtime is not None
        old = service.runtime
        first = service.fetch("u1", [1, 2])
        assert first.items == [{"price": 1.5, "s_ctr": 0.1}, {"price": 2.5, "s_ctr": None}]
        source_a, source_b, items = old.sources["a"], old.sources["b"], old.served["items"]
        # The store changes under the cache: only a fresh cache would see it.
        old.daos["items"].upsert([(1, {"price": 9.0})])
        new_doc = copy.deepcopy(doc)
        new_doc["sources"]["b"]["pool_size"] = 2  # b changes: a new pool
        new_doc["views"][1]["features"]["clicks"] = "int"  # stats changes: rebuilt on the same pool
        new = service.reload(new_doc, drain_s=0)

        assert new.sources["a"] is source_a and not source_a.closed
        assert new.sources["b"] is not source_b and source_b.closed
        assert new.served["items"] is items and new.kept == {"items"}
        assert new.breakers["a"] is old.breakers["a"]
        result = service.fetch("u1", [1, 2])
        assert result.items == [{"price": 1.5, "s_ctr": 0.1, "s_clicks": None},
                                {"price": 2.5, "s_ctr": None, "s_clicks": None}]  # price 1.5: from L1
        assert result.user == {"u_age": 31} and result.degraded == []
        assert service.runtime is new and service.views() == ["items", "stats", "users"]
    assert source_a.closed  # closing the service closes what the new runtime took over


def test_a_changed_view_starts_with_an_empty_cache() -> None:
    doc = config()
    with seeded(doc) as service:
        assert service.runtime is not None
        service.fetch(None, [1])
        service.runtime.daos["items"].upsert([(1, {"price": 9.0})])
        new_doc = copy.deepcopy(doc)
        new_doc["views"][0]["cache"]["l1"]["ttl_s"] = 300
        new = service.reload(new_doc, drain_s=0)
        assert new.kept == {"stats", "users"} and new.sources["a"].closed is False
        assert service.fetch(None, [1]).items == [{"price": 9.0, "s_ctr": 0.1}]


def test_reload_without_a_config_reads_the_file_again(tmp_path: Path) -> None:
    doc = config()
    path = tmp_path / "featuredao.json"
    path.write_text(json.dumps(doc))
    with FeatureService.from_config(path) as service:
        assert service.runtime is not None
        for dao in service.runtime.daos.values():
            dao.prepare()
        service.runtime.daos["items"].upsert([(1, {"price": 1.5})])
        doc["views"].append({**doc["views"][1], "name": "stats2", "prefix": "s2_"})
        path.write_text(json.dumps(doc))
        service.reload(drain_s=0)
        assert "stats2" in service.views()
        assert service.fetch(None, [1]).items == [{"price": 1.5, "s_ctr": None, "s2_ctr": None}]
        path.write_text("{not json")
        with pytest.raises(ConfigError, match="not valid JSON"):
            service.reload()
        assert "stats2" in service.views()


def test_an_invalid_config_changes_nothing() -> None:
    doc = config()
    with seeded(doc) as service:
        assert service.runtime is not None
        before = service.runtime
        bad = copy.deepcopy(doc)
        bad["views"][0]["source"] = "nowhere"
        with pytest.raises(ConfigError) as caught:
            service.reload(bad)
        assert "$.views[0].source" in str(caught.value)
        assert service.runtime is before and not before.sources["a"].closed
        assert service.fetch(None, [1]).items == [{"price": 1.5, "s_ctr": 0.1}]


def test_a_config_that_fails_to_build_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = config()
    with seeded(doc) as service:
        assert service.runtime is not None
        before = service.runtime
        new_doc = copy.deepcopy(doc)
        new_doc["sources"]["c"] = {"type": "memory"}
        real = MemorySource.__init__

        def refuse(self: MemorySource, name: str, options: Any) -> None:
            if name == "c":
                raise RuntimeError("the driver refused its settings")
            real(self, name, options)

        monkeypatch.setattr(MemorySource, "__init__", refuse)
        with pytest.raises(RuntimeError, match="refused"):
            service.reload(new_doc)
        # The failed build let go of what it had taken over: the running runtime still owns it all.
        assert service.runtime is before and not before.sources["a"].closed
        assert service.fetch("u1", [1]).items == [{"price": 1.5, "s_ctr": 0.1}]
    assert before.sources["a"].closed and before.sources["b"].closed


def test_requests_in_flight_finish_on_the_sources_they_started_with() -> None:
    doc = config()
    doc["sources"]["b"]["latency_ms"] = 300
    doc["views"][2]["timeout_ms"] = 2000
    doc["service"]["deadline_ms"] = 1000  # the 300 ms read well inside it on a loaded machine
    with seeded(doc) as service:
        assert service.runtime is not None
        old_b = service.runtime.sources["b"]
        assert isinstance(old_b, MemorySource)
        out: list[Any] = []
        before = old_b.round_trips
        thread = threading.Thread(target=lambda: out.append(service.fetch("u1", [1])))
        thread.start()
        end = time.monotonic() + 5
        while old_b.round_trips == before and time.monotonic() < end:
            time.sleep(0.005)
        assert old_b.round_trips > before  # the request is reading b
        new_doc = copy.deepcopy(doc)
        new_doc["sources"]["b"]["latency_ms"] = 0
        service.reload(new_doc)  # waits for the old config's deadline before closing b
        thread.join(5)
        assert out[0].user == {"u_age": 31} and out[0].degraded == []
        assert old_b.closed and service.fetch("u1", []).user == {"u_age": 31}


def test_only_a_service_built_from_a_config_reloads() -> None:
    runtime = build(config())
    try:
        with FeatureService(runtime.served) as service, pytest.raises(UsageError, match="from_config"):
            service.reload(config())
    finally:
        runtime.close()
    service = FeatureService.from_config(config())
    service.close()
    with pytest.raises(Closed):
        service.reload()


def test_runtimes_share_what_they_hold_whichever_closes_first() -> None:
    doc = config()
    first = build(doc)
    second = build(doc, previous=first)
    assert second.sources == first.sources and second.kept == {"items", "stats", "users"}
    second.close()  # a runtime built and never used: what the first holds stays open
    assert not first.sources["a"].closed
    third = build(doc, previous=first)
    first.close()
    assert not third.sources["a"].closed and third.served["items"] is not None
    third.close()
    assert third.sources["a"].closed and third.sources["b"].closed


def carried_config(window: int = 5, fallback_price: str = "float", items_ttl: int = 60) -> dict[str, Any]:
    """A sequence view joining an item view and merging an offline one; two views sharing a fallback."""
    seq = {"time_field": "ts", "item_field": "item_id", "fields": {"item_id": "int", "ts": "int"},
           "max_len": window, "join": {"view": "items", "features": ["price"]}}
    table = {"entity": "item", "source": "m", "key": "id", "key_type": "int", "features": {"price": "float"},
             "cache": {"l1": {"ttl_s": 60}}}
    return {
        "sources": {"m": {"type": "memory", "shared": f"carry-{uuid.uuid4().hex[:8]}"}},
        "views": [
            {"name": "clicks", "entity": "user", "kind": "sequence", "source": "m", "table": "events",
             "key": "user_id", "prefix": "click_", "sequence": {**seq, "merge": ["clicks_offline"]}},
            {"name": "clicks_offline", "entity": "user", "kind": "sequence", "source": "m",
             "table": "events_old", "key": "user_id", "prefix": "old_",
             "sequence": {k: v for k, v in seq.items() if k != "join"}},
            {**table, "name": "items", "table": "items", "cache": {"l1": {"ttl_s": items_ttl}}},
            {**table, "name": "stock", "table": "stock", "prefix": "s_", "fallback": ["backup"]},
            {**table, "name": "promo", "table": "promo", "prefix": "p_", "fallback": ["backup"]},
            {**table, "name": "backup", "table": "backup", "prefix": "b_",
             "features": {"price": fallback_price}, "cache": None},
        ],
    }


@pytest.mark.parametrize(("change", "kept"), [
    ({}, {"clicks", "items", "stock", "promo"}),
    # The sequence view changes: the item view it joins keeps its cache, the merged view goes with it.
    ({"window": 9}, {"items", "stock", "promo"}),
    # The shared fallback changes: both views that fall back to it are built anew.
    ({"fallback_price": "int"}, {"clicks", "items"}),
    # The joined item view changes: the sequence view joining it is built anew with it.
    ({"items_ttl": 30}, {"stock", "promo"}),
])
def test_what_a_new_runtime_takes_over(change: dict[str, Any], kept: set[str]) -> None:
    doc = carried_config()
    new_doc = carried_config(**change)
    new_doc["sources"] = doc["sources"]
    first = build(doc)
    try:
        second = build(new_doc, previous=first)
        try:
            assert second.kept == kept
            assert all(second.served[n] is first.served[n] for n in kept)
            assert all(second.served[n] is not first.served[n] for n in set(second.served) - kept)
            assert second.sources["m"] is first.sources["m"]
        finally:
            second.close()
        assert not first.sources["m"].closed
    finally:
        first.close()
    assert first.sources["m"].closed
