"""featuredao's SQL adapters versus their raw drivers doing the same read by hand, in the same run.

Run: ``.venv/bin/python benchmarks/bench_sql.py [mysql] [hologres] [--quick]``

For each backend: start a throwaway server (featuredao.testing.servers), create a wide table of
20 features with the adapter's ``prepare()``, seed it through ``upsert``, then for batches of 1, 100,
500 and 1000 keys time ``dao.read(keys)`` and ``dao.raw_reader()`` - the same statement written by
hand with the raw driver on its own connection, decoded to the same Python rows in input order
(NULL -> default) - interleaved: each iteration uses the same random keys for both, alternating
which goes first. Writes ``benchmarks/results/<name>.md``.

To add a backend (e.g. clickhouse), register a ``Backend`` (server factory, source config, driver
name) in ``BACKENDS`` at the bottom of this file; its DAO must implement ``raw_reader()``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from featuredao import factory
from featuredao.dao import BaseDao
from featuredao.testing import servers

RESULTS = Path(__file__).parent / "results"
BATCHES = (1, 100, 500, 1000)
ROWS = 20_000
TABLE = "bench_items"

# 20 features, a typical mix: mostly numbers, some text, a flag and a list.
FEATURES: dict[str, str] = {
    **{f"f{i}": "float" for i in range(10)},
    **{f"i{i}": "int" for i in range(5)},
    **{f"s{i}": "str" for i in range(3)},
    "flag": "bool", "ids": "list[int]",
}
DEFAULTS: dict[str, Any] = {**{f"f{i}": 0.0 for i in range(10)}, **{f"i{i}": 0 for i in range(5)}}
FIELDS = list(FEATURES)

RawReader = Callable[[list[str]], object]


@dataclass
class Backend:
    """How to benchmark one adapter: its throwaway server, the source config reaching it, its driver."""

    name: str
    server: Callable[[], Any]
    source: Callable[[Any], dict[str, Any]]
    driver: str


def _row(i: int) -> dict[str, Any]:
    rng = random.Random(i)
    row: dict[str, Any] = {f"f{j}": rng.random() * 100 for j in range(10)}
    row.update({f"i{j}": rng.randrange(-10**9, 10**9) for j in range(5)})
    row.update({f"s{j}": f"category-{rng.randrange(1000)}-{i}" for j in range(3)})
    row["flag"] = i % 3 == 0
    row["ids"] = [rng.randrange(10**6) for _ in range(5)]
    if i % 10 == 0:
        row["f0"] = None  # some NULLs, read back as defaults
    return row


# -- the measurement ---------------------------------------------------------------------------------
def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _iterations(batch: int, quick: bool) -> int:
    n = {1: 3000, 100: 1500, 500: 600, 1000: 400}[batch]
    return max(50, n // 10) if quick else n


def measure(dao: BaseDao, raw: RawReader, quick: bool) -> list[dict[str, Any]]:
    rng = random.Random(7)
    out = []
    for batch in BATCHES:
        keys_of = [f"item-{i}" for i in range(ROWS)]
        sample = rng.sample(keys_of, batch)
        ours = [r for r in dao.read(sample)]
        assert ours == raw(sample), "featuredao and the raw read disagree"
        for _ in range(max(20, _iterations(batch, quick) // 20)):  # warm-up: prepared statements, caches
            dao.read(sample)
            raw(sample)
        times: dict[str, list[float]] = {"featuredao": [], "raw": []}
        for i in range(_iterations(batch, quick)):
            sample = rng.sample(keys_of, batch)
            for name in ("featuredao", "raw") if i % 2 == 0 else ("raw", "featuredao"):
                started = time.perf_counter()
                if name == "raw":
                    raw(sample)
                else:
                    dao.read(sample)
                times[name].append(time.perf_counter() - started)
        fd, rw = times["featuredao"], times["raw"]
        out.append({"batch": batch, "n": len(fd),
                    "fd_p50": _pct(fd, 50), "fd_p99": _pct(fd, 99),
                    "raw_p50": _pct(rw, 50), "raw_p99": _pct(rw, 99),
                    "ratio_p50": statistics.median(fd) / statistics.median(rw),
                    "ratio_p99": _pct(fd, 99) / _pct(rw, 99)})
        print(f"  batch {batch:>4}: featuredao p50 {out[-1]['fd_p50'] * 1e3:.3f} ms, "
              f"raw p50 {out[-1]['raw_p50'] * 1e3:.3f} ms, ratio {out[-1]['ratio_p50']:.2f}", flush=True)
    return out


def markdown(backend: Backend, results: list[dict[str, Any]], server_version: str,
             source: dict[str, Any]) -> str:
    shown = {k: v for k, v in source.items() if k not in ("password", "host", "port", "user")}
    lines = [
        f"# {backend.name}: featuredao vs raw {backend.driver}",
        "",
        f"Measured by `benchmarks/bench_sql.py` on {time.strftime('%Y-%m-%d')}: {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {backend.driver} {version(backend.driver)}, "
        f"server {server_version} (throwaway, localhost).",
        "",
        f"Wide table of {ROWS} rows x {len(FEATURES)} features (10 float, 5 int, 3 str, 1 bool, 1 list[int]; "
        "10% NULLs in one column read back as defaults), keys sampled at random, all present. "
        "featuredao = `dao.read(keys)` (normalise, dedupe, chunk, coerce, realign); raw = the same "
        "statement with the driver by hand, decoded to the same rows in input order. "
        "Interleaved in one process, same keys per iteration.",
        "",
        f"Source options: `{json.dumps(shown)}`",
        "",
        "Measured on a shared 2-core machine while other suites ran: p50 ratios are indicative (they moved "
        "by about +-0.1 between runs), p99 values mostly show scheduling noise.",
        "",
        "| batch | n | featuredao p50 (ms) | featuredao p99 (ms) | raw p50 (ms) | raw p99 (ms) "
        "| ratio p50 | ratio p99 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['batch']} | {r['n']} | {r['fd_p50'] * 1e3:.3f} | {r['fd_p99'] * 1e3:.3f} | "
                     f"{r['raw_p50'] * 1e3:.3f} | {r['raw_p99'] * 1e3:.3f} | {r['ratio_p50']:.2f} | "
                     f"{r['ratio_p99']:.2f} |")
    return "\n".join(lines) + "\n"


def _server_version(name: str, server: Any) -> str:
    if name == "mysql":
        return "MariaDB " + str(server.sql("SELECT VERSION()")).strip()
    return "PostgreSQL " + str(server.psql("SHOW server_version")).strip()


def run(backend: Backend, quick: bool) -> str:
    with backend.server() as server:
        source = backend.source(server)
        runtime = factory.build({
            "sources": {"db": source},
            "views": [{"name": "items", "entity": "item", "source": "db", "table": TABLE, "key": "id",
                       "features": FEATURES, "defaults": DEFAULTS}],
        })
        dao = runtime.daos["items"]
        assert isinstance(dao, BaseDao)
        try:
            dao.prepare()
            for start in range(0, ROWS, 2000):
                dao.upsert((f"item-{i}", _row(i)) for i in range(start, min(ROWS, start + 2000)))
            reader = dao.raw_reader()
            assert reader is not None, f"{backend.name}: the adapter has no raw_reader()"
            print(f"{backend.name}: seeded {ROWS} rows", flush=True)
            results = measure(dao, lambda keys: reader(list(keys), FIELDS), quick)
            text = markdown(backend, results, _server_version(backend.name, server), source)
        finally:
            runtime.close()  # closes the raw reader's connections too
    return text


BACKENDS: dict[str, Backend] = {
    "mysql": Backend(
        "mysql", servers.MariaDbServer,
        lambda s: {"type": "mysql", "host": s.host, "port": s.port, "user": s.user, "password": s.password,
                   "database": s.database},
        "PyMySQL"),
    "hologres": Backend(
        "hologres", servers.PostgresServer,
        lambda s: {"type": "hologres", "host": s.host, "port": s.port, "user": s.user, "password": s.password,
                   "database": s.dbname, "sslmode": "disable"},
        "psycopg"),
    # Hook: a backend whose DAO implements raw_reader() needs only its server and source config, e.g.
    # "clickhouse": Backend("clickhouse", servers.ClickHouseServer,
    #                       lambda s: {"type": "clickhouse", "host": s.host, "port": s.port, ...},
    #                       "clickhouse-driver"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("backends", nargs="*", metavar="backend", help=f"any of {', '.join(BACKENDS)} (all)")
    parser.add_argument("--quick", action="store_true", help="a tenth of the iterations (smoke run)")
    parser.add_argument("--no-write", action="store_true", help="print the tables, do not write results/")
    args = parser.parse_args(argv)
    unknown = set(args.backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}; known: {', '.join(BACKENDS)}")
    for name in args.backends or list(BACKENDS):
        text = run(BACKENDS[name], args.quick)
        print(text)
        if not args.no_write:
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / f"{name}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
