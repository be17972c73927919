"""Hot reload of a real ``featuredao serve``: what an unchanged source and view keep, and a config that
validates but cannot be built."""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from servehelp import Served, config_doc, metric, seed, wait_for, write_config

from featuredao import build
from featuredao.testing.servers import RedisServer

pytestmark = [pytest.mark.serve, pytest.mark.redis]

REQUEST = {"user_id": "u1", "item_ids": [1, 2, 3]}


def config_hash(url: str) -> str:
    answer: str = httpx.get(f"{url}/v1/config", timeout=5.0).json()["config"]
    return answer


def cached_config(tmp: Path, redis_server: RedisServer) -> tuple[Path, dict[str, Any]]:
    """The servers' test config, with the Redis view of item stats cached in L1 (ten minutes)."""
    doc = config_doc(redis_server)
    for view in doc["views"]:
        if view["name"] == "item_stats":
            view["cache"] = {"l1": {"ttl_s": 600, "max_entries": 1000}}
    path = write_config(tmp, doc)
    seed(path)
    return path, doc


def redis_clients(server: RedisServer) -> set[int]:
    """The ids of the connections Redis has open, but for the one asking."""
    client = redis.Redis(host=server.host, port=server.port)
    try:
        own = client.client_id()
        return {int(c["id"]) for c in client.client_list() if int(c["id"]) != own}
    finally:
        client.close()


def test_an_unchanged_source_keeps_its_connections_and_an_unchanged_view_its_cache(
        tmp_path: Path, redis_server: RedisServer) -> None:
    path, doc = cached_config(tmp_path, redis_server)
    server = Served(path, "--reload-interval", "0.2")
    try:
        first = httpx.post(f"{server.url}/v1/fetch", json=REQUEST).json()
        assert [i["s_ctr"] for i in first["items"]] == [0.01, 0.02, 0.03]
        connections = redis_clients(redis_server)
        assert connections  # the worker's pool to Redis (its pings and reads)
        # The store changes under the cache: only a fresh cache would answer the new value.
        runtime = build(path)
        try:
            runtime.daos["item_stats"].upsert([(1, {"ctr": 0.99, "clicks": 1})])
        finally:
            runtime.close()
        old = config_hash(server.url)
        # The SQLite source changes (a new pool, its views rebuilt); Redis and item_stats do not.
        changed = json.loads(json.dumps(doc))
        changed["sources"]["local"]["pool_size"] = 2
        write_config(tmp_path, changed)
        wait_for(lambda: config_hash(server.url) != old, 10.0, "the reload")
        wait_for(lambda: "source pools kept" in server.log(), 5.0, "the reload logged")
        assert "source pools kept: cache; view caches kept: item_stats" in server.log()
        after = httpx.post(f"{server.url}/v1/fetch", json=REQUEST).json()
        assert [i["s_ctr"] for i in after["items"]] == [0.01, 0.02, 0.03]  # 0.01: from the kept L1
        assert after["items"][0]["price"] == 1.5 and after["config"] != first["config"]
        time.sleep(0.5)  # the old service is closed by now: what it did not hand over is gone
        assert redis_clients(redis_server) == connections  # the same connections, none closed or added

        # A change to the Redis source: a new pool, the old connections closed, a fresh cache.
        changed["sources"]["cache"]["pool_size"] = 3
        old = config_hash(server.url)
        write_config(tmp_path, changed)
        wait_for(lambda: config_hash(server.url) != old, 10.0, "the second reload")
        fresh = httpx.post(f"{server.url}/v1/fetch", json=REQUEST).json()
        assert fresh["items"][0]["s_ctr"] == 0.99
        wait_for(lambda: not redis_clients(redis_server) & connections, 10.0, "the old connections closed")
        text = httpx.get(f"{server.url}/metrics").text
        assert metric(text, "featuredao_config_reloads_total", outcome="ok") == 2
    finally:
        assert server.stop() == 0, server.log()
    assert "Traceback" not in server.log()


# Every shipped adapter connects lazily, so a valid config that cannot be built is rare (a driver that
# refuses its settings when constructed, say): an adapter registered in the server's processes stands in.
REFUSING = """
    from featuredao import registry
    from featuredao.memory import MemorySource

    class RefusingSource(MemorySource):
        type_name = "refusing"

        def __init__(self, name, options):
            raise RuntimeError("the driver refused these settings")

    registry.register("refusing", RefusingSource)
"""

