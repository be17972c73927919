"""Cache benchmark: 500 items x 20 features through FeatureService, from L1, from L2, mixed, and uncached.

Starts two throwaway Redis servers (the primary store, hash layout, and the shared L2 tier), seeds
rows, then times ``service.fetch(None, keys)`` per request, the four modes interleaved:

    (a) every key an L1 hit        (b) every key an L2 hit (no L1)
    (c) 80% L1 / 15% L2 / 5% miss  (d) no cache: straight to the primary store

and prints p50/p99 in ms and the ratio of each p50 to (d)'s.

    .venv/bin/python benchmarks/bench_cache.py [--requests 200] [--layout hash|msgpack] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import redis

from featuredao import FeatureService, build, synthetic
from featuredao.cache import flush_background
from featuredao.demo import ITEM_FEATURES
from featuredao.testing.servers import RedisServer

BATCH = 500


def view(name: str, layout: str, cache: dict[str, Any] | None) -> dict[str, Any]:
    options = {"layout": "hash"} if layout == "hash" else {"layout": "string", "encoding": layout}
    out: dict[str, Any] = {"name": name, "entity": "item", "source": "store", "table": "items", "key": "id",
                           "key_type": "int", "features": dict(ITEM_FEATURES), "timeout_ms": 5000,
                           "options": options}
    if cache is not None:
        out["cache"] = cache
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--layout", default="hash", choices=["hash", "msgpack"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    n = args.requests
    l1_count, l2_count, miss_count = 400, 75, 25
    rows_needed = l1_count + (l2_count + miss_count) * n + BATCH
    store, shared = RedisServer().start(), RedisServer().start()
    try:
        sources = {"store": {"type": "redis", "host": store.host, "port": store.port, "pool_size": 4},
                   "shared": {"type": "redis", "host": shared.host, "port": shared.port, "pool_size": 4}}
        l1 = {"ttl_s": 3600, "max_entries": 1_000_000}
        l2 = {"source": "shared", "ttl_s": 3600}
        configs = {
            "a_l1": {"l1": l1},
            "b_l2": {"l2": l2},
            "c_mixed": {"l1": l1, "l2": l2},
            "d_none": None,
        }
        views = {name: view(name, args.layout, cache) for name, cache in configs.items()}
        # Each mode is its own service holding one view, so every fetch reads exactly that view.
        cfg = {"sources": sources, "views": [views["d_none"]], "service": {"deadline_ms": 5000}}
        runtime = build(cfg)
        seed_view = runtime.daos["d_none"]
        print(f"seeding {rows_needed:,} rows x {len(ITEM_FEATURES)} features ...", flush=True)
        for start in range(0, rows_needed, 5000):
            count = min(5000, rows_needed - start)
            seed_view.upsert(synthetic.rows(seed_view.view, count, seed=7, start=start))
        runtime.close()

        def service(name: str) -> FeatureService:
            return FeatureService.from_config({**cfg, "views": [views[name]]})

        services = {name: service(name) for name in configs}
        hot = list(range(l1_count))
        all_hot = list(range(BATCH))
        services["a_l1"].fetch(None, all_hot)           # L1 holds the whole batch
        services["b_l2"].fetch(None, all_hot)           # L2 holds it (b has no L1)
        services["c_mixed"].fetch(None, hot)            # L1 (and L2) hold the 400 hot keys
        # L2 alone holds the keys c will read as L2 hits: fill it through another instance.
        filler = service("c_mixed")
        warm_start = l1_count + BATCH
        filler.fetch(None, list(range(warm_start, warm_start + l2_count * n)))
        flush_background()  # L2 is written off the request path: wait for it before measuring
        filler.close()
        # Misses are keys nobody read: they exist in the store but in no cache.
        miss_start = warm_start + l2_count * n

        def keys_for(mode: str, i: int) -> list[int]:
            if mode != "c_mixed":
                return all_hot
            l2_keys = list(range(warm_start + i * l2_count, warm_start + (i + 1) * l2_count))
            misses = list(range(miss_start + i * miss_count, miss_start + (i + 1) * miss_count))
            return hot + l2_keys + misses

        times: dict[str, list[float]] = {m: [] for m in configs}
        calls: dict[str, Callable[[list[int]], Any]] = {m: (lambda k, s=s: s.fetch(None, k))
                                                         for m, s in services.items()}
        for i in range(n):
            order = list(configs)[i % 4:] + list(configs)[:i % 4]  # rotate who goes first
            for mode in order:
                keys = keys_for(mode, i)
                started = time.perf_counter()
                result = calls[mode](keys)
                times[mode].append((time.perf_counter() - started) * 1000)
                assert not result.degraded and len(result.items) == BATCH
        for s in services.values():
            s.close()
        client = redis.Redis(host=shared.host, port=shared.port)
        l2_keys = client.dbsize()
        client.close()
    finally:
        store.stop()
        shared.stop()

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    base = statistics.median(times["d_none"])
    label = {"a_l1": "(a) all L1 hits", "b_l2": "(b) all L2 hits", "c_mixed": "(c) 80/15/5 L1/L2/miss",
             "d_none": "(d) no cache"}
    lines = [
        f"Cache benchmark: {BATCH} items x {len(ITEM_FEATURES)} features per request, {n} requests per mode, "
        f"interleaved; primary store Redis ({args.layout} layout), L2 a second Redis ({l2_keys:,} keys).",
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, redis-py "
        f"{redis.__version__}, load average {os.getloadavg()[0]:.1f}.",
        "",
        "| mode | p50 ms | p99 ms | speed-up vs (d) (p50) |",
        "|---|---:|---:|---:|",
    ]
    for mode in configs:
        p50 = statistics.median(times[mode])
        lines.append(f"| {label[mode]} | {p50:.2f} | {pct(times[mode], 0.99):.2f} | {base / p50:.1f}x |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
