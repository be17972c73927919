"""Hologres adapter on a throwaway PostgreSQL server: layouts, server-side timeouts, faults, types."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from featuredao import config, factory
from featuredao.dao import BaseDao
from featuredao.errors import BackendAuthError, BackendQueryError, BackendTimeout, ConfigError
from featuredao.testing.servers import PostgresServer

pytestmark = pytest.mark.hologres

_names = itertools.count()


def table_name(stem: str) -> str:
    return f"ah_{stem}_{next(_names)}"


def source_config(server: PostgresServer, **extra: Any) -> dict[str, Any]:
    return {"type": "hologres", "host": server.host, "port": server.port, "user": server.user,
            "password": server.password, "database": server.dbname, "sslmode": "disable", **extra}


def view_config(table: str, features: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {"name": "v", "entity": "item", "source": "db", "table": table, "key": "id",
            "features": features, **extra}


@pytest.fixture
def sql(postgres_server: PostgresServer) -> Iterator[psycopg.Connection[Any]]:
    """A raw connection to the test database, to build tables the adapter did not create."""
    with psycopg.connect(postgres_server.conninfo, autocommit=True) as conn:
        yield conn


def build(server: PostgresServer, view: dict[str, Any], **source: Any) -> tuple[factory.Runtime, BaseDao]:
    runtime = factory.build({"sources": {"db": source_config(server, **source)}, "views": [view]})
    dao = runtime.daos["v"]
    assert isinstance(dao, BaseDao)
    return runtime, dao


def test_wide_store_types_map_to_feature_types(postgres_server: PostgresServer,
                                               sql: psycopg.Connection[Any]) -> None:
    table = table_name("types")
    sql.execute(f"CREATE TABLE {table} (id text PRIMARY KEY, price numeric(10,3), n integer, flag boolean, "
                "tags jsonb, scores real[], ids int4[], title varchar(100))")
    sql.execute(f"INSERT INTO {table} VALUES ('a', 12.345, 7, true, '[\"x\",\"ü\"]', '{{1.5,2}}', "
                "'{3,4}', 'naïve 🙂'), ('b', NULL, NULL, NULL, NULL, NULL, NULL, NULL)")
    features = {"price": "float", "n": "int", "flag": "bool", "tags": "list[str]", "scores": "list[float]",
                "ids": "list[int]", "title": "str"}
    runtime, dao = build(postgres_server, view_config(table, features, defaults={"price": 0.5, "n": -1}))
    try:
        a, b, missing = dao.read(["a", "b", "c"])
        assert a == {"price": 12.345, "n": 7, "flag": True, "tags": ["x", "ü"], "scores": [1.5, 2.0],
                     "ids": [3, 4], "title": "naïve 🙂"}
        assert type(a["price"]) is float
        assert b == {"price": 0.5, "n": -1, "flag": None, "tags": None, "scores": None, "ids": None,
                     "title": None}
        assert missing is None
    finally:
        runtime.close()


def test_typed_rows_skip_coercion_only_when_nothing_needs_it(postgres_server: PostgresServer,
                                                             sql: psycopg.Connection[Any]) -> None:
    table = table_name("arrays")
    sql.execute(f"CREATE TABLE {table} (id text PRIMARY KEY, n bigint, ids bigint[])")
    # Typed rows pass straight through; a NULL element or a 2-D array still meets the core's checks.
    sql.execute(f"INSERT INTO {table} VALUES ('ok', 1, '{{1,2}}'), ('null_elem', 2, '{{1,NULL}}'), "
                "('nested', 3, '{{1,2},{3,4}}'), ('null_col', NULL, '{}')")
    runtime, dao = build(postgres_server, view_config(table, {"n": "int", "ids": "list[int]"},
                                                      defaults={"n": -1, "ids": [0]}))
    try:
        result = dao.read(["ok", "null_elem", "nested", "null_col"])
        assert result.rows == [{"n": 1, "ids": [1, 2]}, {"n": 2, "ids": [0]}, {"n": 3, "ids": [0]},
                               {"n": -1, "ids": []}]
        assert sorted((d.keys, d.feature) for d in result.degraded) == [
            (("nested",), "ids"), (("null_elem",), "ids")]
    finally:
        runtime.close()


def test_tall_layout_without_event_time(postgres_server: PostgresServer) -> None:
    view = view_config(table_name("tall"), {"a": "int", "b": "list[str]", "c": "str"},
                       options={"layout": "tall"}, defaults={"a": 0})
    runtime, dao = build(postgres_server, view)
    try:
        dao.prepare()
        dao.upsert([("k1", {"a": 1, "b": ["x"], "c": "one"}), ("k2", {"a": 2})])
        dao.upsert([("k1", {"a": 10, "b": [], "c": "uno"})])
        assert list(dao.read(["k1", "k2", "k3"])) == [
            {"a": 10, "b": [], "c": "uno"}, {"a": 2, "b": None, "c": None}, None]
        assert dao.read(["k1"], ["c"])[0] == {"c": "uno"}
    finally:
        runtime.close()


def test_tall_layout_newest_event_time_wins(postgres_server: PostgresServer,
                                            sql: psycopg.Connection[Any]) -> None:
    table = table_name("events")
    sql.execute(f"CREATE TABLE {table} (id text, fname text, fvalue text, ts timestamptz)")
    # Versions inserted out of order; a row without a time never wins over one with a time.
    sql.execute(f"INSERT INTO {table} VALUES "
                "('u1', 'age', '30', '2024-01-02'), ('u1', 'age', '31', '2024-03-01'), "
                "('u1', 'age', '29', '2023-12-31'), ('u1', 'city', 'Paris', NULL), "
                "('u1', 'city', 'Oslo', '2024-01-01'), ('u2', 'age', '40', '2024-01-01'), "
                "('u2', 'unknown', 'x', '2025-01-01')")
    view = view_config(table, {"age": "int", "city": "str"}, options={
        "layout": "tall", "feature_column": "fname", "value_column": "fvalue", "event_time_column": "ts"})
    runtime, dao = build(postgres_server, view)
    try:
        assert list(dao.read(["u2", "u1", "u3"])) == [
            {"age": 40, "city": None}, {"age": 31, "city": "Oslo"}, None]
    finally:
        runtime.close()


@pytest.mark.parametrize("per_call", [True, False])
def test_timeout_is_enforced_by_the_server_and_the_connection_stays_usable(
        postgres_server: PostgresServer, sql: psycopg.Connection[Any], per_call: bool) -> None:
    table = table_name("base")
    sql.execute(f"CREATE TABLE {table} (id text PRIMARY KEY, n bigint)")
    sql.execute(f"INSERT INTO {table} VALUES ('a', 1)")
    # A deliberately slow "table": reading it sleeps for 3 seconds.
    sql.execute(f"CREATE VIEW {table}_slow AS SELECT t.* FROM {table} t, LATERAL (SELECT pg_sleep(3)) s")
    # Without per-call limits the session limit (read_timeout_ms) is what cancels the statement.
    source = source_config(postgres_server, pool_size=1, per_call_timeout=per_call,
                           **({} if per_call else {"read_timeout_ms": 300}))
    runtime = factory.build({
        "sources": {"db": source},
        "views": [view_config(f"{table}_slow", {"n": "int"}),
                  {**view_config(table, {"n": "int"}), "name": "fast", "prefix": "f_"}],
    })
    try:
        slow, fast = runtime.daos["v"], runtime.daos["fast"]
        with pytest.raises(BackendTimeout) as info:
            slow.read(["a"], timeout_s=0.3)
        # The server cancelled the statement itself (statement_timeout), not just the client waiting.
        assert isinstance(info.value.__cause__, psycopg.errors.QueryCanceled)
        busy = sql.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                           "AND query LIKE %s AND pid <> pg_backend_pid()", (f"%{table}_slow%",)).fetchone()
        assert busy == (0,)
        # The pool's only connection serves the next read, with the default limit back in place.
        assert fast.read(["a"])[0] == {"n": 1}
        assert fast.read(["a"], timeout_s=5.0)[0] == {"n": 1}
    finally:
        runtime.close()


def test_pool_recovers_after_server_restart(postgres_server: PostgresServer) -> None:
    runtime, dao = build(postgres_server, view_config(table_name("restart"), {"n": "int"}), pool_size=2)
    try:
        dao.prepare()
        dao.upsert([("a", {"n": 1}), ("b", {"n": 2})])
        assert [r["n"] if r else None for r in dao.read(["a", "b"])] == [1, 2]
        postgres_server.restart()
        # Both pooled connections are dead now; the read replaces them without failing.
        assert [r["n"] if r else None for r in dao.read(["b", "a"])] == [2, 1]
        dao.ping()
    finally:
        runtime.close()


def test_injection_through_a_config_identifier_is_rejected(postgres_server: PostgresServer) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"table": 't"; DROP TABLE users; --'}, "$.views[0].table"),
        ({"key": 'id"--'}, "$.views[0].key"),
        ({"options": {"layout": "tall", "event_time_column": "ts) OR 1=1 --"}},
         "$.views[0].options.event_time_column"),
    ]
    for bad, path in cases:
        cfg = {"sources": {"db": source_config(postgres_server)},
               "views": [{**view_config("t", {"n": "int"}), **bad}]}
        with pytest.raises(ConfigError) as info:
            config.load(cfg)
        assert [issue.path for issue in info.value.issues] == [path]


@pytest.mark.parametrize("layout", ["wide", "tall"])
def test_injection_through_keys_is_harmless(postgres_server: PostgresServer, layout: str) -> None:
    view = view_config(table_name("inj"), {"n": "int"}, options={"layout": layout})
    runtime, dao = build(postgres_server, view)
    try:
        dao.prepare()
        dao.upsert([("a", {"n": 1}), ("b'); DROP TABLE x; --", {"n": 2})])
        evil = ["' OR '1'='1", "a' OR 1=1 -- ", "$$; SELECT 1; $$", "b'); DROP TABLE x; --", "a"]
        assert [r["n"] if r else None for r in dao.read(evil)] == [None, None, None, 2, 1]
    finally:
        runtime.close()


def test_binary_and_unicode_keys(postgres_server: PostgresServer) -> None:
    for key_type in ("str", "int"):
        view = view_config(table_name("keys"), {"n": "int"}, key_type=key_type)
        runtime, dao = build(postgres_server, view)
        try:
            dao.prepare()
            if key_type == "str":
                keys: list[Any] = ["abc", "ABC", "é", "e", "🙂", "用户-42", "tab\tand\x7f"]
                dao.upsert((k, {"n": i}) for i, k in enumerate(keys))
                # Bytes keys are UTF-8 text; text compares exactly (case and accents matter).
                got = dao.read([k.encode() for k in reversed(keys)] + ["Abc"])
                assert [r["n"] if r else None for r in got] == [6, 5, 4, 3, 2, 1, 0, None]
            else:
                dao.upsert([(2**62, {"n": 1}), (-5, {"n": 2})])
                got = dao.read(["-5", 2**62, 3])
                assert [r["n"] if r else None for r in got] == [2, 1, None]
        finally:
            runtime.close()


def test_missing_table_or_column_names_the_view(postgres_server: PostgresServer) -> None:
    table = table_name("cols")
    runtime, dao = build(postgres_server, view_config(table, {"n": "int"}))
    try:
        with pytest.raises(BackendQueryError) as info:
            dao.read(["a"])
        assert "view='v'" in str(info.value) and info.value.view == "v"
        assert isinstance(info.value.__cause__, psycopg.errors.UndefinedTable)
        dao.prepare()
    finally:
        runtime.close()
    runtime, dao = build(postgres_server, view_config(table, {"n": "int", "absent": "str"}))
    try:
        with pytest.raises(BackendQueryError) as info:
            dao.read(["a"], ["absent"])
        assert info.value.view == "v" and "absent" in str(info.value)
        assert dao.read(["a"], ["n"])[0] is None  # the connection survived the failed statement
    finally:
        runtime.close()


def test_wrong_password_error_does_not_reveal_it(postgres_server: PostgresServer) -> None:
    secret = "Sup3r-s3cret-pa55word"
    runtime, dao = build(postgres_server, view_config("t", {"n": "int"}), password=secret)
    try:
        with pytest.raises(BackendAuthError) as info:
            dao.read(["a"], timeout_s=5.0)
        shown = [str(info.value), repr(info.value), str(info.value.__cause__), repr(info.value.__cause__),
                 repr(runtime.sources["db"]), repr(runtime.sources["db"].options), repr(runtime.config)]
        assert all(secret not in text for text in shown)
    finally:
        runtime.close()


def test_building_does_not_connect(postgres_server: PostgresServer) -> None:
    # A closed port: building the runtime succeeds; only a read would report the store down.
    runtime, _ = build(postgres_server, view_config("t", {"n": "int"}), port=1)
    runtime.close()
