"""Existing tables are read as they are: data written by each store's own tool, never by featuredao.

Every test makes its table (or keys) with the store's own client, the way another program would: SQL DDL
and INSERTs by hand, ``redis-cli``-style ``HSET`` of text values, happybase puts without featuredao's
row marker, OTSClient ``put_row``. The view then reads it with no layout options unless the store needs
one to know where to look, and the test checks the exact values and Python types featuredao returns.
"""

from __future__ import annotations

import itertools
import sqlite3
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import happybase
import pytest
import redis
import tablestore as ots
from clickhouse_driver import Client
from test_sql import HOLOGRES, MYSQL, SqlBackend

from featuredao import factory
from featuredao.dao import BaseDao
from featuredao.testing.hbase import HBaseThriftServer
from featuredao.testing.servers import ClickHouseServer, MariaDbServer, PostgresServer, RedisServer
from featuredao.testing.tablestore import DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET, TableStoreServer

FEATURES = {"n": "int", "price": "float", "title": "str", "flag": "bool", "tags": "list[str]"}
DEFAULTS = {"n": -1, "price": 0.25}
FULL = {"n": 42, "price": 0.5, "title": "naïve 🙂", "flag": True, "tags": ["a", "b"]}
# The row of nulls (or absent cells) reads as the defaults and None.
SPARSE = {"n": -1, "price": 0.25, "title": "only", "flag": False, "tags": None}
TYPES = {"n": int, "price": float, "title": str, "flag": bool, "tags": list}
_names = itertools.count()


def table_name(stem: str) -> str:
    return f"ex_{stem}_{next(_names)}_{time.time_ns() % 10**6}"


def build(source: dict[str, Any], table: str, **view: Any) -> tuple[factory.Runtime, BaseDao]:
    runtime = factory.build({"sources": {"s": source}, "views": [
        {"name": "v", "entity": "item", "source": "s", "table": table, "key": "id", "features": FEATURES,
         "defaults": DEFAULTS, **view}]})
    dao = runtime.daos["v"]
    assert isinstance(dao, BaseDao)
    return runtime, dao


def assert_reads(dao: BaseDao, full: dict[str, Any] = FULL, sparse: dict[str, Any] = SPARSE) -> None:
    """k1 holds every feature, k2 a few, k3 does not exist: exact values, exact types, in key order."""
    result = dao.read(["k3", "k1", "k2"])
    assert result.degraded == []
    missing, k1, k2 = result.rows
    assert missing is None
    assert k1 == full
    assert k2 == sparse
    for row in (k1, k2):
        assert row is not None
        for name, value in row.items():
            assert value is None or type(value) is TYPES[name], (name, value)
    tags = k1["tags"]
    assert isinstance(tags, list) and all(type(t) is str for t in tags)


# -- SQL stores --------------------------------------------------------------------------------------


@pytest.mark.clickhouse
def test_clickhouse_plain_merge_tree_made_by_hand(clickhouse_server: ClickHouseServer) -> None:
    # No version column, no _nulls column, no ReplacingMergeTree: what another tool makes. A list column
    # cannot be NULL in ClickHouse, so the sparse row's list reads as the empty list it stores.
    table = table_name("ch")
    s = clickhouse_server
    raw = Client(s.host, port=s.port, user=s.user, password=s.password, database=s.database)
    try:
        raw.execute(f"CREATE TABLE {table} (id String, n Nullable(Int32), price Nullable(Float64), "
                    "title Nullable(String), flag Nullable(UInt8), tags Array(String)) "
                    "ENGINE = MergeTree ORDER BY id")
        raw.execute(f"INSERT INTO {table} VALUES", [("k1", 42, 0.5, "naïve 🙂", 1, ["a", "b"]),
                                                     ("k2", None, None, "only", 0, [])])
    finally:
        raw.disconnect()
    runtime, dao = build({"type": "clickhouse", "host": s.host, "port": s.port, "user": s.user,
                          "password": s.password, "database": s.database}, table)
    try:
        assert_reads(dao, sparse={**SPARSE, "tags": []})
    finally:
        runtime.close()


