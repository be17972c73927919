"""Views of one source read together (``featuredao.steps``) on the in-memory adapter: one round trip per
source and request, the same answers, failures and deadlines as when each view is read alone."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from featuredao import FeatureService
from featuredao._service_reads import ServiceReads
from featuredao.errors import Reason
from featuredao.memory import MemorySource
from featuredao.resilience import BreakerState, CircuitBreaker
from featuredao.service import FetchResult
from featuredao.steps import Chunks, Fetch

GROUPED_VIEWS = ("users", "items", "stats")
"""The views of source ``mem`` a request with a user and items reads (one stage)."""


def config(*, retries: int = 0, threshold: int = 5, deadline_ms: int = 3000,
           timeouts: dict[str, int] | None = None, cache: Sequence[str] = (),
           other_source: bool = False) -> dict[str, Any]:
    """A user view and two item views on one memory source (``mem``); optionally two more on ``other``."""
    def timeout(name: str) -> int:
        return (timeouts or {}).get(name, 2000)

    views: list[dict[str, Any]] = [
        {"name": "users", "entity": "user", "source": "mem", "table": "users", "key": "id",
         "features": {"age": "int", "city": "str"}, "prefix": "u_", "timeout_ms": timeout("users")},
        {"name": "items", "entity": "item", "source": "mem", "table": "items", "key": "id", "key_type": "int",
         "features": {"price": "float"}, "defaults": {"price": -1.0}, "timeout_ms": timeout("items")},
        {"name": "stats", "entity": "item", "source": "mem", "table": "stats", "key": "id", "key_type": "int",
         "features": {"clicks": "int"}, "defaults": {"clicks": 0}, "prefix": "s_",
         "timeout_ms": timeout("stats")},
    ]
    sources: dict[str, Any] = {
        "mem": {"type": "memory", "retries": {"max": retries, "backoff_ms": 1},
                "circuit_breaker": {"failure_threshold": threshold, "reset_timeout_s": 60}}}
    if other_source:
        sources["other"] = {"type": "memory"}
        views += [
            {"name": "tags", "entity": "item", "source": "other", "table": "tags", "key": "id",
             "key_type": "int", "features": {"tag": "str"}, "defaults": {"tag": "?"}, "prefix": "t_",
             "timeout_ms": 2000},
            {"name": "profile", "entity": "user", "source": "other", "table": "profile", "key": "id",
             "features": {"tier": "str"}, "prefix": "p_", "timeout_ms": 2000},
        ]
    for view in views:
        if view["name"] in cache:
            view["cache"] = {"l1": {"ttl_s": 60}}
    return {"sources": sources, "views": views,
            "service": {"deadline_ms": deadline_ms, "max_in_flight": 64}}


def seeded(cfg: dict[str, Any], *, grouped: bool = True, latency_ms: float = 0.0) -> FeatureService:
    """A service on its own memory stores, rows written; ``grouped=False``: the capability switched off;
    ``latency_ms``: each round trip of ``mem`` from then on takes that long."""
    svc = FeatureService.from_config(cfg)
    runtime = svc.runtime
    assert runtime is not None
    for source in runtime.sources.values():
        assert isinstance(source, MemorySource)
        if not grouped:  # this source's instance only: another service's keeps the capability
            off = dataclasses.replace(source.capabilities, grouped_reads=False)
            setattr(source, "capabilities", off)  # noqa: B010 - an instance's own, over the class's
    daos = runtime.daos
    for dao in daos.values():
        dao.prepare()
    daos["users"].upsert([("u1", {"age": 30, "city": "Oslo"}), ("u2", {"age": None, "city": "Lima"})])
    daos["items"].upsert([(i, {"price": i / 2}) for i in range(1, 6)])
    daos["stats"].upsert([(i, {"clicks": 10 * i}) for i in (1, 2, 4)])
    if "tags" in daos:
        daos["tags"].upsert([(1, {"tag": "new"}), (3, {"tag": "old"})])
        daos["profile"].upsert([("u1", {"tier": "gold"})])
    source = runtime.sources["mem"]
    assert isinstance(source, MemorySource)
    source.round_trips = 0  # what the seeding cost is not what the tests count
    source.latency_s = latency_ms / 1000
    return svc


def mem(svc: FeatureService, name: str = "mem") -> MemorySource:
    assert svc.runtime is not None
    source = svc.runtime.sources[name]
    assert isinstance(source, MemorySource)
    return source


def breaker(svc: FeatureService, name: str = "mem") -> CircuitBreaker:
    assert svc.runtime is not None
    return svc.runtime.breakers[name]


def trips(svc: FeatureService, fetch: Callable[[], FetchResult],
          name: str = "mem") -> tuple[FetchResult, int]:
    """A fetch's result and the round trips it cost source ``name``."""
    before = mem(svc, name).round_trips
    result = fetch()
    return result, mem(svc, name).round_trips - before


