"""One deadline per request: the value type, and every layer reading the same instant instead of its own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from featuredao import build
from featuredao.deadline import Deadline
from featuredao.errors import reason_of
from featuredao.factory import Runtime, compose
from featuredao.memory import MemorySource
from featuredao.types import Reason

# Far above every bound asserted below: a layer that restarted the clock would wait this long.
LATENCY_MS = 3000
MARGIN_S = 0.5  # a loaded 2-core machine; the point is "the caller's time", not the store's latency


def test_a_deadline_counts_down_and_never_goes_negative() -> None:
    deadline = Deadline.after(0.05)
    left = deadline.remaining()
    assert left is not None and 0 < left <= 0.05
    assert not deadline.expired
    time.sleep(0.06)
    assert deadline.remaining() == 0.0
    assert deadline.expired


def test_no_deadline_has_no_bound() -> None:
    assert Deadline.none().remaining() is None
    assert not Deadline.none().expired
    assert Deadline.after(None) is Deadline.none()
    assert Deadline.none().within(None) is Deadline.none()
    share = Deadline.none().within(0.1)
    assert share.at is not None and share.remaining() is not None


def test_a_given_deadline_wins_over_a_timeout() -> None:
    given = Deadline.after(0.01)
    assert Deadline.of(given, 10.0) is given
    made = Deadline.of(None, 10.0)
    assert made.at is not None and made.at > given.at  # type: ignore[operator]
    assert Deadline.of(None, None) is Deadline.none()


def test_within_takes_the_earlier_instant() -> None:
    request = Deadline.after(0.2)
    assert request.within(5.0) is request  # a share longer than what is left changes nothing
    share = request.within(0.01)
    assert share.at is not None and request.at is not None and share.at < request.at
    started = time.perf_counter()
    assert Deadline.after(1.0, start=started - 2.0).expired  # counted from when it was entered


@pytest.fixture
def runtime() -> Iterator[Runtime]:
    MemorySource.clear_shared()
    view = {"entity": "item", "table": "items", "key": "id", "features": {"price": "float"},
            "timeout_ms": 60_000}
    cfg: dict[str, Any] = {
        "sources": {"slow": {"type": "memory", "latency_ms": LATENCY_MS},
                    "quick": {"type": "memory"}},
        "views": [{**view, "name": "items", "source": "slow", "fallback": ["backup"], "timeout_ms": 50,
                   "cache": {"l1": {"ttl_s": 60}}},
                  {**view, "name": "backup", "source": "quick"},
                  {**view, "name": "plain", "source": "slow", "table": "plain", "prefix": "p_",
                   "cache": {"l1": {"ttl_s": 60}}}],
    }
    rt = build(cfg)
    try:
        slow = rt.sources["slow"]
        assert isinstance(slow, MemorySource)
        for table in ("items", "plain"):
            slow.put(table, {})  # no round trip: the slow store's latency is for reads
        rt.daos["backup"].prepare()
        rt.daos["backup"].upsert([("a", {"price": 1.5})])
        yield rt
    finally:
        rt.close()


def test_the_deadline_reaches_the_adapter_with_the_time_already_spent_counted(runtime: Runtime) -> None:
    # cache -> resilience -> BaseDao -> the adapter's round trip: each sees the one instant.
    dao = compose(runtime, "plain")
    deadline = Deadline.after(0.4)
    time.sleep(0.3)  # spent before the read: a layer restarting a 0.4 s timeout would wait 0.4 s more
    started = time.perf_counter()
    result = dao.read_partial(["a"], deadline=deadline)
    took = time.perf_counter() - started
    assert result.failed == ["a"] and result.error is not None
    assert took < 0.1 + MARGIN_S, took


def test_a_deadline_wins_over_timeout_s(runtime: Runtime) -> None:
    dao = compose(runtime, "plain")
    started = time.perf_counter()
    result = dao.read_partial(["a"], timeout_s=60.0, deadline=Deadline.after(0.05))
    assert result.failed == ["a"]
    assert time.perf_counter() - started < 0.05 + MARGIN_S


def test_the_primary_gets_its_share_and_the_fallback_the_rest_of_one_deadline(runtime: Runtime) -> None:
    dao = compose(runtime, "items")
    started = time.perf_counter()
    result = dao.read_partial(["a"], deadline=Deadline.after(0.3))
    took = time.perf_counter() - started
    # The primary's share (50 ms) runs out; the fallback serves with what the request has left.
    assert result.rows == [{"price": 1.5}]
    assert any(d.reason is Reason.FALLBACK for d in result.degraded)
    assert took < 0.3 + MARGIN_S, took


def test_an_expired_deadline_reads_nothing_from_the_store(runtime: Runtime) -> None:
    source = runtime.sources["slow"]
    assert isinstance(source, MemorySource)
    before = source.round_trips
    result = runtime.daos["plain"].read_partial(["a"], deadline=Deadline.after(0.0))
    assert result.failed == ["a"] and result.error is not None
    assert reason_of(result.error) is Reason.OVERLOADED  # no time left when the read could start
    assert source.round_trips == before


def test_asyncio_reads_take_the_same_deadline(runtime: Runtime) -> None:
    dao = compose(runtime, "plain")
    assert dao.native_async()

    async def read() -> float:
        deadline = Deadline.after(0.3)
        await asyncio.sleep(0.2)
        started = time.perf_counter()
        result = await dao.aread_partial(["a"], deadline=deadline)
        assert result.failed == ["a"]
        return time.perf_counter() - started

    assert asyncio.run(read()) < 0.1 + MARGIN_S
