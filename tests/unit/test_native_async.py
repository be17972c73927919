"""``afetch`` on DAOs that read with an asyncio client (the in-memory adapter's): no thread, same answers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from featuredao import FeatureService
from featuredao.memory import MemorySource
from featuredao.resilience import BreakerState
from featuredao.types import Reason


def config(latency_ms: float = 0.0, *, fallback: bool = False, cache: bool = False,
           timeout_ms: int = 50) -> dict[str, Any]:
    items: dict[str, Any] = {"name": "items", "entity": "item", "source": "m", "table": "items", "key": "id",
                             "key_type": "int", "features": {"price": "float"}, "defaults": {"price": -1.0},
                             "timeout_ms": timeout_ms}
    if cache:
        items["cache"] = {"l1": {"ttl_s": 60}}
    views = [items, {"name": "users", "entity": "user", "source": "m", "table": "users", "key": "id",
                     "features": {"age": "int"}, "prefix": "u_", "timeout_ms": timeout_ms}]
    sources: dict[str, Any] = {"m": {"type": "memory", "latency_ms": latency_ms,
                                     "circuit_breaker": {"failure_threshold": 2, "reset_timeout_s": 60}}}
    if fallback:
        sources["f"] = {"type": "memory"}
        items["fallback"] = ["items_backup"]
        views.append({**items, "name": "items_backup", "source": "f", "fallback": [], "cache": None})
    return {"sources": sources, "views": views,
            "service": {"deadline_ms": max(100, 2 * timeout_ms), "max_in_flight": 64}}


def seeded(cfg: dict[str, Any]) -> FeatureService:
    svc = FeatureService.from_config(cfg)
    assert svc.runtime is not None
    for dao in svc.runtime.daos.values():
        dao.prepare()
    svc.runtime.daos["items"].upsert([(i, {"price": i / 2}) for i in range(10)])
    svc.runtime.daos["users"].upsert([("u1", {"age": 30})])
    return svc


def threads_used(svc: FeatureService) -> int:
    return len(svc._pool._threads)  # the service's worker threads started so far


def test_afetch_reads_on_the_loop_and_answers_as_fetch_does() -> None:
    MemorySource.clear_shared()
    # Generous timeouts: the point is where the reads run, not how fast a loaded machine runs them.
    with seeded(config(latency_ms=1, cache=True, timeout_ms=5000)) as svc:
        assert all(d.native_async() for d in svc.daos.values())

        async def many() -> list[Any]:
            return await asyncio.gather(*(svc.afetch("u1", [1, 2, 99]) for _ in range(50)))

        results = asyncio.run(many())
        assert threads_used(svc) == 0
        expected = svc.fetch("u1", [1, 2, 99])
        for result in results:
            assert (result.user, result.items, result.missing) == (expected.user, expected.items,
                                                                   expected.missing)
            assert not result.degraded


def test_a_slow_store_costs_its_timeout_not_the_request() -> None:
    MemorySource.clear_shared()
    with seeded(config()) as svc:
        source = svc.runtime.sources["m"]  # type: ignore[union-attr]
        assert isinstance(source, MemorySource)
        source.latency_s = 10.0
        started = time.perf_counter()
        result = asyncio.run(svc.afetch("u1", [1]))
        took = time.perf_counter() - started
        # The request's 100 ms, with room for a loaded 2-core machine; waiting out the store is 10 s.
        assert took < 2.0, took
        assert result.items == [{"price": -1.0}]
        assert {d.reason for d in result.degraded} == {Reason.TIMEOUT}
        assert threads_used(svc) == 0


def test_failures_on_the_loop_open_the_breaker() -> None:
    MemorySource.clear_shared()
    with seeded(config()) as svc:
        source = svc.runtime.sources["m"]  # type: ignore[union-attr]
        assert isinstance(source, MemorySource)
        source.down = True
        for _ in range(3):
            result = asyncio.run(svc.afetch(None, [1]))
            assert result.items == [{"price": -1.0}]
        assert svc.runtime.breakers["m"].state is BreakerState.OPEN  # type: ignore[union-attr]
        assert {d.reason for d in result.degraded} == {Reason.CIRCUIT_OPEN}


def test_a_view_with_a_fallback_chain_reads_on_threads() -> None:
    MemorySource.clear_shared()
    # Generous timeouts: the point is where the reads run; the primary missing its share on a loaded
    # machine would be served by the (empty) fallback.
    with seeded(config(fallback=True, timeout_ms=2000)) as svc:
        assert not svc.daos["items"].native_async() and svc.daos["users"].native_async()
        result = asyncio.run(svc.afetch("u1", [1]))
        assert result.items == [{"price": 0.5}] and result.user == {"u_age": 30}
        assert threads_used(svc) >= 1


def test_a_read_the_request_gave_up_on_is_not_a_store_failure() -> None:
    MemorySource.clear_shared()
    with seeded(config()) as svc:
        source = svc.runtime.sources["m"]  # type: ignore[union-attr]
        assert isinstance(source, MemorySource)
        source.latency_s = 2.0
        dao = svc.daos["items"]

        async def give_up() -> None:
            task = asyncio.ensure_future(dao.aread_partial([1], timeout_s=5.0))
            await asyncio.sleep(0.02)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        for _ in range(4):  # twice the breaker's threshold
            asyncio.run(give_up())
        assert svc.runtime.breakers["m"].state is BreakerState.CLOSED  # type: ignore[union-attr]
