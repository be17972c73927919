"""Shared helpers of the Spark tests: one local SparkSession per test module, configs, reading views back."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from featuredao import build
from featuredao.testing.servers import MariaDbServer, RedisServer

FEATURES = {"price": "float", "tags": "list[str]", "clicks": "int", "flag": "bool", "name": "str"}
SCHEMA = "id long, price double, tags array<string>, clicks long, flag boolean, name string"


def session() -> Iterator[Any]:
    """A local[2] SparkSession for one test module (one JVM start per module), stopped after it."""
    from featuredao.spark import local_session

    spark = local_session("local[2]", "featuredao-tests")
    spark.sparkContext.setLogLevel("ERROR")
    try:
        yield spark
    finally:
        spark.stop()


def redis_source(server: RedisServer) -> dict[str, Any]:
    # A dead target is refused at once; a 500-row pipeline on a loaded machine may take a while to answer.
    return {"type": "redis", "host": server.host, "port": server.port, "socket_timeout_ms": 2000,
            "connect_timeout_ms": 300, "pool_timeout_ms": 2000, "batch_size": 500}


def mysql_source(server: MariaDbServer) -> dict[str, Any]:
    return {"type": "mysql", "host": server.host, "port": server.port, "user": server.user,
            "password": server.password, "database": server.database}


def view(name: str, source: str, *, table: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"name": name, "entity": "item", "source": source, "table": table or f"t{uuid.uuid4().hex[:10]}",
            "key": "id", "key_type": "int", "features": FEATURES, **extra}


def redis_view(name: str, source: str = "hot") -> dict[str, Any]:
    return view(name, source, prefix=f"{name}_", options={"layout": "string", "encoding": "msgpack"})


def config_file(tmp_path: Path, sources: dict[str, Any], views: list[dict[str, Any]],
                jobs: list[dict[str, Any]] | None = None, name: str = "features.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"sources": sources, "views": views, "sync": jobs or []}))
    return path


def row(i: int) -> tuple[Any, ...]:
    """One DataFrame row of SCHEMA."""
    return (i, i * 1.25, [f"t{i % 7}", "x"], i * 3, i % 3 == 0, None if i % 11 == 0 else f"item-{i}")


def as_features(r: tuple[Any, ...]) -> dict[str, Any]:
    return dict(zip(FEATURES, r[1:], strict=True))


def contents(config: Path | dict[str, Any], view_name: str, keys: list[int]) -> dict[int, Any]:
    """Every given key's row in a view (None where absent), through the view's own DAO."""
    runtime = build(config)
    try:
        batch = runtime.daos[view_name].read(keys)
        return dict(zip(keys, batch.rows, strict=True))
    finally:
        runtime.close()


def dead_letters(folder: Path) -> list[dict[str, Any]]:
    files = sorted(folder.glob("part-*.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]
