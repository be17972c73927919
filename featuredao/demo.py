"""``featuredao demo``: build an embedded SQLite dataset, fetch one user with 500 items, show the timings."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from featuredao import factory, synthetic
from featuredao.config import load
from featuredao.dao import BaseDao
from featuredao.service import FeatureService

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
        ],
        "service": {"deadline_ms": 500},
    }


def build_dataset(directory: Path, users: int, items: int, console: Console) -> Path:
    """Write the demo config and fill its SQLite database (skipped when already complete)."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg_path = directory / "featuredao.json"
    cfg_path.write_text(json.dumps(demo_config(), indent=2) + "\n", encoding="utf-8")
    runtime = factory.build(load(cfg_path))
    try:
        with Progress(console=console, transient=True) as progress:
            for name, count in (("user_profile", users), ("item_features", items)):
                dao = runtime.daos[name]
                assert isinstance(dao, BaseDao)
                dao.prepare()
                last = synthetic.key_for(dao.view, count - 1)
                if dao.read([last])[0] is not None:
                    continue  # already built
                task = progress.add_task(f"writing {count:,} rows of {name}", total=count)
                step = 5000
                for start in range(0, count, step):
                    n = min(step, count - start)
                    dao.upsert(synthetic.rows(dao.view, n, seed=42, start=start))
                    progress.advance(task, n)
    finally:
        runtime.close()
    return cfg_path


def run(directory: Path, users: int = 10_000, items: int = 100_000, fetch_items: int = 500,
        console: Console | None = None) -> None:
    """Build (once) and query the demo dataset, printing features and timings."""
    console = console or Console()
    started = time.perf_counter()
    cfg_path = build_dataset(directory, users, items, console)
    console.print(f"dataset ready in {directory} ({users:,} users, {items:,} items, "
                  f"{time.perf_counter() - started:.1f} s); config: {cfg_path}")
    with FeatureService.from_config(cfg_path) as service:
        user_id = "u42"
        item_ids = [(i * 7919) % items for i in range(fetch_items)]
        cold = service.fetch(user_id, item_ids)
        times = []
        for _ in range(20):
            result = service.fetch(user_id, item_ids)
            times.append(result.elapsed_s * 1000)

    table = Table(title=f"user {user_id}: {len(cold.user)} features")
    table.add_column("feature")
    table.add_column("value", overflow="fold")
    for name, value in cold.user.items():
        table.add_row(name, _short(value))
    console.print(table)
    shown = ["item_category", "item_brand", "item_price", "item_ctr_7d", "item_in_stock", "item_rating"]
    items_table = Table(title=f"{len(cold.items)} items x {len(cold.items[0]) if cold.items else 0} "
                              "features (first 10)")
    items_table.add_column("item_id")
    for col in shown:
        items_table.add_column(col, overflow="fold")
    for item_id, row in list(zip(cold.item_ids, cold.items, strict=True))[:10]:
        items_table.add_row(str(item_id), *(_short(row.get(c)) for c in shown))
    console.print(items_table)
    found = sum(1 for r in cold.items if r.get("item_category") is not None)
    console.print(f"items with features: {found}/{len(cold.items)}; degraded: "
                  f"{[d.to_dict() for d in cold.degraded] or 'none'}")
    console.print(f"fetch 1 user + {fetch_items} items: first call {cold.elapsed_s * 1000:.1f} ms; "
                  f"next 20 calls p50 {statistics.median(times):.1f} ms, max {max(times):.1f} ms")


def _short(value: Any) -> str:
    if isinstance(value, list) and len(value) > 6:
        return json.dumps(value[:6])[:-1] + f", ... ({len(value)} values)]"
    return json.dumps(value, ensure_ascii=False)
