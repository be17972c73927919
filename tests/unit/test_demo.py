"""The demo dataset looks like a recommender's data, is stored exactly as generated, and prints cleanly."""

from __future__ import annotations

import io
import json
import re
import statistics
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from featuredao import demo, factory
from featuredao.config import load
from featuredao.dao import BaseDao
from featuredao.types import FeatureType, Key, Row

USERS = demo.user_rows(0, 3000)
ITEMS = demo.item_rows(0, 5000)
EXACT = {FeatureType.INT: int, FeatureType.FLOAT: float, FeatureType.STR: str, FeatureType.BOOL: bool}


def plain(rows: list[tuple[Key, Row]]) -> list[tuple[Key, dict[str, Any]]]:
    return [(key, dict(row)) for key, row in rows]


def column(rows: list[tuple[Key, Row]], name: str) -> list[Any]:
    return [row[name] for _, row in rows]


@pytest.mark.parametrize(("rows", "features"), [(USERS, demo.USER_FEATURES), (ITEMS, demo.ITEM_FEATURES)])
def test_rows_have_every_feature_with_its_exact_type(rows: list[tuple[Key, Row]],
                                                     features: dict[str, str]) -> None:
    for _, row in rows:
        assert set(row) == set(features)
        for name, declared in features.items():
            ftype, value = FeatureType(declared), row[name]
            if ftype.is_list:
                assert isinstance(value, list) and value, name
                assert all(type(v) is EXACT[ftype.element] for v in value), name
            else:
                assert type(value) is EXACT[ftype], name


def test_users_look_real() -> None:
    assert [k for k, _ in USERS[:3]] == ["u0", "u1", "u2"]
    ages = column(USERS, "age")
    assert min(ages) >= 16 and max(ages) <= 80 and 25 <= statistics.median(ages) <= 40
    assert set(column(USERS, "gender")) <= {"female", "male", "non-binary", "unknown"}
    places = {(city, country, lang) for city, country, lang in demo._PLACES}
    assert {(r["city"], r["country"], r["lang"]) for _, r in USERS} <= places
    assert len(set(column(USERS, "city"))) > 20 and "Berlin" in column(USERS, "city")
    for name in ("ctr_7d", "ctr_30d", "cvr_7d"):
        assert all(0.0 <= v <= 0.2 for v in column(USERS, name)), name
    assert 0.02 <= statistics.mean(column(USERS, "ctr_7d")) <= 0.06
    assert 0.02 <= sum(column(USERS, "is_vip")) / len(USERS) <= 0.15
    for _, row in plain(USERS):
        assert row["purchases_30d"] >= 0 and row["clicks_7d"] >= 0 and 0 <= row["sessions_7d"] <= 80
        assert row["active_hours"] == sorted(set(row["active_hours"]))
        assert all(0 <= h <= 23 for h in row["active_hours"])
        assert set(row["tags"]) <= set(demo._TAGS)
        assert set(row["fav_categories"]) <= set(demo._CATEGORY_NAMES)
        assert len(row["embedding"]) == demo.EMBEDDING_DIM
        assert row["device"] in {"android", "ios", "web", "tablet"}
        assert 0.0 <= row["score"] <= 1.0


def test_items_look_real() -> None:
    assert [k for k, _ in ITEMS[:3]] == [0, 1, 2]
    assert set(column(ITEMS, "category")) == set(demo._CATEGORY_NAMES)
    assert set(column(ITEMS, "brand")) <= set(demo._BRANDS)
    prices = column(ITEMS, "price")
    # Long-tailed: most items cheap, a few very expensive.
    assert min(prices) >= 0.99 and statistics.median(prices) < statistics.mean(prices)
    assert max(prices) > 20 * statistics.median(prices)
    assert all(round(p, 2) == p for p in prices)
    for name in ("ctr_7d", "cvr_7d"):
        assert all(0.0 <= v <= 0.2 for v in column(ITEMS, name)), name
    for _, row in plain(ITEMS):
        assert row["clicks_7d"] <= row["impressions_7d"]
        assert 1.0 <= row["rating"] <= 5.0 and 1.0 <= row["seller_score"] <= 5.0
        assert 0.0 <= row["discount"] <= 0.5 and 0.0 <= row["popularity"] <= 1.0
        assert row["is_new"] == (row["age_days"] < 30)
        assert 1 <= len(row["tags"]) <= 6 and set(row["tags"]) <= set(demo._TAGS)
        assert len(row["embedding"]) == demo.EMBEDDING_DIM
        assert all(-2.0 < v < 2.0 for v in row["embedding"])
        assert row["color"] in demo._COLORS and 1 <= row["shipping_days"] <= 14


