"""Sync into sequence views: an events table (a table view keyed by event id) copied as each user's events.

Full and incremental (by event time) jobs from SQLite into a Redis and a SQLite sequence view, read back
through featuredao and compared with the events table; a bad record goes to the dead letters; the config
refuses what a sequence target cannot do.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from synchelp import redis_source, sqlite_exec

from featuredao import build
from featuredao.config import load
from featuredao.errors import ConfigError
from featuredao.sync.engine import SyncEngine
from featuredao.testing.servers import RedisServer

NOW = 1_700_000_000
FIELDS = {"item_id": "int", "event": "str", "ts": "int", "play_time": "float"}


def events_view() -> dict[str, Any]:
    return {"name": "events", "entity": "event", "source": "src", "table": "events", "key": "event_id",
            "key_type": "int", "features": {"user_id": "str", **FIELDS}}


def sequence_view(name: str, source: str) -> dict[str, Any]:
    spec = {"time_field": "ts", "item_field": "item_id", "event_field": "event", "fields": FIELDS,
            "max_len": 1000}
    return {"name": name, "entity": "user", "kind": "sequence", "source": source, "table": f"{name}_events",
            "key": "user_id", "sequence": spec, "prefix": f"{name}_", "timeout_ms": 5000}


def config(tmp_path: Path, redis: RedisServer, jobs: list[dict[str, Any]]) -> Path:
    doc = {"sources": {"src": {"type": "sqlite", "path": "src.db"},
                       "dst": {"type": "sqlite", "path": "dst.db"}, "hot": redis_source(redis)},
           "views": [events_view(), sequence_view("seq_redis", "hot"), sequence_view("seq_sqlite", "dst")],
           "service": {"deadline_ms": 5000}, "sync": jobs}
    path = tmp_path / "sync.json"
    path.write_text(json.dumps(doc))
    return path


def made(rng: random.Random, first: int, n: int) -> dict[int, dict[str, Any]]:
    return {i: {"user_id": f"u{rng.randrange(8)}", "item_id": rng.randrange(50),
                "event": rng.choice(["click", "buy"]), "ts": NOW - rng.randrange(10_000) + i,
                "play_time": round(rng.random() * 9, 2)} for i in range(first, first + n)}


def seed(path: Path, rows: dict[int, dict[str, Any]], prepare: bool = False) -> None:
    runtime = build(path)
    try:
        for dao in runtime.daos.values():
            if prepare:
                dao.prepare()  # type: ignore[attr-defined]
        runtime.daos["events"].upsert(rows.items())
    finally:
        runtime.close()


def read_back(path: Path, view: str, users: list[str]) -> dict[str, list[tuple[Any, ...]]]:
    runtime = build(path)
    try:
        rows = runtime.daos[view].read(users, timeout_s=5.0).rows
    finally:
        runtime.close()
    return {u: sorted(zip(*(r[f] for f in FIELDS), strict=True)) if r else [] for u, r in zip(users, rows,
                                                                                                 strict=True)}


def expected(rows: dict[int, dict[str, Any]], users: list[str]) -> dict[str, list[tuple[Any, ...]]]:
    return {u: sorted(tuple(r[f] for f in FIELDS) for r in rows.values() if r["user_id"] == u) for u in users}


USERS = [f"u{i}" for i in range(8)]


def test_full_then_incremental_by_time_into_redis_and_sqlite(tmp_path: Path,
                                                             redis_server: RedisServer) -> None:
    path = config(tmp_path, redis_server, [
        {"name": "all", "from": "events", "to": ["seq_redis", "seq_sqlite"], "batch_size": 37},
        {"name": "new", "from": "events", "to": ["seq_redis", "seq_sqlite"], "mode": "incremental",
         "watermark": "ts", "batch_size": 37}])
    rng = random.Random(3)
    rows = made(rng, 0, 300)
    seed(path, rows, prepare=True)
    with SyncEngine.from_file(path, "all") as engine:
        report = engine.run()
    assert report.ok and report.written == 2 * 300
    for view in ("seq_redis", "seq_sqlite"):
        assert read_back(path, view, USERS) == expected(rows, USERS), view
    # The incremental job picks up what arrives after its own first pass, by event time.
    with SyncEngine.from_file(path, "new") as engine:
        assert engine.run().ok
    later = {i: {**r, "ts": NOW + 20_000 + i} for i, r in made(rng, 300, 120).items()}
    seed(path, later)
    with SyncEngine.from_file(path, "new") as engine:
        report = engine.run()
    assert report.ok and report.written == 2 * 120
    # The incremental job's own first pass sent the first 300 events again: Redis holds an identical
    # event once, the SQLite events table keeps both copies (appends are not idempotent there).
    assert read_back(path, "seq_redis", USERS) == expected({**rows, **later}, USERS)
    doubled = {u: sorted(evs + evs) for u, evs in expected(rows, USERS).items()}
    assert read_back(path, "seq_sqlite", USERS) == {u: sorted(doubled[u] + expected(later, USERS)[u])
                                                    for u in USERS}


def test_a_record_that_cannot_be_an_event_is_a_dead_letter(tmp_path: Path, redis_server: RedisServer) -> None:
    path = config(tmp_path, redis_server, [{"name": "all", "from": "events", "to": ["seq_sqlite"],
                                            "dead_letter": {"path": "dead.jsonl"}}])
    rows = made(random.Random(4), 0, 20)
    seed(path, rows, prepare=True)
    sqlite_exec(tmp_path / "src.db", "UPDATE events SET ts = NULL WHERE event_id = 3")
    with SyncEngine.from_file(path, "all") as engine:
        report = engine.run()
    assert report.written == 19
    dead = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert [d["key"] for d in dead] == [3] and "time" in dead[0]["reason"]
    del rows[3]
    assert read_back(path, "seq_sqlite", USERS) == expected(rows, USERS)


@pytest.mark.parametrize(("job", "message"), [
    ({"mode": "full", "delete_missing": True}, "appended, never deleted"),
    ({"conflict": {"strategy": "target_wins"}}, "appended, never deleted"),
])
def test_what_a_sequence_target_cannot_do_is_a_config_error(tmp_path: Path, redis_server: RedisServer,
                                                            job: dict[str, Any], message: str) -> None:
    path = config(tmp_path, redis_server, [{"name": "j", "from": "events", "to": ["seq_redis"], **job}])
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert any(i.path == "$.sync[0].to[0]" and message in i.message for i in caught.value.issues), \
        caught.value.issues
