"""``featuredao demo``: build an embedded SQLite dataset, fetch one user with 500 items, show the timings."""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import math
import random
import statistics
import time
from collections.abc import Callable
from operator import getitem
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from featuredao import factory
from featuredao.config import load
from featuredao.service import FeatureService
from featuredao.types import Key, Row

USER_FEATURES = {
    "age": "int", "gender": "str", "city": "str", "country": "str", "is_vip": "bool", "signup_days": "int",
    "ctr_7d": "float", "ctr_30d": "float", "cvr_7d": "float", "clicks_7d": "int", "purchases_30d": "int",
    "avg_price": "float", "active_hours": "list[int]", "tags": "list[str]", "fav_categories": "list[str]",
    "embedding": "list[float]", "device": "str", "lang": "str", "score": "float", "sessions_7d": "int",
}
ITEM_FEATURES = {
    "category": "str", "brand": "str", "price": "float", "ctr_7d": "float", "cvr_7d": "float",
    "impressions_7d": "int", "clicks_7d": "int", "rating": "float", "review_count": "int", "in_stock": "bool",
    "age_days": "int", "tags": "list[str]", "embedding": "list[float]", "title_len": "int",
    "seller_score": "float", "discount": "float", "popularity": "float", "is_new": "bool",
    "shipping_days": "int", "color": "str",
}

# -- realistic values --------------------------------------------------------------------------------
# Every row depends only on (view, index, seed): rows are generated in fixed chunks of CHUNK, each with
# its own random generator, so any slice of the dataset can be rebuilt and checked on its own.
CHUNK = 1000
EMBEDDING_DIM = 16

# (city, country, language)
_PLACES = (
    ("New York", "US", "en"), ("Los Angeles", "US", "en"), ("Chicago", "US", "en"), ("Houston", "US", "en"),
    ("Seattle", "US", "en"), ("Toronto", "CA", "en"), ("Montreal", "CA", "fr"), ("London", "GB", "en"),
    ("Manchester", "GB", "en"), ("Dublin", "IE", "en"), ("Paris", "FR", "fr"), ("Lyon", "FR", "fr"),
    ("Berlin", "DE", "de"), ("Munich", "DE", "de"), ("Hamburg", "DE", "de"), ("Vienna", "AT", "de"),
    ("Zurich", "CH", "de"), ("Amsterdam", "NL", "nl"), ("Madrid", "ES", "es"), ("Barcelona", "ES", "es"),
    ("Lisbon", "PT", "pt"), ("Milan", "IT", "it"), ("Rome", "IT", "it"), ("Stockholm", "SE", "sv"),
    ("Warsaw", "PL", "pl"), ("Mexico City", "MX", "es"), ("São Paulo", "BR", "pt"),
    ("Buenos Aires", "AR", "es"), ("Tokyo", "JP", "ja"), ("Osaka", "JP", "ja"), ("Seoul", "KR", "ko"),
    ("Shanghai", "CN", "zh"), ("Beijing", "CN", "zh"), ("Singapore", "SG", "en"), ("Mumbai", "IN", "hi"),
    ("Bangalore", "IN", "en"), ("Sydney", "AU", "en"), ("Melbourne", "AU", "en"),
)
_GENDERS = ("female", "male", "non-binary", "unknown")
_DEVICES = ("android", "ios", "web", "tablet")
# (category, median price)
_CATEGORIES = (
    ("electronics", 120.0), ("fashion", 35.0), ("home & kitchen", 30.0), ("beauty", 18.0),
    ("sports & outdoors", 40.0), ("books", 14.0), ("toys & games", 22.0), ("grocery", 6.0),
    ("health", 15.0), ("automotive", 45.0), ("pet supplies", 20.0), ("garden", 28.0),
    ("jewelry", 60.0), ("office", 12.0), ("music", 25.0), ("baby", 24.0),
)
_CATEGORY_NAMES = tuple(c for c, _ in _CATEGORIES)
_BRANDS = (
    "Northwind", "Altura", "Brightline", "Kestrel", "Lumio", "Oakridge", "Pellio", "Quanta", "Redwood & Co",
    "Solano", "Terrava", "Velora", "Zephyr", "Cobalt", "Driftwood", "Evergreen", "Fable", "Granite",
    "Harbor", "Juniper", "Kindred", "Larkspur", "Meridian", "Nimbus", "Orchard", "Pinecrest", "Sable",
    "Tandem", "Urbane", "Wildroot",
)
_TAGS = (
    "bestseller", "new-arrival", "on-sale", "eco-friendly", "handmade", "limited-edition", "premium",
    "budget", "gift-idea", "organic", "vegan", "wireless", "waterproof", "for-kids", "unisex", "vintage",
    "smart-home", "outdoor", "fitness", "travel", "minimalist", "luxury", "bundle", "refurbished",
    "seasonal", "summer", "winter", "back-to-school", "trending", "staff-pick", "free-shipping",
    "top-rated", "local-brand", "imported", "diy", "pet-friendly", "gaming", "work-from-home",
)
_COLORS = ("black", "white", "gray", "silver", "navy", "blue", "red", "green", "beige", "brown", "pink",
           "gold", "multicolor")
