"""Views of one SQL source read together (``read_group``): one pool checkout for all their statements.

Runs once per SQL adapter (mysql on MariaDB, hologres on PostgreSQL) on the throwaway servers; the pool
checkouts are counted on the real pool object, the driver stays real.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from test_sql import HOLOGRES, MYSQL, Dialect, SqlBackend, view_config

from featuredao import FeatureService, factory
from featuredao.dao import BaseDao
from featuredao.deadline import Deadline
from featuredao.errors import BackendQueryError
from featuredao.steps import drive
from featuredao.types import BatchResult, Reason

KEYS = ["k0", "k1", "gone1", "k2", "k3", "k4", "gone2", "k5", "k6"]
"""Found and missing keys: with ``batch_size`` 2, five chunks per view."""


@pytest.fixture(params=[pytest.param(MYSQL, id="mysql", marks=pytest.mark.mysql),
                        pytest.param(HOLOGRES, id="hologres", marks=pytest.mark.hologres)])
def backend(request: pytest.FixtureRequest) -> SqlBackend:
    dialect: Dialect = request.param
    return SqlBackend(dialect, request.getfixturevalue(dialect.server_fixture))


def _views(backend: SqlBackend, missing: bool = False) -> list[dict[str, Any]]:
    """Views ``a`` (int, str) and ``b`` (float) on two tables; ``b``'s table is never made if ``missing``."""
    b_table = backend.table("never_made" if missing else "b")
    return [{**view_config(backend.table("a"), {"n": "int", "s": "str"}), "name": "a", "prefix": "a_"},
            {**view_config(b_table, {"x": "float"}), "name": "b", "prefix": "b_"}]


def _runtime(backend: SqlBackend, missing: bool = False, **source: Any) -> factory.Runtime:
    runtime = factory.build({"sources": {"db": backend.source(batch_size=2, **source)},
                             "views": _views(backend, missing)})
    _fill(runtime, missing)
    return runtime


def _fill(runtime: factory.Runtime, missing: bool = False) -> None:
    a, b = _dao(runtime, "a"), _dao(runtime, "b")
    a.prepare()
    a.upsert([(f"k{i}", {"n": i, "s": f"s{i}"}) for i in range(7)])
    if not missing:
        b.prepare()
        b.upsert([(f"k{i}", {"x": i / 2}) for i in range(0, 7, 2)])  # k1, k3, k5: rows of a only


def _dao(runtime: factory.Runtime, name: str) -> BaseDao:
    dao = runtime.daos[name]
    assert isinstance(dao, BaseDao)
    return dao


def _count_checkouts(source: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Each connection the source's own pool hands out from now on (the original method does the work)."""
    calls: list[int] = []
    if source.type_name == "mysql":
        pool, method = source._pool, "connection"  # featuredao's pool for pymysql: a context manager
    else:
        pool, method = source._pool_ready(), "getconn"  # psycopg_pool's ConnectionPool
    original: Callable[..., Any] = getattr(pool, method)

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(pool, method, counting)
    return calls


def _together(runtime: factory.Runtime, *names: str) -> list[BatchResult | Exception]:
    return drive([_dao(runtime, name).read_steps(KEYS, deadline=Deadline.after(5)) for name in names])


def test_views_read_together_answer_as_each_alone(backend: SqlBackend) -> None:
    runtime = _runtime(backend)
    try:
        got_a, got_b = _together(runtime, "a", "b")
        assert isinstance(got_a, BatchResult) and isinstance(got_b, BatchResult)
        alone_a, alone_b = _dao(runtime, "a").read(KEYS), _dao(runtime, "b").read(KEYS)
        assert got_a.rows == alone_a.rows and got_b.rows == alone_b.rows
        assert got_a.rows[:3] == [{"n": 0, "s": "s0"}, {"n": 1, "s": "s1"}, None]
        assert got_b.rows[:4] == [{"x": 0.0}, None, None, {"x": 1.0}]
        for got in (got_a, got_b):
            assert got.failed == [] and got.degraded == [] and got.error is None
    finally:
        runtime.close()


def test_one_pool_checkout_for_the_whole_group(backend: SqlBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = _runtime(backend)
    try:
        _dao(runtime, "a").read(["k0"])  # the pool is open and has a connection
        checkouts = _count_checkouts(runtime.sources["db"], monkeypatch)
        _dao(runtime, "a").read(KEYS)
        alone = len(checkouts)
        assert alone == 5  # the counter sees every checkout: one per chunk when a view reads alone
        checkouts.clear()
        got = _together(runtime, "a", "b")
        assert all(isinstance(r, BatchResult) and r.failed == [] for r in got)
        assert len(checkouts) == 1  # ten statements (five chunks each), one connection
    finally:
        runtime.close()


def test_a_missing_table_fails_its_view_alone(backend: SqlBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    # One connection in the pool: the statements after the failed one run on the very same connection.
    runtime = _runtime(backend, missing=True, pool_size=1)
    try:
        expected = _dao(runtime, "a").read(KEYS).rows
        checkouts = _count_checkouts(runtime.sources["db"], monkeypatch)
        for order in (("b", "a"), ("a", "b"), ("b", "a")):
            got = dict(zip(order, _together(runtime, *order), strict=True))
            assert isinstance(got["b"], BackendQueryError), repr(got["b"])
            assert got["b"].view == "b" and got["b"].source == "db"
            backend.assert_caused_by(got["b"], backend.dialect.missing_table_error)
            assert isinstance(got["a"], BatchResult)
            assert got["a"].rows == expected and got["a"].failed == [] and got["a"].degraded == []
        assert len(checkouts) == 3
        # The connection serves on, with the default statement limit back for a read without a deadline.
        assert _dao(runtime, "a").read(["k6"])[0] == {"n": 6, "s": "s6"}
    finally:
        runtime.close()


def _service_config(backend: SqlBackend, missing: bool = False) -> dict[str, Any]:
    user = {**view_config(backend.table("user"), {"age": "int", "city": "str"}), "name": "user",
            "entity": "user", "prefix": "u_", "timeout_ms": 3000}
    item = {**view_config(backend.table("never_made" if missing else "item"), {"price": "float"}),
            "name": "item", "prefix": "i_", "timeout_ms": 3000}
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


@pytest.mark.mysql
def test_a_request_reads_a_user_view_and_an_item_view_with_one_checkout(
        mariadb_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = SqlBackend(MYSQL, mariadb_server)
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
        # The same request with each view read alone (grouped reads switched off) answers the same.
        monkeypatch.setattr(source, "capabilities",
                            dataclasses.replace(source.capabilities, grouped_reads=False))
        checkouts.clear()
        alone = service.fetch("u1", items)
        assert len(checkouts) == 4  # one for the user's view, one per chunk of the items'
        assert (alone.user, alone.items, alone.missing, alone.degraded) == \
               (grouped.user, grouped.items, grouped.missing, grouped.degraded)


def test_a_request_degrades_only_the_view_whose_table_is_missing(backend: SqlBackend) -> None:
    with FeatureService.from_config(_service_config(backend, missing=True)) as service:
        _fill_service(service, missing=True)
        result = service.fetch("u2", ["i0", "i1"])
        assert result.user == {"u_age": 41, "u_city": None}
        assert result.items == [{"i_price": None}, {"i_price": None}]
        assert [(d.view, d.reason) for d in result.degraded] == [("item", Reason.QUERY_ERROR)]
