"""Many views on one source: fetch latency against the number of views (10, 50, 200) and the pool size.

Embedded SQLite (no server). Each view is a table of 10 features; a request asks for 100 items from
every view. The baseline is the same reads written by hand with ``sqlite3``: one ``IN (...)`` SELECT
per view on one connection, rows decoded to dicts. Both run in the same process, interleaved request
by request, and the degraded views per request are counted (the deadline is generous: none should
degrade for lack of connections).

    .venv/bin/python benchmarks/bench_many_views.py [--requests 60] [--views 10,50,200] [--pools 1,2,4,8]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from featuredao import FeatureService, build

FEATURES = {f"f{i}": "float" if i % 2 else "int" for i in range(10)}
ITEMS = 5000
BATCH = 100


def config(path: Path, views: int, pool: int) -> dict[str, Any]:
    return {
        "sources": {"store": {"type": "sqlite", "path": str(path), "pool_size": pool}},
        "views": [{"name": f"v{i}", "entity": "item", "source": "store", "table": f"t{i}", "key": "id",
                   "key_type": "int", "features": FEATURES, "prefix": f"v{i}_", "timeout_ms": 1000}
                  for i in range(views)],
        "service": {"deadline_ms": 5000, "max_workers": 16},
    }


def seed(path: Path, views: int) -> None:
    runtime = build(config(path, views, 1))
    try:
        for n, dao in enumerate(runtime.daos.values()):
            dao.prepare()  # type: ignore[attr-defined]
            dao.upsert([(i, {f: (i * n) % 97 if FEATURES[f] == "int" else i / 7 for f in FEATURES})
                        for i in range(0, ITEMS, 2)])
    finally:
        runtime.close()


def by_hand(conn: sqlite3.Connection, views: int, keys: list[int]) -> list[dict[str, Any]]:
    cols = ", ".join(["id", *FEATURES])
    marks = ", ".join("?" * len(keys))
    out = []
    for i in range(views):
        rows = conn.execute(f"SELECT {cols} FROM t{i} WHERE id IN ({marks})", keys).fetchall()
        found = {r[0]: dict(zip(FEATURES, r[1:], strict=True)) for r in rows}
        out.append({k: found.get(k) for k in keys})
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--views", default="10,50,200")
    parser.add_argument("--pools", default="1,2,4,8")
    args = parser.parse_args()
    print("| views | pool_size | fetch p50 ms | fetch p99 ms | by hand p50 ms | ratio p50 "
          "| degraded views/request |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for views in (int(v) for v in args.views.split(",")):
            path = Path(tmp) / f"views{views}.db"
            seed(path, views)
            conn = sqlite3.connect(path, check_same_thread=False)
            for pool in (int(p) for p in args.pools.split(",")):
                service = FeatureService.from_config(config(path, views, pool))
                ours: list[float] = []
                hand: list[float] = []
                degraded = []
                for r in range(args.requests + 5):
                    keys = list(range(r * 37 % (ITEMS - BATCH), r * 37 % (ITEMS - BATCH) + BATCH))
                    t0 = time.perf_counter()
                    result = service.fetch(None, keys)
                    t1 = time.perf_counter()
                    by_hand(conn, views, keys)
                    t2 = time.perf_counter()
                    if r >= 5:  # warm-up: connections opened, statements cached
                        ours.append(t1 - t0)
                        hand.append(t2 - t1)
                        degraded.append(len({d.view for d in result.degraded}))
                service.close()
                print(f"| {views} | {pool} | {pct(ours, 0.5):.1f} | {pct(ours, 0.99):.1f} | "
                      f"{pct(hand, 0.5):.1f} | {pct(ours, 0.5) / pct(hand, 0.5):.2f} | "
                      f"{statistics.mean(degraded):.1f} |")
            conn.close()


if __name__ == "__main__":
    main()
