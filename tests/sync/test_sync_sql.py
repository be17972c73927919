"""Full and incremental sync from real SQL and ClickHouse servers (MariaDB, PostgreSQL, ClickHouse) into
SQLite and Redis targets: target equal to source, ties at the boundary watermark never skipped,
deletes of a full pass with ``delete_missing``, checkpoints held in the SQL source itself."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from synchelp import assert_same, config, contents, redis_source, redis_view, row, seed, view

from featuredao import build
from featuredao.sync.engine import SyncEngine
from featuredao.testing.servers import RedisServer

KEYS = list(range(1, 61))


def _mysql(server: Any) -> dict[str, Any]:
    return {"type": "mysql", "host": server.host, "port": server.port, "user": server.user,
            "password": server.password, "database": server.database}


def _hologres(server: Any) -> dict[str, Any]:
    return {"type": "hologres", "host": server.host, "port": server.port, "user": server.user,
            "password": server.password, "database": server.dbname, "sslmode": "disable"}


def _clickhouse(server: Any) -> dict[str, Any]:
    return {"type": "clickhouse", "host": server.host, "port": server.port, "user": server.user,
            "password": server.password, "database": server.database}


BACKENDS = [
    pytest.param(("mariadb_server", _mysql, True), id="mysql", marks=pytest.mark.mysql),
    pytest.param(("postgres_server", _hologres, True), id="hologres", marks=pytest.mark.hologres),
    pytest.param(("clickhouse_server", _clickhouse, False), id="clickhouse", marks=pytest.mark.clickhouse),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> tuple[dict[str, Any], bool]:
    fixture, make, sql = request.param
    return make(request.getfixturevalue(fixture)), sql


def _table() -> str:
    return f"sy{uuid.uuid4().hex[:12]}"


def engine(path: Path, job: str) -> SyncEngine:
    return SyncEngine.from_file(path, job)


def _delete(path: Path, view_name: str, keys: list[int]) -> None:
    runtime = build(path)
    try:
        runtime.daos[view_name].delete(keys)  # type: ignore[attr-defined]
    finally:
        runtime.close()


def test_full_sync_with_deletes_into_sqlite(tmp_path: Path, backend: tuple[dict[str, Any], bool]) -> None:
    source, sql = backend
    path = config(tmp_path, sources={"off": source},
                  views=[view("items", "off", _table()), view("copy", "dst", "items", prefix="c_")],
                  jobs=[{"name": "full", "from": "items", "to": ["copy"], "batch_size": 7,
                         "delete_missing": True}])
    seed(path, "items", {i: row(i) for i in KEYS})
    with engine(path, "full") as e:
        report = e.run()
    assert report.ok and report.read == len(KEYS) and report.written == len(KEYS)
    assert_same(path, "items", "copy", KEYS)
    seed(path, "items", {i: row(i, 1) for i in KEYS[::5]})
    gone = [3, 4, 59]
    if sql:
        _delete(path, "items", gone)
    with engine(path, "full") as e:
        report = e.run()
    assert report.ok
    assert_same(path, "items", "copy", KEYS)
    if sql:
        assert report.deleted == len(gone)
        assert all(contents(path, "copy", gone)[k] is None for k in gone)


def test_incremental_ties_at_the_boundary_into_redis(tmp_path: Path, backend: tuple[dict[str, Any], bool],
                                                     redis_server: RedisServer) -> None:
    source, _ = backend
    path = config(tmp_path, sources={"off": source, "hot": redis_source(redis_server)},
                  views=[view("items", "off", _table()), redis_view("hot_copy")],
                  jobs=[{"name": "inc", "from": "items", "to": ["hot_copy"], "mode": "incremental",
                         "watermark": "updated_at", "batch_size": 7}])
    # Every row shares watermark 0: each chunk boundary falls inside a run of ties.
    seed(path, "items", {i: row(i) for i in KEYS})
    with engine(path, "inc") as e:
        report = e.run()
        cursor = e.status()[0]["cursor"]
    assert report.ok and report.read == len(KEYS)
    assert cursor == [0, KEYS[-1]]
    assert_same(path, "items", "hot_copy", KEYS)
    # Updates with a newer watermark, ties among them again; nothing else is read a second time.
    changed = KEYS[::4]
    seed(path, "items", {i: row(i, 7) for i in changed})
    with engine(path, "inc") as e:
        report = e.run()
    assert report.ok and report.read == len(changed)
    assert_same(path, "items", "hot_copy", KEYS)
    with engine(path, "inc") as e:
        assert e.run().read == 0


@pytest.mark.parametrize("which", [pytest.param("mysql", marks=pytest.mark.mysql),
                                   pytest.param("hologres", marks=pytest.mark.hologres)])
def test_checkpoints_live_in_the_sql_source(tmp_path: Path, request: pytest.FixtureRequest,
                                            which: str) -> None:
    server = request.getfixturevalue("mariadb_server" if which == "mysql" else "postgres_server")
    source = _mysql(server) if which == "mysql" else _hologres(server)
    job = f"j{uuid.uuid4().hex[:8]}"
    path = config(tmp_path, sources={"off": source},
                  views=[view("items", "off", _table()), view("copy", "dst", "items", prefix="c_")],
                  jobs=[{"name": job, "from": "items", "to": ["copy"], "batch_size": 9,
                         "delete_missing": True, "checkpoint": {"source": "off"}}])
    seed(path, "items", {i: row(i) for i in KEYS})
    with engine(path, job) as e:
        assert e.run().ok
        store = e.store
        state = store.load(job)["copy"]
        assert type(store).__name__ == "SqlStateStore"
    assert state["phase"] == "idle" and state["passes"] == 1 and state["written"] == len(KEYS)
    assert not (tmp_path / "sync.sync.db").exists()
    _delete(path, "items", [10, 20])
    with engine(path, job) as e:
        report = e.run()
        assert e.store.load(job)["copy"]["passes"] == 2
    assert report.deleted == 2
    assert_same(path, "items", "copy", KEYS)