def record_groups(svc: FeatureService, monkeypatch: pytest.MonkeyPatch,
                  name: str = "mem") -> list[dict[str, list[list[Any]]]]:
    """Every ``read_group`` of the source: per call, each view's chunks of keys (the real call still runs)."""
    source = mem(svc, name)
    seen: list[dict[str, list[list[Any]]]] = []
    real = source.read_group

    def spy(fetches: Sequence[Fetch], timeout_s: float | None) -> list[Chunks | Exception]:
        seen.append({f.view: [list(c) for c in f.chunks] for f in fetches})
        return real(fetches, timeout_s)

    monkeypatch.setattr(source, "read_group", spy)
    return seen


def reasons(result: FetchResult) -> dict[str, set[Reason]]:
    out: dict[str, set[Reason]] = {}
    for d in result.degraded:
        out.setdefault(d.view, set()).add(d.reason)
    return out


def answer(result: FetchResult) -> tuple[Any, ...]:
    """What a caller sees of a result (not its timing)."""
    return (result.user, result.item_ids, result.items, result.missing,
            [(d.view, d.reason, d.keys) for d in result.degraded])


@pytest.fixture
def svc() -> Iterator[FeatureService]:
    with seeded(config()) as service:
        yield service


# -- 1. one round trip per source -----------------------------------------------------------------

def test_a_user_and_two_item_views_cost_one_round_trip_with_the_values_read_alone(
        svc: FeatureService, monkeypatch: pytest.MonkeyPatch) -> None:
    assert all(svc.daos[v].grouped() for v in GROUPED_VIEWS)
    groups = record_groups(svc, monkeypatch)
    items = [1, 2, 3, 4, 5]
    result, cost = trips(svc, lambda: svc.fetch("u1", items))
    assert cost == 1
    assert groups == [{"users": [["u1"]], "items": [items], "stats": [items]}]
    # Each view read alone, through the same service.
    users = svc.read_view("users", ["u1"])
    prices = svc.read_view("items", items)
    stats = svc.read_view("stats", items)
    assert users.rows[0] is not None and result.user == {"u_age": 30, "u_city": "Oslo"}
    assert result.user == {f"u_{k}": v for k, v in users.rows[0].items()}
    for i, item in enumerate(result.items):
        price, clicks = prices.rows[i], stats.rows[i]
        assert item == {"price": price["price"] if price else -1.0,
                        "s_clicks": clicks["clicks"] if clicks else 0}
    assert result.items[2] == {"price": 1.5, "s_clicks": 0} and result.missing == {"stats": [3, 5]}
    assert result.degraded == []
    _, again = trips(svc, lambda: svc.fetch("u2", [2]))  # every request: one round trip again
    assert again == 1


def test_views_of_two_sources_cost_one_round_trip_each() -> None:
    with seeded(config(other_source=True)) as svc:
        before = mem(svc, "other").round_trips
        result, cost = trips(svc, lambda: svc.fetch("u1", [1, 2, 3]))
        assert cost == 1 and mem(svc, "other").round_trips - before == 1
    assert result.user == {"u_age": 30, "u_city": "Oslo", "p_tier": "gold"}
    assert [item["t_tag"] for item in result.items] == ["new", "?", "old"]
    assert [item["price"] for item in result.items] == [0.5, 1.0, 1.5]
    assert result.degraded == []


# -- 2. missing, duplicate and invalid keys as on the path that reads each view alone ------------

@pytest.mark.parametrize(("user", "items"), [
    ("u1", [1, 2, 99, 2, 1]),            # a missing item, duplicate ids
    ("nobody", [4, 4, 4]),               # an unknown user, one id three times
    ("u2", [1, "abc", 3, "7", None]),    # ids an int view cannot take; a string form of an int
    ("u1", [2]),                         # one of each
    (None, [5, 1]),                      # no user: only the items' views
])
def test_keys_are_answered_as_when_each_view_is_read_alone(user: Any, items: list[Any]) -> None:
    with seeded(config()) as grouped, seeded(config(), grouped=False) as alone:
        assert not alone.daos["items"].grouped()
        got, cost = trips(grouped, lambda: grouped.fetch(user, items))
        expected, alone_cost = trips(alone, lambda: alone.fetch(user, items))
    assert answer(got) == answer(expected)
    read = (user is not None) + 2  # the views this request reads
    assert cost == 1 and alone_cost == read


