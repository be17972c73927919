"""featuredao.spark.write_view on a real local Spark (local[2]) into real Redis and MariaDB servers: rows from
Parquet land typed by the view, a mistyped column fails on the driver before any task, and records that
cannot be written (bad rows, a stopped server) become dead letters and counts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sparkhelp import (
    SCHEMA,
    as_features,
    config_file,
    contents,
    dead_letters,
    mysql_source,
    redis_source,
    redis_view,
    row,
    session,
    view,
)

import featuredao.spark
from featuredao import UsageError
from featuredao.config import load
from featuredao.spark import ColumnMismatch, write_view
from featuredao.testing.servers import MariaDbServer, RedisServer

pytestmark = pytest.mark.spark

N = 3000


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    yield from session()


@pytest.fixture(scope="module")
def parquet(spark: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """N rows written as Parquet by Spark, in 4 files."""
    path = tmp_path_factory.mktemp("parquet") / "items"
    spark.createDataFrame([row(i) for i in range(1, N + 1)], SCHEMA).repartition(4).write.parquet(str(path))
    return path


def redis_keys(server: RedisServer, table: str) -> int:
    keys = server.command("KEYS", f"{table}:*")
    assert isinstance(keys, list)
    return len(keys)


@pytest.mark.redis
@pytest.mark.parametrize("transfer", ["arrow", "rows"])
def test_parquet_into_redis(spark: Any, parquet: Path, tmp_path: Path, redis_server: RedisServer,
                            transfer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrow batches where pyarrow and pandas are installed, else pickled Rows: both paths, same result.
    monkeypatch.setattr(featuredao.spark, "_has_arrow", lambda: transfer == "arrow")
    path = config_file(tmp_path, {"hot": redis_source(redis_server)}, [redis_view("items")])
    df = spark.read.parquet(str(parquet))
    result = write_view(df, path, "items", batch_size=400, dead_letter=tmp_path / "dlq")
    parts = df.rdd.getNumPartitions()
    assert (result.rows, result.written, result.failed, result.partitions) == (N, N, 0, parts)
    assert result.ok and result.dead_letter_files == () and not list((tmp_path / "dlq").glob("part-*"))
    keys = list(range(1, N + 1))
    assert contents(path, "items", keys) == {i: as_features(row(i)) for i in keys}
    # Idempotent: writing the same rows again changes nothing and counts them again.
    again = write_view(df, str(path), "items")
    assert (again.written, again.failed) == (N, 0)
    assert redis_keys(redis_server, load(path).views["items"].table) == N


@pytest.mark.mysql
def test_parquet_into_mysql(spark: Any, parquet: Path, tmp_path: Path, mariadb_server: MariaDbServer) -> None:
    cfg = {"sources": {"sql": mysql_source(mariadb_server)}, "views": [view("items", "sql")]}
    df = spark.read.parquet(str(parquet)).repartition(3)
    result = write_view(df, cfg, "items", batch_size=500)  # a dict config; the table is created first
    assert (result.rows, result.written, result.failed, result.partitions) == (N, N, 0, 3)
    keys = list(range(1, N + 1))
    assert contents(cfg, "items", keys) == {i: as_features(row(i)) for i in keys}


@pytest.mark.mysql
def test_last_writer_wins_keeps_the_newer_version(spark: Any, tmp_path: Path,
                                                  mariadb_server: MariaDbServer) -> None:
    cfg = {"sources": {"sql": mysql_source(mariadb_server)}, "views": [view("items", "sql")]}
    conflict = {"strategy": "last_writer_wins", "version": "clicks"}
    newer = [(i, 1.0, [], 100, True, "new") for i in range(1, 21)]
    older = [(i, 2.0, [], 50, False, "old") for i in range(1, 41)]
    assert write_view(spark.createDataFrame(newer, SCHEMA), cfg, "items", conflict=conflict).written == 20
    result = write_view(spark.createDataFrame(older, SCHEMA), cfg, "items", conflict=conflict)
    assert (result.written, result.failed) == (20, 0)  # keys 1-20 hold a newer version: skipped
    got = contents(cfg, "items", list(range(1, 41)))
    assert {got[i]["name"] for i in range(1, 21)} == {"new"}
    assert {got[i]["name"] for i in range(21, 41)} == {"old"}


@pytest.mark.redis
@pytest.mark.mysql
@pytest.mark.parametrize("target", ["redis", "mysql"])
def test_a_mistyped_or_missing_column_fails_before_any_write(spark: Any, parquet: Path, tmp_path: Path,
                                                             target: str, redis_server: RedisServer,
                                                             mariadb_server: MariaDbServer) -> None:
    from pyspark.sql.functions import col

    source = redis_source(redis_server) if target == "redis" else mysql_source(mariadb_server)
    spec = redis_view("items", "dst") if target == "redis" else view("items", "dst")
    cfg = {"sources": {"dst": source}, "views": [spec]}
    df = spark.read.parquet(str(parquet))
    bad = df.withColumn("price", col("price").cast("string")).drop("flag")
    group = f"mistyped-{target}"
    spark.sparkContext.setJobGroup(group, "must not run")
    try:
        with pytest.raises(ColumnMismatch) as caught:
            write_view(bad, cfg, "items")
    finally:
        spark.sparkContext.setLocalProperty("spark.jobGroup.id", None)
    err = caught.value
    assert isinstance(err, UsageError) and err.view == "items"
    assert "column 'price' is string, the view's feature is float" in str(err)
    assert "cast('double')" in str(err)
    assert "missing column 'flag'" in str(err)
    assert len(err.problems) == 2
    assert spark.sparkContext.statusTracker().getJobIdsForGroup(group) == []  # no task ever started
    table = spec["table"]
    if target == "redis":
        assert redis_keys(redis_server, table) == 0
    else:  # not even the table was created
        found = mariadb_server.sql(f"SHOW TABLES LIKE '{table}'", database=mariadb_server.database)
        assert table not in found


@pytest.mark.redis
def test_rows_that_cannot_be_written_become_dead_letters(spark: Any, tmp_path: Path,
                                                        redis_server: RedisServer) -> None:
    path = config_file(tmp_path, {"hot": redis_source(redis_server)}, [redis_view("items")])
    good = [row(i) for i in range(1, 501)]
    null_key = [(None, 1.0, ["a"], 1, True, "no key")] * 3
    null_element = [(1000 + i, 1.0, ["a", None], 1, True, "null tag") for i in range(4)]
    df = spark.createDataFrame(good + null_key + null_element, SCHEMA).repartition(2)
    result = write_view(df, path, "items", batch_size=100, dead_letter=tmp_path / "dlq")
    assert (result.rows, result.written, result.failed) == (507, 500, 7)
    assert not result.ok and len(result.errors) == 7
    letters = dead_letters(tmp_path / "dlq")
    assert len(letters) == 7 and {e["stage"] for e in letters} == {"coerce"}
    assert sorted(e["key"] for e in letters if e["key"] is not None) == [1000, 1001, 1002, 1003]
    assert all(e["record"]["name"] in ("no key", "null tag") for e in letters)
    assert len(result.dead_letter_files) == len(list((tmp_path / "dlq").glob("part-*.jsonl")))
    keys = list(range(1, 501))
    assert contents(path, "items", keys) == {i: as_features(row(i)) for i in keys}
    assert set(contents(path, "items", [1000, 1001]).values()) == {None}


@pytest.mark.mysql
def test_rows_the_store_rejects_become_dead_letters(spark: Any, tmp_path: Path,
                                                    mariadb_server: MariaDbServer) -> None:
    spec = view("items", "sql")
    cfg = {"sources": {"sql": mysql_source(mariadb_server)}, "views": [spec]}
    # A table made by someone else, its name column narrower than the view's: MariaDB refuses long names.
    mariadb_server.sql(f"CREATE TABLE `{spec['table']}` (id BIGINT NOT NULL PRIMARY KEY, price DOUBLE, "
                       "tags JSON, clicks BIGINT, flag BOOLEAN, name VARCHAR(8))",
                       database=mariadb_server.database)
    rows = [(i, 1.0, ["a"], i, True, "x" * 20 if i % 50 == 0 else "ok") for i in range(1, 401)]
    df = spark.createDataFrame(rows, SCHEMA).repartition(2)
    result = write_view(df, cfg, "items", batch_size=100, dead_letter=tmp_path / "dlq")
    assert (result.rows, result.written, result.failed) == (400, 392, 8)
    letters = dead_letters(tmp_path / "dlq")
    assert sorted(e["key"] for e in letters) == list(range(50, 401, 50))
    assert {e["stage"] for e in letters} == {"write"}
    got = contents(cfg, "items", list(range(1, 401)))
    assert [k for k, v in got.items() if v is None] == list(range(50, 401, 50))


@pytest.mark.redis
def test_a_stopped_server_sends_every_batch_to_the_dead_letters(spark: Any, tmp_path: Path) -> None:
    server = RedisServer().start()
    path = config_file(tmp_path, {"hot": redis_source(server)}, [redis_view("items")])
    server.stop()
    df = spark.createDataFrame([row(i) for i in range(1, 301)], SCHEMA).repartition(2)
    result = write_view(df, path, "items", batch_size=100, dead_letter=tmp_path / "dlq", retries=2,
                        backoff_s=0.01)
    assert (result.rows, result.written, result.failed, result.partitions) == (300, 0, 300, 2)
    # The first batch of each partition is retried twice; once the store is down, later batches get one try.
    assert result.retries == 2 * 2
    letters = dead_letters(tmp_path / "dlq")
    assert sorted(e["key"] for e in letters) == list(range(1, 301))
    assert {e["stage"] for e in letters} == {"unavailable"}
    assert all("BackendUnavailable" in e["reason"] for e in letters)
    assert len(result.dead_letter_files) == 2


def test_arguments_are_checked_on_the_driver(spark: Any, tmp_path: Path) -> None:
    cfg = {"sources": {"mem": {"type": "memory"}}, "views": [view("items", "mem")]}
    df = spark.createDataFrame([row(1)], SCHEMA)
    with pytest.raises(UsageError, match="no view 'nope'"):
        write_view(df, cfg, "nope")
    with pytest.raises(UsageError, match="last_writer_wins needs a 'version'"):
        write_view(df, cfg, "items", conflict="last_writer_wins")
    with pytest.raises(UsageError, match="supports source_wins"):
        write_view(df, cfg, "items", conflict="my_resolver")
    with pytest.raises(UsageError, match="batch_size"):
        write_view(df, cfg, "items", batch_size=0)


@pytest.mark.redis
def test_events_into_a_sequence_view(spark: Any, tmp_path: Path, redis_server: RedisServer) -> None:
    fields = {"item_id": "int", "ts": "int"}
    seq = {"name": "clicks", "entity": "user", "kind": "sequence", "source": "hot", "table": "spark_clicks",
           "key": "user_id", "sequence": {"time_field": "ts", "item_field": "item_id", "fields": fields,
                                          "max_len": 100}}
    path = config_file(tmp_path, {"hot": redis_source(redis_server)}, [seq])
    events = [(f"u{i % 5}", i, 1_700_000_000 + i) for i in range(200)]
    df = spark.createDataFrame(events, "user_id string, item_id long, ts long")
    result = write_view(df, path, "clicks", batch_size=64)
    assert (result.rows, result.written, result.failed) == (200, 200, 0)
    from featuredao import build

    runtime = build(path)
    try:
        rows = runtime.daos["clicks"].read([f"u{u}" for u in range(5)]).rows
    finally:
        runtime.close()
    for u, got in enumerate(rows):
        assert got is not None and got["item_id"] == [i for i in range(199, -1, -1) if i % 5 == u][:100]
    with pytest.raises(ColumnMismatch, match="item_id"):
        write_view(df.drop("item_id"), path, "clicks")
