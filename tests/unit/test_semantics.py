"""Recommender semantics on the in-memory adapter: any entity, features keyed by features, context,
found/missing and freshness (no server)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import pytest

from featuredao import ConfigError, FeatureService, FetchError, Reason, UsageError, build, load_config
from featuredao.stages import plan

_stores = itertools.count()
NOW = time.time()


def config(shared: str) -> dict[str, Any]:
    mem = {"type": "memory", "shared": shared}
    return {
        "sources": {"mem": mem},
        "views": [
            {"name": "users", "entity": "user", "source": "mem", "table": "users", "key": "user_id",
             "features": {"city": "str", "age": "int"}, "prefix": "u_"},
            {"name": "items", "entity": "item", "source": "mem", "table": "items", "key": "item_id",
             "key_type": "int", "features": {"category_id": "int", "price": "float", "updated_at": "float"},
             "freshness": {"field": "updated_at", "max_age_s": 3600}},
            {"name": "categories", "entity": "item", "source": "mem", "table": "categories", "key": "id",
             "key_type": "int", "key_from": "item.category_id", "features": {"name": "str", "ctr": "float"},
             "prefix": "cat_", "defaults": {"ctr": 0.0}},
            {"name": "user_category", "entity": "item", "source": "mem", "table": "uc", "key": "id",
             "key_from": ["user.user_id", "item.category_id"], "features": {"clicks": "int"},
             "prefix": "uc_", "defaults": {"clicks": 0}},
            {"name": "city_stats", "entity": "user", "source": "mem", "table": "cities", "key": "city",
             "key_from": "user.u_city", "features": {"pop": "int", "night_hours": "list[int]"},
             "prefix": "city_"},
            {"name": "shops", "entity": "shop", "source": "mem", "table": "shops", "key": "shop_id",
             "features": {"rating": "float"}, "prefix": "shop_"},
        ],
        "context": {"hour": {"type": "int", "default": 0}, "device": {"type": "str", "default": "unknown"}},
        "derived": [
            {"name": "log_price", "entity": "item", "op": "log1p", "input": "price", "default": 0.0},
            {"name": "city_x_cat", "entity": "item", "op": "cross", "inputs": ["user.u_city", "cat_name"],
             "default": ""},
            {"name": "price_bucket", "entity": "item", "op": "bucketize", "input": "log_price",
             "boundaries": [1.0, 1.5]},
            {"name": "night", "entity": "user", "op": "in", "inputs": ["context.hour", "city_night_hours"]},
            {"name": "age_x_device", "entity": "user", "op": "cross", "inputs": ["u_age", "context.device"]},
        ],
        "service": {"deadline_ms": 2000},
    }


@pytest.fixture
def cfg() -> Iterator[dict[str, Any]]:
    cfg = config(f"sem{next(_stores)}")
    runtime = build(cfg)
    daos = runtime.daos
    for dao in daos.values():
        dao.prepare()
    daos["users"].upsert([("u1", {"city": "Oslo", "age": 30}), ("u2", {"city": "Lima", "age": 40})])
    daos["items"].upsert([(1, {"category_id": 10, "price": 2.5, "updated_at": NOW}),
                          (2, {"category_id": 20, "price": 4.0, "updated_at": NOW}),
                          (3, {"category_id": 10, "price": 1.0, "updated_at": NOW - 7200}),  # too old
                          (4, {"category_id": None, "price": 9.0, "updated_at": NOW}),
                          (5, {"category_id": 20, "price": -5.0, "updated_at": NOW})])
    daos["categories"].upsert([(10, {"name": "books", "ctr": 0.1}), (20, {"name": "music", "ctr": 0.2})])
    daos["user_category"].upsert([("u1_10", {"clicks": 5})])
    daos["city_stats"].upsert([("Oslo", {"pop": 700, "night_hours": [22, 23, 0, 1]})])
    daos["shops"].upsert([("s9", {"rating": 4.5})])
    runtime.close()
    yield cfg


def test_stages_follow_the_keys(cfg: dict[str, Any]) -> None:
    views = load_config(cfg).views
    stages = plan(views)
    assert stages[0] == ["users", "items", "shops"]
    assert set(stages[1]) == {"categories", "user_category", "city_stats"}


def test_features_keyed_by_features_join_their_rows(cfg: dict[str, Any]) -> None:
    with FeatureService.from_config(cfg) as service:
        source: Any = service.runtime.sources["mem"]  # type: ignore[union-attr]
        before = source.round_trips
        result = service.fetch("u1", [1, 2, 1, 4, 99], keys={"shop": "s9"}, context={"hour": "9"})
        trips = source.round_trips - before
    items = result.items
    assert items[0]["cat_name"] == "books" and items[0]["uc_clicks"] == 5
    assert items[1]["cat_name"] == "music" and items[1]["uc_clicks"] == 0  # "u1_20" is not stored
    assert items[2] == items[0]
    assert items[3]["cat_name"] is None and items[3]["cat_ctr"] == 0.0  # null key: the view's defaults
    assert items[4]["price"] is None and items[4]["cat_ctr"] == 0.0  # unknown item
    assert result.user == {"u_city": "Oslo", "u_age": 30, "city_pop": 700, "city_night_hours": [22, 23, 0, 1],
                           "night": False, "age_x_device": "30_unknown"}
    assert result.entities == {"shop": {"shop_rating": 4.5}}
    assert result.context == {"hour": 9, "device": "unknown"}
    assert result.missing == {"items": [99], "user_category": ["u1_20"]}
    # Each view read once, its distinct keys in one batch, and the views of a stage (one source) in one
    # round trip together: 3 views in stage 1, 3 in stage 2.
    assert trips == 2


def test_an_unknown_user_is_told_from_a_stored_one(cfg: dict[str, Any]) -> None:
    with FeatureService.from_config(cfg) as service:
        unknown = service.fetch("nobody", [])
        known = service.fetch("u2", [])
    assert unknown.missing == {"users": ["nobody"]} and known.missing == {"city_stats": ["Lima"]}
    assert unknown.degraded == [] and unknown.to_dict()["missing"] == {"users": ["nobody"]}


def test_freshness_treats_old_rows_as_missing(cfg: dict[str, Any]) -> None:
    with FeatureService.from_config(cfg) as service:
        result = service.fetch(None, [3, 1])
    assert result.items[0]["price"] is None and result.items[1]["price"] == 2.5
    assert result.missing == {"items": [3]}
    assert [(d.view, d.reason) for d in result.degraded] == [("items", Reason.STALE)]
    assert result.items[0]["cat_name"] is None  # its category key came from the stale row: not read


def test_context_is_validated_and_coerced(cfg: dict[str, Any]) -> None:
    with FeatureService.from_config(cfg) as service:
        with pytest.raises(UsageError, match="unknown context features"):
            service.fetch(None, [1], context={"weather": "rain"})
        result = service.fetch(None, [1], context={"hour": "late", "device": "ios"})
        with pytest.raises(UsageError, match="unknown entities"):
            service.fetch(None, [1], keys={"planet": "x"})
    assert result.context == {"hour": 0, "device": "ios"}
    assert [(d.view, d.reason, d.feature) for d in result.degraded] == [("context", Reason.COERCION, "hour")]


@pytest.mark.parametrize(("change", "path", "message"), [
    ({"key_from": "item.nope"}, "$.views[2].key_from", "produces 'nope'"),
    ({"key_from": "planet.x"}, "$.views[2].key_from", "known entity"),
    ({"key_from": "item.cat_name"}, "$.views[2].key_from", "its own feature"),
    ({"freshness": {"field": "nope", "max_age_s": 1}}, "$.views[2].freshness.field", "not a feature"),
])
def test_config_errors_name_their_path(change: dict[str, Any], path: str, message: str) -> None:
    cfg = config("errors")
    cfg["views"][2].update(change)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert any(i.path == path and message in i.message for i in info.value.issues), info.value


def test_key_from_cycles_are_config_errors() -> None:
    cfg = config("cycle")
    cfg["views"][2]["key_from"] = "item.uc_clicks"
    cfg["views"][3]["key_from"] = "item.cat_ctr"
    with pytest.raises(ConfigError, match="cycle") as info:
        load_config(cfg)
    # Reported once, at the first view of the cycle, naming every view in it.
    assert [(i.path, i.message) for i in info.value.issues] == [
        ("$.views[2].key_from", "key_from forms a cycle: categories -> user_category -> categories "
                                "(each view is keyed by a feature of the next)")]
    cfg = config("cycle3")  # a longer one, entered from a view outside it (city_stats keyed by it)
    cfg["views"][0]["key_from"] = "user.city_pop"
    cfg["views"][4]["key_from"] = "user.u_city"
    cfg["views"][5].update(entity="user", key_from="user.u_age", prefix="s_")
    cfg["derived"] = []
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert [i.path for i in info.value.issues] == ["$.views[0].key_from"]
    assert "users -> city_stats -> users" in info.value.issues[0].message
    cfg = config("ctx")
    cfg["context"]["hour"]["default"] = "noon"
    with pytest.raises(ConfigError, match=r"context\.hour\.default"):
        load_config(cfg)


def test_the_cli_takes_context_and_entity_keys(cfg: dict[str, Any], tmp_path: Any) -> None:
    import json
    import subprocess
    import sys

    path = tmp_path / "semantics.json"
    # A memory store lives in one process: the CLI process sees its own empty one, enough for the shape.
    path.write_text(json.dumps(cfg))
    exe = [sys.executable, "-m", "featuredao.cli"]
    out = subprocess.run([*exe, "fetch", str(path), "--items", "1", "--context", "hour=9",
                          "--key", "shop=s9", "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["context"] == {"hour": 9, "device": "unknown"} and "shop" in doc["entities"]
    bad = subprocess.run([*exe, "fetch", str(path), "--items", "1", "--context", "weather=rain"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown context features" in bad.stderr and "Traceback" not in bad.stderr


def test_derived_features_are_computed_over_the_rows(cfg: dict[str, Any]) -> None:
    import math

    with FeatureService.from_config(cfg) as service:
        result = service.fetch("u1", [1, 2, 99, 5], context={"hour": 23})
    first, second, unknown, negative = result.items
    assert first["log_price"] == math.log1p(2.5) and first["city_x_cat"] == "Oslo_books"
    assert first["price_bucket"] == 1 and second["price_bucket"] == 2  # log1p(4.0) = 1.61
    assert unknown["log_price"] == 0.0 and unknown["city_x_cat"] == ""  # null inputs: the default, quietly
    assert negative["log_price"] == 0.0  # log1p(-5) cannot be computed: the default, and said so
    assert result.user["night"] is True
    assert [(d.view, d.reason) for d in result.degraded] == [("log_price", Reason.DERIVE_ERROR)]


@pytest.mark.parametrize(("spec", "path", "message"), [
    ({"name": "x", "entity": "item", "op": "log1p", "input": "nope"}, "$.derived[0].input", "produces"),
    ({"name": "x", "entity": "user", "op": "log1p", "input": "item.price"}, "$.derived[0].input", "per item"),
    ({"name": "x", "entity": "item", "op": "cross", "inputs": ["price", "context.weather"]},
     "$.derived[0].inputs[1]", "context feature"),
    ({"name": "price", "entity": "item", "op": "log1p", "input": "price"}, "$.derived[0].name", "already"),
    ({"name": "x", "entity": "item", "op": "log1p"}, "$.derived[0]", ""),
])
def test_derived_config_errors_name_their_path(spec: dict[str, Any], path: str, message: str) -> None:
    cfg = config("derr")
    cfg["derived"] = [spec]
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert any(i.path.startswith(path) and message in i.message for i in info.value.issues), info.value


def test_scenes_read_their_views_only_with_their_deadline(cfg: dict[str, Any]) -> None:
    cfg = {**cfg, "scenes": {"feed": {"views": ["items", "categories"], "deadline_ms": 300},
                             "profile": {"views": ["users"]}}}
    with FeatureService.from_config(cfg) as service:
        feed = service.fetch("u1", [1], scene="feed")
        full = service.fetch("u1", [1])
        with pytest.raises(UsageError, match="unknown scene 'nope'; known: feed, profile"):
            service.fetch("u1", [1], scene="nope")
    assert "u_city" not in feed.user and "cat_name" in feed.items[0] and "uc_clicks" not in feed.items[0]
    assert "uc_clicks" in full.items[0] and full.user["u_city"] == "Oslo"


@pytest.mark.parametrize(("views", "message"), [
    (["nope"], "unknown view"), (["categories"], "add them to the scene"), ([], "at least 1"),
])
def test_scene_config_errors(views: list[str], message: str) -> None:
    cfg = config("scenes")
    cfg["scenes"] = {"feed": {"views": views}}
    with pytest.raises(ConfigError, match=message):
        load_config(cfg)


def test_a_composite_key_is_joined_by_the_views_separator(cfg: dict[str, Any]) -> None:
    cfg["views"][3]["key_separator"] = "|"
    runtime = build(cfg)
    runtime.daos["user_category"].upsert([("u1|20", {"clicks": 7})])
    runtime.close()
    with FeatureService.from_config(cfg) as service:
        result = service.fetch("u1", [1, 2, 4])
    # "u1_10" is stored too, but it is not what this view's key is made of any more.
    assert [item["uc_clicks"] for item in result.items] == [0, 7, 0]
    assert result.missing == {"user_category": ["u1|10"]}  # item 4 has no category: no key, not missing


def flaky_scores(prices: list[Any]) -> list[float]:
    """A user's derived-feature function that fails on some requests (any price over 5)."""
    if any(p is not None and p > 5 for p in prices):
        raise RuntimeError("model server down")
    return [0.5 for _ in prices]


