"""A request read in the caller's thread keeps its deadline on a real Redis, frozen or not.

One item view on a standalone Redis, no fallback: ``fetch`` reads it in the caller's thread (no worker
is ever started), and with every Redis process stopped (SIGSTOP) each request still answers with the
view's defaults and a degraded entry at its own time, however long the socket and pool timeouts are.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from featuredao import FeatureService, build
from featuredao.testing.servers import RedisServer
from featuredao.types import Reason

pytestmark = pytest.mark.redis

ITEMS = [f"i{n}" for n in range(50)]
TIMEOUT_MS = 100
BOUND_S = 1.0  # scheduling slack on a loaded 2-core machine; the socket and pool timeouts are 5 s


@pytest.fixture
def server(own_redis: RedisServer) -> RedisServer:
    """The test's own Redis (it freezes it)."""
    return own_redis


def config(server: RedisServer) -> dict[str, Any]:
    return {"sources": {"r": {"type": "redis", "host": server.host, "port": server.port, "pool_size": 2,
                              "socket_timeout_ms": 5000, "pool_timeout_ms": 5000}},
            "views": [{"name": "items", "entity": "item", "source": "r", "table": "items", "key": "id",
                       "features": {"a": "int"}, "defaults": {"a": -1}, "timeout_ms": TIMEOUT_MS,
                       "options": {"layout": "string", "encoding": "msgpack"}}],
            "service": {"deadline_ms": 300}}


def workers() -> int:
    return sum(t.name.startswith("featuredao-view") for t in threading.enumerate())


def test_a_frozen_store_costs_an_inline_read_its_own_time(server: RedisServer) -> None:
    cfg = config(server)
    runtime = build(cfg)
    runtime.daos["items"].upsert((k, {"a": i}) for i, k in enumerate(ITEMS))
    runtime.close()
    before = workers()
    with FeatureService.from_config(cfg) as service:
        end = time.monotonic() + 10
        while service.fetch(None, ITEMS).degraded and time.monotonic() < end:
            time.sleep(0.05)  # a cold first read may miss its 100 ms on a loaded machine
        assert [row["a"] for row in service.fetch(None, ITEMS).items] == list(range(len(ITEMS)))
        server.freeze()
        for _ in range(4):  # 2 pooled connections: the late ones are dropped, new ones wait as well
            started = time.monotonic()
            result = service.fetch(None, ITEMS)
            assert time.monotonic() - started < TIMEOUT_MS / 1000 + BOUND_S
            assert {row["a"] for row in result.items} == {-1}
            assert [d.reason for d in result.degraded] == [Reason.TIMEOUT]
        server.thaw()
        end = time.monotonic() + 10
        while service.fetch(None, ITEMS).degraded and time.monotonic() < end:
            time.sleep(0.05)
        assert [row["a"] for row in service.fetch(None, ITEMS).items] == list(range(len(ITEMS)))
        assert workers() == before  # every read ran in this thread
