"""FeatureService merging, deadlines and degradation, with in-memory fake DAOs (no store involved)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence

import pytest
from fakes import FakeDao, make_view

from featuredao.config import ServiceConfig, View
from featuredao.dao import FeatureDao
from featuredao.deadline import Deadline
from featuredao.errors import BackendQueryError, BackendUnavailable, FetchError
from featuredao.service import FeatureService, FetchResult
from featuredao.types import BatchResult, Key, Reason, Row


def service(*daos: FeatureDao, deadline_ms: int = 500, strict: bool = False) -> FeatureService:
    return FeatureService({d.view.name: d for d in daos},
                          ServiceConfig(deadline_ms=deadline_ms, strict=strict))


def test_merges_views_in_input_order_with_prefixes_and_defaults() -> None:
    users = FakeDao(make_view("u", "user"), {"u1": {"a": 1, "b": "x"}})
    items = FakeDao(make_view("i", "item"), {"i1": {"a": 10, "b": "p"}, "i3": {"a": 30, "b": None}})
    stats = FakeDao(make_view("s", "item", prefix="s_"), {"i3": {"a": 3, "b": "q"}})
    with service(users, items, stats) as svc:
        result = svc.fetch("u1", ["i3", "i2", "i1", "i3"])
    assert result.user == {"a": 1, "b": "x"}
    assert result.item_ids == ["i3", "i2", "i1", "i3"]
    assert result.items == [
        {"a": 30, "b": None, "s_a": 3, "s_b": "q"},
        {"a": -1, "b": None, "s_a": -1, "s_b": None},
        {"a": 10, "b": "p", "s_a": -1, "s_b": None},
        {"a": 30, "b": None, "s_a": 3, "s_b": "q"},
    ]
    assert result.degraded == []
    assert result.to_dict()["items"]["i2"] == {"a": -1, "b": None, "s_a": -1, "s_b": None}


def test_slow_view_gives_defaults_and_a_timeout_entry() -> None:
    slow = FakeDao(make_view("slow", "item", timeout_ms=30), {"i1": {"a": 5, "b": "z"}}, delay=5)
    fast = FakeDao(make_view("fast", "user"), {"u1": {"a": 1, "b": "x"}})
    with service(slow, fast) as svc:
        started = time.monotonic()
        result = svc.fetch("u1", ["i1"])
        elapsed = time.monotonic() - started
        slow.release.set()
    assert result.items == [{"a": -1, "b": None}]
    assert result.user == {"a": 1, "b": "x"}
    assert [(d.view, d.reason) for d in result.degraded] == [("slow", Reason.TIMEOUT)]
    assert elapsed < 2.0  # bounded by the view's 30 ms, not by the 5 s the store takes


def test_overall_deadline_caps_view_timeouts() -> None:
    slow = FakeDao(make_view("slow", "user", timeout_ms=10_000), {}, delay=5)
    with service(slow, deadline_ms=40) as svc:
        result = svc.fetch("u1", [])
        slow.release.set()
    assert [d.reason for d in result.degraded] == [Reason.TIMEOUT]


def test_failures_are_degraded_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    down = FakeDao(make_view("down", "user"), {}, error=BackendUnavailable("refused", source="db"))
    bad = FakeDao(make_view("bad", "item"), {}, error=BackendQueryError("no such table", source="db"))
    with service(down, bad) as svc, caplog.at_level(logging.WARNING, logger="featuredao"):
        result = svc.fetch("u1", ["i1"])
    assert {(d.view, d.reason) for d in result.degraded} == {("down", Reason.UNAVAILABLE),
                                                             ("bad", Reason.QUERY_ERROR)}
    assert result.user == {"a": -1, "b": None}
    assert any(r.levelno == logging.ERROR and "bad" in r.getMessage() for r in caplog.records)


def test_strict_mode_raises() -> None:
    down = FakeDao(make_view("down", "user"), {}, error=BackendUnavailable("refused"))
    with service(down, strict=True) as svc, pytest.raises(FetchError, match="down: unavailable"):
        svc.fetch("u1", [])
    with service(down) as svc, pytest.raises(FetchError):
        svc.fetch("u1", [], strict=True)


class MeetingDao(FakeDao):
    """A fake whose read returns only once every other read on the same barrier is in flight too."""

    def __init__(self, view: View, rows: dict[Key, Row], barrier: threading.Barrier) -> None:
        super().__init__(view, rows)
        self.barrier = barrier

    def read_partial(self, keys: Sequence[Key], features: Sequence[str] | None = None, *,
                     timeout_s: float | None = None, as_of: float | None = None,
                     deadline: Deadline | None = None) -> BatchResult:
        self.barrier.wait()  # BrokenBarrierError after 1 s unless the other view is being read meanwhile
        return super().read_partial(keys, features, timeout_s=timeout_s, deadline=deadline)


def test_views_are_read_concurrently() -> None:
    barrier = threading.Barrier(2, timeout=1)
    a = MeetingDao(make_view("a", "item", timeout_ms=5000), {"i1": {"a": 1, "b": "x"}}, barrier)
    b = MeetingDao(make_view("b", "item", prefix="b_", timeout_ms=5000), {"i1": {"a": 2, "b": "y"}}, barrier)
    with service(a, b, deadline_ms=5000) as svc:
        result = svc.fetch(None, ["i1"])
    assert result.degraded == [] and not barrier.broken
    assert result.items == [{"a": 1, "b": "x", "b_a": 2, "b_b": "y"}]
    assert len(a.calls) == len(b.calls) == 1


def test_afetch_does_not_block_the_event_loop() -> None:
    slow = FakeDao(make_view("slow", "user", timeout_ms=300), {"u1": {"a": 2, "b": "y"}}, delay=0.2)

    async def main() -> tuple[int, object]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        with service(slow) as svc:
            result = await svc.afetch("u1", [])
        task.cancel()
        return ticks, result

    ticks, result = asyncio.run(main())
    assert isinstance(result, FetchResult)
    assert ticks >= 5  # the loop kept running while the store was busy
    assert result.user == {"a": 2, "b": "y"}


def test_a_request_beyond_max_in_flight_is_shed_with_defaults_not_queued() -> None:
    slow = FakeDao(make_view("slow", "item", timeout_ms=1000), {"i1": {"a": 5, "b": "z"}}, delay=0.4)
    svc = FeatureService({"slow": slow}, ServiceConfig(deadline_ms=100, max_in_flight=1, admission_wait=0.5))
    first = threading.Thread(target=svc.fetch, args=(None, ["i1"]))
    first.start()
    time.sleep(0.02)  # the first request holds the only slot
    started = time.monotonic()
    result = svc.fetch(None, ["i1"])
    took = time.monotonic() - started
    slow.release.set()
    first.join()
    svc.close()
    assert result.items == [{"a": -1, "b": None}]
    assert [(d.view, d.reason) for d in result.degraded] == [("slow", Reason.OVERLOADED)]
    assert 0.04 <= took < 0.5  # waited its admission share (50 ms), not the 400 ms the store takes
    assert len(slow.calls) == 1  # the shed request never reached the store


def test_slots_are_shared_by_threads_and_coroutines_first_come_first_served() -> None:
    from featuredao.lifecycle import Slots

    slots = Slots(1)
    assert slots.acquire(0.0)
    assert not slots.acquire(0.02)  # none free: times out
    order: list[str] = []

    def thread_waiter() -> None:
        assert slots.acquire(2.0)
        order.append("thread")
        slots.release()

    async def coroutine_waiter() -> None:
        await asyncio.sleep(0.05)  # queues after the thread
        assert await slots.acquire_async(2.0)
        order.append("coroutine")
        slots.release()

    waiter = threading.Thread(target=thread_waiter)
    waiter.start()
    time.sleep(0.02)

    async def main() -> None:
        task = asyncio.ensure_future(coroutine_waiter())
        await asyncio.sleep(0.1)
        slots.release()  # the first slot goes to the oldest waiter: the thread
        await task

    asyncio.run(main())
    waiter.join()
    assert order == ["thread", "coroutine"]
    assert slots.acquire(0.0)  # the slot came back
