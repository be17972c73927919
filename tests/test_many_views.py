"""Many views on one source: they share its pool without degrading, and waiting for our own pool is load.

On the embedded SQLite default with a real file: dozens of views per request are normal in a
recommender config, and a pool kept busy by someone else must not open the store's circuit breaker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from featuredao import FeatureService, Reason, build
from featuredao.resilience import BreakerState

VIEWS = 50
FEATURES = {"a": "int", "b": "float", "c": "str"}


def _config(path: Path, pool_size: int, deadline_ms: int, timeout_ms: int = 50) -> dict[str, Any]:
    return {
        "sources": {"store": {"type": "sqlite", "path": str(path), "pool_size": pool_size}},
        "views": [{"name": f"v{i}", "entity": "item", "source": "store", "table": f"t{i}", "key": "id",
                   "key_type": "int", "features": FEATURES, "prefix": f"v{i}_", "timeout_ms": timeout_ms}
                  for i in range(VIEWS)],
        "service": {"deadline_ms": deadline_ms},
    }


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "many.db"
    runtime = build(_config(path, 1, 100))
    try:
        for dao in runtime.daos.values():
            dao.prepare()  # type: ignore[attr-defined]
            dao.upsert([(i, {"a": i, "b": i / 2, "c": f"s{i}"}) for i in range(0, 200, 3)])
    finally:
        runtime.close()
    return path


@pytest.fixture
def small_pool(db: Path) -> Iterator[FeatureService]:
    # Generous timeouts: the point is waiting for connections, not speed on a loaded 2-core machine.
    with FeatureService.from_config(_config(db, pool_size=2, deadline_ms=5000, timeout_ms=1000)) as service:
        yield service


def test_fifty_views_on_a_small_pool_never_degrade_and_never_open_the_breaker(
        small_pool: FeatureService) -> None:
    runtime = small_pool.runtime
    assert runtime is not None
    source: Any = runtime.sources["store"]
    waits = _count_pool_waits(source)
    items = list(range(100))
    for _ in range(40):
        result = small_pool.fetch(None, items)
        assert result.degraded == []
        assert result.items[3]["v49_a"] == 3 and result.items[4]["v0_a"] is None
    assert runtime.breakers["store"].state is BreakerState.CLOSED
    # The views queue on our side (lanes of pool_size): no read ever had to wait for a connection.
    assert waits == []


def _count_pool_waits(source: Any) -> list[float]:
    """Record every time a read found the source's pool empty and had to wait for a connection."""
    waits: list[float] = []
    slots = source._slots

    class Counting:
        def acquire(self, timeout: float | None = None) -> bool:
            if slots.acquire(blocking=False):
                return True
            waits.append(timeout or 0.0)
            return bool(slots.acquire(timeout=timeout))

        def release(self) -> None:
            slots.release()

    source._slots = Counting()
    return waits


def test_a_pool_held_by_a_slow_statement_degrades_as_overloaded_and_keeps_the_breaker_closed(
        db: Path) -> None:
    # The request's deadline is the first view's timeout: it waits that long for the held connection,
    # the 49 views queued behind it find no time left. Both are load (OVERLOADED), never the store's fault.
    deadline_ms = 400  # the service waits 10% more for an answer: 40 ms of slack for a stalled worker
    with FeatureService.from_config(_config(db, pool_size=1, deadline_ms=deadline_ms,
                                            timeout_ms=deadline_ms)) as service:
        runtime = service.runtime
        assert runtime is not None
        source: Any = runtime.sources["store"]
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with source.connection() as conn:
                conn.execute("SELECT 1").fetchone()  # a statement ran: the connection is the store's
                held.set()
                release.wait(10)

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert held.wait(5)
            on_time = 0
            for _ in range(8):  # more than the breaker's failure threshold (5)
                started = time.monotonic()
                result = service.fetch(None, [3, 4])
                elapsed = time.monotonic() - started
                reasons = {d.reason for d in result.degraded}
                assert result.items[0]["v0_a"] is None
                # The service waits a view's answer for its time plus 10%: a worker the loaded machine
                # stalled past that is reported as the service's own timeout ("no answer within"), the
                # deadline's outcome. A request answered within its time must be overloaded only.
                if elapsed < deadline_ms / 1000 * 1.1:
                    assert reasons == {Reason.OVERLOADED}, result.degraded
                    on_time += 1
                else:
                    assert all(d.reason is Reason.OVERLOADED or
                               (d.reason is Reason.TIMEOUT and d.detail.startswith("no answer within"))
                               for d in result.degraded), result.degraded
            assert on_time >= 4, f"only {on_time} of 8 requests answered within their time"
            assert runtime.breakers["store"].state is BreakerState.CLOSED
        finally:
            release.set()
            holder.join()
        # Served again once the connection is back (each try bounded by its deadline; 50 views on one
        # connection within 400 ms may take a loaded machine more than one try).
        end = time.monotonic() + 10
        while True:
            result = service.fetch(None, [3, 4])
            if result.degraded == [] or time.monotonic() > end:
                break
            time.sleep(0.05)
        assert result.degraded == [] and result.items[0]["v0_a"] == 3
        assert runtime.breakers["store"].state is BreakerState.CLOSED