@pytest.mark.mysql
def test_mysql_table_made_by_hand(mariadb_server: MariaDbServer) -> None:
    backend = SqlBackend(MYSQL, mariadb_server)
    table = backend.table("existing")
    with backend.cursor() as sql:
        sql.execute(f"CREATE TABLE {table} (id VARCHAR(32) NOT NULL PRIMARY KEY, n INT, price DOUBLE, "
                    "title TEXT, flag BOOLEAN, tags JSON) DEFAULT CHARSET=utf8mb4")
        sql.execute(f"INSERT INTO {table} VALUES ('k1', 42, 0.5, 'naïve 🙂', TRUE, '[\"a\", \"b\"]'), "
                    "('k2', NULL, NULL, 'only', FALSE, NULL)")
    runtime, dao = build(backend.source(), table)
    try:
        assert_reads(dao)
    finally:
        runtime.close()


@pytest.mark.hologres
def test_postgresql_table_made_by_hand(postgres_server: PostgresServer) -> None:
    backend = SqlBackend(HOLOGRES, postgres_server)
    table = backend.table("existing")
    with backend.cursor() as sql:
        sql.execute(f"CREATE TABLE {table} (id varchar(32) PRIMARY KEY, n integer, price double precision, "
                    "title text, flag boolean, tags text[], extra jsonb)")
        sql.execute(f"INSERT INTO {table} VALUES ('k1', 42, 0.5, 'naïve 🙂', true, ARRAY['a', 'b'], "
                    "'[1.5, 2]'), ('k2', NULL, NULL, 'only', false, NULL, NULL)")
    runtime, dao = build(backend.source(), table)
    try:
        assert_reads(dao)
    finally:
        runtime.close()
    # A jsonb array reads as a list too (psycopg decodes it).
    runtime, dao = build(backend.source(), table, features={"extra": "list[float]"}, defaults={})
    try:
        assert dao.read(["k1", "k2"]).rows == [{"extra": [1.5, 2.0]}, {"extra": None}]
    finally:
        runtime.close()


@pytest.mark.sqlite
def test_sqlite_table_made_by_hand(tmp_path: Path) -> None:
    path = tmp_path / "existing.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE items (id TEXT PRIMARY KEY, n INTEGER, price REAL, title TEXT, "
                     "flag BOOLEAN, tags TEXT)")
        conn.execute("INSERT INTO items VALUES ('k1', 42, 0.5, 'naïve 🙂', 1, '[\"a\", \"b\"]'), "
                     "('k2', NULL, NULL, 'only', 0, NULL)")
    conn.close()
    runtime, dao = build({"type": "sqlite", "path": str(path)}, "items")
    try:
        assert_reads(dao)
    finally:
        runtime.close()


# -- Redis ---------------------------------------------------------------------------------------------


@pytest.mark.redis
def test_redis_hashes_written_like_redis_cli(redis_server: RedisServer) -> None:
    # redis-cli HSET items:k1 n 42 price 0.5 ... : every value is text, field names are the features.
    table = table_name("redis")
    raw = redis.Redis(host=redis_server.host, port=redis_server.port)
    try:
        raw.hset(f"{table}:k1", mapping={"n": "42", "price": "0.5", "title": "naïve 🙂", "flag": "1",
                                         "tags": '["a", "b"]'})
        raw.hset(f"{table}:k2", mapping={"title": "only", "flag": "false", "other": "not a feature"})
        raw.hset(f"{table}:k4", mapping={"other": "x"})  # a hash without any feature of the view
    finally:
        raw.close()
    runtime, dao = build({"type": "redis", "host": redis_server.host, "port": redis_server.port}, table)
    try:
        assert_reads(dao)
        # The key exists: a row of defaults, told apart from a missing key with EXISTS.
        assert dao.read(["k4", "k5"], ["n"]).rows == [{"n": -1}, None]
    finally:
        runtime.close()


# -- HBase ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hbase_server() -> Iterator[HBaseThriftServer]:
    with HBaseThriftServer() as srv:
        yield srv


