"""SQL sequence views (SQLite, MariaDB, PostgreSQL) on real servers: events loaded with each raw driver into
the documented layout, read through the CLI and the DAO, compared with the rules in plain Python."""

from __future__ import annotations

import contextlib
import re
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest
from sequence_truth import (
    FIELDS,
    SPEC,
    assert_cli_matches,
    cli_fetch,
    events,
    expected,
    tied_user,
    truth_config,
)

from featuredao import factory
from featuredao.dao import BaseDao
from featuredao.sequence import SequenceQuery
from featuredao.testing.servers import MariaDbServer, PostgresServer

NOW = 1_700_000_000
ORDER = list(FIELDS)


@dataclass
class Store:
    """A source config, and the raw driver: ``run(sql, rows)`` (rows: executemany) and ``rows(sql)``."""

    name: str
    source: dict[str, Any]
    run: Callable[[str, list[tuple[Any, ...]] | None], None]
    rows: Callable[[str, tuple[Any, ...]], list[Any]]
    mark: str
    """The driver's placeholder."""
    ddl: Callable[[str], list[str]]
    """The documented layout of an events table for ``FIELDS``, by hand."""


def _sqlite_ddl(t: str) -> list[str]:
    return [f'CREATE TABLE "{t}" (user_id TEXT NOT NULL, item_id INTEGER NOT NULL DEFAULT 0, '
            "event TEXT NOT NULL DEFAULT '', ts INTEGER NOT NULL, play_time REAL NOT NULL DEFAULT 0)",
            f'CREATE INDEX "{t}_newest" ON "{t}" (user_id, ts, item_id, event, play_time)']


def _mysql_ddl(t: str) -> list[str]:
    text = "VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL"
    return [f"CREATE TABLE `{t}` (user_id {text}, item_id BIGINT NOT NULL, event {text}, ts BIGINT NOT NULL, "
            "play_time DOUBLE NOT NULL, KEY newest (user_id, ts, item_id, event, play_time)) ENGINE=InnoDB"]


def _postgres_ddl(t: str) -> list[str]:
    return [f'CREATE TABLE "{t}" (user_id text NOT NULL, item_id bigint NOT NULL, event text COLLATE "C" '
            "NOT NULL, ts bigint NOT NULL, play_time double precision NOT NULL)",
            f'CREATE INDEX ON "{t}" (user_id, ts, item_id, event, play_time)']


