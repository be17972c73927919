"""Sync benchmark: a full pass of N rows x 20 features from each source into Redis, rows/s and peak memory.

Sources: the embedded SQLite, MySQL (a throwaway MariaDB), PostgreSQL (the hologres adapter) and
ClickHouse, each started by the benchmark (``--sources`` picks some). Starts its own throwaway Redis.
For each source and size, a fresh process seeds the SQLite source, and another fresh
process runs one full pass of ``SyncEngine`` (msgpack string layout in Redis) and reports wall time,
rows/s and its peak RSS (``ru_maxrss``) next to the RSS it had before the pass: memory is bounded by the
chunk size, so the peak should not grow with the row count.

    .venv/bin/python benchmarks/bench_sync.py [--sizes 50000,200000] [--batch 2000] \\
        [--sources sqlite,mysql,postgres,clickhouse] [--out benchmarks/results/sync.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FEATURES = {**{f"f{i}": "float" for i in range(12)}, **{f"i{i}": "int" for i in range(4)},
            "s0": "str", "s1": "str", "tags": "list[str]", "embedding": "list[float]"}
WORDS = ("sports", "music", "news", "games", "travel", "food", "tech", "fashion")


SOURCES = ("sqlite", "mysql", "postgres", "clickhouse")


def start_server(kind: str) -> Any:
    """The throwaway server of a source kind (None: embedded) and its source config."""
    from featuredao.testing.servers import ClickHouseServer, MariaDbServer, PostgresServer

    if kind == "sqlite":
        return None, {"type": "sqlite", "path": "offline.db"}
    if kind == "mysql":
        my = MariaDbServer().start()
        return my, {"type": "mysql", "host": my.host, "port": my.port, "user": my.user,
                    "password": my.password, "database": my.database}
    if kind == "postgres":
        pg = PostgresServer().start()
        return pg, {"type": "hologres", "host": pg.host, "port": pg.port, "user": pg.user,
                    "password": pg.password, "database": pg.dbname, "sslmode": "disable"}
    ch = ClickHouseServer().start()
    return ch, {"type": "clickhouse", "host": ch.host, "port": ch.port, "user": ch.user,
                "password": ch.password, "database": ch.database, "read_timeout_ms": 60000}


def make_config(directory: Path, port: int, batch: int, offline: dict[str, Any] | None = None,
                table: str = "items") -> Path:
    cfg = {
        "sources": {"offline": offline or {"type": "sqlite", "path": "offline.db"},
                    "online": {"type": "redis", "port": port, "batch_size": 1000, "pool_size": 2,
                               "socket_timeout_ms": 5000}},
        "views": [
            {"name": "items_offline", "entity": "item", "source": "offline", "table": table, "key": "id",
             "key_type": "int", "features": FEATURES},
            {"name": "items_online", "entity": "item", "source": "online", "table": "items", "key": "id",
             "key_type": "int", "features": FEATURES, "prefix": "on_",
             "options": {"layout": "string", "encoding": "msgpack"}},
        ],
        "sync": [{"name": "publish", "from": "items_offline", "to": ["items_online"], "batch_size": batch}],
    }
    path = directory / "bench.json"
    path.write_text(json.dumps(cfg))
    return path


def seed(path: Path, rows: int) -> None:
    from featuredao import build

    rng = random.Random(0)
    runtime = build(path)
    try:
        dao = runtime.daos["items_offline"]
        dao.prepare()  # type: ignore[attr-defined]
        for start in range(0, rows, 10_000):
            chunk = []
            for k in range(start, min(rows, start + 10_000)):
                row: dict[str, Any] = {f"f{i}": rng.random() for i in range(12)}
                row.update({f"i{i}": rng.randrange(1_000_000) for i in range(4)})
                row.update(s0=rng.choice(WORDS), s1=f"item-{k}", tags=rng.sample(WORDS, 4),
                           embedding=[rng.random() for _ in range(16)])
                chunk.append((k, row))
            dao.upsert(chunk)
    finally:
        runtime.close()


def run_pass(path: Path) -> dict[str, Any]:
    from featuredao.sync.engine import SyncEngine

    with SyncEngine.from_file(path, "publish") as engine:
        engine.runtime.daos["items_offline"].read([0])  # connections and imports before the baseline
        before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        report = engine.run()
        elapsed = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert report.ok and report.failed == 0, report
    return {"rows": report.written, "seconds": elapsed, "rows_per_s": report.written / elapsed,
            "rss_before_mb": before_kb / 1024, "rss_peak_mb": peak_kb / 1024}


def child(argv: list[str]) -> None:
    action, path = argv[0], Path(argv[1])
    if action == "seed":
        seed(path, int(argv[2]))
    else:
        print(json.dumps(run_pass(path)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="50000,200000")
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--sources", default=",".join(SOURCES))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    from featuredao.testing.servers import RedisServer

    results = []
    with RedisServer() as server, tempfile.TemporaryDirectory() as tmp:
        for kind in args.sources.split(","):
            if kind not in SOURCES:
                parser.error(f"unknown source {kind!r}; known: {', '.join(SOURCES)}")
            db, offline = start_server(kind)
            try:
                for size in (int(s) for s in args.sizes.split(",")):
                    directory = Path(tmp) / f"{kind}-{size}"
                    directory.mkdir()
                    offline = {**offline, "batch_size": 1000} if kind != "sqlite" else offline
                    path = make_config(directory, server.port, args.batch, offline, f"items_{size}")
                    subprocess.run([sys.executable, __file__, "--child", "seed", str(path), str(size)],
                                   check=True)
                    server.command("FLUSHALL")
                    out = subprocess.run([sys.executable, __file__, "--child", "run", str(path)], check=True,
                                         capture_output=True, text=True)
                    result = {"source": kind, "size": size,
                              **json.loads(out.stdout.strip().splitlines()[-1])}
                    keys = server.command("DBSIZE")
                    assert keys == size, f"Redis holds {keys} keys, expected {size}"
                    print(result, flush=True)
                    results.append(result)
            finally:
                if db is not None:
                    db.stop()
    lines = [
        "# Sync benchmark: full pass from each source into Redis (msgpack string layout)",
        "",
        f"`benchmarks/bench_sync.py --sizes {args.sizes} --batch {args.batch} --sources {args.sources}`; "
        f"{os.cpu_count()} cores, "
        f"{platform.python_implementation()} {platform.python_version()}, load average "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} at the end. 20 features per row (12 float, 4 int, "
        "2 str, 4 tags, a 16-float embedding). One process per size; peak RSS is the process's high-water "
        "mark (ru_maxrss), taken before and after the pass.",
        "",
        "| source | rows | seconds | rows/s | RSS before pass (MB) | peak RSS (MB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(f"| {r['source']} | {r['size']:,} | {r['seconds']:.2f} | {r['rows_per_s']:,.0f} | "
                     f"{r['rss_before_mb']:.1f} | {r['rss_peak_mb']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
