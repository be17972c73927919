"""SQLite-specific behaviour: deadlines interrupt the statement, bad stored values degrade."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from featuredao import factory
from featuredao.dao import BaseDao
from featuredao.errors import BackendQueryError, BackendTimeout
from featuredao.types import Reason

pytestmark = pytest.mark.sqlite


def build(tmp_path: Path, table: str = "items") -> tuple[factory.Runtime, BaseDao]:
    view = {"entity": "item", "source": "db", "key": "id", "features": {"n": "int", "tags": "list[str]"},
            "defaults": {"n": 0}}
    runtime = factory.build({
        "sources": {"db": {"type": "sqlite", "path": str(tmp_path / "f.db"), "pool_size": 1}},
        "views": [{**view, "name": "items", "table": table},
                  {**view, "name": "other", "table": "other", "prefix": "o_"}],
    })
    dao = runtime.daos["items"]
    assert isinstance(dao, BaseDao)
    return runtime, dao


def test_deadline_interrupts_the_running_statement(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "f.db") as conn:
        # A view that takes seconds to scan: a deliberately slow "table".
        conn.execute("CREATE VIEW slow AS WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
                     "WHERE x < 50000000) SELECT CAST(x AS TEXT) AS id, x AS n, '[]' AS tags FROM c")
    runtime, dao = build(tmp_path, "slow")
    try:
        with pytest.raises(BackendTimeout) as info:
            dao.read(["nope"], timeout_s=0.05)
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        # The only pooled connection was interrupted, not broken: the next read on it works.
        other = runtime.daos["other"]
        assert isinstance(other, BaseDao)
        other.prepare()
        other.upsert([("1", {"n": 1, "tags": []})])
        assert other.read(["1"])[0] == {"n": 1, "tags": []}
    finally:
        runtime.close()


def test_value_that_cannot_be_coerced_degrades_to_default(tmp_path: Path) -> None:
    runtime, dao = build(tmp_path)
    try:
        dao.prepare()
        dao.upsert([("a", {"n": 1, "tags": ["x"]})])
        with sqlite3.connect(tmp_path / "f.db") as conn:
            conn.execute("INSERT INTO items VALUES ('b', 'not a number', '[\"y\"]')")
        result = dao.read(["a", "b"])
        assert result.rows == [{"n": 1, "tags": ["x"]}, {"n": 0, "tags": ["y"]}]
        assert [(d.reason, d.keys, d.feature) for d in result.degraded] == [(Reason.COERCION, ("b",), "n")]
    finally:
        runtime.close()


def test_missing_table_is_a_query_error_naming_the_view(tmp_path: Path) -> None:
    runtime, dao = build(tmp_path, "absent")
    try:
        with pytest.raises(BackendQueryError, match="view='items'"):
            dao.read(["a"])
    finally:
        runtime.close()


def test_concurrent_chunks_on_a_file_not_yet_in_wal_mode(tmp_path: Path) -> None:
    """The first connections of a pool switch a fresh file to WAL at once: none of them fails "locked"."""
    for n in range(15):
        path = tmp_path / f"fresh{n}.db"
        raw = sqlite3.connect(path, isolation_level=None)  # a rollback-journal file, made by another tool
        raw.execute("CREATE TABLE t (id TEXT PRIMARY KEY, a INTEGER)")
        raw.executemany("INSERT INTO t VALUES (?, ?)", [(f"k{i}", i) for i in range(300)])
        source = {"type": "sqlite", "path": str(path), "batch_size": 64, "pool_size": 8}
        runtime = factory.build({"sources": {"s": source},
                                 "views": [{"name": "v", "entity": "item", "source": "s", "table": "t",
                                            "key": "id", "features": {"a": "int"}}]})
        try:
            result = runtime.daos["v"].read_partial([f"k{i}" for i in range(300)], timeout_s=10)
            assert result.error is None and [r["a"] for r in result.rows if r] == list(range(300))
        finally:
            runtime.close()
            raw.close()
