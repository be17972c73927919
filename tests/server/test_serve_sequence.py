"""Sequence views over HTTP: one list per field in the user's row, the request time from the context."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from servehelp import Served, write_config

from featuredao import build

NOW = 1_700_000_000


def test_sequences_are_lists_and_request_time_ends_the_window(tmp_path: Path) -> None:
    seq = {"time_field": "ts", "item_field": "item_id", "max_len": 3, "window_s": 100,
           "fields": {"item_id": "int", "ts": "int"}}
    doc = {"sources": {"s": {"type": "sqlite", "path": "s.db"}},
           "views": [{"name": "clicks", "entity": "user", "kind": "sequence", "source": "s",
                      "table": "events", "key": "user_id", "prefix": "click_", "timeout_ms": 5000,
                      "sequence": seq}],
           "service": {"deadline_ms": 5000}}
    path = write_config(tmp_path, doc)
    runtime = build(path)
    try:
        runtime.daos["clicks"].prepare()
        runtime.daos["clicks"].append(("u1", {"item_id": i, "ts": NOW - 50 * i}) for i in range(5))
    finally:
        runtime.close()
    server = Served(path, "--reload-interval", "0")

    def fetch(body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{server.url}/v1/fetch", json=body, timeout=10.0)

    try:
        answer = fetch({"user_id": "u1", "context": {"request_time": NOW}})
        assert answer.status_code == 200, answer.text
        assert answer.json()["user"] == {"click_item_id": [0, 1, 2], "click_ts": [NOW, NOW - 50, NOW - 100]}
        # 60 s later the window (100 s) starts after the second event.
        later = fetch({"user_id": "u1", "context": {"request_time": NOW + 60}})
        assert later.json()["user"]["click_item_id"] == [0]
        nobody = fetch({"user_id": "u9"}).json()
        assert nobody["user"] == {"click_item_id": [], "click_ts": []}
        assert nobody["missing"] == {"clicks": ["u9"]}
        bad = fetch({"user_id": "u1", "context": {"request_time": "soon"}})
        assert bad.status_code == 400 and bad.json()["field"] == "context.request_time"
    finally:
        assert server.stop() == 0, server.log()
