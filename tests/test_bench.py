"""featuredao bench end to end: seed, then run with --baseline --out --report --plot (no timing assertions).

``run_end_to_end(config_path, views, tmp_path)`` is the whole scenario for any config; the SQLite test
calls it on two stores side by side. Other backends (Redis, once its adapter lands) add a test that writes
their config and calls the same function.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from featuredao.bench import report
from featuredao.bench.cli import bench

ROWS = 200
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FEATURES = {"price": "float", "clicks": "int", "category": "str", "in_stock": "bool", "tags": "list[str]",
            "embedding": "list[float]"}


def invoke(*args: str) -> Any:
    result = CliRunner().invoke(bench, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def run_end_to_end(config_path: Path, views: list[str], tmp_path: Path, *, baseline_expected: bool = True
                   ) -> dict[str, Any]:
    """Seed every view, run a tiny benchmark with every output, check the outputs; return the JSON."""
    names = ",".join(views)
    seeded = invoke("seed", str(config_path), "--view", names, "--rows", str(ROWS), "--seed", "3",
                    "--chunk", "64", "--no-progress")
    for view in views:
        assert f"{view}: {ROWS} rows written" in seeded.output
    out, md, png = tmp_path / "results.json", tmp_path / "report.md", tmp_path / "charts.png"
    ran = invoke("run", str(config_path), "--view", names, "--batch", "1,20", "--concurrency", "1,2",
                 "--requests", "8", "--warmup", "2", "--cache", "off,warm", "--hit-ratio", "0.8",
                 "--rows", str(ROWS), "--baseline", "--no-progress",
                 "--out", str(out), "--report", str(md), "--plot", str(png))
    assert "| view | batch | conc |" in ran.output

    doc: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    assert report.schema_problems(doc) == []
    assert doc["interrupted"] is False
    assert doc["params"]["views"] == views and doc["params"]["baseline"] is True
    paths = {"service", "dao", "raw"} if baseline_expected else {"service", "dao"}
    cells = {(r["view"], r["batch"], r["concurrency"], r["cache"], r["path"]) for r in doc["records"]}
    assert cells == {(v, b, c, m, p) for v in views for b in (1, 20) for c in (1, 2) for m in ("off", "warm")
                     for p in paths}
    for rec in doc["records"]:
        assert rec["requests"] + rec["errors"] == 8
        assert rec["keys"] == rec["requests"] * rec["batch"]
        if baseline_expected:
            assert rec["ratio_to_raw"] is None or rec["ratio_to_raw"] > 0

    text = md.read_text(encoding="utf-8")
    assert "GIL" in text and f"{doc['machine']['cores']} cores" in text
    for view in views:
        assert f"| {view} | 20 | 2 | warm | service |" in text
    if len(views) > 1:
        assert "Side by side" in text
    assert png.read_bytes()[:8] == PNG_MAGIC
    return doc


def sqlite_config(tmp_path: Path, stores: int = 2) -> tuple[Path, list[str]]:
    """The same logical item view in ``stores`` SQLite files: a side-by-side comparison."""
    sources = {f"db{i}": {"type": "sqlite", "path": str(tmp_path / f"store{i}.db"), "pool_size": 2}
               for i in range(stores)}
    views: list[dict[str, Any]] = [
        {"name": f"items_{i}", "entity": "item", "source": f"db{i}", "table": "items", "key": "item_id",
         "key_type": "int", "features": FEATURES, "prefix": f"s{i}_", "defaults": {"price": 0.0},
         "timeout_ms": 5000}
        for i in range(stores)]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"sources": sources, "views": views, "service": {"deadline_ms": 5000}}))
    return path, [v["name"] for v in views]


@pytest.mark.sqlite
def test_end_to_end_on_sqlite_side_by_side(tmp_path: Path) -> None:
    config, views = sqlite_config(tmp_path)
    doc = run_end_to_end(config, views, tmp_path)
    assert doc["machine"]["versions"]["sqlite3"]
    assert doc["machine"]["adapters"] == ["sqlite"]
    # Every store holds the same rows: the seeded data is the same whatever the store.
    import sqlite3

    dumps = []
    for i in range(2):
        with sqlite3.connect(tmp_path / f"store{i}.db") as conn:
            dumps.append(conn.execute("SELECT * FROM items ORDER BY item_id").fetchall())
    assert len(dumps[0]) == ROWS and dumps[0] == dumps[1]


@pytest.mark.sqlite
def test_seed_is_deterministic_per_seed(tmp_path: Path) -> None:
    import sqlite3

    config, _ = sqlite_config(tmp_path, stores=1)
    db = tmp_path / "store0.db"

    def dump(seed: str) -> list[Any]:
        invoke("seed", str(config), "--view", "items_0", "--rows", "30", "--seed", seed, "--no-progress")
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT * FROM items ORDER BY item_id").fetchall()

    assert dump("1") == dump("1") != dump("2")


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    config, _ = sqlite_config(tmp_path, stores=1)
    runner = CliRunner()
    cases = [
        ["run", str(config), "--view", "nope", "--requests", "1"],
        ["run", str(config), "--batch", "1,x"],
        ["run", str(config), "--cache", "hot"],
        ["run", str(config), "--requests", "5", "--duration", "1"],
        ["seed", str(config), "--view", "nope"],
    ]
    for args in cases:
        result = runner.invoke(bench, args)
        assert result.exit_code == 2, (args, result.output)


@pytest.mark.sqlite
def test_default_run_needs_no_config_and_no_server(tmp_path: Path) -> None:
    """`python -m featuredao.bench run` without CONFIG: the embedded SQLite default, seeded on first use."""
    data = tmp_path / "data"
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "featuredao.bench", "run", "--data-dir", str(data), "--rows", "50",
         "--batch", "1,5", "--concurrency", "1", "--requests", "3", "--warmup", "0", "--baseline",
         "--out", str(out)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path, env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "seeding" in proc.stderr
    doc = json.loads(out.read_text())
    assert report.schema_problems(doc) == []
    assert {r["view"] for r in doc["records"]} == {"user_profile", "item_features"}
    assert {r["path"] for r in doc["records"]} == {"service", "dao", "raw"}
    # The user view is fetched one user at a time, so larger batches go through read_view.
    calls = {(r["view"], r["batch"]): r["call"] for r in doc["records"] if r["path"] == "service"}
    assert calls[("user_profile", 1)] == "FeatureService.fetch(user)"
    assert calls[("user_profile", 5)] == "FeatureService.read_view(view, keys)"
    assert calls[("item_features", 5)] == "FeatureService.fetch(None, keys)"


@pytest.mark.redis
def test_end_to_end_on_redis_layouts_side_by_side(tmp_path: Path, redis_server: Any) -> None:
    layouts = {"json": {"layout": "string", "encoding": "json"},
               "msgpack": {"layout": "string", "encoding": "msgpack"}}
    views = [{"name": f"items_{name}", "entity": "item", "source": "cache", "table": f"bench_{name}",
              "key": "item_id", "key_type": "int", "features": FEATURES, "prefix": f"{name}_",
              "timeout_ms": 5000, "options": options} for name, options in layouts.items()]
    config = tmp_path / "redis.json"
    config.write_text(json.dumps({
        "sources": {"cache": {"type": "redis", "host": redis_server.host, "port": redis_server.port}},
        "views": views, "service": {"deadline_ms": 5000}}))
    doc = run_end_to_end(config, [v["name"] for v in views], tmp_path)
    assert doc["machine"]["adapters"] == ["redis"]
    assert {r["path"] for r in doc["records"]} == {"service", "dao", "raw"}
