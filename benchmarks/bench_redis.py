"""Redis adapter benchmark: featuredao versus a hand-written redis-py pipeline, per layout and batch size.

Starts its own throwaway Redis, seeds 50-feature rows (40 float, 5 int, 5 str) in every layout, then
times ``dao.read(keys)`` and a hand-written redis-py read that decodes to the same Python dicts,
interleaved on the same random keys, and prints a Markdown table (p50/p99 in ms, ratio of p50s).

    .venv/bin/python benchmarks/bench_redis.py [--iterations 300] [--out benchmarks/results/redis.md]
"""

from __future__ import annotations

import argparse
import functools
import gc
import platform
import random
import time
from collections.abc import Callable
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]
import orjson
import redis

from featuredao import FeatureService, factory
from featuredao.testing.servers import RedisServer

ROWS = 20_000
BATCHES = (1, 100, 500, 1000)
FEATURES = {**{f"f{i}": "float" for i in range(40)}, **{f"i{i}": "int" for i in range(5)},
            **{f"s{i}": "str" for i in range(5)}}
LAYOUTS: dict[str, dict[str, Any]] = {
    "hash": {"layout": "hash"},
    "msgpack": {"layout": "string", "encoding": "msgpack"},
    "json": {"layout": "string", "encoding": "json"},
    "csv": {"layout": "string", "encoding": "csv"},
}
FIELDS = list(FEATURES)
CAST: dict[str, Callable[[Any], Any]] = {"float": float, "int": int, "str": bytes.decode}
CASTS = [CAST[t] for t in FEATURES.values()]
TEXT_CAST: dict[str, Callable[[str], Any]] = {f: {"float": float, "int": int, "str": str}[t]
                                               for f, t in FEATURES.items()}


def make_row(rng: random.Random) -> dict[str, Any]:
    """One row: 40 floats, 5 ints, 5 short category strings."""
    row: dict[str, Any] = {f"f{i}": rng.random() * 100 for i in range(40)}
    row.update({f"i{i}": rng.randrange(10**9) for i in range(5)})
    row.update({f"s{i}": f"cat_{rng.randrange(1000)}" for i in range(5)})
    return row