_SHIPPING = (1, 2, 3, 4, 5, 7, 10, 14)
_DISCOUNTS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
# A random byte's tag: tag k gets fewer bytes as k grows (a long tail of rarer tags), each at least one.
_TAG_OF_BYTE = tuple(_TAGS[int(len(_TAGS) * (b / 256) ** 1.6)] for b in range(256))
_CATEGORY_OF_BYTE = tuple(_CATEGORY_NAMES[int(len(_CATEGORY_NAMES) * (b / 256) ** 1.3)] for b in range(256))
# A random byte's hour of the day: users are active mostly around noon and in the evening.
_HOUR_WEIGHTS = (2, 1, 1, 1, 1, 2, 4, 8, 11, 10, 9, 11, 16, 13, 10, 10, 11, 14, 19, 24, 26, 23, 16, 8)
_HOUR_OF_BYTE = tuple(bisect.bisect(list(itertools.accumulate(_HOUR_WEIGHTS)),
                                    (b + 0.5) * sum(_HOUR_WEIGHTS) / 256) for b in range(256))
_MAX_CTR = 0.2
_Q = 4096  # quantiles per distribution table
_PERCENT = 100  # entries of a weighted table
_NORMAL = statistics.NormalDist()


def _table(quantile: Callable[[float], float], digits: int | None = None) -> tuple[Any, ...]:
    """A distribution's values at _Q evenly spaced probabilities: ``table[int(random() * _Q)]`` draws from
    it with one uniform number (much cheaper than ``lognormvariate`` and friends, row after row)."""
    values = (quantile((k + 0.5) / _Q) for k in range(_Q))
    return tuple(int(v) if digits is None else round(v, digits) for v in values)


def _lognormal(median: float, sigma: float, lo: float = 0.0,
               hi: float = math.inf) -> Callable[[float], float]:
    return lambda p: min(hi, max(lo, median * math.exp(sigma * _NORMAL.inv_cdf(p))))


def _age(p: float) -> float:
    """Ages 16-80, median 31, long-tailed towards older users (a log-normal cut at 80, not piled up there)."""
    top = _NORMAL.cdf(math.log((80.99 - 15) / 16) / 0.6)
    return 15 + 16 * math.exp(0.6 * _NORMAL.inv_cdf(p * top))


def _exponential(mean: float, lo: float = 0.0, hi: float = math.inf) -> Callable[[float], float]:
    return lambda p: min(hi, max(lo, -mean * math.log1p(-p)))


def _weighted(values: tuple[Any, ...], percents: tuple[int, ...]) -> tuple[Any, ...]:
    """A lookup table of _PERCENT entries drawing ``values`` with the given percentages."""
    if sum(percents) != _PERCENT:
        raise ValueError(f"percentages {percents} do not add up to {_PERCENT}")
    return tuple(v for v, w in zip(values, percents, strict=True) for _ in range(w))


class _Tables:
    """Every distribution the generators draw from, built once per process."""

    def __init__(self) -> None:
        self.ctr = _table(_lognormal(0.03, 0.6, hi=_MAX_CTR), 4)
        self.user_ctr = _table(_lognormal(0.035, 0.6, hi=_MAX_CTR), 4)
        self.cvr = _table(_lognormal(0.02, 0.7, hi=_MAX_CTR), 4)
        self.prices = tuple(_table(_lognormal(median, 0.9, lo=0.99, hi=20_000), 2)
                            for _, median in _CATEGORIES)
        self.avg_price = _table(_lognormal(30.0, 0.8), 2)
        self.impressions = _table(_lognormal(400, 1.5))
        self.reviews = _table(_lognormal(20, 1.6))
        self.age_days = _table(_exponential(400, hi=2000))
        self.signup_days = _table(_exponential(600, lo=1, hi=3650))
        self.sessions = _table(_exponential(9, hi=80))
        self.rating = _table(lambda p: 5.0 - _exponential(0.6, hi=4.0)(p), 1)
        self.seller = _table(lambda p: 5.0 - _exponential(0.35, hi=4.0)(p), 2)
        self.age = _table(_age)
        self.score = _table(lambda p: 1 - math.exp(-0.5 * math.exp(0.6 * _NORMAL.inv_cdf(p))), 4)
        self.genders = _weighted(_GENDERS, (48, 46, 2, 4))
        self.devices = _weighted(_DEVICES, (46, 34, 15, 5))
        self.shipping = _weighted(_SHIPPING, (22, 23, 18, 13, 10, 7, 4, 3))
        self.discounts = _weighted((0.0, *_DISCOUNTS), (70, 6, 7, 4, 5, 2, 3, 2, 1))