def test_rows_depend_only_on_their_index() -> None:
    assert demo.item_rows(2 * demo.CHUNK, 3 * demo.CHUNK) == ITEMS[2 * demo.CHUNK:3 * demo.CHUNK]
    assert demo.user_rows(0, 10) == USERS[:10]
    assert demo.item_rows(0, 100, seed=7) != ITEMS[:100]
    with pytest.raises(ValueError, match="chunk"):
        demo.item_rows(5, 10)


def test_run_prints_one_config_line_and_stores_rows_as_generated(tmp_path: Path) -> None:
    directory = tmp_path / "a-rather-long-directory-name-for-a-narrow-terminal"
    out = io.StringIO()
    demo.run(directory, users=60, items=1500, fetch_items=50, console=Console(file=out, width=40))
    text = out.getvalue()
    lines = [line for line in text.splitlines() if "config:" in line]
    assert len(lines) == 1, text
    match = re.fullmatch(r"dataset ready in (\S+) \(60 users, 1,500 items, \d+\.\d s\); "
                         r"config: (\S+)", lines[0])
    assert match, lines[0]
    assert Path(match[1]) == directory and Path(match[2]) == directory / "featuredao.json"
    assert json.loads(Path(match[2]).read_text())["views"][0]["name"] == "user_profile"
    assert "degraded: none" in text and "items with features: 50/50" in text

    runtime = factory.build(load(directory / "featuredao.json"))
    try:
        for name, expected in (("user_profile", demo.user_rows(0, 60)),
                               ("item_features", demo.item_rows(0, 1500))):
            dao = runtime.daos[name]
            assert list(dao.read([k for k, _ in expected])) == [row for _, row in expected]
        # A stale dataset (here: its last item changed) is rebuilt on the next run.
        items = runtime.daos["item_features"]
        assert isinstance(items, BaseDao)
        items.upsert([(1499, {**dict(expected[-1][1]), "age_days": 999_999})])
    finally:
        runtime.close()
    demo.build_dataset(directory, 60, 1500, Console(file=io.StringIO()))
    runtime = factory.build(load(directory / "featuredao.json"))
    try:
        assert runtime.daos["item_features"].read([1499])[0] == expected[-1][1]
    finally:
        runtime.close()


def test_run_shows_the_category_stage_the_derived_features_and_the_context(tmp_path: Path) -> None:
    import math

    out = io.StringIO()
    demo.run(tmp_path / "d", users=60, items=1500, fetch_items=50, console=Console(file=out, width=250))
    text = out.getvalue()
    assert 'context: {"hour": 9, "device": "ios"}; derived: log_price, price_vs_category' in text
    lines = text.splitlines()
    header = next(line for line in lines if "cat_ctr_30d" in line)
    names = [c.strip() for c in header.strip("┃ ").split("┃")]
    assert names[-3:] == ["cat_ctr_30d", "log_price", "price_vs_category"]
    categories = dict(demo.category_rows(42))
    rows = [[c.strip() for c in line.strip("│ ").split("│")] for line in lines
            if line.startswith("│") and len(line.split("│")) == len(names) + 2]
    assert len(rows) == 10
    for cells in rows:
        shown = dict(zip(names, cells, strict=True))
        item: dict[str, Any] = dict(ITEMS[int(shown["item_id"])][1])
        category = categories[item["category"]]
        # The second stage's features and the derived ones, as the demo prints them, from the rows themselves.
        assert shown["category"] == json.dumps(item["category"])
        assert shown["cat_ctr_30d"] == demo._short(category["ctr_30d"])
        assert shown["log_price"] == demo._short(math.log1p(item["price"]))
        assert shown["price_vs_category"] == demo._short(item["price"] / category["avg_price"])
