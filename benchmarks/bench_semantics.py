"""What a second stage and five derived features cost: 500 items with them against the same request without.

Embedded SQLite (no server). Both services read the same user and item views; the full one also has a
category view keyed by each item's category (a second stage) and five derived features (log1p, ratio,
bucketize, cross, hash_bucket). Requests alternate between the two, same keys; p50/p99 and the ratio.

    .venv/bin/python benchmarks/bench_semantics.py [--requests 300]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from featuredao import FeatureService, build

ITEMS = 20_000
BATCH = 500
CATEGORIES = 50


def config(path: Path, full: bool) -> dict[str, Any]:
    source = {"type": "sqlite", "path": str(path), "pool_size": 4}
    views: list[dict[str, Any]] = [
        {"name": "users", "entity": "user", "source": "local", "table": "users", "key": "user_id",
         "features": {"city": "str", "age": "int"}, "prefix": "u_", "timeout_ms": 2000},
        {"name": "items", "entity": "item", "source": "local", "table": "items", "key": "item_id",
         "key_type": "int", "features": {"category": "str", "price": "float", "ctr": "float"},
         "timeout_ms": 2000},
    ]
    cfg: dict[str, Any] = {"sources": {"local": source}, "views": views,
                           "context": {"hour": {"type": "int", "default": 0}},
                           "service": {"deadline_ms": 5000}}
    if full:
        views.append({"name": "categories", "entity": "item", "source": "local", "table": "categories",
                      "key": "name", "key_from": "item.category", "features": {"avg_price": "float"},
                      "prefix": "cat_", "timeout_ms": 2000})
        cfg["derived"] = [
            {"name": "log_price", "entity": "item", "op": "log1p", "input": "price", "default": 0.0},
            {"name": "price_ratio", "entity": "item", "op": "ratio", "inputs": ["price", "cat_avg_price"],
             "default": 1.0},
            {"name": "ctr_bucket", "entity": "item", "op": "bucketize", "input": "ctr",
             "boundaries": [0.01, 0.05, 0.1]},
            {"name": "city_x_category", "entity": "item", "op": "cross",
             "inputs": ["user.u_city", "category"]},
            {"name": "item_hash", "entity": "item", "op": "hash_bucket", "input": "item.item_id",
             "buckets": 1000},
        ]
    return cfg


def seed(path: Path) -> None:
    runtime = build(config(path, full=True))
    rng = random.Random(3)
    try:
        for dao in runtime.daos.values():
            dao.prepare()
        runtime.daos["users"].upsert((f"u{i}", {"city": f"city{i % 40}", "age": 20 + i % 50})
                                     for i in range(100))
        runtime.daos["items"].upsert((i, {"category": f"cat{i % CATEGORIES}", "price": rng.uniform(1, 200),
                                          "ctr": rng.uniform(0, 0.2)}) for i in range(ITEMS))
        runtime.daos["categories"].upsert((f"cat{c}", {"avg_price": 50.0 + c}) for c in range(CATEGORIES))
    finally:
        runtime.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "semantics.db"
        seed(path)
        plain = FeatureService.from_config(config(path, full=False))
        full = FeatureService.from_config(config(path, full=True))
        times: dict[str, list[float]] = {"plain": [], "full": []}
        rng = random.Random(5)
        for r in range(args.requests + 10):
            user, items = f"u{rng.randrange(100)}", rng.sample(range(ITEMS), BATCH)
            for name, service in (("plain", plain), ("full", full)) if r % 2 else (("full", full),
                                                                                  ("plain", plain)):
                started = time.perf_counter()
                result = service.fetch(user, items, context={"hour": 9})
                took = time.perf_counter() - started
                assert not result.degraded, result.degraded
                if r >= 10:
                    times[name].append(took * 1000)
        plain.close()
        full.close()

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    p50 = {k: statistics.median(v) for k, v in times.items()}
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, {args.requests} requests each, "
          f"1 user + {BATCH} items, SQLite")
    print("| request | p50 ms | p99 ms |")
    print("| --- | ---: | ---: |")
    print(f"| user + item views | {p50['plain']:.2f} | {pct(times['plain'], 0.99):.2f} |")
    print(f"| + category stage + 5 derived | {p50['full']:.2f} | {pct(times['full'], 0.99):.2f} |")
    extra = p50["full"] / p50["plain"] - 1
    print(f"\ncost of the second stage and the derived features at p50: {extra:+.0%}")


if __name__ == "__main__":
    main()