@pytest.mark.hbase
def test_hbase_cells_put_by_happybase_without_the_marker(hbase_server: HBaseThriftServer) -> None:
    table = f"ex_{uuid.uuid4().hex[:10]}"
    conn = happybase.Connection(**hbase_server.connection_kwargs())
    try:
        conn.create_table(table, {"f": {}})
        t = conn.table(table)
        t.put(b"k1", {b"f:n": b"42", b"f:price": b"0.5", b"f:title": "naïve 🙂".encode(), b"f:flag": b"true",
                      b"f:tags": b'["a", "b"]'})
        t.put(b"k2", {b"f:title": b"only", b"f:flag": b"0"})
        t.put(b"k4", {b"f:other": b"x"})  # cells of no feature of the view
        assert b"f:" not in t.row(b"k1")  # no featuredao marker anywhere
    finally:
        conn.close()
    runtime, dao = build({"type": "hbase", "host": "127.0.0.1", "port": hbase_server.port}, table)
    try:
        assert_reads(dao)
        # The rule: a row is found when it has the marker or a cell of a requested feature. Without the
        # marker, a row none of whose requested features is stored reads as missing.
        assert dao.read(["k1", "k2", "k4"], ["n", "title"]).rows == [{"n": 42, "title": "naïve 🙂"},
                                                                     {"n": -1, "title": "only"}, None]
        assert dao.read(["k1", "k2"], ["n"]).rows == [{"n": 42}, None]
        # Once featuredao writes a row, its marker keeps the row found whatever the projection.
        dao.upsert([("k2", {"title": "only"})])
        assert dao.read(["k2"], ["n"]).rows == [{"n": -1}]
    finally:
        runtime.close()


@pytest.mark.hbase
def test_hbase_binary_cells_put_like_java_bytes(hbase_server: HBaseThriftServer) -> None:
    # Bytes.toBytes(long), Bytes.toBytes(double), Bytes.toBytes(boolean) as a Java writer stores them.
    table = f"ex_{uuid.uuid4().hex[:10]}"
    conn = happybase.Connection(**hbase_server.connection_kwargs())
    try:
        conn.create_table(table, {"cf": {}})
        t = conn.table(table)
        t.put(b"k1", {b"cf:n": struct.pack(">q", 42), b"cf:price": struct.pack(">d", 0.5),
                      b"cf:title": "naïve 🙂".encode(), b"cf:flag": b"\xff", b"cf:tags": b'["a","b"]'})
        t.put(b"k2", {b"cf:title": b"only", b"cf:flag": b"\x00"})
    finally:
        conn.close()
    runtime, dao = build({"type": "hbase", "host": "127.0.0.1", "port": hbase_server.port}, table,
                         options={"encoding": "binary", "column_family": "cf"})
    try:
        assert_reads(dao)
    finally:
        runtime.close()


# -- TableStore ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tablestore_server() -> Iterator[TableStoreServer]:
    with TableStoreServer("127.0.0.1") as srv:
        yield srv


@pytest.mark.tablestore
def test_tablestore_rows_put_by_otsclient(tablestore_server: TableStoreServer) -> None:
    srv = tablestore_server
    table = f"ex_{uuid.uuid4().hex[:10]}"
    client = ots.OTSClient(srv.endpoint, DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET, srv.instance_name,
                           retry_policy=ots.NoRetryPolicy())
    client.create_table(ots.TableMeta(table, [("id", "STRING")]), ots.TableOptions(),
                        ots.ReservedThroughput(ots.CapacityUnit(0, 0)))
    client.put_row(table, ots.Row([("id", "k1")], [("n", 42), ("price", 0.5), ("title", "naïve 🙂"),
                                                   ("flag", True), ("tags", '["a", "b"]')]))
    client.put_row(table, ots.Row([("id", "k2")], [("title", "only"), ("flag", False)]))
    # A whole number written as INTEGER into a float feature reads as a float.
    client.put_row(table, ots.Row([("id", "k4")], [("price", 2)]))
    runtime, dao = build({"type": "tablestore", "endpoint": srv.endpoint, "instance_name": srv.instance_name,
                          "access_key_id": DEFAULT_ACCESS_KEY_ID,
                          "access_key_secret": DEFAULT_ACCESS_KEY_SECRET}, table)
    try:
        assert_reads(dao)
        k4 = dao.read(["k4"], ["price", "n"])[0]
        assert k4 == {"price": 2.0, "n": -1} and k4 is not None and type(k4["price"]) is float
    finally:
        runtime.close()
