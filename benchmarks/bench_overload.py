"""The request path under load: threads 1, 4, 16, 64 calling ``fetch`` back to back on one service.

The request (the request-path issue's): a user view and an item view on one throwaway Redis
(string/msgpack, 20 float features each, L1 on the item view), 1 user + 200 items per ``fetch``, 17% of
the items missing, ``service.deadline_ms`` 100. Each thread count runs for ``--seconds``; per count it
prints p50/p99/p99.9/max latency, answers/s, answers with full values/s, the share of answers with a
view shed as ``overloaded`` and the share with any degraded part. With ``--chart`` it draws a PNG.
The asyncio rows (``--tasks``) read on the loop with redis-py's asyncio client; ``--thread-reads`` makes
``afetch`` read on the service's threads instead (the path before native reads), for a comparison at the
same machine load. ``--single N`` times N single ``fetch`` and ``afetch`` calls, one at a time and without
L1, on Redis msgpack and on Hologres (a throwaway PostgreSQL).

    .venv/bin/python benchmarks/bench_overload.py [--seconds 5] [--threads 1,4,16,64] [--chart FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import threading
import time
from typing import Any

from featuredao import FeatureService, Reason, build
from featuredao.testing.servers import PostgresServer, RedisServer

FEATURES = {f"f{i}": "float" for i in range(20)}
ITEMS = 20_000
MISSING = 0.17
BATCH = 200
DEADLINE_MS = 100


def config(host: str, port: int, service: dict[str, Any] | None = None) -> dict[str, Any]:
    options = {"layout": "string", "encoding": "msgpack"}
    source = {"type": "redis", "host": host, "port": port, "pool_size": 8}
    return {
        "sources": {"store": source},
        "views": [
            {"name": "user", "entity": "user", "source": "store", "table": "u", "key": "id",
             "features": FEATURES, "prefix": "u_", "options": options},
            {"name": "item", "entity": "item", "source": "store", "table": "i", "key": "id",
             "key_type": "int", "features": FEATURES, "prefix": "i_", "options": options,
             "cache": {"l1": {"ttl_s": 3600, "max_entries": 1_000_000}}},
        ],
        "service": {"deadline_ms": DEADLINE_MS, **(service or {})},
    }


def pg_config(pg: PostgresServer) -> dict[str, Any]:
    """The same two views on Hologres (a throwaway PostgreSQL), wide tables, no L1."""
    cfg = config("", 0)
    cfg["sources"]["store"] = {"type": "hologres", "host": pg.host, "port": pg.port, "user": pg.user,
                               "password": pg.password, "database": pg.dbname, "sslmode": "disable"}
    for view in cfg["views"]:
        view["options"] = {"layout": "wide"}
    return cfg


def seed(cfg: dict[str, Any]) -> None:
    runtime = build(cfg)
    try:
        for dao in runtime.daos.values():
            dao.prepare()
        rng = random.Random(1)
        runtime.daos["user"].upsert((f"u{i}", {f: rng.random() for f in FEATURES}) for i in range(1000))
        kept = [i for i in range(ITEMS) if rng.random() >= MISSING]
        for start in range(0, len(kept), 5000):
            chunk = kept[start:start + 5000]
            runtime.daos["item"].upsert((i, {f: rng.random() for f in FEATURES}) for i in chunk)
    finally:
        runtime.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run(service: FeatureService, threads: int, seconds: float) -> dict[str, float]:
    latencies: list[list[float]] = [[] for _ in range(threads)]
    shed = [0] * threads
    degraded = [0] * threads
    errors = [0] * threads
    stop = time.perf_counter() + seconds

    def worker(n: int) -> None:
        rng = random.Random(n)
        while time.perf_counter() < stop:
            user = f"u{rng.randrange(1000)}"
            items = rng.sample(range(ITEMS), BATCH)
            started = time.perf_counter()
            try:
                result = service.fetch(user, items)
            except Exception:
                errors[n] += 1
                continue
            latencies[n].append((time.perf_counter() - started) * 1000)
            if result.degraded:
                degraded[n] += 1
                if any(d.reason is Reason.OVERLOADED for d in result.degraded):
                    shed[n] += 1

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    began = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.perf_counter() - began
    flat = [x for lat in latencies for x in lat]
    answers = len(flat)
    full = answers - sum(degraded)
    return {"threads": threads, "p50": pct(flat, 0.5), "p99": pct(flat, 0.99), "p999": pct(flat, 0.999),
            "max": max(flat, default=float("nan")), "answers_s": answers / wall, "full_s": full / wall,
            "shed": sum(shed) / max(answers, 1), "degraded": sum(degraded) / max(answers, 1),
            "errors": sum(errors)}


def run_async(service: FeatureService, tasks: int, seconds: float) -> dict[str, float]:
    """``tasks`` coroutines calling ``afetch`` back to back on one event loop, and a 10 ms ticker."""
    latencies: list[float] = []
    lags: list[float] = []
    counts = {"shed": 0, "degraded": 0, "errors": 0}

    async def worker(n: int, stop: float) -> None:
        rng = random.Random(n)
        while time.perf_counter() < stop:
            user = f"u{rng.randrange(1000)}"
            items = rng.sample(range(ITEMS), BATCH)
            started = time.perf_counter()
            try:
                result = await service.afetch(user, items)
            except Exception:
                counts["errors"] += 1
                continue
            latencies.append((time.perf_counter() - started) * 1000)
            if result.degraded:
                counts["degraded"] += 1
                if any(d.reason is Reason.OVERLOADED for d in result.degraded):
                    counts["shed"] += 1

    async def ticker(stop: float) -> None:
        while time.perf_counter() < stop:
            planned = time.perf_counter() + 0.010
            await asyncio.sleep(0.010)
            lags.append(max(0.0, time.perf_counter() - planned) * 1000)

    async def main() -> float:
        stop = time.perf_counter() + seconds
        began = time.perf_counter()
        await asyncio.gather(ticker(stop), *(worker(n, stop) for n in range(tasks)))
        return time.perf_counter() - began

    wall = asyncio.run(main())
    answers = len(latencies)
    full = answers - counts["degraded"]
    return {"threads": tasks, "p50": pct(latencies, 0.5), "p99": pct(latencies, 0.99),
            "p999": pct(latencies, 0.999), "max": max(latencies, default=float("nan")),
            "answers_s": answers / wall, "full_s": full / wall, "shed": counts["shed"] / max(answers, 1),
            "degraded": counts["degraded"] / max(answers, 1), "errors": counts["errors"],
            "lag_p99": pct(lags, 0.99), "lag_max": max(lags, default=float("nan"))}


def single_calls(calls: int) -> list[tuple[str, float, float, float, float]]:
    """Per store: p50 and p99 (ms) of one ``fetch`` and of one ``afetch`` at a time, interleaved, every call
    a store read (no L1)."""
    rd, pg = RedisServer().start(), PostgresServer().start()
    out = []
    try:
        redis_cfg = config(rd.host, rd.port)
        redis_cfg["views"][1].pop("cache")
        for name, cfg in (("Redis msgpack", redis_cfg), ("Hologres wide", pg_config(pg))):
            seed(cfg)
            with FeatureService.from_config(cfg) as service:
                sync_ms: list[float] = []
                async_ms: list[float] = []

                async def main(service: FeatureService = service, sync_ms: list[float] = sync_ms,
                               async_ms: list[float] = async_ms) -> None:
                    rng = random.Random(7)
                    for i in range(calls + 50):  # the first 50 of each warm the pools up
                        user, items = f"u{rng.randrange(1000)}", rng.sample(range(ITEMS), BATCH)
                        started = time.perf_counter()
                        service.fetch(user, items)
                        took = time.perf_counter() - started
                        started = time.perf_counter()
                        await service.afetch(user, items)
                        if i >= 50:
                            sync_ms.append(took * 1000)
                            async_ms.append((time.perf_counter() - started) * 1000)

                asyncio.run(main())
                out.append((name, pct(sync_ms, 0.5), pct(async_ms, 0.5), pct(sync_ms, 0.99),
                            pct(async_ms, 0.99)))
    finally:
        rd.stop()
        pg.stop()
    return out


def chart(rows: list[dict[str, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = [r["threads"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("p50", "p99", "max"):
        left.plot(threads, [r[key] for r in rows], marker="o", label=key)
    left.axhline(DEADLINE_MS, color="grey", linestyle="--", label="deadline")
    left.set_xscale("log", base=2)
    left.set_xlabel("threads")
    left.set_ylabel("ms")
    left.legend()
    right.plot(threads, [r["answers_s"] for r in rows], marker="o", label="answers/s")
    right.plot(threads, [r["full_s"] for r in rows], marker="o", label="full answers/s")
    right.set_xscale("log", base=2)
    right.set_xlabel("threads")
    right.legend()
    fig.suptitle(f"fetch: 1 user + {BATCH} items, Redis msgpack, deadline {DEADLINE_MS} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", default="1,4,16,64")
    parser.add_argument("--chart", default=None)
    parser.add_argument("--tasks", default="1,16,64", help="asyncio tasks (empty: skip the asyncio rows)")
    parser.add_argument("--thread-reads", action="store_true",
                        help="afetch reads on the service's threads, not with the asyncio client")
    parser.add_argument("--single", type=int, default=0, help="time this many single fetch/afetch calls")
    parser.add_argument("--max-in-flight", type=int, default=None,
                        help="service.max_in_flight (default: the library's)")
    parser.add_argument("--admission-wait", type=float, default=None,
                        help="service.admission_wait (default: the library's)")
    args = parser.parse_args()
    if args.single:
        print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, {args.single} calls each, "
              f"1 user + {BATCH} items, no L1")
        print("| store | fetch p50 ms | afetch p50 ms | fetch p99 ms | afetch p99 ms |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, s50, a50, s99, a99 in single_calls(args.single):
            print(f"| {name} | {s50:.2f} | {a50:.2f} | {s99:.2f} | {a99:.2f} |")
        return
    server = RedisServer().start()
    try:
        knobs = {"max_in_flight": args.max_in_flight, "admission_wait": args.admission_wait}
        cfg = config(server.host, server.port, {k: v for k, v in knobs.items() if v is not None})
        seed(cfg)
        with FeatureService.from_config(cfg) as service:
            for start in range(0, ITEMS, 5000):  # the L1 of the item view holds every item
                service.fetch("u1", list(range(start, start + 5000)))
            rows = [run(service, int(t), args.seconds) for t in args.threads.split(",") if t]
            if args.thread_reads:
                for dao in service.daos.values():
                    dao.native_async = lambda: False  # type: ignore[method-assign]
            async_rows = [run_async(service, int(t), args.seconds) for t in args.tasks.split(",") if t]
    finally:
        server.stop()
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, deadline {DEADLINE_MS} ms, "
          f"max_in_flight {args.max_in_flight or 'default'}, "
          f"admission_wait {args.admission_wait or 'default'}, "
          f"{args.seconds:.0f} s per thread count, asyncio reads "
          f"{'on threads' if args.thread_reads else 'on the loop'}")
    print("| threads | p50 ms | p99 ms | p99.9 ms | max ms | answers/s | full answers/s | shed | degraded "
          "| errors |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['threads']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['p999']:.1f} | {r['max']:.1f} | "
              f"{r['answers_s']:.0f} | {r['full_s']:.0f} | {r['shed']:.0%} | {r['degraded']:.0%} | "
              f"{r['errors']:.0f} |")
    if async_rows:
        print()
        print("| asyncio tasks | p50 ms | p99 ms | p99.9 ms | max ms | answers/s | full answers/s | shed "
              "| degraded | errors | ticker lag p99 ms | lag max ms |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in async_rows:
            print(f"| {r['threads']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['p999']:.1f} | "
                  f"{r['max']:.1f} | {r['answers_s']:.0f} | {r['full_s']:.0f} | {r['shed']:.0%} | "
                  f"{r['degraded']:.0%} | {r['errors']:.0f} | {r['lag_p99']:.1f} | {r['lag_max']:.1f} |")
    if args.chart:
        chart(rows, args.chart)


if __name__ == "__main__":
    main()
