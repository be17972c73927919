"""Sequence views through the in-memory adapter: config checks, reading rules, merge, join, the service."""

from __future__ import annotations

import time
from typing import Any

import pytest

from featuredao import FeatureService
from featuredao.config import load
from featuredao.errors import ConfigError, UsageError
from featuredao.memory import MemorySource
from featuredao.types import Reason

NOW = 1_700_000_000
FIELDS = {"item_id": "int", "event": "str", "ts": "int", "play_time": "float"}


def seq_view(name: str = "click_seq", *, table: str = "user_events", **sequence: Any) -> dict[str, Any]:
    spec = {"time_field": "ts", "item_field": "item_id", "event_field": "event", "fields": FIELDS,
            "max_len": 5, **sequence}
    return {"name": name, "entity": "user", "kind": "sequence", "source": "m", "table": table,
            "key": "user_id", "prefix": "click_", "sequence": spec}


def config(*views: dict[str, Any], shared: str = "seq") -> dict[str, Any]:
    items = {"name": "item_profile", "entity": "item", "source": "m", "table": "items", "key": "id",
             "key_type": "int", "features": {"category": "str", "price": "float"},
             "defaults": {"category": "unknown"}}
    return {"sources": {"m": {"type": "memory", "shared": shared}}, "views": [*views, items]}


def event(item: int, ts: int, kind: str = "click", play: float = 5.0) -> dict[str, Any]:
    return {"item_id": item, "event": kind, "ts": ts, "play_time": play}


@pytest.fixture
def service(request: pytest.FixtureRequest) -> Any:
    MemorySource.clear_shared()
    made: list[FeatureService] = []

    def build(*views: dict[str, Any], events: dict[str, list[dict[str, Any]]] | None = None,
              offline: dict[str, list[dict[str, Any]]] | None = None) -> FeatureService:
        cfg = config(*views)
        for view in cfg["views"]:  # values, not deadlines: a stalled machine may miss the default 50 ms
            view.setdefault("timeout_ms", 2000)
        cfg["service"] = {"deadline_ms": 4000}
        svc = FeatureService.from_config(cfg)
        made.append(svc)
        assert svc.runtime is not None
        for dao in svc.runtime.daos.values():
            dao.prepare()
        svc.runtime.daos["click_seq"].append((u, e) for u, evs in (events or {}).items() for e in evs)
        if offline:
            svc.runtime.daos["click_seq_offline"].append((u, e) for u, evs in offline.items() for e in evs)
        svc.runtime.daos["item_profile"].upsert([(1, {"category": "books", "price": 9.5}),
                                                 (2, {"category": "games", "price": 30.0})])
        return svc

    yield build
    for svc in made:
        svc.close()


def test_newest_first_capped_and_aligned(service: Any) -> None:
    svc = service(seq_view(), events={"u1": [event(i, NOW - 100 + i) for i in range(10)]})
    user = svc.fetch("u1", context={"request_time": NOW}).user
    assert user["click_item_id"] == [9, 8, 7, 6, 5]
    assert user["click_ts"] == [NOW - 91, NOW - 92, NOW - 93, NOW - 94, NOW - 95]
    assert user["click_event"] == ["click"] * 5 and user["click_play_time"] == [5.0] * 5


def test_window_events_thresholds_dedupe(service: Any) -> None:
    events = [event(1, NOW - 10, "click", 1.0),   # below the play_time threshold
              event(2, NOW - 20, "buy"), event(2, NOW - 30, "click"),  # dedupe keeps the newest of item 2
              event(3, NOW - 40, "view"),           # not an event type kept
              event(4, NOW - 50), event(5, NOW - 5000)]  # item 5 is outside the window
    svc = service(seq_view(window_s=1000, events=["click", "buy"], min={"play_time": 3.0}, dedupe="item_id"),
                  events={"u1": events})
    user = svc.fetch("u1", context={"request_time": NOW}).user
    assert user["click_item_id"] == [2, 4]
    assert user["click_event"] == ["buy", "click"]


def test_request_time_replays_the_past(service: Any) -> None:
    svc = service(seq_view(window_s=200), events={"u1": [event(1, NOW - 50), event(2, NOW + 50)]})
    assert svc.fetch("u1", context={"request_time": NOW}).user["click_item_id"] == [1]
    assert svc.fetch("u1", context={"request_time": NOW + 100}).user["click_item_id"] == [2, 1]
    # Without a request time the window ends now: these events are long past.
    assert svc.fetch("u1").user["click_item_id"] == []


def test_ties_on_time_order_by_item_then_the_other_fields(service: Any) -> None:
    evs = [event(1, NOW, "buy"), event(3, NOW, "a"), event(2, NOW, "c"), event(2, NOW, "b")]
    svc = service(seq_view(), events={"u1": evs})
    user = svc.fetch("u1").user
    assert user["click_item_id"] == [3, 2, 2, 1] and user["click_event"] == ["a", "c", "b", "buy"]


def test_a_user_without_events_gets_empty_lists_and_is_missing(service: Any) -> None:
    svc = service(seq_view(), events={"u1": [event(1, NOW)]})
    result = svc.fetch("nobody")
    assert result.user == {"click_item_id": [], "click_event": [], "click_ts": [], "click_play_time": []}
    assert result.missing == {"click_seq": ["nobody"]} and not result.degraded