@pytest.fixture(params=[pytest.param("sqlite", marks=pytest.mark.sqlite),
                        pytest.param("mysql", marks=pytest.mark.mysql),
                        pytest.param("hologres", marks=pytest.mark.hologres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        path = str(tmp_path / "events.db")
        lite = sqlite3.connect(path, isolation_level=None)

        def lite_run(sql: str, rows: list[tuple[Any, ...]] | None) -> None:
            if rows is None:
                lite.execute(sql)
            else:
                lite.executemany(sql, rows)

        yield Store("sqlite", {"type": "sqlite", "path": path}, lite_run,
                    lambda sql, p: lite.execute(sql, p).fetchall(), "?", _sqlite_ddl)
        lite.close()
    elif request.param == "mysql":
        maria: MariaDbServer = request.getfixturevalue("mariadb_server")
        conn = pymysql.connect(host=maria.host, port=maria.port, user=maria.user, password=maria.password,
                               database=maria.database, autocommit=True, charset="utf8mb4")

        def my_run(sql: str, rows: list[tuple[Any, ...]] | None) -> None:
            with conn.cursor() as cur:
                if rows is None:
                    cur.execute(sql)
                else:
                    cur.executemany(sql, rows)

        def my_rows(sql: str, params: tuple[Any, ...]) -> list[Any]:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return list(cur.fetchall())

        yield Store("mysql", {"type": "mysql", "host": maria.host, "port": maria.port, "user": maria.user,
                              "password": maria.password, "database": maria.database, "flavor": "mariadb"},
                    my_run, my_rows, "%s", _mysql_ddl)
        conn.close()
    else:
        pg: PostgresServer = request.getfixturevalue("postgres_server")
        pconn = psycopg.connect(host=pg.host, port=pg.port, user=pg.user, password=pg.password,
                                dbname=pg.dbname, autocommit=True)

        def pg_run(sql: str, rows: list[tuple[Any, ...]] | None) -> None:
            with pconn.cursor() as cur:
                if rows is None:
                    cur.execute(sql)
                else:
                    cur.executemany(sql, rows)

        def pg_rows(sql: str, params: tuple[Any, ...]) -> list[Any]:
            return pconn.execute(sql, params).fetchall()

        yield Store("hologres", {"type": "hologres", "host": pg.host, "port": pg.port, "user": pg.user,
                                 "password": pg.password, "database": pg.dbname, "sslmode": "disable"},
                    pg_run, pg_rows, "%s", _postgres_ddl)
        pconn.close()


def load(store: Store, table: str, by_user: dict[str, list[dict[str, Any]]]) -> None:
    """The documented layout made by hand, then every event inserted with the raw driver."""
    for sql in store.ddl(table):
        store.run(sql, None)
    q = '`' if store.name == "mysql" else '"'
    marks = ", ".join([store.mark] * (len(ORDER) + 1))
    store.run(f"INSERT INTO {q}{table}{q} (user_id, {', '.join(ORDER)}) VALUES ({marks})",
              [(user, *(e[f] for f in ORDER)) for user, evs in by_user.items() for e in evs])


def view(table: str, spec: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": "click_seq", "entity": "user", "kind": "sequence", "source": "db", "table": table,
            "key": "user_id", "prefix": "click_", "sequence": spec, **extra}


def test_ground_truth_through_the_cli(store: Store, tmp_path: Path) -> None:
    table = f"truth_{secrets.token_hex(4)}"
    users = [f"u{i}" for i in range(6)] + ["用户-ü", "ユーザー:7", "emoji 🎧", "Ω"]
    by_user = events(16, users, 120, NOW)
    by_user["tie-用户"] = tied_user(NOW)
    load(store, table, by_user)
    config = truth_config(tmp_path, "db", store.source, view(table, SPEC))
    assert_cli_matches(config, by_user, NOW)
    tie = cli_fetch(config, "tie-用户", NOW)["user"]
    # Per item the newest is ("click", 7.0): "click" sorts above "buy", then the higher play time.
    assert tie["click_item_id"] == list(range(40, 20, -1)) and set(tie["click_play_time"]) == {7.0}


@pytest.mark.parametrize("spec", [
    {"max_len": 7, "window_s": 3000},
    {"max_len": 5, "window_s": 6000, "events": ["buy"], "min": {"play_time": 4.0}},
    {"max_len": 4, "dedupe": "item_id", "scan_len": 40},
], ids=["window", "filters", "dedupe"])
def test_a_batch_of_users_matches_the_truth(store: Store, spec: dict[str, Any]) -> None:
    table = f"batch_{secrets.token_hex(4)}"
    users = [f"ü-{i}" for i in range(150)]
    by_user = events(3, users, 40, NOW)
    by_user["tie"] = tied_user(NOW)
    load(store, table, by_user)
    full = {"time_field": "ts", "item_field": "item_id", "event_field": "event", "fields": FIELDS, **spec}
    source = {**store.source, "batch_size": 64}  # three chunks: the many-key statement and a single key
    runtime = factory.build({"sources": {"db": source}, "views": [view(table, full)]})
    try:
        dao = runtime.daos["click_seq"]
        names = [*users, "tie", "nobody"]
        rows = dao.read(names, timeout_s=10.0, as_of=NOW).rows
        for user, row in zip(names, rows, strict=True):
            want = expected(by_user.get(user, []), full, NOW, prefix="")
            if not want["item_id"]:
                assert row is None, user
            else:
                assert row == want, user
    finally:
        runtime.close()


def test_prepare_makes_a_layout_read_in_index_order(store: Store) -> None:
    """``prepare`` creates the documented table; the read walks the index, with no sort and no table rows."""
    table = f"made_{secrets.token_hex(4)}"
    runtime = factory.build({"sources": {"db": store.source}, "views": [view(table, SPEC)]})
    try:
        dao = runtime.daos["click_seq"]
        assert isinstance(dao, BaseDao)
        dao.prepare()
        dao.prepare()  # idempotent
        dao.append(("ü", {"item_id": i, "event": "click", "ts": NOW - i, "play_time": 5.0})
                   for i in range(300))
        query = SequenceQuery(ORDER, time_field="ts", since=NOW - 500.5, until=NOW + 0.5, limit=20,
                              event_field="event", events=("click", "buy"), minimum=(("play_time", 2.0),))
        sql, params = dao._seq.select(["ü"], query)  # type: ignore[attr-defined]
        if store.name == "sqlite":
            plan = " ".join(str(r[-1]) for r in store.rows(f"EXPLAIN QUERY PLAN {sql}", tuple(params)))
            assert "COVERING INDEX" in plan and "TEMP B-TREE" not in plan, plan
        elif store.name == "mysql":
            (row,) = store.rows(f"EXPLAIN {sql}", tuple(params))
            assert "Using index" in row[-1] and "filesort" not in row[-1], row
        else:
            with contextlib.suppress(Exception):
                store.run(f'VACUUM ANALYZE "{table}"', None)
            plan = " ".join(r[0] for r in store.rows(f"EXPLAIN {sql}", tuple(params)))
            assert "Index Only Scan Backward" in plan and "Sort" not in plan, plan
        row = dao.read(["ü"], as_of=NOW).rows[0]
        assert row is not None and row["item_id"] == list(range(20))
    finally:
        runtime.close()


def test_int_keys_and_a_float_time_in_milliseconds(store: Store) -> None:
    table = f"ms_{secrets.token_hex(4)}"
    spec = {"time_field": "at", "item_field": "item", "fields": {"item": "str", "at": "float"},
            "time_unit": "ms", "max_len": 3, "window_s": 10}
    runtime = factory.build({"sources": {"db": store.source},
                             "views": [{**view(table, spec), "key_type": "int"}]})
    try:
        dao = runtime.daos["click_seq"]
        dao.prepare()
        at = NOW * 1000.0
        dao.append([(7, {"item": "a", "at": at - 10_000.5}), (7, {"item": "b", "at": at - 9_999.5}),
                    (7, {"item": "c", "at": at - 0.25}), (7, {"item": "é", "at": at - 0.25}),
                    (7, {"item": "z", "at": at + 1}), (8, {"item": "x", "at": at - 5})])
        rows = dao.read([7, 8, 9], as_of=NOW).rows
        assert rows[0] == {"item": ["é", "c", "b"], "at": [at - 0.25, at - 0.25, at - 9_999.5]}
        assert rows[1] == {"item": ["x"], "at": [at - 5]} and rows[2] is None
    finally:
        runtime.close()


@pytest.mark.mysql
def test_the_mysql_flavor_keeps_its_time_limit_on_a_union(mariadb_server: MariaDbServer) -> None:
    """MySQL 8's hint needs a leading SELECT: the union is wrapped (MariaDB reads the hint as a comment)."""
    m = mariadb_server
    source = {"type": "mysql", "host": m.host, "port": m.port, "user": m.user, "password": m.password,
              "database": m.database, "flavor": "mysql"}
    spec = {"time_field": "ts", "item_field": "item_id", "fields": {"item_id": "int", "ts": "int"},
            "max_len": 2}
    runtime = factory.build({"sources": {"db": source},
                             "views": [view(f"flavor_{secrets.token_hex(4)}", spec)]})
    try:
        dao = runtime.daos["click_seq"]
        dao.prepare()
        dao.append((u, {"item_id": i, "ts": NOW - i}) for u in ("a", "b") for i in range(4))
        assert dao.read(["a", "b", "c"], timeout_s=5.0, as_of=NOW).rows == [
            {"item_id": [0, 1], "ts": [NOW, NOW - 1]}, {"item_id": [0, 1], "ts": [NOW, NOW - 1]}, None]
    finally:
        runtime.close()


@pytest.mark.hologres
def test_a_read_limit_kept_by_the_session_never_limits_other_work(postgres_server: PostgresServer) -> None:
    """A read's ``statement_timeout`` stays on its pooled connection for the next read of the same limit;
    a read without a deadline, a write or DDL on that connection run with the connect-time default."""
    pg = postgres_server
    source = {"type": "hologres", "host": pg.host, "port": pg.port, "user": pg.user, "password": pg.password,
              "database": pg.dbname, "sslmode": "disable", "pool_size": 1, "read_timeout_ms": 4000}
    runtime = factory.build({"sources": {"db": source},
                             "views": [view(f"limit_{secrets.token_hex(4)}", {**SPEC, "max_len": 3})]})
    try:
        src: Any = runtime.daos["click_seq"].source
        # A read's limit is its time left in whole ms, rounded up: the limit asked for, less by what a
        # loaded machine spent before the read took it (bounded below by half; the default is 4 s).
        assert 250 <= shown_ms(src.fetch("SHOW statement_timeout", (), 0.5)[0][0]) <= 500
        assert 250 <= shown_ms(src.fetch("SHOW statement_timeout", (), 0.5)[0][0]) <= 500  # kept, or set anew
        assert src.fetch("SHOW statement_timeout", (), None)[0][0] == "4s"
        # Reads of 0.5 s (a 50 ms limit could cancel even SELECT 1 on a stalled server); the work after
        # each outlasts the limit left on the session.
        src.fetch("SELECT 1", (), 0.5)
        src.execute("SELECT pg_sleep(0.8)")  # DDL-like work: not cancelled at the read's 500 ms
        src.fetch("SELECT 1", (), 0.5)
        src.write("SELECT pg_sleep(%s)", [(0.8,)])
        with pytest.raises(Exception, match="statement timeout"):
            src.fetch("SELECT pg_sleep(0.3)", (), 0.05)
        # A failed read set it again.
        assert 1000 <= shown_ms(src.fetch("SHOW statement_timeout", (), 2.0)[0][0]) <= 2000
    finally:
        runtime.close()


def shown_ms(setting: str) -> int:
    """A ``statement_timeout`` as PostgreSQL shows it ("500ms", "4s", "1min"), in ms."""
    match = re.fullmatch(r"(\d+)(ms|s|min)", setting)
    assert match, setting
    return int(match[1]) * {"ms": 1, "s": 1000, "min": 60_000}[match[2]]
