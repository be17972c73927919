"""Shared helpers of the sync tests: configs, seeding, reading whole views back."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from featuredao import build
from featuredao.config import load
from featuredao.testing.servers import RedisServer

EXE = shutil.which("featuredao", path=str(Path(sys.executable).parent)) or "featuredao"

FEATURES = {"price": "float", "tags": "list[str]", "updated_at": "int", "flag": "bool", "name": "str"}


def view(name: str, source: str, table: str, *, features: dict[str, str] | None = None,
         prefix: str = "", **extra: Any) -> dict[str, Any]:
    return {"name": name, "entity": "item", "source": source, "table": table, "key": "id", "key_type": "int",
            "features": features or FEATURES, "prefix": prefix, **extra}


def redis_source(server: RedisServer) -> dict[str, Any]:
    # A dead target is refused at once; a 500-row pipeline on a loaded machine may take a while to answer.
    return {"type": "redis", "host": server.host, "port": server.port, "socket_timeout_ms": 2000,
            "connect_timeout_ms": 300, "pool_timeout_ms": 2000, "batch_size": 500}


def redis_view(name: str, source: str = "hot") -> dict[str, Any]:
    return view(name, source, f"t{uuid.uuid4().hex[:10]}", prefix=f"{name}_",
                options={"layout": "string", "encoding": "msgpack"})


def config(tmp_path: Path, *, views: list[dict[str, Any]], jobs: list[dict[str, Any]],
           sources: dict[str, Any] | None = None, name: str = "sync.json") -> Path:
    srcs = {"src": {"type": "sqlite", "path": "src.db"}, "dst": {"type": "sqlite", "path": "dst.db"},
            **(sources or {})}
    path = tmp_path / name
    path.write_text(json.dumps({"sources": srcs, "views": views, "sync": jobs}))
    return path


def row(i: int, version: int = 0) -> dict[str, Any]:
    return {"price": i * 1.25 + version, "tags": [f"t{i % 7}", f"v{version}"], "updated_at": version,
            "flag": i % 3 == 0, "name": None if i % 11 == 0 else f"item-{i}-{version}"}


def prepare(path: Path, *views: str) -> None:
    runtime = build(path)
    try:
        for v in views:
            runtime.daos[v].prepare()  # type: ignore[attr-defined]
    finally:
        runtime.close()


def seed(path: Path, view_name: str, rows: dict[int, dict[str, Any]]) -> None:
    runtime = build(path)
    try:
        dao = runtime.daos[view_name]
        dao.prepare()  # type: ignore[attr-defined]
        dao.upsert(rows.items())
    finally:
        runtime.close()


def sqlite_exec(db: Path, sql: str, params: Any = ()) -> list[Any]:
    conn = sqlite3.connect(db, timeout=10)
    try:
        rows = conn.execute(sql, params).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


def sqlite_keys(db: Path, table: str) -> list[int]:
    return [r[0] for r in sqlite_exec(db, f'SELECT id FROM "{table}" ORDER BY id')]


def contents(path: Path, view_name: str, keys: list[int]) -> dict[int, Any]:
    """Every given key's row in a view (None where absent), through the view's own DAO."""
    runtime = build(path)
    try:
        batch = runtime.daos[view_name].read(keys)
        return dict(zip(keys, batch.rows, strict=True))
    finally:
        runtime.close()


def redis_count(server: RedisServer, table: str) -> int:
    keys = server.command("KEYS", f"{table}:*")
    assert isinstance(keys, list)
    return len(keys)


def table_of(path: Path, view_name: str) -> str:
    return load(path).views[view_name].table


def assert_same(path: Path, source_view: str, target_view: str, keys: list[int]) -> None:
    src = contents(path, source_view, keys)
    dst = contents(path, target_view, keys)
    diff = {k: (src[k], dst[k]) for k in keys if src[k] != dst[k]}
    assert not diff, f"{len(diff)} keys differ, e.g. {list(diff.items())[:3]}"


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def start_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([EXE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def checkpoint(state_db: Path, job: str, target: str) -> dict[str, Any] | None:
    if not state_db.exists():
        return None
    try:
        rows = sqlite_exec(state_db, "SELECT value FROM featuredao_sync_state WHERE scope = ? AND name = ?",
                           (job, target))
    except sqlite3.OperationalError:
        return None  # tables not created yet
    return json.loads(rows[0][0]) if rows else None
