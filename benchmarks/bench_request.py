"""A realistic request through ``FeatureService.fetch`` against the same reads written by hand.

The request of the request-path and fast-path issues: a user view (20 float features) and an item view
(20 float features, L1 on it) on one throwaway Redis, string/msgpack layout, 1 user + 200 items per
request, 17% of the items missing. The hand-written version does what a service would do without
featuredao: one ``MGET`` for the user and one for the items (a redis-py client with hiredis when
installed), ``msgpack.unpackb`` per value, output rows with prefixed names and defaults for the missing.
Both run in one process on the same keys, interleaved request by request; threads 1 and 4.

``--fanout`` adds a third view on a second source, so the request fans out: 10 float features of each
item in an embedded SQLite file (by hand: one ``SELECT ... IN (...)`` with sqlite3 after the Redis reads).

    .venv/bin/python benchmarks/bench_request.py [--requests 2000] [--threads 1,4] [--fanout]
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import redis

from featuredao import FeatureService, build
from featuredao.testing.servers import RedisServer

FEATURES = {f"f{i}": "float" for i in range(20)}
EXTRA = {f"s{i}": "float" for i in range(10)}
ITEMS = 20_000
USERS = 1000
MISSING = 0.17
BATCH = 200


def config(host: str, port: int, sqlite_path: Path | None = None) -> dict[str, Any]:
    options = {"layout": "string", "encoding": "msgpack"}
    cfg: dict[str, Any] = {
        "sources": {"store": {"type": "redis", "host": host, "port": port, "pool_size": 8}},
        "views": [
            {"name": "user", "entity": "user", "source": "store", "table": "u", "key": "id",
             "features": FEATURES, "prefix": "u_", "options": options},
            {"name": "item", "entity": "item", "source": "store", "table": "i", "key": "id",
             "key_type": "int",
             "features": FEATURES, "prefix": "i_", "options": options,
             "cache": {"l1": {"ttl_s": 3600, "max_entries": 1_000_000}}},
        ],
        "service": {"deadline_ms": 1000, "max_in_flight": 64},
    }
    if sqlite_path is not None:
        cfg["sources"]["local"] = {"type": "sqlite", "path": str(sqlite_path)}
        cfg["views"].append({"name": "extra", "entity": "item", "source": "local", "table": "extra",
                             "key": "id", "key_type": "int", "features": EXTRA, "prefix": "s_"})
    return cfg


def seed(cfg: dict[str, Any]) -> None:
    runtime = build(cfg)
    try:
        rng = random.Random(1)
        runtime.daos["user"].upsert((f"u{i}", {f: rng.random() for f in FEATURES}) for i in range(USERS))
        kept = [i for i in range(ITEMS) if rng.random() >= MISSING]
        for start in range(0, len(kept), 5000):
            chunk = kept[start:start + 5000]
            runtime.daos["item"].upsert((i, {f: rng.random() for f in FEATURES}) for i in chunk)
            if "extra" in runtime.daos:
                runtime.daos["extra"].prepare()  # type: ignore[attr-defined]
                runtime.daos["extra"].upsert((i, {f: rng.random() for f in EXTRA}) for i in chunk)
    finally:
        runtime.close()


def by_hand(client: redis.Redis, user: str, items: list[int]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The same two reads and the same output, written with the drivers."""
    names = list(FEATURES)
    user_keys = [f"u:{user}"]
    pipe = client.pipeline(transaction=False)
    pipe.mget(user_keys)
    pipe.mget([f"i:{i}" for i in items])
    user_raw, item_raw = pipe.execute()
    default_user = {f"u_{f}": None for f in names}
    default_item = {f"i_{f}": None for f in names}
    user_row = default_user
    if user_raw[0] is not None:
        values = msgpack.unpackb(user_raw[0])
        user_row = {f"u_{f}": values.get(f) for f in names}
    rows = []
    for raw in item_raw:
        if raw is None:
            rows.append(dict(default_item))
        else:
            values = msgpack.unpackb(raw)
            rows.append({f"i_{f}": values.get(f) for f in names})
    return user_row, rows


_local = threading.local()


def by_hand_extra(path: Path, items: list[int], rows: list[dict[str, Any]]) -> None:
    """The third view by hand: one SELECT on this thread's sqlite3 connection, merged into ``rows``."""
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = _local.conn = sqlite3.connect(path)
    names = list(EXTRA)
    found = {r[0]: r[1:] for r in conn.execute(
        f"SELECT id, {', '.join(names)} FROM extra WHERE id IN ({', '.join('?' * len(items))})", items)}
    for item, row in zip(items, rows, strict=True):
        values = found.get(item)
        row.update({f"s_{f}": None for f in names} if values is None else
                   {f"s_{f}": v for f, v in zip(names, values, strict=True)})


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--threads", default="1,4")
    parser.add_argument("--fanout", action="store_true", help="a third view on an embedded SQLite file")
    args = parser.parse_args()
    server = RedisServer().start()
    scratch = tempfile.TemporaryDirectory()
    sqlite_path = Path(scratch.name) / "extra.db" if args.fanout else None
    try:
        cfg = config(server.host, server.port, sqlite_path)
        seed(cfg)
        client = redis.Redis(host=server.host, port=server.port, max_connections=16)
        with FeatureService.from_config(cfg) as service:
            for start in range(0, ITEMS, 5000):  # warm the item view's L1 with every stored item
                service.fetch(None, list(range(start, start + 5000)))
            rows = []
            for threads in (int(t) for t in args.threads.split(",")):
                ours: list[float] = []
                hand: list[float] = []
                lock = threading.Lock()

                def worker(n: int, threads: int = threads, ours: list[float] = ours,
                           hand: list[float] = hand, lock: threading.Lock = lock) -> None:
                    rng = random.Random(n)
                    mine: list[float] = []
                    theirs: list[float] = []
                    for r in range(args.requests // threads):
                        user, items = f"u{rng.randrange(USERS)}", rng.sample(range(ITEMS), BATCH)
                        order = (0, 1) if r % 2 else (1, 0)  # alternate who goes first
                        for which in order:
                            started = time.perf_counter()
                            if which == 0:
                                service.fetch(user, items)
                                mine.append(time.perf_counter() - started)
                            else:
                                _, item_rows = by_hand(client, user, items)
                                if sqlite_path is not None:
                                    by_hand_extra(sqlite_path, items, item_rows)
                                theirs.append(time.perf_counter() - started)
                    with lock:
                        ours.extend(mine[20:])
                        hand.extend(theirs[20:])

                pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
                for t in pool:
                    t.start()
                for t in pool:
                    t.join()
                rows.append((threads, ours, hand))
        client.close()
    finally:
        server.stop()
        scratch.cleanup()
    shape = "fan-out to SQLite, " if args.fanout else ""
    print(f"{shape}{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
          f"redis-py {redis.__version__}, {args.requests} requests per path")
    print("| threads | fetch p50 ms | fetch p99 ms | fetch mean ms | by hand p50 ms | by hand p99 ms "
          "| by hand mean ms | ratio p50 | ratio mean |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for threads, ours, hand in rows:
        mo, mh = sum(ours) / len(ours) * 1000, sum(hand) / len(hand) * 1000
        print(f"| {threads} | {pct(ours, .5) * 1000:.2f} | {pct(ours, .99) * 1000:.2f} | {mo:.2f} | "
              f"{pct(hand, .5) * 1000:.2f} | {pct(hand, .99) * 1000:.2f} | {mh:.2f} | "
              f"{pct(ours, .5) / pct(hand, .5):.2f} | {mo / mh:.2f} |")


if __name__ == "__main__":
    main()
