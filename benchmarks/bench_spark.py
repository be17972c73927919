"""Spark benchmark: ``write_view`` from Parquet into Redis against the local sync of the same rows.

Starts its own throwaway Redis and a local Spark (``--master``, default ``local[2]``). Spark generates N
rows x 20 features (the rows of ``bench_sync.py``'s shape: 12 float, 4 int, 2 str, 4 tags, a 16-float
embedding) and writes them as Parquet; ``write_view`` copies the same rows into an embedded SQLite
source (one task, not timed). Then, each ``--repeat`` times, interleaved:

* ``spark write_view``: Parquet into a Redis view (msgpack string layout), in the running SparkSession;
  Spark's own start-up (JVM, Python workers) is excluded: a small ``write_view`` runs first.
* ``local sync p1`` / ``p2``: ``featuredao sync run --json`` (a fresh process) of a full job from the
  SQLite source into Redis with parallelism 1 and 2; its ``elapsed_s`` (worker start-up included).
* ``spark sync``: the same job with ``--engine spark``'s runner in the running SparkSession.

Every run writes all N keys; Redis holds them afterwards (checked) and a sample of keys is compared
across the two target views. Peak RSS of the Spark Python workers is their ``VmHWM``.

    .venv/bin/python benchmarks/bench_spark.py [--rows 1000000] [--batch 5000] [--repeat 2] \\
        [--master local[2]] [--out benchmarks/results/spark.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FEATURES = {**{f"f{i}": "float" for i in range(12)}, **{f"i{i}": "int" for i in range(4)},
            "s0": "str", "s1": "str", "tags": "list[str]", "embedding": "list[float]"}
WORDS = ("sports", "music", "news", "games", "travel", "food", "tech", "fashion")
EXE = shutil.which("featuredao", path=str(Path(sys.executable).parent)) or "featuredao"


def config(directory: Path, port: int, batch: int) -> Path:
    def view(name: str, source: str, table: str, prefix: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "entity": "item", "source": source, "table": table, "key": "id",
                "key_type": "int", "features": FEATURES, "prefix": prefix, **extra}

    redis = {"layout": "string", "encoding": "msgpack"}
    cfg = {
        "sources": {"offline": {"type": "sqlite", "path": "offline.db"},
                    "online": {"type": "redis", "port": port, "batch_size": 1000, "pool_size": 2,
                               "socket_timeout_ms": 5000}},
        "views": [view("items_offline", "offline", "items", ""),
                  view("items_spark", "online", "items_spark", "s_", options=redis),
                  view("items_local", "online", "items_local", "l_", options=redis)],
        "sync": [{"name": f"publish_p{p}", "from": "items_offline", "to": ["items_local"],
                  "batch_size": batch, "parallelism": p} for p in (1, 2)],
    }
    path = directory / "bench.json"
    path.write_text(json.dumps(cfg))
    return path


def generate(spark: Any, rows: int, parquet: Path) -> None:
    """N rows as Parquet in 4 files, made by Spark (deterministic seeds)."""
    from pyspark.sql import functions as F

    words = F.array(*[F.lit(w) for w in WORDS])
    cols = [F.col("id")]
    cols += [F.rand(i).alias(f"f{i}") for i in range(12)]
    cols += [(F.rand(100 + i) * 1_000_000).cast("long").alias(f"i{i}") for i in range(4)]
    cols += [F.element_at(words, (F.col("id") % len(WORDS) + 1).cast("int")).alias("s0"),
             F.concat(F.lit("item-"), F.col("id").cast("string")).alias("s1"),
             F.slice(F.concat(words, words), (F.col("id") % len(WORDS) + 1).cast("int"), 4).alias("tags"),
             F.array(*[F.rand(200 + i) for i in range(16)]).alias("embedding")]
    spark.range(rows).select(*cols).repartition(4).write.mode("overwrite").parquet(str(parquet))


def worker_peak_mb() -> float:
    """The highest VmHWM among this machine's PySpark worker processes (reused across tasks)."""
    peak = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            if b"pyspark" not in cmd or (b"daemon" not in cmd and b"worker" not in cmd):
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            continue
    return peak / 1024