@functools.cache
def _get_tables() -> _Tables:
    return _Tables()


_Embedding = tuple[tuple[float, ...], ...]


def _embedding_table(centre: list[float], spread: float) -> _Embedding:
    """Per dimension, the 256 values a random byte maps to: ``centre`` plus normal noise, 4 decimals;
    ``list(map(getitem, table, randbytes(16)))`` then makes one embedding."""
    noise = [spread * _NORMAL.inv_cdf((b + 0.5) / 256) for b in range(256)]
    return tuple(tuple(round(c + n, 4) for n in noise) for c in centre)


@functools.cache
def _embedding_tables(seed: int) -> tuple[_Embedding, tuple[_Embedding, ...]]:
    """The users' table (centred on 0) and one per category, so items of a category cluster together."""
    rng = random.Random(f"demo/centroids/{seed}")
    items = tuple(_embedding_table([rng.gauss(0, 0.25) for _ in range(EMBEDDING_DIM)], 0.12)
                  for _ in _CATEGORIES)
    return _embedding_table([0.0] * EMBEDDING_DIM, 0.25), items


def _check_start(start: int) -> None:
    if start < 0 or start % CHUNK:
        raise ValueError(f"rows are generated in chunks of {CHUNK}: start {start} is not at a chunk's start")


def user_rows(start: int, stop: int, seed: int = 42) -> list[tuple[Key, Row]]:
    """The demo users ``start`` .. ``stop - 1`` (``start`` a multiple of CHUNK), as (key, row) pairs."""
    _check_start(start)
    t = _get_tables()
    embedding = _embedding_tables(seed)[0]
    age, genders, devices, signup, sessions_t = t.age, t.genders, t.devices, t.signup_days, t.sessions
    ctr_t, cvr_t, price_t, score_t = t.user_ctr, t.cvr, t.avg_price, t.score
    tag_of, hour_of = _TAG_OF_BYTE.__getitem__, _HOUR_OF_BYTE.__getitem__
    category_of = _CATEGORY_OF_BYTE.__getitem__
    n_places = len(_PLACES)
    out: list[tuple[Key, Row]] = []
    for chunk in range(start, stop, CHUNK):
        rng = random.Random(f"demo/user/{seed}/{chunk // CHUNK}")
        r, rb = rng.random, rng.randbytes
        for i in range(chunk, min(stop, chunk + CHUNK)):
            city, country, lang = _PLACES[int(r() * n_places)]
            ctr_30d = ctr_t[int(r() * _Q)]
            sessions = sessions_t[int(r() * _Q)]
            clicks = int(sessions * (0.5 + 5.5 * r()))
            cvr = cvr_t[int(r() * _Q)]
            out.append((f"u{i}", {
                "age": age[int(r() * _Q)], "gender": genders[int(r() * _PERCENT)],
                "city": city, "country": country, "lang": lang,
                "is_vip": r() < 0.08,
                "signup_days": signup[int(r() * _Q)],
                "ctr_7d": round(min(_MAX_CTR, ctr_30d * (0.7 + 0.6 * r())), 4),
                "ctr_30d": ctr_30d, "cvr_7d": cvr,
                "clicks_7d": clicks,
                "purchases_30d": int(clicks * 4 * cvr + r()),
                "avg_price": price_t[int(r() * _Q)],
                "active_hours": sorted(set(map(hour_of, rb(3 + int(r() * 6))))),
                "tags": list(dict.fromkeys(map(tag_of, rb(3 + int(r() * 6))))),
                "fav_categories": list(dict.fromkeys(map(category_of, rb(3)))),
                "embedding": list(map(getitem, embedding, rb(EMBEDDING_DIM))),
                "device": devices[int(r() * _PERCENT)],
                "score": score_t[int(r() * _Q)],
                "sessions_7d": sessions,
            }))
    return out


