"""CDC from real servers: PostgreSQL through a logical replication slot decoded by wal2json (hologres
adapter), MariaDB through its row-based binary log (mysql adapter, mysql-replication). Inserts, updates,
deletes and key changes propagate; the position survives a restart of the job; a replayed change never
brings back an older row; the PostgreSQL slot only advances past what the targets confirmed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cdchelp import BACKENDS, Backend, make_backend
from synchelp import assert_same, config, contents, row, seed, view

from featuredao import build
from featuredao.sync.engine import SyncEngine

KEYS = list(range(1, 41))
ALL = list(range(1, 61))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    b = make_backend(request)
    yield b
    b.drop()


def _setup(tmp_path: Path, b: Backend, batch_size: int = 6) -> Path:
    path = config(tmp_path, sources={"off": b.source()},
                  views=[view("items", "off", b.table), view("copy", "dst", "items", prefix="c_")],
                  jobs=[{"name": "cdc", "from": "items", "to": ["copy"], "mode": "cdc",
                         "batch_size": batch_size}])
    seed(path, "items", {i: row(i) for i in KEYS})
    return path


def _run(path: Path) -> dict[str, Any]:
    with SyncEngine.from_file(path, "cdc") as e:
        report = e.run()
        assert report.ok, report
        state: dict[str, Any] = e.status()[0]
    return state


def test_inserts_updates_deletes_and_key_changes_propagate(tmp_path: Path, backend: Backend) -> None:
    path = _setup(tmp_path, backend)
    first = _run(path)
    assert first["phase"] == "stream"
    assert_same(path, "items", "copy", ALL)
    # One transaction with several changes, then single statements; more changes than one chunk.
    seed(path, "items", {i: row(i, 2) for i in range(41, 56)})
    seed(path, "items", {i: row(i, 3) for i in KEYS[::3]})
    backend.run("DELETE FROM {t} WHERE id IN (2, 5, 41)")
    backend.run("UPDATE {t} SET id = 60 WHERE id = 7")  # a key change: 7 goes, 60 comes
    backend.run("UPDATE {t} SET price = 99.5 WHERE id = 8")
    second = _run(path)
    assert second["phase"] == "stream"
    assert_same(path, "items", "copy", ALL)
    dst = contents(path, "copy", [2, 5, 7, 41, 60, 8])
    assert dst[2] is None and dst[5] is None and dst[7] is None and dst[41] is None
    assert dst[60] is not None and dst[8]["price"] == 99.5  # type: ignore[index]
    assert second["cursor"] != first["cursor"]


def test_position_survives_a_restart_and_the_slot_follows_the_targets(tmp_path: Path,
                                                                      backend: Backend) -> None:
    path = _setup(tmp_path, backend, batch_size=4)
    _run(path)
    backend.run("INSERT INTO {t} (id, price, updated_at) VALUES (100, 1.5, 1)")
    state = _run(path)
    at = state["cursor"]
    lsn = backend.slot_lsn() if backend.which == "hologres" else None
    if lsn is not None:
        assert lsn >= at[0]  # the slot was advanced to the applied transaction
    # A new process (a restart) picks up at the checkpointed position: nothing is read again.
    with SyncEngine.from_file(path, "cdc") as e:
        report = e.run()
        assert report.ok and report.read == 0
    # Changes while the job is stopped; an older row is never applied over a newer one.
    for version in range(5, 12):
        backend.run("UPDATE {t} SET price = %s, updated_at = %s WHERE id = 3", (float(version), version))
    backend.run("DELETE FROM {t} WHERE id = 100")
    with SyncEngine.from_file(path, "cdc") as e:
        report = e.run()
        assert report.ok
        after = e.status()[0]["cursor"]
    assert report.read == 8
    assert after > at
    assert contents(path, "copy", [3])[3]["updated_at"] == 11  # type: ignore[index]
    assert_same(path, "items", "copy", [*ALL, 100])
    if backend.which == "hologres":
        assert backend.slot_lsn() >= after[0]


def test_a_transaction_larger_than_a_chunk_is_read_once(tmp_path: Path, backend: Backend) -> None:
    path = _setup(tmp_path, backend, batch_size=100)
    seed(path, "items", {i: row(i) for i in range(100, 3100)})
    _run(path)
    start = _run(path)["cursor"]
    backend.run("UPDATE {t} SET price = price + 1, updated_at = 7")  # one transaction, 3040 changes
    runtime = build(path)
    try:
        dao: Any = runtime.daos["items"]
        whole = dao.feed(start, 100_000)
        assert len(whole) == 3040 and whole.at_end
        cursor, keys, scanned = start, [], 0
        while True:  # chunk by chunk, the way the engine moves its cursor
            batch = dao.feed(cursor, 100)
            keys += [c.key for c in batch]
            scanned += batch.scanned
            ends = [p for p in ([batch[-1].position] if batch else []) + [batch.tail] if p is not None]
            cursor = max(ends) if ends else cursor
            if batch.at_end or len(keys) >= len(whole):
                break
    finally:
        runtime.close()
    assert keys == [c.key for c in whole]  # every change once, in order
    assert scanned <= whole.scanned + 10, (scanned, whole.scanned)  # decoded once, not once per chunk
    _run(path)
    assert_same(path, "items", "copy", [*ALL, *range(100, 3100)])