def test_invalid_ids_degrade_each_item_view_and_reach_no_store(
        svc: FeatureService, monkeypatch: pytest.MonkeyPatch) -> None:
    groups = record_groups(svc, monkeypatch)
    result = svc.fetch("u1", ["abc", 2])
    assert groups == [{"users": [["u1"]], "items": [[2]], "stats": [[2]]}]
    assert reasons(result) == {"items": {Reason.INVALID_KEY}, "stats": {Reason.INVALID_KEY}}
    assert result.items == [{"price": -1.0, "s_clicks": 0}, {"price": 1.0, "s_clicks": 20}]


# -- 3. failures ----------------------------------------------------------------------------------

def test_a_failed_round_trip_degrades_every_view_of_the_group() -> None:
    with seeded(config(retries=0)) as svc:
        mem(svc).fail_next(1, "unavailable")
        result, cost = trips(svc, lambda: svc.fetch("u1", [1, 2]))  # not strict: no raise
        failures = breaker(svc)._failures
        assert cost == 1
        assert reasons(result) == {v: {Reason.UNAVAILABLE} for v in GROUPED_VIEWS}
        assert result.user == {"u_age": None, "u_city": None}
        assert result.items == [{"price": -1.0, "s_clicks": 0}] * 2
        # The store failed this request: the breaker counted it (a view it served would have reset it).
        assert failures >= 1 and breaker(svc).state is BreakerState.CLOSED
        # The next request is served, and the breaker learns the store is back.
        assert svc.fetch("u1", [1]).degraded == [] and breaker(svc)._failures == 0


def test_a_failed_round_trip_is_retried_for_the_whole_group() -> None:
    with seeded(config(retries=1)) as svc, seeded(config(retries=1)) as ref:
        mem(svc).fail_next(1, "unavailable")
        groups: list[dict[str, list[list[Any]]]] = []
        with pytest.MonkeyPatch.context() as mp:
            groups = record_groups(svc, mp)
            result, cost = trips(svc, lambda: svc.fetch("u1", [1, 2]))
        expected = ref.fetch("u1", [1, 2])
        assert result.degraded == [] and answer(result) == answer(expected)
        assert cost == 2 and len(groups) == 2 and groups[0] == groups[1]  # the retry: one round trip too
        assert breaker(svc)._failures == 0 and breaker(svc).state is BreakerState.CLOSED


def test_a_query_error_degrades_the_group_and_is_no_store_failure() -> None:
    with seeded(config(threshold=1)) as svc:
        mem(svc).fail_next(1, "query")
        result, cost = trips(svc, lambda: svc.fetch("u1", [1, 2]))
        assert cost == 1
        assert reasons(result) == {v: {Reason.QUERY_ERROR} for v in GROUPED_VIEWS}
        assert result.items == [{"price": -1.0, "s_clicks": 0}] * 2
        # One failure opens this breaker: the store answered, so it stays closed.
        assert breaker(svc).state is BreakerState.CLOSED and breaker(svc)._failures == 0
        assert svc.fetch("u1", [1]).degraded == []


def test_a_failure_of_a_strict_request_raises_naming_every_view() -> None:
    from featuredao import FetchError

    with seeded(config()) as svc:
        mem(svc).fail_next(1, "unavailable")
        with pytest.raises(FetchError) as info:
            svc.fetch("u1", [1], strict=True)
    assert {d.view for d in info.value.degraded} == set(GROUPED_VIEWS)


# -- 4. deadlines ---------------------------------------------------------------------------------

def test_a_view_whose_time_runs_out_first_times_out_alone() -> None:
    # The store answers in 400 ms: past the user view's 100 ms, within the item views' 2 s.
    cfg = config(timeouts={"users": 100}, deadline_ms=3000)
    with seeded(cfg, latency_ms=400) as svc:
        started = time.perf_counter()
        result, cost = trips(svc, lambda: svc.fetch("u1", [1, 2]))
        took = time.perf_counter() - started
    assert reasons(result) == {"users": {Reason.TIMEOUT}}
    assert result.user == {"u_age": None, "u_city": None}
    assert result.items == [{"price": 0.5, "s_clicks": 10}, {"price": 1.0, "s_clicks": 20}]
    assert cost == 1
    assert took < 3.0 + 0.1, took


