"""Hologres adapter behaviour on a throwaway PostgreSQL server that the other SQL adapter does not share.

What both SQL adapters share (layouts, server-side timeouts, faults, injection) is in test_sql.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from test_sql import HOLOGRES, SqlBackend, assert_server_cancels_slow_read, view_config

from featuredao.testing.servers import PostgresServer

pytestmark = pytest.mark.hologres


@pytest.fixture
def hologres(postgres_server: PostgresServer) -> SqlBackend:
    return SqlBackend(HOLOGRES, postgres_server)


@pytest.fixture
def sql(hologres: SqlBackend) -> Iterator[psycopg.Cursor[Any]]:
    with hologres.cursor() as cur:
        yield cur


def test_wide_store_types_map_to_feature_types(hologres: SqlBackend, sql: psycopg.Cursor[Any]) -> None:
    table = hologres.table("types")
    sql.execute(f"CREATE TABLE {table} (id text PRIMARY KEY, price numeric(10,3), n integer, flag boolean, "
                "tags jsonb, scores real[], ids int4[], title varchar(100))")
    sql.execute(f"INSERT INTO {table} VALUES ('a', 12.345, 7, true, '[\"x\",\"ü\"]', '{{1.5,2}}', "
                "'{3,4}', 'naïve 🙂'), ('b', NULL, NULL, NULL, NULL, NULL, NULL, NULL)")
    features = {"price": "float", "n": "int", "flag": "bool", "tags": "list[str]", "scores": "list[float]",
                "ids": "list[int]", "title": "str"}
    runtime, dao = hologres.build(view_config(table, features, defaults={"price": 0.5, "n": -1}))
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


def test_typed_rows_skip_coercion_only_when_nothing_needs_it(hologres: SqlBackend,
                                                             sql: psycopg.Cursor[Any]) -> None:
    table = hologres.table("arrays")
    sql.execute(f"CREATE TABLE {table} (id text PRIMARY KEY, n bigint, ids bigint[])")
    # Typed rows pass straight through; a NULL element or a 2-D array still meets the core's checks.
    sql.execute(f"INSERT INTO {table} VALUES ('ok', 1, '{{1,2}}'), ('null_elem', 2, '{{1,NULL}}'), "
                "('nested', 3, '{{1,2},{3,4}}'), ('null_col', NULL, '{}')")
    runtime, dao = hologres.build(view_config(table, {"n": "int", "ids": "list[int]"},
                                              defaults={"n": -1, "ids": [0]}))
    try:
        result = dao.read(["ok", "null_elem", "nested", "null_col"])
        assert result.rows == [{"n": 1, "ids": [1, 2]}, {"n": 2, "ids": [0]}, {"n": 3, "ids": [0]},
                               {"n": -1, "ids": []}]
        assert sorted((d.keys, d.feature) for d in result.degraded) == [
            (("nested",), "ids"), (("null_elem",), "ids")]
    finally:
        runtime.close()


def test_session_timeout_is_enforced_by_the_server_without_per_call_limits(
        hologres: SqlBackend, sql: psycopg.Cursor[Any]) -> None:
    # Without per-call limits the session limit (read_timeout_ms) is what cancels the statement.
    # test_sql.py covers the per-call limits (per_call_timeout: true, the default).
    assert_server_cancels_slow_read(hologres, sql, per_call_timeout=False, read_timeout_ms=300)


def test_binary_and_unicode_keys(hologres: SqlBackend) -> None:
    for key_type in ("str", "int"):
        view = view_config(hologres.table("keys"), {"n": "int"}, key_type=key_type)
        runtime, dao = hologres.build(view)
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