# Refuses in the first process that builds it only (the one that creates the marker file).
REFUSING_ONCE = """
    import os

    from featuredao import registry
    from featuredao.memory import MemorySource

    class RefusingOnce(MemorySource):
        type_name = "refusing"

        def __init__(self, name, options):
            try:
                os.close(os.open(os.environ["REFUSE_MARKER"], os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                super().__init__(name, options)
                return
            raise RuntimeError("the driver refused these settings")

    registry.register("refusing", RefusingOnce)
"""


def with_plugin(tmp: Path, code: str) -> dict[str, str]:
    """The environment that has the server's processes register ``code``'s adapter at start."""
    plugins = tmp / "plugins"
    plugins.mkdir()
    (plugins / "sitecustomize.py").write_text(textwrap.dedent(code))
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(plugins), os.environ.get("PYTHONPATH", "")) if p),
            "REFUSE_MARKER": str(tmp / "refused")}


def unbuildable(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with a view on a source of the refusing adapter: valid, but not built."""
    return {**doc, "sources": {**doc["sources"], "odd": {"type": "refusing"}},
            "views": [*doc["views"], {"name": "odd", "entity": "item", "source": "odd", "table": "odd",
                                      "key": "id", "key_type": "int", "features": {"x": "int"},
                                      "prefix": "odd_"}]}


def failed_reloads(url: str) -> float:
    return metric(httpx.get(f"{url}/metrics").text, "featuredao_config_reloads_total", outcome="failed")


def test_a_valid_config_that_cannot_be_built_keeps_the_running_one(
        tmp_path: Path, redis_server: RedisServer) -> None:
    path, doc = cached_config(tmp_path, redis_server)
    server = Served(path, "--reload-interval", "0.2", env=with_plugin(tmp_path, REFUSING), workers=2)
    try:
        old = config_hash(server.url)
        write_config(tmp_path, unbuildable(doc))

        wait_for(lambda: failed_reloads(server.url) == 1, 10.0, "the failed reload counted")
        log = server.log()
        assert log.count("the driver refused these settings") >= 2  # each worker says why
        assert "could not be built" in log and "Traceback" not in log
        for _ in range(10):  # new connections: spread over both workers
            r = httpx.post(f"{server.url}/v1/fetch", json=REQUEST)
            assert r.status_code == 200 and r.json()["config"] == old
        text = httpx.get(f"{server.url}/metrics").text
        assert metric(text, "featuredao_config_reloads_total", outcome="ok") == 0
        time.sleep(0.5)  # polled again meanwhile: the same file is not retried
        assert failed_reloads(server.url) == 1
        # The next good version is taken.
        write_config(tmp_path, {**doc, "service": {"deadline_ms": 900}})
        wait_for(lambda: config_hash(server.url) != old, 10.0, "the next valid config")
    finally:
        assert server.stop() == 0, server.log()


def test_when_one_worker_cannot_build_a_config_every_worker_keeps_the_running_one(
        tmp_path: Path, redis_server: RedisServer) -> None:
    path, doc = cached_config(tmp_path, redis_server)
    server = Served(path, "--reload-interval", "0.2", env=with_plugin(tmp_path, REFUSING_ONCE), workers=2)
    try:
        old = config_hash(server.url)
        write_config(tmp_path, unbuildable(doc))

        wait_for(lambda: failed_reloads(server.url) == 1, 10.0, "the failed reload counted")
        assert server.log().count("the driver refused these settings") == 1  # one worker refused
        wait_for(lambda: "go back to config " + old in server.log(), 10.0, "the other worker sent back")

        def all_old() -> bool:  # new connections each time: spread over both workers
            return all(config_hash(server.url) == old for _ in range(20))

        wait_for(all_old, 10.0, "every worker on the running config")
        r = httpx.post(f"{server.url}/v1/fetch", json=REQUEST)
        assert r.status_code == 200 and "odd_x" not in r.json()["items"][0]
        assert "Traceback" not in server.log()
    finally:
        assert server.stop() == 0, server.log()
