"""Views of one SQLite or ClickHouse source read together (``read_group``): one pool checkout for all.

Runs on a SQLite file of the test and on the throwaway ClickHouse server (wide and tall layouts). The
checkouts are counted on the real pool objects (SQLite's ``_checkout``, the ClickHouse pool's ``client``),
each wrapper calling through to the original; the drivers stay real.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from clickhouse_driver import Client
from clickhouse_driver import errors as ch_errors

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
    """One store variant: its source options, view options and how to make a slow "table" in it."""

    kind: str
    """``sqlite`` or ``clickhouse``."""
    source_options: dict[str, Any]
    view_options: dict[str, Any] = field(default_factory=dict)
    server: ClickHouseServer | None = None
    run: str = field(default_factory=lambda: f"{time.time_ns() % 10**9}_{next(_names)}")

    def table(self, what: str) -> str:
        return f"g_{what}_{self.run}"

    def source(self, **extra: Any) -> dict[str, Any]:
        return {**self.source_options, **extra}

    def view(self, name: str, table: str, features: dict[str, str], **extra: Any) -> dict[str, Any]:
        return {"name": name, "entity": "item", "source": "db", "table": table, "key": "id",
                "key_type": "str", "features": features, "prefix": f"{name}_", "options": self.view_options,
                **extra}

    def missing_table(self, error: BaseException | None) -> bool:
        """Whether ``error`` is the driver's own "no such table" error."""
        if self.kind == "sqlite":
            return isinstance(error, sqlite3.OperationalError) and "no such table" in str(error)
        return isinstance(error, ch_errors.ServerException) and error.code == 60

    def make_slow(self, table: str) -> None:
        """A view named ``table`` (key ``id``, feature ``n``) that any read scans for many seconds."""
        if self.kind == "sqlite":
            with contextlib.closing(sqlite3.connect(self.source_options["path"])) as conn:
                conn.execute(f'CREATE VIEW "{table}" AS WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL '
                             "SELECT x + 1 FROM c WHERE x < 1000000000) "
                             'SELECT CAST(x AS TEXT) AS "id", x AS "n" FROM c')
            return
        assert self.server is not None
        raw = Client(self.server.host, port=self.server.port, user=self.server.user,
                     password=self.server.password, database=self.server.database)
        try:
            raw.execute(f"CREATE VIEW {table} AS SELECT toString(number) AS id, toInt64(number) AS n "
                        "FROM system.numbers WHERE sipHash64(number) = 1")
        finally:
            raw.disconnect()


def _sqlite(request: pytest.FixtureRequest) -> Backend:
    tmp: Path = request.getfixturevalue("tmp_path")
    return Backend("sqlite", {"type": "sqlite", "path": str(tmp / "grouped.db")})


def _clickhouse(request: pytest.FixtureRequest, options: dict[str, Any]) -> Backend:
    server: ClickHouseServer = request.getfixturevalue("clickhouse_server")
    return Backend("clickhouse", {"type": "clickhouse", "host": server.host, "port": server.port,
                                  "user": server.user, "password": server.password,
                                  "database": server.database}, options, server)


_WIDE = {"layout": "wide"}
_TALL = {"layout": "tall", "event_time_column": "event_time"}


@pytest.fixture(params=[pytest.param("sqlite", marks=pytest.mark.sqlite),
                        pytest.param("clickhouse_wide", marks=pytest.mark.clickhouse),
                        pytest.param("clickhouse_tall", marks=pytest.mark.clickhouse)])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "sqlite":
        return _sqlite(request)
    return _clickhouse(request, _WIDE if request.param == "clickhouse_wide" else _TALL)


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


