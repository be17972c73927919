"""Validation of the config's sync section: every problem at once, each with its JSON path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from synchelp import cli, view

from featuredao.config import load
from featuredao.errors import ConfigError
from featuredao.sync import register_conflict, register_transform
from featuredao.sync.config import SyncJob


def base(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "sources": {"src": {"type": "sqlite", "path": "src.db"}, "dst": {"type": "sqlite", "path": "dst.db"},
                    "hot": {"type": "redis"}, "olap": {"type": "clickhouse"}},
        "views": [view("items", "src", "items"), view("copy", "dst", "items", prefix="c_"),
                  view("hot_items", "hot", "items", prefix="h_"),
                  view("olap_items", "olap", "items", prefix="o_")],
        "sync": jobs,
    }


def problems(jobs: list[dict[str, Any]]) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load(base(jobs))
    found: dict[str, str] = {}
    for i in info.value.issues:
        found[i.path] = f"{found.get(i.path, '')} | {i.message}"
    return found


def test_valid_jobs_are_parsed() -> None:
    register_transform("test_cfg_double", lambda row: row["price"] * 2)
    cfg = load(base([
        {"name": "full", "from": "items", "to": ["copy", "hot_items"], "delete_missing": True},
        {"name": "inc", "from": "items", "to": ["copy"], "mode": "incremental", "watermark": "updated_at",
         "transform": [{"compute": {"field": "double", "fn": "test_cfg_double"}},
                       {"filter": {"field": "double", "op": "gt", "value": 3}}],
         "conflict": {"strategy": "last_writer_wins", "version": "updated_at"}},
    ]))
    assert [j.name for j in cfg.sync] == ["full", "inc"]
    job = cfg.sync[1]
    assert isinstance(job, SyncJob) and job.targets == ("copy",) and job.watermark == "updated_at"
    assert [s.kind for s in job.steps] == ["compute", "filter"]


def test_every_problem_reported_with_its_path() -> None:
    register_conflict("test_cfg_keep", lambda key, src, dst: src)
    found = problems([
        {"name": "a", "from": "nope", "to": ["missing", "copy"]},
        {"name": "b", "from": "items", "to": ["copy"], "mode": "incremental",
         "transform": [{"cast": {"price": "decimal"}}, {"rename": {"nope": "x"}},
                       {"compute": {"field": "y", "fn": "not_registered"}},
                       {"filter": {"field": "price", "op": "like", "value": 1}},
                       {"rename": {"a": "b"}, "cast": {"c": "int"}}]},
        {"name": "c", "from": "hot_items", "to": ["copy"], "conflict": {"strategy": "newest"}},
        {"name": "d", "from": "items", "to": ["copy"], "conflict": {"strategy": "last_writer_wins"},
         "checkpoint": {"source": "hot"}},
        {"name": "e", "from": "items", "to": ["copy"], "bogus": 1},
        {"name": "a", "from": "items", "to": ["olap_items"], "mode": "cdc"},
        {"name": "f", "from": "items", "to": ["copy", "copy", "items"], "mode": "full", "watermark": "x",
         "transform": [{"rename": {"price": "cost"}}],
         "conflict": {"strategy": "test_cfg_keep", "version": "nope"}},
    ])
    expected = {
        "$.sync[0].from": "unknown view",
        "$.sync[0].to[0]": "unknown view",
        "$.sync[1].watermark": "needs the watermark",
        "$.sync[1].transform[0].cast.price": "unknown type",
        "$.sync[1].transform[1].rename.nope": "no field 'nope'",
        "$.sync[1].transform[2].compute.fn": "unknown function",
        "$.sync[1].transform[3].filter.op": "Input should be",
        "$.sync[1].transform[4]": "exactly one of",
        "$.sync[2].from": "cannot serve full sync (no scan capability)",
        "$.sync[2].conflict.strategy": "unknown strategy",
        "$.sync[3].conflict.version": "needs the version field",
        "$.sync[3].checkpoint.source": "cannot hold checkpoints",
        "$.sync[4].bogus": "unknown key",
        "$.sync[5].name": "duplicate job name",
        "$.sync[5].to[0]": "cdc needs deletes",
        "$.sync[6].watermark": "incremental jobs only",
        "$.sync[6].to[1]": "duplicate target",
        "$.sync[6].to[2]": "its own source view",
        "$.sync[6].to[0]": "['price'] are not produced",
        "$.sync[6].conflict.version": "not a field of the source rows",
    }
    for path, text in expected.items():
        assert path in found, f"{path} not reported; got {sorted(found)}"
        assert text in found[path], f"{path}: {found[path]!r} lacks {text!r}"


def test_cli_validate_exits_2_with_paths(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(base([{"name": "x", "from": "items", "to": ["copy"], "mode": "incremental"}])))
    out = cli("validate", str(path))
    assert out.returncode == 2
    assert "$.sync[0].watermark" in out.stderr and "Traceback" not in out.stderr
    out = cli("sync", "run", str(path), "--job", "x")
    assert out.returncode == 2 and "$.sync[0].watermark" in out.stderr and "Traceback" not in out.stderr


def test_cli_unknown_job_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(base([{"name": "x", "from": "items", "to": ["copy"]}])))
    out = cli("sync", "run", str(path), "--job", "y")
    assert out.returncode == 2 and "no job named 'y'" in out.stderr and "Traceback" not in out.stderr