def item_rows(start: int, stop: int, seed: int = 42) -> list[tuple[Key, Row]]:
    """The demo items ``start`` .. ``stop - 1`` (``start`` a multiple of CHUNK), as (key, row) pairs."""
    _check_start(start)
    t = _get_tables()
    embeddings = _embedding_tables(seed)[1]
    prices, impressions_t, ctr_t, cvr_t, age_t = t.prices, t.impressions, t.ctr, t.cvr, t.age_days
    rating_t, reviews_t, seller_t = t.rating, t.reviews, t.seller
    discounts, shipping = t.discounts, t.shipping
    n_cat, n_brand, n_color = len(_CATEGORIES), len(_BRANDS), len(_COLORS)
    tag_of = _TAG_OF_BYTE.__getitem__
    log1p, log_1e6 = math.log1p, math.log1p(1e6)
    out: list[tuple[Key, Row]] = []
    for chunk in range(start, stop, CHUNK):
        rng = random.Random(f"demo/item/{seed}/{chunk // CHUNK}")
        r, rb = rng.random, rng.randbytes
        for i in range(chunk, min(stop, chunk + CHUNK)):
            c = int(r() * n_cat)
            impressions = impressions_t[int(r() * _Q)]
            ctr = ctr_t[int(r() * _Q)]
            age_days = age_t[int(r() * _Q)]
            out.append((i, {
                "category": _CATEGORY_NAMES[c],
                "brand": _BRANDS[int(r() * n_brand)],
                "price": prices[c][int(r() * _Q)],
                "ctr_7d": ctr,
                "cvr_7d": cvr_t[int(r() * _Q)],
                "impressions_7d": impressions,
                "clicks_7d": int(impressions * ctr),
                "rating": rating_t[int(r() * _Q)],
                "review_count": reviews_t[int(r() * _Q)],
                "in_stock": r() < 0.92,
                "age_days": age_days,
                "tags": list(dict.fromkeys(map(tag_of, rb(2 + int(r() * 5))))),
                "embedding": list(map(getitem, embeddings[c], rb(EMBEDDING_DIM))),
                "title_len": 20 + int(r() * 100),
                "seller_score": seller_t[int(r() * _Q)],
                "discount": discounts[int(r() * _PERCENT)],
                "popularity": round(min(1.0, log1p(impressions) / log_1e6), 4),
                "is_new": age_days < 30,
                "shipping_days": shipping[int(r() * _PERCENT)],
                "color": _COLORS[int(r() * n_color)],
            }))
    return out


GENERATORS: dict[str, Callable[[int, int, int], list[tuple[Key, Row]]]] = {
    "user_profile": user_rows, "item_features": item_rows,
}


def demo_config(db: str = "features.db") -> dict[str, Any]:
    """The demo's configuration: one SQLite source, a user view and an item view."""
    return {
        "sources": {"local": {"type": "sqlite", "path": db, "pool_size": 4}},
        "views": [
            {"name": "user_profile", "entity": "user", "source": "local", "table": "user_profile",
             "key": "user_id", "features": dict(USER_FEATURES),
             "defaults": {"age": 0, "ctr_7d": 0.0, "is_vip": False}, "timeout_ms": 200},
            {"name": "item_features", "entity": "item", "source": "local", "table": "item_features",
             "key": "item_id", "key_type": "int", "features": dict(ITEM_FEATURES), "prefix": "item_",
             "defaults": {"price": 0.0, "ctr_7d": 0.0}, "timeout_ms": 200},
            # Keyed by each item's category (a second stage): one read of the distinct categories.
            {"name": "category_stats", "entity": "item", "source": "local", "table": "category_stats",
             "key": "category", "key_from": "item.item_category", "features": dict(CATEGORY_FEATURES),
             "prefix": "cat_", "defaults": {"ctr_30d": 0.0}, "timeout_ms": 200},
        ],
        "context": {"hour": {"type": "int", "default": 12}, "device": {"type": "str", "default": "web"}},
        "derived": [
            {"name": "log_price", "entity": "item", "op": "log1p", "input": "item_price", "default": 0.0},
            {"name": "price_vs_category", "entity": "item", "op": "ratio",
             "inputs": ["item_price", "cat_avg_price"], "default": 1.0},
        ],
        "service": {"deadline_ms": 500},
    }


CATEGORY_FEATURES = {"avg_price": "float", "ctr_30d": "float", "items": "int"}