def _count_checkouts(source: Any, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Each connection (SQLite) or Client (ClickHouse) the source's own pool hands out from now on."""
    handed: list[Any] = []
    if source.type_name == "sqlite":
        checkout: Callable[[], Any] = source._checkout

        def counting_checkout() -> Any:
            conn = checkout()
            handed.append(conn)
            return conn

        monkeypatch.setattr(source, "_checkout", counting_checkout)
        return handed
    pool = source._pool
    borrow = pool.client

    @contextlib.contextmanager
    def counting_borrow(wait_s: float | None) -> Iterator[Any]:
        with borrow(wait_s) as client:
            handed.append(client)
            yield client

    monkeypatch.setattr(pool, "client", counting_borrow)
    return handed


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
        _dao(runtime, "b").read(["k0"])  # both tables' layouts are known (ClickHouse inspects on first use)
        checkouts = _count_checkouts(runtime.sources["db"], monkeypatch)
        _dao(runtime, "a").read(KEYS)
        assert len(checkouts) == 5  # the counter sees every checkout: one per chunk when a view reads alone
        checkouts.clear()
        got = _together(runtime, "a", "b")
        assert all(isinstance(r, BatchResult) and r.failed == [] for r in got)
        assert len(checkouts) == 1  # ten statements (five chunks each), one connection
    finally:
        runtime.close()


@pytest.mark.clickhouse
def test_first_use_inspects_the_table_on_the_groups_own_client(clickhouse_server: ClickHouseServer,
                                                              request: pytest.FixtureRequest,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh runtime of one Client: the layout inspections of both views run inside the group's borrow."""
    backend = _clickhouse(request, _WIDE)
    _runtime(backend).close()
    runtime = factory.build({"sources": {"db": backend.source(batch_size=2, pool_size=1)},
                             "views": _views(backend)})
    try:
        checkouts = _count_checkouts(runtime.sources["db"], monkeypatch)
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
        checkouts = _count_checkouts(runtime.sources["db"], monkeypatch)
        for order in (("b", "a"), ("a", "b"), ("b", "a")):
            got = dict(zip(order, _together(runtime, *order), strict=True))
            assert isinstance(got["b"], BackendQueryError), repr(got["b"])
            assert got["b"].view == "b" and got["b"].source == "db"
            assert backend.missing_table(got["b"].__cause__), repr(got["b"].__cause__)
            assert isinstance(got["a"], BatchResult)
            assert got["a"].rows == expected and got["a"].failed == [] and got["a"].degraded == []
        assert len(checkouts) == 3
        assert len({id(c) for c in checkouts}) == 1  # the one pooled connection (Client), kept each time
        # It serves on, read alone without a deadline of the caller's.
        assert _dao(runtime, "a").read(["k6"])[0] == {"n": 6, "s": "s6", "tags": None}
        with pytest.raises(BackendQueryError):
            _dao(runtime, "b").read(["k0"])
    finally:
        runtime.close()


@pytest.mark.parametrize("kind", [pytest.param("sqlite", marks=pytest.mark.sqlite),
                                  pytest.param("clickhouse", marks=pytest.mark.clickhouse)])
def test_once_the_groups_time_is_gone_the_rest_is_not_sent(kind: str, request: pytest.FixtureRequest,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    backend = _sqlite(request) if kind == "sqlite" else \
        _clickhouse(request, {"layout": "wide", "final": False})
    slow_table = backend.table("slow")
    backend.make_slow(slow_table)
    _runtime(backend).close()  # tables a and b, filled
    runtime = factory.build({"sources": {"db": backend.source(batch_size=2, pool_size=1)},
                             "views": [*_views(backend), backend.view("slow", slow_table, {"n": "int"})]})
    try:
        _dao(runtime, "b").read(["k0"])
        with pytest.raises(BackendTimeout):  # the slow view's layout is inspected, its read times out
            _dao(runtime, "slow").read(["k0"], timeout_s=0.3)
        source: Any = runtime.sources["db"]
        sent: list[str] = []
        if kind == "sqlite":
            checkout = source._checkout

            def traced() -> Any:
                conn = checkout()
                conn.set_trace_callback(sent.append)  # every statement SQLite is asked to run
                return conn

            monkeypatch.setattr(source, "_checkout", traced)
        else:
            select_on = source._select_on

            def counted(client: Any, sql: str, params: Any, deadline: float) -> Any:
                sent.append(sql)
                return select_on(client, sql, params, deadline)

            monkeypatch.setattr(source, "_select_on", counted)
        started = time.perf_counter()
        got_slow, got_b = _together(runtime, "slow", "b", timeout_s=0.5)
        took = time.perf_counter() - started
        assert isinstance(got_slow, BatchResult) and isinstance(got_b, BatchResult)
        assert sorted(got_slow.failed) == sorted(set(KEYS)) and sorted(got_b.failed) == sorted(set(KEYS))
        assert took < 3, took
        # One statement of the slow view ran to the deadline; none of its later chunks, none of b's, was sent.
        assert [s for s in sent if "IN" in s.upper()] == [s for s in sent if slow_table in s]
        assert len([s for s in sent if slow_table in s]) == 1
        if kind == "sqlite":
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
        held = source.connection() if backend.kind == "sqlite" else source._pool.client(None)
        with held:
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
        checkouts = _count_checkouts(source, monkeypatch)
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