def test_a_store_slower_than_the_request_costs_the_deadline_only() -> None:
    cfg = config(deadline_ms=300)
    with seeded(cfg, latency_ms=5000) as svc:
        started = time.perf_counter()
        result, cost = trips(svc, lambda: svc.fetch("u1", [1, 2]))
        took = time.perf_counter() - started
    assert took < 0.3 + 0.1 + 0.5, took  # generous for a loaded machine; waiting the store out is 5 s
    assert cost == 1
    assert reasons(result) == {v: {Reason.TIMEOUT} for v in GROUPED_VIEWS}
    assert result.items == [{"price": -1.0, "s_clicks": 0}] * 2


# -- 5. L1 in front of one of the views -------------------------------------------------------------

def test_l1_hits_skip_the_store_and_misses_join_the_group(monkeypatch: pytest.MonkeyPatch) -> None:
    with seeded(config(cache=["stats"])) as svc:
        assert svc.daos["stats"].grouped()
        groups = record_groups(svc, monkeypatch)
        first, cost = trips(svc, lambda: svc.fetch("u1", [1, 2]))
        assert cost == 1 and groups[-1] == {"users": [["u1"]], "items": [[1, 2]], "stats": [[1, 2]]}
        second, cost = trips(svc, lambda: svc.fetch("u1", [1, 2]))
        assert cost == 1 and groups[-1] == {"users": [["u1"]], "items": [[1, 2]]}  # stats from L1
        assert answer(second) == answer(first)
        third, cost = trips(svc, lambda: svc.fetch("u1", [2, 3, 1, 4]))
        assert cost == 1 and groups[-1] == {"users": [["u1"]], "items": [[2, 3, 1, 4]], "stats": [[3, 4]]}
        assert [i["s_clicks"] for i in third.items] == [20, 0, 10, 40]
        assert third.missing == {"stats": [3]} and third.degraded == []
        assert len(groups) == 3


# -- 6. an open breaker ---------------------------------------------------------------------------

def test_an_open_breaker_fails_the_group_fast_without_a_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[list[str]] = []
    real = ServiceReads._run_group

    def spy(self: ServiceReads, queue: Any, deadline: Any) -> None:
        runs.append(sorted(task.view.name for task, _ in queue))
        real(self, queue, deadline)

    monkeypatch.setattr(ServiceReads, "_run_group", spy)
    with seeded(config(threshold=1)) as svc:
        groups = record_groups(svc, monkeypatch)
        breaker(svc).failure()
        assert breaker(svc).state is BreakerState.OPEN
        result, cost = trips(svc, lambda: svc.fetch("u1", [1, 2]))
    assert runs == [sorted(GROUPED_VIEWS)]  # read as a group, answered by the breaker
    assert cost == 0 and groups == []
    assert reasons(result) == {v: {Reason.CIRCUIT_OPEN} for v in GROUPED_VIEWS}
    assert result.items == [{"price": -1.0, "s_clicks": 0}] * 2


# -- 7. close during a grouped read -----------------------------------------------------------------

def test_close_while_a_group_waits_on_the_store() -> None:
    svc = seeded(config(deadline_ms=8000, timeouts=dict.fromkeys(GROUPED_VIEWS, 8000)), latency_ms=3000)
    source = mem(svc)
    outcome: list[FetchResult | BaseException] = []

    def run() -> None:
        try:
            outcome.append(svc.fetch("u1", [1, 2]))
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    waited = time.monotonic() + 5
    while source.round_trips == 0 and time.monotonic() < waited:
        time.sleep(0.005)
    time.sleep(0.1)
    assert source.round_trips == 1  # the group's one round trip is waiting out its latency
    started = time.monotonic()
    svc.close()
    worker.join(5)
    assert not worker.is_alive()
    assert time.monotonic() - started < 2.0
    (result,) = outcome
    assert isinstance(result, FetchResult), result  # it started before close: an answer, not Closed
    got = reasons(result)
    assert set(got) == set(GROUPED_VIEWS)
    assert all(r <= {Reason.CLOSED, Reason.UNAVAILABLE} for r in got.values()), got
    assert result.items == [{"price": -1.0, "s_clicks": 0}] * 2


