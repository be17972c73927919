"""MySQL adapter behaviour on a throwaway MariaDB server that the other SQL adapter does not share.

What both SQL adapters share (layouts, server-side timeouts, faults, injection) is in test_sql.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pymysql
import pytest
from test_sql import MYSQL, SqlBackend, view_config

from featuredao.testing.servers import MariaDbServer

pytestmark = pytest.mark.mysql


@pytest.fixture
def mysql(mariadb_server: MariaDbServer) -> SqlBackend:
    return SqlBackend(MYSQL, mariadb_server)


@pytest.fixture
def sql(mysql: SqlBackend) -> Iterator[pymysql.cursors.Cursor]:
    with mysql.cursor() as cur:
        yield cur


def test_wide_store_types_map_to_feature_types(mysql: SqlBackend, sql: pymysql.cursors.Cursor) -> None:
    table = mysql.table("types")
    sql.execute(f"CREATE TABLE {table} (id VARCHAR(64) PRIMARY KEY, price DECIMAL(10,3), n INT, "
                f"flag TINYINT(1), tags JSON, scores JSON, title VARCHAR(100)) CHARSET=utf8mb4")
    sql.execute(f"INSERT INTO {table} VALUES ('a', 12.345, 7, 1, '[\"x\",\"ü\"]', '[1.5, 2]', 'naïve 🙂'), "
                f"('b', NULL, NULL, NULL, NULL, NULL, NULL)")
    features = {"price": "float", "n": "int", "flag": "bool", "tags": "list[str]", "scores": "list[float]",
                "title": "str"}
    runtime, dao = mysql.build(view_config(table, features, defaults={"price": 0.5, "n": -1}))
    try:
        a, b, missing = dao.read(["a", "b", "c"])
        assert a == {"price": 12.345, "n": 7, "flag": True, "tags": ["x", "ü"], "scores": [1.5, 2.0],
                     "title": "naïve 🙂"}
        assert type(a["price"]) is float and type(a["flag"]) is bool
        assert b == {"price": 0.5, "n": -1, "flag": None, "tags": None, "scores": None, "title": None}
        assert missing is None
    finally:
        runtime.close()


def test_untyped_columns_are_checked_like_any_stored_value(mysql: SqlBackend,
                                                           sql: pymysql.cursors.Cursor) -> None:
    table = mysql.table("untyped")
    sql.execute(f"CREATE TABLE {table} (id VARCHAR(32) PRIMARY KEY, flag TINYINT, ids TEXT, scores TEXT)")
    sql.execute(f"INSERT INTO {table} VALUES ('ok', 1, '[1,2]', '[1.5,2]'), ('bad_bool', 2, '[1]', '[]'), "
                "('bad_json', 0, 'not json', ''), ('bad_elem', 0, '[\"x\"]', '[1]')")
    view = view_config(table, {"flag": "bool", "ids": "list[int]", "scores": "list[float]"},
                       defaults={"flag": False, "ids": [0]})
    runtime, dao = mysql.build(view)
    try:
        result = dao.read(["ok", "bad_bool", "bad_json", "bad_elem"])
        assert result.rows == [
            {"flag": True, "ids": [1, 2], "scores": [1.5, 2.0]}, {"flag": False, "ids": [1], "scores": []},
            {"flag": False, "ids": [0], "scores": []}, {"flag": False, "ids": [0], "scores": [1.0]}]
        assert sorted((d.keys, d.feature) for d in result.degraded) == [
            (("bad_bool",), "flag"), (("bad_elem",), "ids"), (("bad_json",), "ids")]
    finally:
        runtime.close()


def test_mysql8_flavor_uses_the_optimizer_hint(mysql: SqlBackend) -> None:
    runtime, dao = mysql.build(view_config(mysql.table("hint"), {"n": "int"}), flavor="mysql")
    try:
        source: Any = runtime.sources["db"]
        assert type(source).__name__ == "MySQLSource"
        hinted = "SELECT /*+ MAX_EXECUTION_TIME(250) */ `n` FROM t"
        assert source._limited("SELECT `n` FROM t", 0.25) == hinted
        dao.prepare()
        dao.upsert([("a", {"n": 5})])
        # MariaDB reads the hint as a comment; the statement still runs.
        assert dao.read(["a"], timeout_s=2.0)[0] == {"n": 5}
    finally:
        runtime.close()


def test_binary_and_unicode_keys(mysql: SqlBackend, sql: pymysql.cursors.Cursor) -> None:
    table = mysql.table("bin")
    # A key column the adapter did not create: VARBINARY comes back as bytes and is decoded.
    sql.execute(f"CREATE TABLE {table} (id VARBINARY(64) PRIMARY KEY, n BIGINT)")
    sql.execute(f"INSERT INTO {table} VALUES (%s, 1), (%s, 2), (%s, 3)",
                (b"plain", "用户-42".encode(), b"A\x00\x7f\tz"))
    runtime, dao = mysql.build(view_config(table, {"n": "int"}))
    try:
        keys: list[Any] = [b"plain", "用户-42", "A\x00\x7f\tz", "PLAIN", "用户"]  # bytes: UTF-8 text
        got = dao.read(keys)
        assert [r["n"] if r else None for r in got] == [1, 2, 3, None, None]
    finally:
        runtime.close()
    # In tables the adapter creates, keys compare exactly (binary collation): case and accents matter.
    runtime, dao = mysql.build(view_config(mysql.table("uni"), {"n": "int"}))
    try:
        dao.prepare()
        keys = ["abc", "ABC", "é", "e", "🙂", "😀"]
        dao.upsert((k, {"n": i}) for i, k in enumerate(keys))
        assert [r["n"] if r else None for r in dao.read(list(reversed(keys)))] == [5, 4, 3, 2, 1, 0]
    finally:
        runtime.close()