def local_sync(path: Path, job: str) -> float:
    out = subprocess.run([EXE, "sync", "run", str(path), "--job", job, "--json", "--no-progress"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"sync {job} exited {out.returncode}: {out.stdout[-2000:]} {out.stderr[-3000:]}")
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["failed"] == 0 and report["source_error"] is None and not report["down"], report
    return float(report["elapsed_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from featuredao import build
    from featuredao.spark import local_session, write_view
    from featuredao.sync.spark_engine import SparkSync
    from featuredao.testing.servers import RedisServer

    times: dict[str, list[float]] = {"spark write_view": [], "local sync p1": [], "local sync p2": [],
                                     "spark sync": []}
    with RedisServer() as redis, tempfile.TemporaryDirectory() as tmp:
        path = config(Path(tmp), redis.port, args.batch)
        started = time.perf_counter()
        spark = local_session(args.master, "featuredao bench")
        spark.sparkContext.setLogLevel("ERROR")
        session_s = time.perf_counter() - started
        parquet = Path(tmp) / "items.parquet"
        generate(spark, args.rows, parquet)
        df = spark.read.parquet(str(parquet))
        seeded = write_view(df.coalesce(1), path, "items_offline", batch_size=args.batch)
        assert seeded.written == args.rows, seeded
        write_view(df.limit(1000), path, "items_spark")  # Python workers started and imports done
        partitions = df.rdd.getNumPartitions()
        for _ in range(args.repeat):
            redis.command("FLUSHALL", timeout=120)
            result = write_view(df, path, "items_spark", batch_size=args.batch)
            assert (result.written, result.failed) == (args.rows, 0), result
            times["spark write_view"].append(result.elapsed_s)
            for p in (1, 2):
                times[f"local sync p{p}"].append(local_sync(path, f"publish_p{p}"))
            with SparkSync(path, "publish_p2") as runner:
                began = time.perf_counter()
                report = runner.run()
                times["spark sync"].append(time.perf_counter() - began)
            assert report.ok and report.written == args.rows, report
            assert redis.command("DBSIZE", timeout=30) == 2 * args.rows
            print({k: round(v[-1], 2) for k, v in times.items()}, flush=True)
        peak = worker_peak_mb()
        runtime = build(path)
        try:
            sample = list(range(0, args.rows, max(1, args.rows // 1000)))
            a = runtime.daos["items_spark"].read(sample).rows
            b = runtime.daos["items_local"].read(sample).rows
            assert a == b and all(r is not None for r in a), "the two paths wrote different rows"
        finally:
            runtime.close()
        spark.stop()

    best = {k: statistics.median(v) for k, v in times.items()}
    ratio = best["spark write_view"] / best["local sync p2"]
    lines = [
        "# Spark benchmark: write_view from Parquet into Redis against the local sync of the same rows",
        "",
        f"`benchmarks/bench_spark.py --rows {args.rows} --batch {args.batch} --repeat {args.repeat} "
        f"--master {args.master}`; {os.cpu_count()} cores, {platform.python_implementation()} "
        f"{platform.python_version()}, load average {', '.join(f'{x:.2f}' for x in os.getloadavg())} at "
        f"the end. 20 features per row, Redis msgpack string layout. Median of {args.repeat} interleaved "
        f"runs. Spark start-up excluded: the SparkSession took {session_s:.1f} s to start and a small "
        f"write_view ran first; the Parquet read gave {partitions} partitions. The local syncs are "
        "`featuredao sync run --json` processes (their elapsed_s, worker start-up included); spark sync is "
        "`--engine spark`'s runner in the same session (2 ranges).",
        "",
        "| run | seconds | rows/s |",
        "| --- | ---: | ---: |",
    ]
    for name, seconds in best.items():
        lines.append(f"| {name} | {seconds:.2f} | {args.rows / seconds:,.0f} |")
    lines += ["", f"spark write_view / local sync p2: **{ratio:.2f}x** (target: at most 1.5x); peak RSS of "
              f"a Spark Python worker: {peak:.0f} MB."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
