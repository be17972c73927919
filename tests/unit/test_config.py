"""Config validation: every problem at once, each with its JSON path, secrets never echoed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from featuredao import config
from featuredao.errors import ConfigError


def good() -> dict[str, Any]:
    return {
        "sources": {"local": {"type": "sqlite", "path": "f.db"}},
        "views": [{"name": "user_profile", "entity": "user", "source": "local", "table": "user_profile",
                   "key": "user_id", "features": {"age": "int", "tags": "list[str]"},
                   "defaults": {"age": 0}, "timeout_ms": 30, "options": {}}],
    }


def issues(doc: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        config.load(doc)
    return {i.path: str(i) for i in info.value.issues}


def test_valid_config_loads() -> None:
    cfg = config.load(good())
    view = cfg.views["user_profile"]
    assert view.features["tags"].value == "list[str]" and view.defaults == {"age": 0}
    assert cfg.sources["local"].type == "sqlite"


def test_every_problem_is_reported_at_once_with_its_path() -> None:
    doc = good()
    doc["views"][0].update({"features": {"age": "integer", "ok": "int"}, "defaults": {"ok": "x"},
                            "colour": "red", "table": "users; DROP TABLE x"})
    doc["views"].append({**good()["views"][0], "source": "locl"})
    found = issues(doc)
    assert "$.views[0].features.age" in found and "'integer'" in found["$.views[0].features.age"]
    assert "$.views[0].colour" in found and "unknown key" in found["$.views[0].colour"]
    assert "$.views[0].table" in found and "invalid name" in found["$.views[0].table"]
    assert "did you mean 'local'" in found["$.views[1].source"]


def test_cross_view_checks() -> None:
    doc = good()
    doc["views"][0]["defaults"] = {"age": "old", "nope": 1}
    doc["views"].append({**good()["views"][0], "name": "user_profile2"})  # same outputs
    doc["views"].append({**good()["views"][0], "prefix": "u2_"})  # same name
    found = issues(doc)
    assert "does not fit type int" in found["$.views[0].defaults.age"]
    assert "undeclared feature" in found["$.views[0].defaults.nope"]
    assert "also produced by view 'user_profile'" in found["$.views[1].features.age"]
    assert "duplicate view name" in found["$.views[2].name"]


def test_unknown_adapter_suggests() -> None:
    doc = good()
    doc["sources"]["local"]["type"] = "sqlit"
    found = issues(doc)
    assert "did you mean 'sqlite'" in found["$.sources.local.type"]


def test_adapter_options_are_validated() -> None:
    doc = good()
    doc["sources"]["local"]["pool_size"] = 0
    doc["sources"]["local"]["bogus"] = True
    found = issues(doc)
    assert "$.sources.local.pool_size" in found and "$.sources.local.bogus" in found


def test_unset_env_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEATUREDAO_TEST_UNSET", raising=False)
    doc = good()
    doc["sources"]["local"]["path"] = "${FEATUREDAO_TEST_UNSET}/f.db"
    found = issues(doc)
    assert "FEATUREDAO_TEST_UNSET is not set" in found["$.sources.local.path"]


def test_env_values_are_substituted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEATUREDAO_TEST_DIR", str(tmp_path))
    doc = good()
    doc["sources"]["local"]["path"] = "${FEATUREDAO_TEST_DIR}/f.db"
    assert config.load(doc).sources["local"].options.path == f"{tmp_path}/f.db"


def test_secret_values_never_appear_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEATUREDAO_TEST_SECRET", "hunter2-very-secret")
    doc = good()
    doc["sources"]["local"]["password"] = "${FEATUREDAO_TEST_SECRET}"  # sqlite has no such option
    doc["sources"]["other"] = {"type": "sqlite", "path": "x.db", "secret_token": "inline-secret-value"}
    with pytest.raises(ConfigError) as info:
        config.load(doc)
    text = str(info.value)
    assert "hunter2" not in text and "inline-secret-value" not in text
    assert "${FEATUREDAO_TEST_SECRET}" in text and "$.sources.local.password" in text


def test_relative_sqlite_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "c.json"
    path.parent.mkdir()
    path.write_text(json.dumps(good()))
    assert config.load(path).sources["local"].options.path == str(path.parent / "f.db")


def test_unreadable_and_invalid_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"sources": ')
    with pytest.raises(ConfigError, match="line 1"):
        config.load(bad)


def test_quote_identifier_refuses_injection() -> None:
    assert config.quote_identifier("db.t_1", "`") == "`db`.`t_1`"
    with pytest.raises(ConfigError):
        config.quote_identifier('t"; DROP TABLE x; --')


def test_fallback_and_cache_validation() -> None:
    doc = good()
    base = good()["views"][0]
    doc["views"][0].update({"fallback": ["fb_ok", "fb_item", "fb_thin", "nowhere"],
                            "cache": {"l1": {"ttl_s": 5}, "l2": {"source": "local"}}})
    doc["views"] += [
        {**base, "name": "fb_ok", "table": "t2"},
        {**base, "name": "fb_item", "entity": "item", "table": "t3"},
        {**base, "name": "fb_thin", "table": "t4", "features": {"age": "int"}, "defaults": {}},
    ]
    found = issues(doc)
    assert "$.views[0].fallback[0]" not in found
    assert "entity 'item'" in found["$.views[0].fallback[1]"]
    assert "lacks features ['tags']" in found["$.views[0].fallback[2]"]
    assert "unknown view" in found["$.views[0].fallback[3]"]
    assert "cannot hold a shared cache" in found["$.views[0].cache.l2.source"]


def test_fallback_views_are_served_only_as_fallbacks() -> None:
    doc = good()
    doc["views"][0]["fallback"] = ["backup"]
    doc["views"].append({**good()["views"][0], "name": "backup", "table": "t2"})
    cfg = config.load(doc)
    assert cfg.fallback_only == {"backup"}
    assert cfg.views["user_profile"].fallback == ("backup",)


def test_source_resilience_keys() -> None:
    doc = good()
    doc["sources"]["local"].update({"circuit_breaker": {"failure_threshold": 2, "reset_timeout_s": 1},
                                    "retries": {"max": 1, "backoff_ms": 5}})
    spec = config.load(doc).sources["local"]
    assert spec.circuit_breaker.failure_threshold == 2 and spec.retries.max == 1
    doc["sources"]["local"]["retries"] = {"max": 99}
    assert "$.sources.local.retries.max" in issues(doc)
