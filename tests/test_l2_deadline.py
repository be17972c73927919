"""A frozen L2 Redis costs a read its deadline, not the driver's socket timeout, on a real server.

The shared cache tier is a throwaway standalone Redis with socket and connect timeouts far above the
request's deadline; SIGSTOP holds every socket read (and the setup of every new connection) on it.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from featuredao import FeatureService, build
from featuredao.memory import MemorySource
from featuredao.testing.servers import RedisServer
from featuredao.types import Reason

pytestmark = pytest.mark.redis

DEADLINE_MS = 150
SOCKET_TIMEOUT_MS = 3000  # what an unbounded L2 read would cost on a frozen server
MARGIN_S = 0.5  # scheduling slack on a loaded 2-core machine: far below the socket timeout
ITEMS = [f"i{n}" for n in range(20)]


@pytest.fixture
def l2(own_redis: RedisServer) -> RedisServer:
    """The shared tier's own Redis (the test freezes it)."""
    return own_redis


def config(l2: RedisServer) -> dict[str, Any]:
    return {
        "sources": {"m": {"type": "memory", "shared": "l2_deadline"},
                    "shared": {"type": "redis", "host": l2.host, "port": l2.port,
                               "socket_timeout_ms": SOCKET_TIMEOUT_MS,
                               "connect_timeout_ms": SOCKET_TIMEOUT_MS}},
        "views": [{"name": "items", "entity": "item", "source": "m", "table": "items", "key": "id",
                   "features": {"a": "int"}, "timeout_ms": 100,
                   # No L1: every read asks the L2 first.
                   "cache": {"l1": None, "l2": {"source": "shared", "ttl_s": 600}}}],
        "service": {"deadline_ms": DEADLINE_MS},
    }


def test_a_read_through_a_frozen_l2_keeps_its_deadline_and_serves_from_the_store(l2: RedisServer) -> None:
    MemorySource.clear_shared()
    cfg = config(l2)
    with FeatureService.from_config(cfg) as service:
        assert service.runtime is not None
        service.runtime.daos["items"].prepare()
        service.runtime.daos["items"].upsert((k, {"a": i}) for i, k in enumerate(ITEMS))
        assert service.fetch(None, ITEMS).degraded == []  # connections to the L2 are open now
        l2.freeze()
        took = []
        for _ in range(5):  # the first read times out a pooled connection, the next ones open new ones
            started = time.monotonic()
            result = service.fetch(None, ITEMS)
            took.append(time.monotonic() - started)
            # The L2 gets part of the time left: the store serves the rest.
            assert [row["a"] for row in result.items] == list(range(len(ITEMS))), result.degraded
        assert max(took) < DEADLINE_MS / 1000 + MARGIN_S, took
        l2.thaw()


def test_get_many_on_a_frozen_standalone_server_ends_at_its_timeout_and_recovers(l2: RedisServer) -> None:
    runtime = build(config(l2))
    try:
        kv = runtime.sources["shared"].key_value()
        kv.set_many([("k1", b"one", 60), ("k2", b"two", 60)])
        assert kv.get_many(["k1", "k2"], 1.0) == [b"one", b"two"]
        l2.freeze()
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(Exception, match=r"(?i)timeout|no answer"):
                kv.get_many(["k1"], 0.1)
            assert time.monotonic() - started < 0.1 + MARGIN_S
        l2.thaw()
        # A connection cut mid-reply is not reused: the next read gets its own reply, not a late one.
        deadline = time.monotonic() + 5
        while True:
            try:
                assert kv.get_many(["k2", "k1"], 1.0) == [b"two", b"one"]
                break
            except AssertionError:
                raise
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        runtime.close()


def test_an_l2_timeout_is_bypassed_not_a_failure_of_the_view(l2: RedisServer) -> None:
    MemorySource.clear_shared()
    runtime = build(config(l2))
    try:
        dao = runtime.served["items"]
        runtime.daos["items"].prepare()
        runtime.daos["items"].upsert([("i1", {"a": 1})])
        l2.freeze()
        result = dao.read_partial(["i1"], timeout_s=0.2)
        assert result.rows == [{"a": 1}] and result.failed == []
        assert not any(d.reason is Reason.TIMEOUT for d in result.degraded)
        l2.thaw()
    finally:
        runtime.close()
