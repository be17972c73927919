"""What the SQL adapters (mysql on MariaDB, hologres on PostgreSQL) share: layouts, timeouts, faults.

Every test here runs once per adapter through the ``sql_backend`` fixture; what differs between the two
(column types, the slow view, quoting, the driver's errors) is data in each :class:`Dialect`. Tests of one
adapter only live in test_mysql.py and test_hologres.py, which build on the helpers below.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import pymysql
import pytest

from featuredao import config, factory
from featuredao.dao import BaseDao
from featuredao.errors import BackendAuthError, BackendQueryError, BackendTimeout, ConfigError
from featuredao.testing.servers import MariaDbServer, PostgresServer

_names = itertools.count()

DriverError = tuple[type[BaseException], object]
"""A driver exception class and the error code it carries (MySQL errno, PostgreSQL SQLSTATE)."""


@dataclass(frozen=True)
class Dialect:
    """One SQL adapter's test data: its server, its raw driver and what differs in SQL and errors."""

    name: str
    """The source ``type``, the test id and the pytest marker."""
    server_fixture: str
    table_prefix: str
    source_config: Callable[[Any], dict[str, Any]]
    """The server -> a source config reaching it."""
    cursor: Callable[[Any], AbstractContextManager[Any]]
    """The server -> a raw autocommit cursor, to build tables the adapter did not create."""
    error_code: Callable[[BaseException], object]
    key_type: str
    """Column type of a hand-made key (or short text) column."""
    time_type: str
    slow_view: str
    """A view ``{table}_slow`` over ``{table}`` whose reading sleeps for seconds."""
    running_statements: str
    """Count the statements running on other connections whose text is LIKE the one parameter."""
    timeout_error: DriverError
    """How the driver reports a statement the server cancelled at its time limit."""
    missing_table_error: DriverError
    bad_identifiers: list[tuple[dict[str, Any], str]]
    """View settings smuggling SQL into an identifier (this dialect's quoting), and the config path blamed."""
    injected_key: str
    """A key that closes this dialect's string literal and appends a statement."""
    quote_probe: str
    """Another key that escapes a string literal in this dialect's own way."""


@contextmanager
def _mysql_cursor(server: MariaDbServer) -> Iterator[pymysql.cursors.Cursor]:
    conn = pymysql.connect(host=server.host, port=server.port, user=server.user, password=server.password,
                           database=server.database, autocommit=True, charset="utf8mb4")
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        conn.close()


@contextmanager
def _pg_cursor(server: PostgresServer) -> Iterator[psycopg.Cursor[Any]]:
    with psycopg.connect(server.conninfo, autocommit=True) as conn, conn.cursor() as cur:
        yield cur


MYSQL = Dialect(
    name="mysql", server_fixture="mariadb_server", table_prefix="am",
    source_config=lambda s: {"type": "mysql", "host": s.host, "port": s.port, "user": s.user,
                             "password": s.password, "database": s.database},
    cursor=_mysql_cursor,
    error_code=lambda exc: exc.args[0],
    key_type="VARCHAR(32)", time_type="DATETIME(6)",
    # Every row scanned sleeps for 3 seconds.
    slow_view="CREATE VIEW {table}_slow AS SELECT * FROM {table} WHERE SLEEP(3) = 0",
    running_statements="SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                       "WHERE COMMAND = 'Query' AND INFO LIKE %s AND ID <> CONNECTION_ID()",
    # max_statement_time exceeded: the server stopped the statement, not just the client waiting.
    timeout_error=(pymysql.err.OperationalError, 1969),
    missing_table_error=(pymysql.err.ProgrammingError, 1146),
    bad_identifiers=[
        ({"table": "t; DROP TABLE users"}, "$.views[0].table"),
        ({"key": "id`--"}, "$.views[0].key"),
        ({"options": {"layout": "tall", "feature_column": "f) OR 1=1 --"}},
         "$.views[0].options.feature_column"),
    ],
    injected_key="b'; DROP TABLE x; --", quote_probe="\\' OR 1=1 #",
)

HOLOGRES = Dialect(
    name="hologres", server_fixture="postgres_server", table_prefix="ah",
    source_config=lambda s: {"type": "hologres", "host": s.host, "port": s.port, "user": s.user,
                             "password": s.password, "database": s.dbname, "sslmode": "disable"},
    cursor=_pg_cursor,
    error_code=lambda exc: getattr(exc, "sqlstate", None),
    key_type="text", time_type="timestamptz",
    # Reading it sleeps for 3 seconds.
    slow_view="CREATE VIEW {table}_slow AS SELECT t.* FROM {table} t, LATERAL (SELECT pg_sleep(3)) s",
    running_statements="SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                       "AND query LIKE %s AND pid <> pg_backend_pid()",
    # query_canceled (statement_timeout): the server cancelled the statement, not just the client waiting.
    timeout_error=(psycopg.errors.QueryCanceled, "57014"),
    missing_table_error=(psycopg.errors.UndefinedTable, "42P01"),
    bad_identifiers=[
        ({"table": 't"; DROP TABLE users; --'}, "$.views[0].table"),
        ({"key": 'id"--'}, "$.views[0].key"),
        ({"options": {"layout": "tall", "event_time_column": "ts) OR 1=1 --"}},
         "$.views[0].options.event_time_column"),
    ],
    injected_key="b'); DROP TABLE x; --", quote_probe="$$; SELECT 1; $$",
)


