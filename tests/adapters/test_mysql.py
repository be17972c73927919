"""MySQL adapter behaviour on a throwaway MariaDB server: layouts, server-side timeouts, faults, types."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest

from featuredao import config, factory
from featuredao.dao import BaseDao
from featuredao.errors import BackendAuthError, BackendQueryError, BackendTimeout, ConfigError
from featuredao.testing.servers import MariaDbServer

pytestmark = pytest.mark.mysql

_names = itertools.count()


def table_name(stem: str) -> str:
    return f"am_{stem}_{next(_names)}"


def source_config(server: MariaDbServer, **extra: Any) -> dict[str, Any]:
    return {"type": "mysql", "host": server.host, "port": server.port, "user": server.user,
            "password": server.password, "database": server.database, **extra}


def view_config(table: str, features: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {"name": "v", "entity": "item", "source": "db", "table": table, "key": "id",
            "features": features, **extra}


@pytest.fixture
def sql(mariadb_server: MariaDbServer) -> Iterator[pymysql.cursors.Cursor]:
    """A raw cursor on the test database, to build tables the adapter did not create."""
    conn = pymysql.connect(host=mariadb_server.host, port=mariadb_server.port, user=mariadb_server.user,
                           password=mariadb_server.password, database=mariadb_server.database,
                           autocommit=True, charset="utf8mb4")
    with conn.cursor() as cur:
        yield cur
    conn.close()


def build(server: MariaDbServer, view: dict[str, Any], **source: Any) -> tuple[factory.Runtime, BaseDao]:
    runtime = factory.build({"sources": {"db": source_config(server, **source)}, "views": [view]})
    dao = runtime.daos["v"]
    assert isinstance(dao, BaseDao)
    return runtime, dao


def test_wide_store_types_map_to_feature_types(mariadb_server: MariaDbServer,
                                               sql: pymysql.cursors.Cursor) -> None:
    table = table_name("types")
    sql.execute(f"CREATE TABLE {table} (id VARCHAR(64) PRIMARY KEY, price DECIMAL(10,3), n INT, "
                f"flag TINYINT(1), tags JSON, scores JSON, title VARCHAR(100)) CHARSET=utf8mb4")
    sql.execute(f"INSERT INTO {table} VALUES ('a', 12.345, 7, 1, '[\"x\",\"ü\"]', '[1.5, 2]', 'naïve 🙂'), "
                f"('b', NULL, NULL, NULL, NULL, NULL, NULL)")
    features = {"price": "float", "n": "int", "flag": "bool", "tags": "list[str]", "scores": "list[float]",
                "title": "str"}
    runtime, dao = build(mariadb_server, view_config(table, features, defaults={"price": 0.5, "n": -1}))
    try:
        a, b, missing = dao.read(["a", "b", "c"])
        assert a == {"price": 12.345, "n": 7, "flag": True, "tags": ["x", "ü"], "scores": [1.5, 2.0],
                     "title": "naïve 🙂"}
        assert type(a["price"]) is float and type(a["flag"]) is bool
        assert b == {"price": 0.5, "n": -1, "flag": None, "tags": None, "scores": None, "title": None}
        assert missing is None
    finally:
        runtime.close()


def test_untyped_columns_are_checked_like_any_stored_value(mariadb_server: MariaDbServer,
                                                           sql: pymysql.cursors.Cursor) -> None:
    table = table_name("untyped")
    sql.execute(f"CREATE TABLE {table} (id VARCHAR(32) PRIMARY KEY, flag TINYINT, ids TEXT, scores TEXT)")
    sql.execute(f"INSERT INTO {table} VALUES ('ok', 1, '[1,2]', '[1.5,2]'), ('bad_bool', 2, '[1]', '[]'), "
                "('bad_json', 0, 'not json', ''), ('bad_elem', 0, '[\"x\"]', '[1]')")
    view = view_config(table, {"flag": "bool", "ids": "list[int]", "scores": "list[float]"},
                       defaults={"flag": False, "ids": [0]})
    runtime, dao = build(mariadb_server, view)
    try:
        result = dao.read(["ok", "bad_bool", "bad_json", "bad_elem"])
        assert result.rows == [
            {"flag": True, "ids": [1, 2], "scores": [1.5, 2.0]}, {"flag": False, "ids": [1], "scores": []},
            {"flag": False, "ids": [0], "scores": []}, {"flag": False, "ids": [0], "scores": [1.0]}]
        assert sorted((d.keys, d.feature) for d in result.degraded) == [
            (("bad_bool",), "flag"), (("bad_elem",), "ids"), (("bad_json",), "ids")]
    finally:
        runtime.close()


def test_tall_layout_without_event_time(mariadb_server: MariaDbServer) -> None:
    view = view_config(table_name("tall"), {"a": "int", "b": "list[str]", "c": "str"},
                       options={"layout": "tall"}, defaults={"a": 0})
    runtime, dao = build(mariadb_server, view)
    try:
        dao.prepare()
        dao.upsert([("k1", {"a": 1, "b": ["x"], "c": "one"}), ("k2", {"a": 2})])
        dao.upsert([("k1", {"a": 10, "b": [], "c": "uno"})])
        assert list(dao.read(["k1", "k2", "k3"])) == [
            {"a": 10, "b": [], "c": "uno"}, {"a": 2, "b": None, "c": None}, None]
        assert dao.read(["k1"], ["c"])[0] == {"c": "uno"}
    finally:
        runtime.close()


def test_tall_layout_newest_event_time_wins(mariadb_server: MariaDbServer,
                                            sql: pymysql.cursors.Cursor) -> None:
    table = table_name("events")
    sql.execute(f"CREATE TABLE {table} (id VARCHAR(32), fname VARCHAR(32), fvalue TEXT, ts DATETIME(6))")
    # Versions inserted out of order; a row without a time never wins over one with a time.
    sql.execute(f"INSERT INTO {table} VALUES "
                "('u1', 'age', '30', '2024-01-02'), ('u1', 'age', '31', '2024-03-01'), "
                "('u1', 'age', '29', '2023-12-31'), ('u1', 'city', 'Paris', NULL), "
                "('u1', 'city', 'Oslo', '2024-01-01'), ('u2', 'age', '40', '2024-01-01'), "
                "('u2', 'unknown', 'x', '2025-01-01')")
    view = view_config(table, {"age": "int", "city": "str"}, options={
        "layout": "tall", "feature_column": "fname", "value_column": "fvalue", "event_time_column": "ts"})
    runtime, dao = build(mariadb_server, view)
    try:
        assert list(dao.read(["u2", "u1", "u3"])) == [
            {"age": 40, "city": None}, {"age": 31, "city": "Oslo"}, None]
    finally:
        runtime.close()


def test_timeout_is_enforced_by_the_server_and_the_connection_stays_usable(
        mariadb_server: MariaDbServer, sql: pymysql.cursors.Cursor) -> None:
    table = table_name("base")
    sql.execute(f"CREATE TABLE {table} (id VARCHAR(32) PRIMARY KEY, n BIGINT)")
    sql.execute(f"INSERT INTO {table} VALUES ('a', 1)")
    # A deliberately slow "table": every row scanned sleeps for 3 seconds.
    sql.execute(f"CREATE VIEW {table}_slow AS SELECT * FROM {table} WHERE SLEEP(3) = 0")
    runtime = factory.build({
        "sources": {"db": source_config(mariadb_server, pool_size=1)},
        "views": [view_config(f"{table}_slow", {"n": "int"}),
                  {**view_config(table, {"n": "int"}), "name": "fast", "prefix": "f_"}],
    })
    try:
        slow, fast = runtime.daos["v"], runtime.daos["fast"]
        with pytest.raises(BackendTimeout) as info:
            slow.read(["a"], timeout_s=0.3)
        # The server stopped the statement itself (max_statement_time), not just the client waiting.
        cause = info.value.__cause__
        assert isinstance(cause, pymysql.err.OperationalError) and cause.args[0] == 1969
        sql.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                    f"WHERE COMMAND = 'Query' AND INFO LIKE '%{table}_slow%' AND ID <> CONNECTION_ID()")
        assert sql.fetchone() == (0,)
        # The pool's only connection serves the next read.
        assert fast.read(["a"])[0] == {"n": 1}
    finally:
        runtime.close()


def test_mysql8_flavor_uses_the_optimizer_hint(mariadb_server: MariaDbServer) -> None:
    runtime, dao = build(mariadb_server, view_config(table_name("hint"), {"n": "int"}), flavor="mysql")
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


def test_pool_recovers_after_server_restart(mariadb_server: MariaDbServer) -> None:
    runtime, dao = build(mariadb_server, view_config(table_name("restart"), {"n": "int"}), pool_size=2)
    try:
        dao.prepare()
        dao.upsert([("a", {"n": 1}), ("b", {"n": 2})])
        assert [r["n"] if r else None for r in dao.read(["a", "b"])] == [1, 2]
        mariadb_server.restart()
        # Both pooled connections are dead now; the read replaces them without failing.
        assert [r["n"] if r else None for r in dao.read(["b", "a"])] == [2, 1]
        dao.ping()
    finally:
        runtime.close()


def test_injection_through_a_config_identifier_is_rejected(mariadb_server: MariaDbServer) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"table": "t; DROP TABLE users"}, "$.views[0].table"),
        ({"key": "id`--"}, "$.views[0].key"),
        ({"options": {"layout": "tall", "feature_column": "f) OR 1=1 --"}},
         "$.views[0].options.feature_column"),
    ]
    for bad, path in cases:
        cfg = {"sources": {"db": source_config(mariadb_server)},
               "views": [{**view_config("t", {"n": "int"}), **bad}]}
        with pytest.raises(ConfigError) as info:
            config.load(cfg)
        assert [issue.path for issue in info.value.issues] == [path]
    # Tall-only settings on a wide view are a mistake worth reporting too.
    with pytest.raises(ConfigError):
        config.load({"sources": {"db": source_config(mariadb_server)},
                     "views": [view_config("t", {"n": "int"}, options={"feature_column": "f"})]})


@pytest.mark.parametrize("layout", ["wide", "tall"])
def test_injection_through_keys_is_harmless(mariadb_server: MariaDbServer, layout: str) -> None:
    view = view_config(table_name("inj"), {"n": "int"}, options={"layout": layout})
    runtime, dao = build(mariadb_server, view)
    try:
        dao.prepare()
        dao.upsert([("a", {"n": 1}), ("b'; DROP TABLE x; --", {"n": 2})])
        evil = ["' OR '1'='1", "a' OR 1=1 -- ", "\\' OR 1=1 #", "b'; DROP TABLE x; --", "a"]
        assert [r["n"] if r else None for r in dao.read(evil)] == [None, None, None, 2, 1]
    finally:
        runtime.close()


def test_binary_and_unicode_keys(mariadb_server: MariaDbServer, sql: pymysql.cursors.Cursor) -> None:
    table = table_name("bin")
    # A key column the adapter did not create: VARBINARY comes back as bytes and is decoded.
    sql.execute(f"CREATE TABLE {table} (id VARBINARY(64) PRIMARY KEY, n BIGINT)")
    sql.execute(f"INSERT INTO {table} VALUES (%s, 1), (%s, 2), (%s, 3)",
                (b"plain", "用户-42".encode(), b"A\x00\x7f\tz"))
    runtime, dao = build(mariadb_server, view_config(table, {"n": "int"}))
    try:
        keys: list[Any] = [b"plain", "用户-42", "A\x00\x7f\tz", "PLAIN", "用户"]  # bytes: UTF-8 text
        got = dao.read(keys)
        assert [r["n"] if r else None for r in got] == [1, 2, 3, None, None]
    finally:
        runtime.close()
    # In tables the adapter creates, keys compare exactly (binary collation): case and accents matter.
    runtime, dao = build(mariadb_server, view_config(table_name("uni"), {"n": "int"}))
    try:
        dao.prepare()
        keys = ["abc", "ABC", "é", "e", "🙂", "😀"]
        dao.upsert((k, {"n": i}) for i, k in enumerate(keys))
        assert [r["n"] if r else None for r in dao.read(list(reversed(keys)))] == [5, 4, 3, 2, 1, 0]
    finally:
        runtime.close()


def test_missing_table_or_column_names_the_view(mariadb_server: MariaDbServer) -> None:
    table = table_name("cols")
    runtime, dao = build(mariadb_server, view_config(table, {"n": "int"}))
    try:
        with pytest.raises(BackendQueryError) as info:
            dao.read(["a"])
        assert "view='v'" in str(info.value) and info.value.view == "v"
        dao.prepare()
    finally:
        runtime.close()
    runtime, dao = build(mariadb_server, view_config(table, {"n": "int", "absent": "str"}))
    try:
        with pytest.raises(BackendQueryError) as info:
            dao.read(["a"], ["absent"])
        assert info.value.view == "v" and "absent" in str(info.value)
    finally:
        runtime.close()


def test_wrong_password_error_does_not_reveal_it(mariadb_server: MariaDbServer) -> None:
    secret = "Sup3r-s3cret-pa55word"
    runtime, dao = build(mariadb_server, view_config("t", {"n": "int"}), password=secret)
    try:
        with pytest.raises(BackendAuthError) as info:
            dao.read(["a"])
        shown = [str(info.value), repr(info.value), str(info.value.__cause__), repr(info.value.__cause__),
                 repr(runtime.sources["db"]), repr(runtime.sources["db"].options), repr(runtime.config)]
        assert all(secret not in text for text in shown)
    finally:
        runtime.close()


def test_building_does_not_connect(mariadb_server: MariaDbServer) -> None:
    # A closed port: building the runtime succeeds; only a read reports the store down.
    runtime, _ = build(mariadb_server, view_config("t", {"n": "int"}), port=1)
    runtime.close()