# -- 8. afetch --------------------------------------------------------------------------------------

def test_afetch_answers_as_the_grouped_fetch(svc: FeatureService) -> None:
    requests: list[tuple[str | None, list[Any]]] = [
        ("u1", [1, 2, 99, 2]), ("nobody", [3, "abc"]), (None, [5])]
    for user, items in requests:
        got = asyncio.run(svc.afetch(user, items))
        expected, cost = trips(svc, lambda: svc.fetch(user, items))  # noqa: B023 - called at once
        assert answer(got) == answer(expected)
        assert cost == 1  # the fetch it is compared with read its views together


def test_afetch_reads_the_views_of_one_source_in_one_round_trip(svc: FeatureService) -> None:
    """On the loop too: the views' fetches go to the source's aread_group together, awaited."""
    expected = svc.fetch("u1", [1, 2, 99])
    got, cost = trips(svc, lambda: asyncio.run(svc.afetch("u1", [1, 2, 99])))
    assert cost == 1
    assert answer(got) == answer(expected)


def test_afetch_of_a_view_out_of_time_degrades_that_view_only() -> None:
    """A group on the loop keeps each view's own timeout: the short one times out, the others serve."""
    with seeded(config(timeouts={"users": 100}, deadline_ms=3000), latency_ms=400) as slow:
        started = time.perf_counter()
        result, cost = trips(slow, lambda: asyncio.run(slow.afetch("u1", [1, 2])))
        took = time.perf_counter() - started
    assert cost == 1
    assert {d.view: d.reason for d in result.degraded} == {"users": Reason.TIMEOUT}
    assert result.items == [{"price": 0.5, "s_clicks": 10}, {"price": 1.0, "s_clicks": 20}]
    assert took < 3.1  # the request's deadline, never the store's pace


# -- what one view of the group meets costs that view only ----------------------------------------------

def test_a_missing_table_of_one_view_fails_that_view_only() -> None:
    """As when each view is read alone: the view whose table does not exist degrades ``query_error``,
    the other views of its source are served (the store rejected one query, not the round trip)."""
    def without_stats(grouped: bool) -> FeatureService:
        svc = FeatureService.from_config(config())
        assert svc.runtime is not None
        source = mem(svc)
        if not grouped:
            off = dataclasses.replace(source.capabilities, grouped_reads=False)
            setattr(source, "capabilities", off)  # noqa: B010 - an instance's own, over the class's
        daos = svc.runtime.daos
        for name in ("users", "items"):  # the stats table is never created
            daos[name].prepare()
        daos["users"].upsert([("u1", {"age": 30, "city": "Oslo"})])
        daos["items"].upsert([(1, {"price": 0.5})])
        return svc

    with without_stats(True) as grouped, without_stats(False) as alone:
        got, cost = trips(grouped, lambda: grouped.fetch("u1", [1]))
        expected = alone.fetch("u1", [1])
    assert cost == 1
    assert reasons(expected) == {"stats": {Reason.QUERY_ERROR}}
    assert reasons(got) == reasons(expected)
    assert got.user == expected.user == {"u_age": 30, "u_city": "Oslo"}
    assert got.items == expected.items == [{"price": 0.5, "s_clicks": 0}]


def test_a_view_waiting_for_another_requests_read_does_not_hold_up_its_group() -> None:
    """A cached view whose keys another request is loading waits for that read; the other views of its
    group must not wait with it. Each round trip takes 400 ms: read alone, the user view (600 ms) is
    served; held behind the wait (~350 ms) and then its own round trip it would run out of time."""
    cfg = config(cache=["stats"], timeouts={"users": 600})
    with seeded(cfg, latency_ms=400) as svc:
        loading = threading.Thread(target=lambda: svc.daos["stats"].read_partial([1], timeout_s=5))
        loading.start()
        time.sleep(0.05)  # that read holds key 1 of stats while it waits out the round trip
        try:
            result, cost = trips(svc, lambda: svc.fetch("u1", [1]))
        finally:
            loading.join(5)
    assert cost == 1  # this request's one group (users, items): stats waits for the read under way
    assert result.degraded == [], [(d.view, d.reason, d.detail) for d in result.degraded]
    assert result.user == {"u_age": 30, "u_city": "Oslo"}
    assert result.items == [{"price": 0.5, "s_clicks": 10}]