@dataclass(frozen=True)
class SqlBackend:
    """A dialect with its live throwaway server."""

    dialect: Dialect
    server: Any

    def table(self, stem: str) -> str:
        """A table name no other test uses."""
        return f"{self.dialect.table_prefix}_{stem}_{next(_names)}"

    def source(self, **extra: Any) -> dict[str, Any]:
        return {**self.dialect.source_config(self.server), **extra}

    def cursor(self) -> AbstractContextManager[Any]:
        return self.dialect.cursor(self.server)

    def build(self, view: dict[str, Any], **source: Any) -> tuple[factory.Runtime, BaseDao]:
        """A runtime with one source ``db`` (these options on top) and the view ``v``."""
        runtime = factory.build({"sources": {"db": self.source(**source)}, "views": [view]})
        dao = runtime.daos["v"]
        assert isinstance(dao, BaseDao)
        return runtime, dao

    def assert_caused_by(self, error: BaseException, expected: DriverError) -> None:
        kind, code = expected
        cause = error.__cause__
        assert isinstance(cause, kind), repr(cause)
        assert self.dialect.error_code(cause) == code


def view_config(table: str, features: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {"name": "v", "entity": "item", "source": "db", "table": table, "key": "id",
            "features": features, **extra}


def assert_server_cancels_slow_read(backend: SqlBackend, sql: Any, **source: Any) -> None:
    """A read over its limit is cancelled by the server, and the pool's only connection serves on."""
    d = backend.dialect
    table = backend.table("base")
    sql.execute(f"CREATE TABLE {table} (id {d.key_type} PRIMARY KEY, n BIGINT)")
    sql.execute(f"INSERT INTO {table} VALUES ('a', 1)")
    sql.execute(d.slow_view.format(table=table))
    runtime = factory.build({
        "sources": {"db": backend.source(pool_size=1, **source)},
        "views": [view_config(f"{table}_slow", {"n": "int"}),
                  {**view_config(table, {"n": "int"}), "name": "fast", "prefix": "f_"}],
    })
    try:
        slow, fast = runtime.daos["v"], runtime.daos["fast"]
        with pytest.raises(BackendTimeout) as info:
            slow.read(["a"], timeout_s=0.3)
        backend.assert_caused_by(info.value, d.timeout_error)
        # Gone from the server's list (it may list the statement a moment after the error came back);
        # the slow view sleeps 3 s, so an abandoned statement would still be there after this wait.
        end = time.monotonic() + 1.5
        while True:
            sql.execute(d.running_statements, (f"%{table}_slow%",))
            running = sql.fetchone()
            if running == (0,) or time.monotonic() > end:
                break
            time.sleep(0.05)
        assert running == (0,)
        # The pool's only connection serves the next read, with the default limit back in place.
        assert fast.read(["a"])[0] == {"n": 1}
        assert fast.read(["a"], timeout_s=5.0)[0] == {"n": 1}
    finally:
        runtime.close()


@pytest.fixture(params=[pytest.param(MYSQL, id="mysql", marks=pytest.mark.mysql),
                        pytest.param(HOLOGRES, id="hologres", marks=pytest.mark.hologres)])
def sql_backend(request: pytest.FixtureRequest) -> SqlBackend:
    dialect: Dialect = request.param
    return SqlBackend(dialect, request.getfixturevalue(dialect.server_fixture))


@pytest.fixture
def sql(sql_backend: SqlBackend) -> Iterator[Any]:
    with sql_backend.cursor() as cur:
        yield cur


def test_tall_layout_without_event_time(sql_backend: SqlBackend) -> None:
    view = view_config(sql_backend.table("tall"), {"a": "int", "b": "list[str]", "c": "str"},
                       options={"layout": "tall"}, defaults={"a": 0})
    runtime, dao = sql_backend.build(view)
    try:
        dao.prepare()
        dao.upsert([("k1", {"a": 1, "b": ["x"], "c": "one"}), ("k2", {"a": 2})])
        dao.upsert([("k1", {"a": 10, "b": [], "c": "uno"})])
        assert list(dao.read(["k1", "k2", "k3"])) == [
            {"a": 10, "b": [], "c": "uno"}, {"a": 2, "b": None, "c": None}, None]
        assert dao.read(["k1"], ["c"])[0] == {"c": "uno"}
    finally:
        runtime.close()


def test_tall_layout_newest_event_time_wins(sql_backend: SqlBackend, sql: Any) -> None:
    d = sql_backend.dialect
    table = sql_backend.table("events")
    sql.execute(f"CREATE TABLE {table} (id {d.key_type}, fname {d.key_type}, fvalue TEXT, ts {d.time_type})")
    # Versions inserted out of order; a row without a time never wins over one with a time.
    sql.execute(f"INSERT INTO {table} VALUES "
                "('u1', 'age', '30', '2024-01-02'), ('u1', 'age', '31', '2024-03-01'), "
                "('u1', 'age', '29', '2023-12-31'), ('u1', 'city', 'Paris', NULL), "
                "('u1', 'city', 'Oslo', '2024-01-01'), ('u2', 'age', '40', '2024-01-01'), "
                "('u2', 'unknown', 'x', '2025-01-01')")
    view = view_config(table, {"age": "int", "city": "str"}, options={
        "layout": "tall", "feature_column": "fname", "value_column": "fvalue", "event_time_column": "ts"})
    runtime, dao = sql_backend.build(view)
    try:
        assert list(dao.read(["u2", "u1", "u3"])) == [
            {"age": 40, "city": None}, {"age": 31, "city": "Oslo"}, None]
    finally:
        runtime.close()


def test_timeout_is_enforced_by_the_server_and_the_connection_stays_usable(
        sql_backend: SqlBackend, sql: Any) -> None:
    # Hologres: with per-call limits (the default); test_hologres.py covers the session limit.
    assert_server_cancels_slow_read(sql_backend, sql)


def test_pool_recovers_after_server_restart(sql_backend: SqlBackend) -> None:
    runtime, dao = sql_backend.build(view_config(sql_backend.table("restart"), {"n": "int"}), pool_size=2)
    try:
        dao.prepare()
        dao.upsert([("a", {"n": 1}), ("b", {"n": 2})])
        assert [r["n"] if r else None for r in dao.read(["a", "b"])] == [1, 2]
        sql_backend.server.restart()
        # Both pooled connections are dead now; the read replaces them without failing.
        assert [r["n"] if r else None for r in dao.read(["b", "a"])] == [2, 1]
        dao.ping()
    finally:
        runtime.close()


def test_injection_through_a_config_identifier_is_rejected(sql_backend: SqlBackend) -> None:
    source = sql_backend.source()
    for bad, path in sql_backend.dialect.bad_identifiers:
        cfg = {"sources": {"db": source}, "views": [{**view_config("t", {"n": "int"}), **bad}]}
        with pytest.raises(ConfigError) as info:
            config.load(cfg)
        assert [issue.path for issue in info.value.issues] == [path]
    # Tall-only settings on a wide view are a mistake worth reporting too.
    with pytest.raises(ConfigError):
        config.load({"sources": {"db": source},
                     "views": [view_config("t", {"n": "int"}, options={"feature_column": "f"})]})


@pytest.mark.parametrize("layout", ["wide", "tall"])
def test_injection_through_keys_is_harmless(sql_backend: SqlBackend, layout: str) -> None:
    d = sql_backend.dialect
    view = view_config(sql_backend.table("inj"), {"n": "int"}, options={"layout": layout})
    runtime, dao = sql_backend.build(view)
    try:
        dao.prepare()
        dao.upsert([("a", {"n": 1}), (d.injected_key, {"n": 2})])
        evil = ["' OR '1'='1", "a' OR 1=1 -- ", d.quote_probe, d.injected_key, "a"]
        assert [r["n"] if r else None for r in dao.read(evil)] == [None, None, None, 2, 1]
    finally:
        runtime.close()


def test_missing_table_or_column_names_the_view(sql_backend: SqlBackend) -> None:
    table = sql_backend.table("cols")
    runtime, dao = sql_backend.build(view_config(table, {"n": "int"}))
    try:
        with pytest.raises(BackendQueryError) as info:
            dao.read(["a"])
        assert "view='v'" in str(info.value) and info.value.view == "v"
        sql_backend.assert_caused_by(info.value, sql_backend.dialect.missing_table_error)
        dao.prepare()
    finally:
        runtime.close()
    runtime, dao = sql_backend.build(view_config(table, {"n": "int", "absent": "str"}))
    try:
        with pytest.raises(BackendQueryError) as info:
            dao.read(["a"], ["absent"])
        assert info.value.view == "v" and "absent" in str(info.value)
        assert dao.read(["a"], ["n"])[0] is None  # the connection survived the failed statement
    finally:
        runtime.close()


def test_wrong_password_error_does_not_reveal_it(sql_backend: SqlBackend) -> None:
    secret = "Sup3r-s3cret-pa55word"
    runtime, dao = sql_backend.build(view_config("t", {"n": "int"}), password=secret)
    try:
        with pytest.raises(BackendAuthError) as info:
            dao.read(["a"], timeout_s=5.0)
        shown = [str(info.value), repr(info.value), str(info.value.__cause__), repr(info.value.__cause__),
                 repr(runtime.sources["db"]), repr(runtime.sources["db"].options), repr(runtime.config)]
        assert all(secret not in text for text in shown)
    finally:
        runtime.close()


def test_building_does_not_connect(sql_backend: SqlBackend) -> None:
    # A closed port: building the runtime succeeds; only a read would report the store down.
    runtime, _ = sql_backend.build(view_config("t", {"n": "int"}), port=1)
    runtime.close()
