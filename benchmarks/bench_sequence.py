"""Sequence views on every store against the same read written by hand with each store's driver.

Per store: a sequence view (4 event fields, ``max_len`` 100, a 30-day window, no filters) joined with 2
features of an item view on the same store. Each user has 1,000 stored events; 5,000 items. Measured,
interleaved in one process: the view read through featuredao (``dao.read(users)`` on the composed view:
sequence read, core finishing, join) against the adapter's hand-written baseline
(``raw_sequence_reader()``: the same window and limit with the raw driver, decoded into lists) followed
by the item view's hand-written read of the distinct items (``raw_reader()``) and the joined lists built
by hand. Batches: 1 user and 100 users. The SQL stores and Redis read the join in one chunk
(``batch_size`` 5000), as the hand-written read does.

    .venv/bin/python benchmarks/bench_sequence.py [--stores sqlite,redis,...] [--requests 200]
        [--out benchmarks/results/sequence.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from featuredao import factory
from featuredao.dao import BaseDao
from featuredao.errors import ConfigError
from featuredao.testing.hbase import HBaseThriftServer
from featuredao.testing.servers import ClickHouseServer, MariaDbServer, PostgresServer, RedisServer
from featuredao.testing.tablestore import DEFAULT_ACCESS_KEY_SECRET, TableStoreServer

STORES = ("sqlite", "mysql", "hologres", "clickhouse", "redis", "hbase", "tablestore")
FIELDS = {"item_id": "int", "event": "str", "ts": "int", "play_time": "float"}
USERS = 100
EVENTS = 1000
ITEMS = 5000
DAY = 86400


@contextmanager
def source_of(store: str, folder: Path) -> Iterator[dict[str, Any]]:
    """A throwaway server of the store (or a file) and its source config."""
    with ExitStack() as stack:
        if store == "sqlite":
            yield {"type": "sqlite", "path": str(folder / "bench.db")}
        elif store == "mysql":
            m = stack.enter_context(MariaDbServer())
            yield {"type": "mysql", "host": m.host, "port": m.port, "user": m.user, "password": m.password,
                   "database": m.database}
        elif store == "hologres":
            pg = stack.enter_context(PostgresServer())
            yield {"type": "hologres", "host": pg.host, "port": pg.port, "user": pg.user,
                   "password": pg.password, "database": pg.dbname, "sslmode": "disable"}
        elif store == "clickhouse":
            ch = stack.enter_context(ClickHouseServer())
            yield {"type": "clickhouse", "host": ch.host, "port": ch.port, "user": ch.user,
                   "password": ch.password, "database": ch.database}
        elif store == "redis":
            r = stack.enter_context(RedisServer())
            yield {"type": "redis", "host": r.host, "port": r.port}
        elif store == "hbase":
            hb = HBaseThriftServer().start()
            stack.callback(hb.stop)
            yield {"type": "hbase", "host": "127.0.0.1", "port": hb.port}
        else:
            ots = TableStoreServer().start()
            stack.callback(ots.stop)
            yield {"type": "tablestore", "endpoint": ots.endpoint, "instance_name": ots.instance_name,
                   "access_key_id": ots.access_key_id, "access_key_secret": DEFAULT_ACCESS_KEY_SECRET}


def config(source: dict[str, Any]) -> dict[str, Any]:
    if source["type"] in ("sqlite", "mysql", "hologres", "clickhouse", "redis"):
        # The hand-written join reads every distinct item in one statement: so does the view, in one chunk.
        source = {**source, "batch_size": 5000}
    seq = {"time_field": "ts", "item_field": "item_id", "event_field": "event", "fields": FIELDS,
           "max_len": 100, "window_s": 30 * DAY, "join": {"view": "items", "features": ["category", "price"]}}
    return {"sources": {"s": source}, "service": {"deadline_ms": 5000},
            "views": [{"name": "clicks", "entity": "user", "kind": "sequence", "source": "s",
                       "table": "bench_events", "key": "user_id", "timeout_ms": 5000, "sequence": seq},
                      {"name": "items", "entity": "item", "source": "s", "table": "bench_seq_items",
                       "key": "item_id", "key_type": "int", "timeout_ms": 5000,
                       "features": {"category": "str", "price": "float"},
                       "options": {"layout": "string", "encoding": "msgpack"} if source["type"] == "redis"
                       else {}}]}


def seed(runtime: factory.Runtime, now: int) -> None:
    """1,000 events per user over the last 40 days (a quarter outside the window), 5,000 items."""
    rng = random.Random(7)
    events, items = runtime.daos["clicks"], runtime.daos["items"]
    events.prepare()
    items.prepare()
    items.upsert((i, {"category": f"c{i % 37}", "price": i / 10}) for i in range(ITEMS))
    kinds = ["click", "buy", "view"]
    for u in range(USERS):
        events.append((f"u{u}", {"item_id": rng.randrange(ITEMS), "event": rng.choice(kinds),
                                 "ts": now - rng.randrange(40 * DAY),
                                 "play_time": round(rng.random() * 30, 2)}) for _ in range(EVENTS))


def by_hand(events: BaseDao, items: BaseDao) -> Callable[[list[str]], object] | None:
    """The adapter's hand-written sequence read, then the items' hand-written read and the joined lists."""
    raw_seq, raw_items = events.raw_sequence_reader(), items.raw_reader()
    if raw_seq is None or raw_items is None:
        return None
    query = events.sequence_query(None)
    sequences, lookup = raw_seq, raw_items

    def read(users: list[str]) -> object:
        got: Any = sequences(users, query)
        rows = [got.get(u) for u in users] if isinstance(got, dict) else list(got)
        distinct = list(dict.fromkeys(i for r in rows if r for i in r["item_id"]))
        found = dict(zip(distinct, lookup(distinct, ["category", "price"]), strict=True)) if distinct else {}
        for r in rows:
            if r:
                sides = [found.get(i) for i in r["item_id"]]
                r["category"] = [s["category"] if s else "" for s in sides]
                r["price"] = [s["price"] if s else 0.0 for s in sides]
        return rows

    return read


def measure(store: str, requests: int) -> list[dict[str, Any]]:
    with TemporaryDirectory() as tmp, source_of(store, Path(tmp)) as source:
        try:
            runtime = factory.build(config(source))
        except ConfigError as exc:  # an adapter without sequence reads
            return [{"store": store, "note": str(exc).splitlines()[-1].strip()}]
        try:
            seed(runtime, int(time.time()))
            events, items = runtime.daos["clicks"], runtime.daos["items"]
            served = runtime.served["clicks"]
            hand = by_hand(events, items)
            if hand is None:
                return [{"store": store, "note": "no hand-written baseline"}]
            out = []
            rng = random.Random(1)
            for batch in (1, USERS):
                timings: dict[str, list[float]] = {"featuredao": [], "by_hand": []}
                for n in range(requests + 10):
                    users = [f"u{rng.randrange(USERS)}"] if batch == 1 else [f"u{i}" for i in range(USERS)]
                    # Interleaved, alternating which goes first: neither gets a warmer cache.
                    order = [("featuredao", lambda u=users: served.read(u, timeout_s=5.0)),
                             ("by_hand", lambda u=users: hand(u))]
                    for name, call in order if n % 2 else order[::-1]:
                        started = time.perf_counter()
                        call()
                        if n >= 10:
                            timings[name].append((time.perf_counter() - started) * 1000)
                ours, theirs = (statistics.median(timings[k]) for k in ("featuredao", "by_hand"))
                out.append({"store": store, "users": batch, "featuredao_p50_ms": round(ours, 3),
                            "by_hand_p50_ms": round(theirs, 3), "ratio_p50": round(ours / theirs, 2),
                            "ratio_mean": round(statistics.mean(timings["featuredao"])
                                                / statistics.mean(timings["by_hand"]), 2)})
                print(json.dumps(out[-1]), flush=True)
            return out
        finally:
            runtime.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", default=",".join(STORES))
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results/sequence.json")
    args = parser.parse_args()
    results = [r for store in args.stores.split(",") for r in measure(store, args.requests)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
