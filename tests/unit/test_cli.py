"""The featuredao command, run as a real subprocess: exit codes, messages, JSON output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from featuredao.demo import demo_config

EXE = shutil.which("featuredao", path=str(Path(sys.executable).parent)) or "featuredao"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("demo")
    out = run("demo", "--dir", str(directory), "--users", "50", "--items", "300", "--fetch-items", "120")
    assert out.returncode == 0, out.stderr
    assert "120 items x 25 features" in out.stdout and "degraded: none" in out.stdout
    assert "context: {\"hour\": 9, \"device\": \"ios\"}" in out.stdout
    return directory


def test_validate_ok(demo_dir: Path) -> None:
    out = run("validate", str(demo_dir / "featuredao.json"))
    assert out.returncode == 0 and "3 view(s)" in out.stdout


def test_validate_broken_config_exits_2_naming_each_path(tmp_path: Path) -> None:
    cfg: dict[str, Any] = demo_config(str(tmp_path / "f.db"))
    cfg["sources"]["local"]["password"] = "${FEATUREDAO_CLI_SECRET}"
    cfg["views"][0]["features"]["age"] = "integer"
    cfg["views"][1]["source"] = "remote"
    cfg["views"][1]["table"] = "items; DROP TABLE users"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(cfg))
    out = run("validate", str(path), env={"FEATUREDAO_CLI_SECRET": "s3cr3t-value"})
    assert out.returncode == 2
    for where in ("$.sources.local.password", "$.views[0].features.age", "$.views[1].source",
                  "$.views[1].table"):
        assert where in out.stderr
    assert "Traceback" not in out.stderr and "s3cr3t-value" not in out.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    out = run("validate", str(tmp_path / "nope.json"))
    assert out.returncode == 2 and "cannot read" in out.stderr and "Traceback" not in out.stderr


def test_fetch_json_prints_one_object(demo_dir: Path) -> None:
    out = run("fetch", str(demo_dir / "featuredao.json"), "--user", "u3", "--items", "5,999999,7", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert set(doc) == {"user", "items", "context", "missing", "degraded"}
    assert doc["context"] == {"hour": 12, "device": "web"}  # the demo's declared defaults
    assert list(doc["items"]) == ["5", "999999", "7"]
    assert doc["missing"] == {"item_features": ["999999"]}  # found and missing told apart
    assert doc["items"]["999999"]["item_price"] == 0.0  # missing item: defaults
    assert isinstance(doc["items"]["5"]["item_embedding"], list) and len(doc["user"]) == 20


def test_fetch_one_view(demo_dir: Path) -> None:
    out = run("fetch", str(demo_dir / "featuredao.json"), "--view", "user_profile", "--keys", "u1,nobody",
              "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["nobody"] is None and doc["u1"]["age"] >= 0


def test_usage_errors_exit_2(demo_dir: Path) -> None:
    assert run("fetch", str(demo_dir / "featuredao.json")).returncode == 2
    out = run("fetch", str(demo_dir / "featuredao.json"), "--view", "nope", "--keys", "a")
    assert out.returncode == 2 and "unknown view" in out.stderr
    assert run("no-such-command").returncode == 2


def test_runtime_failure_exits_1(tmp_path: Path) -> None:
    cfg = demo_config(str(tmp_path / "missing-dir" / "f.db"))
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    out = run("fetch", str(path), "--view", "user_profile", "--keys", "a")
    assert out.returncode == 1
    assert out.stderr.startswith("error: BackendUnavailable") and "Traceback" not in out.stderr


def test_health_reports_each_source_and_exits_1_when_one_is_down(tmp_path: Path) -> None:
    from featuredao.testing.servers import free_port

    cfg = demo_config(str(tmp_path / "f.db"))
    cfg["sources"]["down"] = {"type": "redis", "host": "127.0.0.1", "port": free_port(),
                              "connect_timeout_ms": 200}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    out = run("health", str(path))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "local" in out.stdout and "down" in out.stdout and "DOWN" in out.stdout
    del cfg["sources"]["down"]
    path.write_text(json.dumps(cfg))
    out = run("health", str(path))
    assert out.returncode == 0 and "up" in out.stdout and "closed" in out.stdout


def test_a_key_that_cannot_be_a_key_of_a_view_is_a_usage_error(demo_dir: Path) -> None:
    out = run("fetch", str(demo_dir / "featuredao.json"), "--user", "1", "--items", "1,abc,2", "--json")
    assert out.returncode == 2, out
    assert "'abc'" in out.stderr and "key_type int" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.splitlines()) == 1, out.stderr  # one line: not click's usage block
    out = run("fetch", str(demo_dir / "featuredao.json"), "--view", "item_features", "--keys", "7,x7")
    assert out.returncode == 2 and "'x7'" in out.stderr and "Traceback" not in out.stderr


def test_entity_keys_are_checked_like_user_and_items(tmp_path: Path) -> None:
    cfg = {"sources": {"mem": {"type": "memory"}},
           "views": [{"name": "shops", "entity": "shop", "source": "mem", "table": "shops", "key": "id",
                      "key_type": "int", "features": {"rating": "float"}},
                     {"name": "items", "entity": "item", "source": "mem", "table": "items", "key": "id",
                      "key_type": "int", "features": {"price": "float"}}]}
    path = tmp_path / "shops.json"
    path.write_text(json.dumps(cfg))
    out = run("fetch", str(path), "--items", "1", "--key", "shop=x7", "--json")
    assert out.returncode == 2, out
    # One line, ours: no click usage lines above it, no traceback.
    assert out.stderr.splitlines() == [
        "error: key 'x7' cannot be a key of view 'shops' (key_type int): 'x7' is not an integer key"]
    out = run("fetch", str(path), "--items", "1", "--key", f"shop={2 ** 64}")
    assert out.returncode == 2 and "outside the 64-bit range" in out.stderr
    assert len(out.stderr.splitlines()) == 1
    out = run("fetch", str(path), "--items", "1", "--key", "planet=3")
    assert out.returncode == 2 and "unknown entities" in out.stderr and "Traceback" not in out.stderr
    out = run("fetch", str(path), "--items", "1", "--key", "shop=7", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["entities"] == {"shop": {"rating": None}}