def baselines(client: Any, tables: dict[str, str]) -> dict[str, Callable[[list[str]], list[Any]]]:
    """What an engineer would write by hand with redis-py: one pipeline or MGET, decode to dicts."""

    def hash_read(keys: list[str]) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for k in keys:
            pipe.hmget(f"{tables['hash']}:{k}", FIELDS)
        out: list[Any] = []
        for values in pipe.execute():
            if values.count(None) == len(values):
                out.append(None)
            else:
                out.append({f: None if v is None else c(v)
                            for f, c, v in zip(FIELDS, CASTS, values, strict=True)})
        return out

    def msgpack_read(keys: list[str]) -> list[Any]:
        values = client.mget([f"{tables['msgpack']}:{k}" for k in keys])
        return [None if v is None else msgpack.unpackb(v) for v in values]

    def json_read(keys: list[str]) -> list[Any]:
        values = client.mget([f"{tables['json']}:{k}" for k in keys])
        return [None if v is None else orjson.loads(v) for v in values]

    def csv_read(keys: list[str]) -> list[Any]:
        out: list[Any] = []
        for v in client.mget([f"{tables['csv']}:{k}" for k in keys]):
            if v is None:
                out.append(None)
                continue
            pairs = dict(p.split(":", 1) for p in v.decode().split(","))
            out.append({f: TEXT_CAST[f](x) for f, x in pairs.items()})
        return out

    return {"hash": hash_read, "msgpack": msgpack_read, "json": json_read, "csv": csv_read}


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300, help="timed reads per cell and side")
    parser.add_argument("--pool-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time, steadier on a busy machine (chunks run inline)")
    parser.add_argument("--through", choices=("dao", "fetch"), default="dao",
                        help="fetch: the whole request path, FeatureService.fetch(None, keys), one view")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    args = parser.parse_args()
    layouts = args.layouts.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    rng = random.Random(42)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    with RedisServer() as server:
        tables = {name: f"bench_{name}" for name in LAYOUTS}
        cfg: dict[str, Any] = {
            "sources": {"redis": {"type": "redis", "host": server.host, "port": server.port,
                                  "pool_size": args.pool_size, "batch_size": args.batch_size}},
            "views": [{"name": name, "entity": "item", "source": "redis", "table": tables[name], "key": "id",
                       "prefix": f"{name}_", "features": FEATURES, "options": LAYOUTS[name],
                       "timeout_ms": 5000}
                      for name in layouts],
            # Time enough for the largest batch of the slowest layout: a degraded answer is not a read.
            "service": {"deadline_ms": 5000},
        }
        runtime = factory.build(cfg)
        # Same protocol as the adapter (RESP2), so the ratio measures featuredao, not a driver setting.
        client = redis.Redis(host=server.host, port=server.port, protocol=2)
        hand = baselines(client, tables)
        rows = [make_row(rng) for _ in range(ROWS)]
        for name in layouts:
            runtime.daos[name].upsert((str(i), row) for i, row in enumerate(rows))
        # Like a serving process after start-up: the seed data must not make every GC pass slower.
        del rows
        gc.collect()
        gc.freeze()
        lines = ["| layout | batch | featuredao p50 | p99 | redis-py p50 | p99 | ratio p50 |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        p50s: dict[tuple[str, int], float] = {}
        for name in layouts:
            dao = runtime.daos[name]
            # The one view unprefixed: its rows are what the hand-written read returns.
            service = FeatureService.from_config({**cfg, "views": [{**v, "prefix": ""} for v in cfg["views"]
                                                                  if v["name"] == name]})
            read: Callable[[list[str]], Any] = dao.read if args.through == "dao" else \
                functools.partial(service.fetch, None)
            for batch in batches:
                # A few absent keys in every batch, like real candidate lists.
                keysets = [[str(rng.randrange(int(ROWS * 1.02))) for _ in range(batch)]
                           for _ in range(args.iterations + 10)]
                ours: list[float] = []
                theirs: list[float] = []
                degraded = 0
                for i, keys in enumerate(keysets):
                    order = (0, 1) if i % 2 == 0 else (1, 0)
                    for side in order:
                        started = clock()
                        answer = read(keys) if side == 0 else hand[name](keys)
                        took = clock() - started
                        if i >= 10:  # warm-up
                            (ours if side == 0 else theirs).append(took)
                        degraded += side == 0 and bool(getattr(answer, "degraded", None))
                    if i == 0:
                        assert list(dao.read(keys)) == hand[name](keys), f"{name}: results differ"
                mine, base = percentile(ours, 0.5), percentile(theirs, 0.5)
                p50s[(name, batch)] = mine
                lines.append(f"| {name} | {batch} | {mine * 1e3:.3f} | {percentile(ours, 0.99) * 1e3:.3f} | "
                             f"{base * 1e3:.3f} | {percentile(theirs, 0.99) * 1e3:.3f} | {mine / base:.2f} |")
                print(lines[-1], flush=True)
                if degraded:  # a degraded answer (defaults after a timeout) is not a read: say so
                    print(f"warning: {name} batch {batch}: {degraded} degraded answers", flush=True)
        if "hash" in layouts and "msgpack" in layouts and 100 in batches:
            speedup = p50s[("hash", 100)] / p50s[("msgpack", 100)]
            lines.append("")
            lines.append(f"msgpack layout vs hash layout at batch 100 x 50 features: {speedup:.1f}x faster "
                         "(featuredao p50)")
            print(lines[-1])
            service.close()
        runtime.close()
        client.close()
    header = [f"Python {platform.python_version()}, redis-py {redis.__version__}, msgpack "
              f"{'.'.join(map(str, msgpack.version))}, orjson {orjson.__version__}; "
              f"pool_size={args.pool_size}, batch_size={args.batch_size}, {args.iterations} reads per cell, "
              f"{args.clock} clock, through {args.through}", ""]
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write("\n".join([*header, *lines]) + "\n")


if __name__ == "__main__":
    main()