def python_spec(fn: str) -> dict[str, Any]:
    return {"name": "score", "entity": "item", "op": "python", "input": "price", "fn": fn, "type": "float",
            "default": -1.0}


@pytest.mark.parametrize(("fn", "message"), [
    ("no_such_module_zz:f", "ModuleNotFoundError: No module named 'no_such_module_zz'"),
    ("os.path:no_such_function", "has no attribute 'no_such_function'"),
    ("os:sep", "'os:sep' is not callable"),
])
def test_a_python_function_that_cannot_be_loaded_is_a_config_error(fn: str, message: str) -> None:
    cfg = config("fn")
    cfg["derived"].insert(2, python_spec(fn))
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert [i.path for i in info.value.issues] == ["$.derived[2].fn"], info.value
    assert message in info.value.issues[0].message
    cfg["derived"][2] = python_spec(f"{__name__}:flaky_scores")
    assert [d.name for d in load_config(cfg).derived][2] == "score"


def test_the_cli_validate_names_the_paths_of_a_bad_function_and_a_cycle(tmp_path: Any) -> None:
    import json
    import subprocess
    import sys

    cfg = config("cli-validate")
    cfg["derived"].append(python_spec("no_such_module_zz:f"))
    cfg["views"][2]["key_from"] = "item.uc_clicks"
    cfg["views"][3]["key_from"] = "item.cat_ctr"
    cfg["derived"] = cfg["derived"][-1:]  # those on category features would be reported too
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    out = subprocess.run([sys.executable, "-m", "featuredao.cli", "validate", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    assert "$.derived[0].fn: cannot load derived-feature function 'no_such_module_zz:f'" in out.stderr
    assert "$.views[2].key_from: key_from forms a cycle: categories -> user_category" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_derived_function_that_raises_costs_its_feature_only(cfg: dict[str, Any]) -> None:
    cfg["derived"].append(python_spec(f"{__name__}:flaky_scores"))
    with FeatureService.from_config(cfg) as service:
        calm = service.fetch("u1", [1, 2])
        result = service.fetch("u1", [1, 4])  # item 4 costs 9.0: the function raises
        with pytest.raises(FetchError) as info:
            service.fetch("u1", [1, 4], strict=True)
    assert [item["score"] for item in calm.items] == [0.5, 0.5] and calm.degraded == []
    assert [item["score"] for item in result.items] == [-1.0, -1.0]
    assert result.items[1]["log_price"] == pytest.approx(2.302585)  # the other derived features stand
    assert [(d.view, d.reason, d.feature) for d in result.degraded] == [
        ("score", Reason.DERIVE_ERROR, "score")]
    assert "2 value(s) could not be derived" in result.degraded[0].detail
    assert [d.reason for d in info.value.degraded] == [Reason.DERIVE_ERROR]


def test_hash_bucket_memo_gives_the_buckets_of_the_per_value_path() -> None:
    from featuredao import derive

    spec = derive.DerivedConfig(name="h", entity="item", op="hash_bucket", input="x", buckets=97)
    ints, texts = list(range(-5, 300)), [f"id{i}" for i in range(300)] + ["日本", "café"]
    for column in (ints, texts, ints[::-1], [str(i) for i in ints]):
        expected = [derive._hash(derive._text(v), 97) for v in column]
        assert derive.compute(spec, [column]) == (expected, [])  # a cold memo, then a warm one
        assert derive.compute(spec, [column]) == (expected, [])
    mixed = [1, "1", True, 2.0]  # not one kind: the per-value path, true is not 1
    assert derive.compute(spec, [mixed])[0] == [derive._hash(t, 97) for t in ("1", "1", "true", "2.0")]
    derive._MEMO, saved = 10, derive._MEMO  # a full memo starts again and still answers right
    try:
        small = derive.DerivedConfig(name="h", entity="item", op="hash_bucket", input="x", buckets=97)
        for column in (ints, texts, ints, texts[:5], ints):
            assert derive.compute(small, [column])[0] == [derive._hash(str(v), 97) for v in column]
    finally:
        derive._MEMO = saved
