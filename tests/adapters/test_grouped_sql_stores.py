"""Views of one SQL-like source read together (``read_group``): one pool checkout for all their statements.

Every test runs once per store through the ``backend`` fixture: sqlite on a file of the test, mysql on
MariaDB, hologres on PostgreSQL and ClickHouse in its wide and tall layouts, on the throwaway servers. What
differs between them is in each :class:`Backend`: the source config built from its server, how a pool
checkout is counted on the real pool object (each wrapper calling through to the original, the drivers
stay real), how a connection of the pool is held, the driver's missing-table error and how a slow table
is made. Tests that hold for some stores only take their own subset of the same params.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from clickhouse_driver import Client
from clickhouse_driver import errors as ch_errors
from test_sql import HOLOGRES, MYSQL, Dialect, SqlBackend

from featuredao import FeatureService, factory
from featuredao.dao import BaseDao
from featuredao.deadline import Deadline
from featuredao.errors import BackendQueryError, BackendTimeout, Overloaded
from featuredao.steps import drive
from featuredao.testing.servers import ClickHouseServer
from featuredao.types import BatchResult, Reason

KEYS = ["k0", "k1", "gone1", "k2", "k3", "k4", "gone2", "k5", "k6"]
"""Found and missing keys: with ``batch_size`` 2, five chunks per view."""

_names = itertools.count()


@dataclass
class Backend:
    """One store variant: its source and view options and what differs in its pool, errors and SQL."""

    name: str
    """The param id."""
    source_options: dict[str, Any]
    view_options: dict[str, Any] = field(default_factory=dict)
    run: str = field(default_factory=lambda: f"{time.time_ns() % 10**9}_{next(_names)}")

    def table(self, what: str) -> str:
        """A table name no other test uses."""
        return f"g_{what}_{self.run}"

    def source(self, **extra: Any) -> dict[str, Any]:
        return {**self.source_options, **extra}

    def view(self, name: str, table: str, features: dict[str, str], **extra: Any) -> dict[str, Any]:
        return {"name": name, "entity": "item", "source": "db", "table": table, "key": "id",
                "key_type": "str", "features": features, "prefix": f"{name}_", "options": self.view_options,
                **extra}

    def count_checkouts(self, source: Any, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
        """Each connection (Client) the source's own pool hands out from now on."""
        raise NotImplementedError

    def hold(self, source: Any) -> AbstractContextManager[Any]:
        """Borrow the pool's connection (Client) until the block ends."""
        raise NotImplementedError

    def missing_table(self, error: BaseException | None) -> bool:
        """Whether ``error`` is the driver's own "no such table" error."""
        raise NotImplementedError

    def make_slow(self) -> tuple[str, dict[str, Any]]:
        """A table (key ``id``, feature ``n``, row ``k0``) that any read of it takes seconds over, and the
        options its view needs."""
        raise NotImplementedError

    def trace_statements(self, source: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        """Each statement the source sends from now on."""
        raise NotImplementedError

    def reads_keys(self, statement: str) -> bool:
        """Whether a traced statement is a read of keys (not the store's own bookkeeping)."""
        return "IN" in statement.upper()


@dataclass
class SqliteBackend(Backend):
    def count_checkouts(self, source: Any, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
        handed: list[Any] = []
        checkout: Callable[[], Any] = source._checkout

        def counting_checkout() -> Any:
            conn = checkout()
            handed.append(conn)
            return conn

        monkeypatch.setattr(source, "_checkout", counting_checkout)
        return handed

    def hold(self, source: Any) -> AbstractContextManager[Any]:
        return source.connection()  # type: ignore[no-any-return]

    def missing_table(self, error: BaseException | None) -> bool:
        return isinstance(error, sqlite3.OperationalError) and "no such table" in str(error)

    def make_slow(self) -> tuple[str, dict[str, Any]]:
        table = self.table("slow")
        with contextlib.closing(sqlite3.connect(self.source_options["path"])) as conn:
            conn.execute(f'CREATE VIEW "{table}" AS WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL '
                         "SELECT x + 1 FROM c WHERE x < 1000000000) "
                         'SELECT CAST(x AS TEXT) AS "id", x AS "n" FROM c')
        return table, {}

    def trace_statements(self, source: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        sent: list[str] = []
        checkout = source._checkout

        def traced() -> Any:
            conn = checkout()
            conn.set_trace_callback(sent.append)  # every statement SQLite is asked to run
            return conn

        monkeypatch.setattr(source, "_checkout", traced)
        return sent


@dataclass
class ClickHouseBackend(Backend):
    server: ClickHouseServer | None = None

    def count_checkouts(self, source: Any, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
        handed: list[Any] = []
        pool = source._pool
        borrow = pool.client

        @contextlib.contextmanager
        def counting_borrow(wait_s: float | None) -> Iterator[Any]:
            with borrow(wait_s) as client:
                handed.append(client)
                yield client

        monkeypatch.setattr(pool, "client", counting_borrow)
        return handed

    def hold(self, source: Any) -> AbstractContextManager[Any]:
        return source._pool.client(None)  # type: ignore[no-any-return]

    def missing_table(self, error: BaseException | None) -> bool:
        return isinstance(error, ch_errors.ServerException) and error.code == 60

    def make_slow(self) -> tuple[str, dict[str, Any]]:
        assert self.server is not None
        table = self.table("slow")
        raw = Client(self.server.host, port=self.server.port, user=self.server.user,
                     password=self.server.password, database=self.server.database)
        try:
            raw.execute(f"CREATE VIEW {table} AS SELECT toString(number) AS id, toInt64(number) AS n "
                        "FROM system.numbers WHERE sipHash64(number) = 1")
        finally:
            raw.disconnect()
        return table, {"options": {"layout": "wide", "final": False}}  # no FINAL over a view

    def trace_statements(self, source: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        sent: list[str] = []
        select_on = source._select_on

        def counted(client: Any, sql: str, params: Any, deadline: float) -> Any:
            sent.append(sql)
            return select_on(client, sql, params, deadline)

        monkeypatch.setattr(source, "_select_on", counted)
        return sent


@dataclass
class ServerSqlBackend(Backend):
    """mysql or hologres: a :class:`Dialect` of test_sql with its live server."""

    sql: SqlBackend | None = None

    @property
    def _sql(self) -> SqlBackend:
        assert self.sql is not None
        return self.sql

    def count_checkouts(self, source: Any, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
        handed: list[Any] = []
        if source.type_name == "mysql":
            pool = source._pool  # featuredao's pool for pymysql: a context manager of (connection, fresh)
            borrow = pool.connection

            @contextlib.contextmanager
            def counting_borrow(timeout_s: float | None) -> Iterator[Any]:
                with borrow(timeout_s) as (conn, fresh):
                    handed.append(conn)
                    yield conn, fresh

            monkeypatch.setattr(pool, "connection", counting_borrow)
            return handed
        pool = source._pool_ready()  # psycopg_pool's ConnectionPool
        getconn: Callable[..., Any] = pool.getconn

        def counting_getconn(*args: Any, **kwargs: Any) -> Any:
            conn = getconn(*args, **kwargs)
            handed.append(conn)
            return conn

        monkeypatch.setattr(pool, "getconn", counting_getconn)
        return handed

    def hold(self, source: Any) -> AbstractContextManager[Any]:
        if source.type_name == "mysql":
            return source._pool.connection(None)  # type: ignore[no-any-return]
        return source._connection(None)  # type: ignore[no-any-return]

    def missing_table(self, error: BaseException | None) -> bool:
        kind, code = self._sql.dialect.missing_table_error
        return isinstance(error, kind) and self._sql.dialect.error_code(error) == code

    def make_slow(self) -> tuple[str, dict[str, Any]]:
        d = self._sql.dialect
        table = self.table("base")
        with self._sql.cursor() as cur:
            cur.execute(f"CREATE TABLE {table} (id {d.key_type} PRIMARY KEY, n BIGINT)")
            cur.execute(f"INSERT INTO {table} VALUES ('k0', 0)")
            cur.execute(d.slow_view.format(table=table))
        return f"{table}_slow", {}

    def trace_statements(self, source: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        sent: list[str] = []
        select = source._select

        def counted(conn: Any, sql: str, params: Any, timeout_s: float | None) -> Any:
            sent.append(sql)
            return select(conn, sql, params, timeout_s)

        monkeypatch.setattr(source, "_select", counted)
        return sent

    def reads_keys(self, statement: str) -> bool:
        return True  # only the reads' own statements are traced (the session's limits are not)


def _sqlite(request: pytest.FixtureRequest) -> Backend:
    tmp: Path = request.getfixturevalue("tmp_path")
    return SqliteBackend("sqlite", {"type": "sqlite", "path": str(tmp / "grouped.db")})


def _server_sql(request: pytest.FixtureRequest, dialect: Dialect) -> Backend:
    sql = SqlBackend(dialect, request.getfixturevalue(dialect.server_fixture))
    return ServerSqlBackend(dialect.name, sql.source(), sql=sql)


def _clickhouse(request: pytest.FixtureRequest, name: str, options: dict[str, Any]) -> Backend:
    server: ClickHouseServer = request.getfixturevalue("clickhouse_server")
    return ClickHouseBackend(name, {"type": "clickhouse", "host": server.host, "port": server.port,
                                    "user": server.user, "password": server.password,
                                    "database": server.database}, options, server=server)


_MAKE: dict[str, Callable[[pytest.FixtureRequest], Backend]] = {
    "sqlite": _sqlite,
    "mysql": lambda request: _server_sql(request, MYSQL),
    "hologres": lambda request: _server_sql(request, HOLOGRES),
    "clickhouse_wide": lambda request: _clickhouse(request, "clickhouse_wide", {"layout": "wide"}),
    "clickhouse_tall": lambda request: _clickhouse(request, "clickhouse_tall",
                                                   {"layout": "tall", "event_time_column": "event_time"}),
}
_MARKS = {"sqlite": pytest.mark.sqlite, "mysql": pytest.mark.mysql, "hologres": pytest.mark.hologres,
          "clickhouse_wide": pytest.mark.clickhouse, "clickhouse_tall": pytest.mark.clickhouse}


def _params(*names: str) -> list[Any]:
    """The backends ``names``, each marked with its store's marker (``-m mysql`` and so on select it)."""
    return [pytest.param(name, id=name, marks=_MARKS[name]) for name in names]


ALL = _params(*_MAKE)


@pytest.fixture(params=ALL)
def backend(request: pytest.FixtureRequest) -> Backend:
    return _MAKE[request.param](request)


def _views(backend: Backend, missing: bool = False) -> list[dict[str, Any]]:
    """Views ``a`` (int, str, list) and ``b`` (float) on two tables; ``b``'s is never made if ``missing``."""
    return [backend.view("a", backend.table("a"), {"n": "int", "s": "str", "tags": "list[str]"}),
            backend.view("b", backend.table("never_made" if missing else "b"), {"x": "float"})]


def _dao(runtime: factory.Runtime, name: str) -> BaseDao:
    dao = runtime.daos[name]
    assert isinstance(dao, BaseDao)
    return dao


def _runtime(backend: Backend, missing: bool = False, **source: Any) -> factory.Runtime:
    runtime = factory.build({"sources": {"db": backend.source(batch_size=2, **source)},
                             "views": _views(backend, missing)})
    a, b = _dao(runtime, "a"), _dao(runtime, "b")
    a.prepare()
    a.upsert([(f"k{i}", {"n": i, "s": f"s{i}", "tags": [f"t{i}"] if i % 3 else None}) for i in range(7)])
    if not missing:
        b.prepare()
        b.upsert([(f"k{i}", {"x": i / 2}) for i in range(0, 7, 2)])  # k1, k3, k5: rows of a only
    return runtime


def _together(runtime: factory.Runtime, *names: str, timeout_s: float = 5) -> list[BatchResult | Exception]:
    return drive([_dao(runtime, name).read_steps(KEYS, deadline=Deadline.after(timeout_s)) for name in names])


def test_views_read_together_answer_as_each_alone(backend: Backend) -> None:
    runtime = _runtime(backend)
    try:
        got_a, got_b = _together(runtime, "a", "b")
        assert isinstance(got_a, BatchResult) and isinstance(got_b, BatchResult)
        alone_a, alone_b = _dao(runtime, "a").read(KEYS), _dao(runtime, "b").read(KEYS)
        assert got_a.rows == alone_a.rows and got_b.rows == alone_b.rows
        assert got_a.rows[:4] == [{"n": 0, "s": "s0", "tags": None}, {"n": 1, "s": "s1", "tags": ["t1"]},
                                  None, {"n": 2, "s": "s2", "tags": ["t2"]}]
        assert got_b.rows[:4] == [{"x": 0.0}, None, None, {"x": 1.0}]
        assert [r is None for r in got_a.rows] == [k.startswith("gone") for k in KEYS]
        for got in (got_a, got_b):
            assert got.failed == [] and got.degraded == [] and got.error is None
        # A projection travels with its fetch: the statement reads just those columns.
        (part,) = drive([_dao(runtime, "a").read_steps(KEYS, ["s"], deadline=Deadline.after(5))])
        assert isinstance(part, BatchResult) and part.rows == _dao(runtime, "a").read(KEYS, ["s"]).rows
    finally:
        runtime.close()


def test_one_pool_checkout_for_the_whole_group(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = _runtime(backend)
    try:
        # The pool is open with a connection, both tables' layouts are known (ClickHouse inspects on first
        # use).
        _dao(runtime, "a").read(["k0"])
        _dao(runtime, "b").read(["k0"])
        checkouts = backend.count_checkouts(runtime.sources["db"], monkeypatch)
        _dao(runtime, "a").read(KEYS)
        assert len(checkouts) == 5  # the counter sees every checkout: one per chunk when a view reads alone
        checkouts.clear()
        got = _together(runtime, "a", "b")
        assert all(isinstance(r, BatchResult) and r.failed == [] for r in got)
        assert len(checkouts) == 1  # ten statements (five chunks each), one connection
    finally:
        runtime.close()


@pytest.mark.parametrize("backend", _params("clickhouse_wide", "clickhouse_tall"), indirect=True)
def test_first_use_inspects_the_table_on_the_groups_own_client(backend: Backend,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh runtime of one Client: the layout inspections of both views run inside the group's borrow."""
    _runtime(backend).close()
    runtime = factory.build({"sources": {"db": backend.source(batch_size=2, pool_size=1)},
                             "views": _views(backend)})
    try:
        checkouts = backend.count_checkouts(runtime.sources["db"], monkeypatch)
        got_a, got_b = _together(runtime, "a", "b", timeout_s=10)
        assert isinstance(got_a, BatchResult) and isinstance(got_b, BatchResult)
        assert got_a.failed == [] and got_b.failed == []
        assert got_b.rows[:4] == [{"x": 0.0}, None, None, {"x": 1.0}]
        assert len(checkouts) == 1
    finally:
        runtime.close()


def test_a_missing_table_fails_its_view_alone(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    # One connection in the pool: the statements after the failed one run on the very same connection.
    runtime = _runtime(backend, missing=True, pool_size=1)
    try:
        expected = _dao(runtime, "a").read(KEYS).rows
        checkouts = backend.count_checkouts(runtime.sources["db"], monkeypatch)
        for order in (("b", "a"), ("a", "b"), ("b", "a")):
            got = dict(zip(order, _together(runtime, *order), strict=True))
            assert isinstance(got["b"], BackendQueryError), repr(got["b"])
            assert got["b"].view == "b" and got["b"].source == "db"
            assert backend.missing_table(got["b"].__cause__), repr(got["b"].__cause__)
            assert isinstance(got["a"], BatchResult)
            assert got["a"].rows == expected and got["a"].failed == [] and got["a"].degraded == []
        assert len(checkouts) == 3
        assert len({id(c) for c in checkouts}) == 1  # the one pooled connection (Client), kept each time
        # It serves on, read alone without a deadline of the caller's (the default statement limit back).
        assert _dao(runtime, "a").read(["k6"])[0] == {"n": 6, "s": "s6", "tags": None}
        with pytest.raises(BackendQueryError):
            _dao(runtime, "b").read(["k0"])
    finally:
        runtime.close()


def test_once_the_groups_time_is_gone_the_rest_is_not_sent(backend: Backend,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    slow_table, slow_options = backend.make_slow()
    _runtime(backend).close()  # tables a and b, filled
    runtime = factory.build({"sources": {"db": backend.source(batch_size=2, pool_size=1)},
                             "views": [*_views(backend),
                                       backend.view("slow", slow_table, {"n": "int"}, **slow_options)]})
    try:
        _dao(runtime, "b").read(["k0"])
        with pytest.raises(BackendTimeout):  # the slow view's layout is inspected, its read times out
            _dao(runtime, "slow").read(["k0"], timeout_s=0.3)
        sent = backend.trace_statements(runtime.sources["db"], monkeypatch)
        started = time.perf_counter()
        got_slow, got_b = _together(runtime, "slow", "b", timeout_s=0.5)
        took = time.perf_counter() - started
        assert isinstance(got_slow, BatchResult) and isinstance(got_b, BatchResult)
        assert sorted(got_slow.failed) == sorted(set(KEYS)) and sorted(got_b.failed) == sorted(set(KEYS))
        assert took < 3, took
        # One statement of the slow view ran to the deadline; none of its later chunks, none of b's, was sent.
        assert [s for s in sent if backend.reads_keys(s)] == [s for s in sent if slow_table in s]
        assert len([s for s in sent if slow_table in s]) == 1
        monkeypatch.undo()
        # The pool's only connection serves on.
        assert _dao(runtime, "b").read(["k0"])[0] == {"x": 0.0}
    finally:
        runtime.close()


def test_a_pool_without_a_free_connection_fails_each_read_as_overloaded(backend: Backend) -> None:
    """Our own pool's wait is this process's load: each read fails Overloaded, not as the store's timeout."""
    runtime = _runtime(backend, pool_size=1)
    try:
        source: Any = runtime.sources["db"]
        with backend.hold(source):
            started = time.perf_counter()
            got = _together(runtime, "a", "b", timeout_s=0.3)
            assert time.perf_counter() - started < 2
        assert [type(g) for g in got] == [Overloaded, Overloaded], got
        assert [(g.source, g.view) for g in got if isinstance(g, Overloaded)] == [("db", "a"), ("db", "b")]
        got = _together(runtime, "a", "b")  # the connection back in the pool serves the group
        assert all(isinstance(g, BatchResult) and g.failed == [] for g in got), got
    finally:
        runtime.close()


def _service_config(backend: Backend, missing: bool = False) -> dict[str, Any]:
    user = {**backend.view("user", backend.table("user"), {"age": "int", "city": "str"}), "entity": "user",
            "prefix": "u_", "timeout_ms": 3000}
    item = {**backend.view("item", backend.table("never_made" if missing else "item"), {"price": "float"}),
            "prefix": "i_", "timeout_ms": 3000}
    return {"sources": {"db": backend.source(batch_size=2)}, "views": [user, item],
            "service": {"deadline_ms": 5000}}


def _fill_service(service: FeatureService, missing: bool = False) -> None:
    assert service.runtime is not None
    user, item = _dao(service.runtime, "user"), _dao(service.runtime, "item")
    user.prepare()
    user.upsert([("u1", {"age": 30, "city": "Oslo"}), ("u2", {"age": 41})])
    if not missing:
        item.prepare()
        item.upsert([(f"i{i}", {"price": i * 1.5}) for i in range(5)])


def test_a_request_reads_a_user_view_and_an_item_view_with_one_checkout(
        backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    items = ["i0", "i4", "nope", "i2", "i1"]
    with FeatureService.from_config(_service_config(backend)) as service:
        _fill_service(service)
        assert service.runtime is not None
        source: Any = service.runtime.sources["db"]
        checkouts = backend.count_checkouts(source, monkeypatch)
        grouped = service.fetch("u1", items)
        assert len(checkouts) == 1  # the user's view and the items' view (three chunks) together
        assert grouped.user == {"u_age": 30, "u_city": "Oslo"}
        assert grouped.items == [{"i_price": 0.0}, {"i_price": 6.0}, {"i_price": None}, {"i_price": 3.0},
                                 {"i_price": 1.5}]
        assert grouped.degraded == [] and grouped.missing == {"item": ["nope"]}
        user, read_items = service.read_view("user", ["u1"]), service.read_view("item", items)
        assert user.rows[0] is not None and grouped.user == {f"u_{k}": v for k, v in user.rows[0].items()}
        assert grouped.items == [{f"i_{k}": v for k, v in (r or {"price": None}).items()}
                                 for r in read_items.rows]
        # The same request with each view read alone (grouped reads switched off) answers the same.
        monkeypatch.setattr(source, "capabilities",
                            dataclasses.replace(source.capabilities, grouped_reads=False))
        checkouts.clear()
        alone = service.fetch("u1", items)
        assert len(checkouts) == 4  # one for the user's view, one per chunk of the items'
        assert (alone.user, alone.items, alone.missing, alone.degraded) == \
               (grouped.user, grouped.items, grouped.missing, grouped.degraded)


def test_a_request_degrades_only_the_view_whose_table_is_missing(backend: Backend) -> None:
    with FeatureService.from_config(_service_config(backend, missing=True)) as service:
        _fill_service(service, missing=True)
        result = service.fetch("u2", ["i0", "i1"])
        assert result.user == {"u_age": 41, "u_city": None}
        assert result.items == [{"i_price": None}, {"i_price": None}]
        assert [(d.view, d.reason) for d in result.degraded] == [("item", Reason.QUERY_ERROR)]