def test_merge_reads_both_dedupes_across_and_caps(service: Any) -> None:
    online = seq_view(merge=["click_seq_offline"], dedupe="item_id")
    offline = seq_view("click_seq_offline", table="user_events_offline")
    svc = service(online, offline, events={"u1": [event(1, NOW - 1), event(2, NOW - 2)]},
                  offline={"u1": [event(2, NOW - 100), event(3, NOW - 200)], "u2": [event(9, NOW)]})
    assert svc.views()[:1] == ["click_seq"] and "click_seq_offline" not in svc.daos
    result = svc.fetch("u1")
    assert result.user["click_item_id"] == [1, 2, 3] and result.user["click_ts"] == [NOW - 1, NOW - 2,
                                                                                   NOW - 200]
    assert svc.fetch("u2").user["click_item_id"] == [9]  # only offline events: served, not missing
    assert svc.fetch("u2").missing == {}


def test_join_adds_item_features_with_the_item_views_defaults(service: Any) -> None:
    svc = service(seq_view(join={"view": "item_profile", "features": ["category", "price"]}),
                  events={"u1": [event(1, NOW - 1), event(7, NOW - 2), event(2, NOW - 3), event(1, NOW - 4)]})
    user = svc.fetch("u1").user
    assert user["click_category"] == ["books", "unknown", "games", "books"]
    assert user["click_price"] == [9.5, 0.0, 30.0, 9.5]


def test_many_users_in_one_batch_and_unicode_keys(service: Any) -> None:
    users = {f"用户-{i}": [event(j, NOW - j) for j in range(i % 4)] for i in range(50)}
    svc = service(seq_view(), events=users)
    result = svc.read_view("click_seq", list(users))
    for evs, row in zip(users.values(), result.rows, strict=True):
        if not evs:
            assert row is None
        else:
            assert row is not None and row["item_id"] == [e["item_id"] for e in evs]


def test_append_types_events_and_refuses_what_cannot_be_one(service: Any) -> None:
    raw = {"item_id": "5", "event": "click", "ts": NOW, "play_time": None}
    svc = service(seq_view(), events={"u1": [raw]})
    assert svc.fetch("u1").user["click_item_id"] == [5] and svc.fetch("u1").user["click_play_time"] == [0.0]
    dao = svc.runtime.daos["click_seq"]
    with pytest.raises(UsageError, match="sequence view"):
        dao.upsert([("u1", {"item_id": [1]})])
    with pytest.raises(Exception, match="needs its time"):
        dao.append([("u1", {"item_id": 1})])
    with pytest.raises(Exception, match="unknown event fields"):
        dao.append([("u1", {"ts": 1, "nope": 1})])


def test_a_failing_merged_view_leaves_the_others_events(service: Any) -> None:
    online = seq_view(merge=["click_seq_offline"])
    offline = seq_view("click_seq_offline", table="user_events_offline")
    svc = service(online, offline, events={"u1": [event(1, NOW)]}, offline={"u1": [event(2, NOW - 1)]})
    source = svc.runtime.sources["m"]
    assert isinstance(source, MemorySource)
    started = time.perf_counter()
    source.fail_next(1, "timeout")  # the first read to reach the store: the online one or the offline one
    result = svc.fetch("u1")
    assert time.perf_counter() - started < 1
    assert len(result.user["click_item_id"]) == 1
    assert any(d.reason is Reason.TIMEOUT for d in result.degraded)


@pytest.mark.parametrize(("change", "path", "message"), [
    ({"features": {"a": "int"}}, "$.views[0].features", "sequence fields"),
    ({"sequence": {"time_field": "nope", "fields": FIELDS}}, "$.views[0].sequence.time_field",
     "not one of the sequence's fields"),
    ({"sequence": {"time_field": "event", "fields": FIELDS}}, "$.views[0].sequence.time_field",
     "int or float"),
    ({"sequence": {"time_field": "ts", "fields": FIELDS, "events": ["click"]}}, "$.views[0].sequence.events",
     "event_field"),
    ({"sequence": {"time_field": "ts", "fields": FIELDS, "item_field": "item_id", "merge": ["nope"]}},
     "$.views[0].sequence.merge[0]", "unknown view"),
    ({"sequence": {"time_field": "ts", "fields": FIELDS, "item_field": "item_id",
                   "join": {"view": "item_profile", "features": ["colour"]}}},
     "$.views[0].sequence.join.features[0]", "not a feature of the joined view"),
    ({"sequence": None}, "$.views[0].sequence", "needs a sequence section"),
    ({"kind": "table"}, "$.views[0].sequence", "only a view of kind 'sequence'"),
])
def test_config_errors_name_the_path(change: dict[str, Any], path: str, message: str) -> None:
    view = {**seq_view(), **change}
    with pytest.raises(ConfigError) as caught:
        load(config(view))
    found = {issue.path: issue.message for issue in caught.value.issues}
    assert path in found and message in found[path], found


def test_bench_seeds_and_measures_a_sequence_view(tmp_path: Any) -> None:
    from featuredao.bench import runner

    MemorySource.clear_shared()
    path = tmp_path / "bench.json"
    view = seq_view(window_s=40 * 86400)
    view["sequence"]["max_len"] = 100
    path.write_text(__import__("json").dumps({"sources": {"m": {"type": "memory", "shared": "bench"}},
                                             "views": [view]}))
    assert runner.seed(path, ["click_seq"], 30, progress=False) == {"click_seq": 30}
    params = runner.BenchParams(views=["click_seq"], rows=30, batches=[1, 10], concurrency=[1], requests=5)
    result = runner.run(path, params, progress=False)
    assert {(m.path, m.batch) for m in result.records} == {("service", 1), ("dao", 1), ("service", 10),
                                                           ("dao", 10)}
    assert not any("missing" in n for n in result.notes), result.notes