def category_rows(seed: int) -> list[tuple[str, dict[str, Any]]]:
    """One row per category: its median price, a 30-day CTR and how many items it has."""
    rng = random.Random(seed)
    return [(name, {"avg_price": median, "ctr_30d": round(rng.uniform(0.01, 0.12), 4),
                    "items": rng.randint(500, 20_000)}) for name, median in _CATEGORIES]


def build_dataset(directory: Path, users: int, items: int, console: Console, seed: int = 42) -> Path:
    """Write the demo config and fill its SQLite database (skipped when already complete and current)."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg_path = directory / "featuredao.json"
    cfg_path.write_text(json.dumps(demo_config(), indent=2) + "\n", encoding="utf-8")
    runtime = factory.build(load(cfg_path))
    try:
        with Progress(console=console, transient=True) as progress:
            for name, count in (("user_profile", users), ("item_features", items)):
                dao = runtime.daos[name]
                dao.prepare()
                if count <= 0:
                    continue
                generate = GENERATORS[name]
                # Rows are deterministic: when the last one is stored as generated, so is the rest.
                last = count - 1
                key, expected = generate(last - last % CHUNK, count, seed)[-1]
                if dao.read([key])[0] == expected:
                    continue
                task = progress.add_task(f"writing {count:,} rows of {name}", total=count)
                for start in range(0, count, CHUNK):
                    # Rows made here have exactly the view's types: no per-value coercion needed.
                    chunk = generate(start, min(count, start + CHUNK), seed)
                    dao.write_checked(chunk)
                    progress.advance(task, len(chunk))
            categories = runtime.daos["category_stats"]
            categories.prepare()
            categories.upsert(category_rows(seed))
    finally:
        runtime.close()
    return cfg_path


def run(directory: Path, users: int = 10_000, items: int = 100_000, fetch_items: int = 500,
        console: Console | None = None) -> None:
    """Build (once) and query the demo dataset, printing features and timings."""
    console = console or Console()
    started = time.perf_counter()
    cfg_path = build_dataset(directory, users, items, console)
    # One unwrapped line whatever the terminal width, the path printed as is (no markup, no highlighting).
    console.print(f"dataset ready in {directory} ({users:,} users, {items:,} items, "
                  f"{time.perf_counter() - started:.1f} s); config: {cfg_path}",
                  soft_wrap=True, markup=False, highlight=False)
    with FeatureService.from_config(cfg_path) as service:
        user_id = "u42"
        item_ids = [(i * 7919) % items for i in range(fetch_items)]
        context = {"hour": 9, "device": "ios"}
        cold = service.fetch(user_id, item_ids, context=context)
        times = []
        for _ in range(20):
            result = service.fetch(user_id, item_ids, context=context)
            times.append(result.elapsed_s * 1000)

    table = Table(title=f"user {user_id}: {len(cold.user)} features")
    table.add_column("feature")
    table.add_column("value", overflow="fold")
    for name, value in cold.user.items():
        table.add_row(name, _short(value))
    console.print(table)
    shown = ["item_category", "item_brand", "item_price", "item_ctr_7d", "item_rating", "cat_ctr_30d",
             "log_price", "price_vs_category"]
    items_table = Table(title=f"{len(cold.items)} items x {len(cold.items[0]) if cold.items else 0} "
                              "features (first 10)")
    items_table.add_column("item_id")
    for col in shown:
        items_table.add_column(col.removeprefix("item_"), overflow="fold")
    for item_id, row in list(zip(cold.item_ids, cold.items, strict=True))[:10]:
        items_table.add_row(str(item_id), *(_short(row.get(c)) for c in shown))
    console.print(items_table)
    found = sum(1 for r in cold.items if r.get("item_category") is not None)
    console.print(f"context: {json.dumps(cold.context)}; derived: log_price, price_vs_category; "
                  f"category features keyed by item_category", soft_wrap=True, markup=False)
    console.print(f"items with features: {found}/{len(cold.items)}; degraded: "
                  f"{[d.to_dict() for d in cold.degraded] or 'none'}", soft_wrap=True, markup=False)
    console.print(f"fetch 1 user + {fetch_items} items: first call {cold.elapsed_s * 1000:.1f} ms; "
                  f"next 20 calls p50 {statistics.median(times):.1f} ms, max {max(times):.1f} ms",
                  soft_wrap=True)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and len(value) > 6:
        return json.dumps(value[:6])[:-1] + f", ... ({len(value)} values)]"
    return json.dumps(value, ensure_ascii=False)
