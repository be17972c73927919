"""featuredao's ClickHouse adapter versus the same query by hand with clickhouse-driver, one throwaway server.

Run: ``.venv/bin/python benchmarks/bench_clickhouse.py [--quick] [--out benchmarks/results/clickhouse.md]``

A wide ReplacingMergeTree table with 20 features (ints, floats, strings, a bool, two lists) and
``ROWS`` keys is written through the adapter. Each request draws one key list (a tenth of the keys
absent) and reads it both ways, the order alternating per request:

* ``featuredao``: ``dao.read(keys, timeout_s=1)``: one chunk (batch_size 1000), the deadline enforced
  by the server and watched from progress packets, values coerced, rows realigned in input order;
* ``by hand``: one ``Client.execute`` of the very statement the DAO sends (``FINAL``, ``IN %(keys)s``),
  then ``{key: dict(zip(columns, row))}`` - the least a caller would do with the rows.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

from clickhouse_driver import Client

from featuredao import factory
from featuredao.testing.servers import ClickHouseServer

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 100, 500, 1000)
ROWS = 50_000
FEATURES = {
    **{f"i{n}": "int" for n in range(6)}, **{f"x{n}": "float" for n in range(8)},
    **{f"s{n}": "str" for n in range(3)}, "flag": "bool", "ids": "list[int]", "vec": "list[float]",
}


def row(i: int) -> dict[str, Any]:
    """Feature values of key number i; about one value in twenty is null."""
    rnd = random.Random(i)
    out: dict[str, Any] = {}
    for name, ftype in FEATURES.items():
        if rnd.random() < 0.05:
            out[name] = None
        elif ftype == "int":
            out[name] = rnd.randrange(-(10**9), 10**9)
        elif ftype == "float":
            out[name] = rnd.random() * 100
        elif ftype == "str":
            out[name] = f"cat-{rnd.randrange(1000)}"
        elif ftype == "bool":
            out[name] = rnd.random() < 0.5
        elif ftype == "list[int]":
            out[name] = [rnd.randrange(10**6) for _ in range(5)]
        else:
            out[name] = [rnd.random() for _ in range(8)]
    return out


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--requests", type=int, default=400, help="requests per batch size")
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    args = parser.parse_args()
    requests = 40 if args.quick else args.requests

    with ClickHouseServer() as server:
        runtime = factory.build({
            "sources": {"ch": {"type": "clickhouse", "host": server.host, "port": server.port,
                               "user": server.user, "password": server.password,
                               "database": server.database, "pool_size": 4, "batch_size": 1000}},
            "views": [{"name": "items", "entity": "item", "source": "ch", "table": "bench_items",
                       "key": "item_id", "features": FEATURES, "defaults": {"i0": 0, "x0": 0.0}}],
        })
        dao: Any = runtime.daos["items"]
        assert dao.source.type_name == "clickhouse"
        dao.prepare()
        keys = [f"item-{i:07d}" for i in range(ROWS)]
        for start in range(0, ROWS, 10_000):
            dao.upsert((keys[i], row(i)) for i in range(start, min(ROWS, start + 10_000)))
        hand = Client(server.host, port=server.port, user=server.user, password=server.password,
                      database=server.database)
        hand.execute("OPTIMIZE TABLE bench_items FINAL")
        fields = list(FEATURES)
        sql, _ = dao._select(fields)  # the very statement the DAO sends
        columns = [*fields, "_nulls"]

        def by_hand(batch: list[str]) -> object:
            rows = hand.execute(sql, {"keys": tuple(batch)})
            return {r[0]: dict(zip(columns, r[1:], strict=True)) for r in rows}

        def featuredao(batch: list[str]) -> object:
            return dao.read(batch, timeout_s=1.0)

        paths: list[tuple[str, Callable[[list[str]], object]]] = [("featuredao", featuredao),
                                                                  ("by hand", by_hand)]
        rnd = random.Random(42)
        results: list[tuple[int, dict[str, list[float]]]] = []
        for size in BATCHES:
            times: dict[str, list[float]] = {name: [] for name, _ in paths}
            for n in range(requests + 20):
                batch = [keys[rnd.randrange(ROWS)] if rnd.random() < 0.9 else f"absent-{rnd.random()}"
                         for _ in range(size)]
                order = paths if n % 2 == 0 else paths[::-1]
                for name, call in order:
                    started = time.perf_counter()
                    call(batch)
                    if n >= 20:  # the first requests warm caches on both sides
                        times[name].append((time.perf_counter() - started) * 1000)
            results.append((size, times))
            print(f"batch {size}: featuredao p50 {statistics.median(times['featuredao']):.3f} ms, "
                  f"by hand p50 {statistics.median(times['by hand']):.3f} ms", flush=True)
        hand.disconnect()
        server_version = dao.source.query("SELECT version()", None, 5.0)[0][0]
        runtime.close()

    lines = [
        "# ClickHouse adapter benchmark",
        "",
        f"`benchmarks/bench_clickhouse.py`, {requests} requests per batch size after 20 warm-up requests, "
        "the two paths interleaved (order alternating per request).",
        f"ClickHouse {server_version} (throwaway server, 127.0.0.1), clickhouse-driver "
        f"{version('clickhouse-driver')}, Python {platform.python_version()}, {platform.machine()}, "
        f"{ROWS} rows x 20 features (6 int, 8 float, 3 str, 1 bool, 2 lists), ~10% of keys absent.",
        "",
        "| batch | featuredao p50 ms | featuredao p99 ms | by hand p50 ms | by hand p99 ms "
        "| p50 ratio | p99 ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size, times in results:
        f50, f99 = pct(times["featuredao"], 0.5), pct(times["featuredao"], 0.99)
        h50, h99 = pct(times["by hand"], 0.5), pct(times["by hand"], 0.99)
        lines.append(f"| {size} | {f50:.3f} | {f99:.3f} | {h50:.3f} | {h99:.3f} | {f50 / h50:.2f}x "
                     f"| {f99 / h99:.2f}x |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
