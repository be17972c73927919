"""Circuit breaker, retries and fallback chains over fake DAOs."""

from __future__ import annotations

import time

import pytest
from fakes import FakeDao, make_view

from featuredao.config import CircuitBreakerConfig, RetryConfig
from featuredao.errors import BackendQueryError, BackendUnavailable, CircuitOpen
from featuredao.resilience import BreakerState, CircuitBreaker, ResilientDao
from featuredao.types import Reason

ROWS = {"a": {"a": 1, "b": "pa"}, "b": {"a": 2, "b": "pb"}}
FALLBACK_ROWS = {"a": {"a": 10, "b": "fa"}, "b": {"a": 20, "b": "fb"}, "c": {"a": 30, "b": "fc"}}


def breaker(threshold: int = 3, reset: float = 0.2) -> CircuitBreaker:
    return CircuitBreaker("src", CircuitBreakerConfig(failure_threshold=threshold, reset_timeout_s=reset))


def test_breaker_opens_fails_fast_probes_and_closes() -> None:
    b = breaker(threshold=2, reset=0.1)
    assert b.allow() and b.state is BreakerState.CLOSED
    b.failure()
    assert b.state is BreakerState.CLOSED
    b.failure()
    assert b.state is BreakerState.OPEN and not b.allow()
    time.sleep(0.12)
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow() and not b.allow()  # one probe at a time
    b.failure()
    assert b.state is BreakerState.OPEN and not b.allow()
    time.sleep(0.12)
    assert b.allow()
    b.success()
    assert b.state is BreakerState.CLOSED and b.allow()


def test_only_failed_keys_go_to_the_fallback() -> None:
    primary = FakeDao(make_view("p"), ROWS, failing={"b"})
    fallback = FakeDao(make_view("f"), FALLBACK_ROWS)
    dao = ResilientDao(primary, breaker(), fallbacks=[ResilientDao(fallback, breaker())])
    result = dao.read(["a", "b", "c"])
    assert result.rows == [ROWS["a"], FALLBACK_ROWS["b"], None]  # c is simply missing: not sent
    assert fallback.calls == [["b"]]
    reasons = [d.reason for d in result.degraded]
    assert Reason.UNAVAILABLE in reasons and Reason.FALLBACK in reasons


def test_fallback_on_missing_sends_missing_keys_too() -> None:
    primary = FakeDao(make_view("p"), ROWS)
    fallback = FakeDao(make_view("f"), FALLBACK_ROWS)
    dao = ResilientDao(primary, breaker(), fallbacks=[ResilientDao(fallback, breaker())],
                       fallback_on_missing=True)
    assert dao.read(["c", "a", "zz"]).rows == [FALLBACK_ROWS["c"], ROWS["a"], None]
    assert fallback.calls == [["c", "zz"]]


def test_chain_of_two_fallbacks_and_open_breaker() -> None:
    primary = FakeDao(make_view("p"), ROWS, error=BackendUnavailable("down"))
    first = FakeDao(make_view("f1"), {}, error=BackendUnavailable("down too"))
    second = FakeDao(make_view("f2"), FALLBACK_ROWS)
    b = breaker(threshold=2)
    chain = [ResilientDao(first, breaker()), ResilientDao(second, breaker())]
    dao = ResilientDao(primary, b, fallbacks=chain)
    for _ in range(3):
        assert dao.read(["a", "c"]).rows == [FALLBACK_ROWS["a"], FALLBACK_ROWS["c"]]
    assert len(primary.calls) == 2  # the third call failed fast: breaker open
    assert b.state is BreakerState.OPEN
    assert any(d.reason is Reason.CIRCUIT_OPEN for d in dao.read(["a"]).degraded)


def test_without_fallback_the_failure_is_raised() -> None:
    primary = FakeDao(make_view("p"), ROWS, error=BackendUnavailable("down"))
    dao = ResilientDao(primary, breaker(threshold=1))
    # Exact types: CircuitOpen is a BackendUnavailable, so isinstance could not tell the two calls apart.
    with pytest.raises(BackendUnavailable) as first:
        dao.read(["a"])
    assert type(first.value) is BackendUnavailable and first.value is primary.error
    with pytest.raises(CircuitOpen) as second:
        dao.read(["a"])
    assert type(second.value) is CircuitOpen
    assert len(primary.calls) == 1  # the open breaker failed fast: the store was not asked again


def test_query_errors_are_not_hidden_by_fallback() -> None:
    primary = FakeDao(make_view("p"), ROWS, error=BackendQueryError("no such table"))
    fallback = FakeDao(make_view("f"), FALLBACK_ROWS)
    dao = ResilientDao(primary, breaker(), fallbacks=[ResilientDao(fallback, breaker())])
    try:
        dao.read(["a"])
    except BackendQueryError:
        pass
    else:
        raise AssertionError("expected BackendQueryError")
    assert fallback.calls == []


def test_retries_are_bounded_and_retry_only_failed_keys() -> None:
    primary = FakeDao(make_view("p"), ROWS, failing={"b"})
    dao = ResilientDao(primary, breaker(), RetryConfig(max=2, backoff_ms=1))
    result = dao.read_partial(["a", "b"], timeout_s=1.0)
    assert primary.calls == [["a", "b"], ["b"], ["b"]]
    assert result.failed == ["b"] and result.rows[0] == ROWS["a"]


def test_retries_stay_within_the_time_left() -> None:
    primary = FakeDao(make_view("p"), ROWS, failing={"a"})
    dao = ResilientDao(primary, breaker(), RetryConfig(max=5, backoff_ms=200))
    dao.read_partial(["a"], timeout_s=0.05)
    assert len(primary.calls) == 1


# -- lateness: the view's timeout_ms is the primary's share; the fallback gets the rest ----------------

def _late_chain(primary_delay: float, hedge_ms: float | None = None, timeout_ms: int = 40,
                fallback_delay: float = 0.0) -> tuple[ResilientDao, CircuitBreaker, FakeDao]:
    primary = FakeDao(make_view("p", timeout_ms=timeout_ms), ROWS, delay=primary_delay)
    fallback = FakeDao(make_view("f"), FALLBACK_ROWS, delay=fallback_delay)
    b = breaker(threshold=5)
    chain = ResilientDao(primary, b, fallbacks=[ResilientDao(fallback, breaker())], hedge_ms=hedge_ms)
    return chain, b, primary


def test_a_late_primary_hands_its_keys_to_the_fallback_within_the_request_budget() -> None:
    chain, b, primary = _late_chain(primary_delay=5.0)  # ignores its deadline, like a frozen server
    started = time.monotonic()
    result = chain.read_partial(["a", "b"], timeout_s=0.5)
    took = time.monotonic() - started
    primary.release.set()
    assert result.rows == [FALLBACK_ROWS["a"], FALLBACK_ROWS["b"]] and result.failed == []
    assert 0.04 <= took < 0.4  # waited the primary's 40 ms share, not the 5 s it would take
    assert b._failures == 1  # a late primary counts against its source
    assert {d.reason for d in result.degraded} >= {Reason.TIMEOUT, Reason.FALLBACK}


def test_without_a_fallback_the_primary_keeps_the_callers_whole_time() -> None:
    primary = FakeDao(make_view("p", timeout_ms=10), ROWS, delay=0.05)
    result = ResilientDao(primary, breaker()).read_partial(["a"], timeout_s=1.0)
    assert result.rows == [ROWS["a"]]


def test_hedge_starts_the_fallback_early_and_the_first_answer_wins() -> None:
    chain, b, primary = _late_chain(primary_delay=5.0, hedge_ms=10, timeout_ms=300)
    started = time.monotonic()
    result = chain.read_partial(["a", "c"], timeout_s=1.0)
    took = time.monotonic() - started
    primary.release.set()
    assert result.rows == [FALLBACK_ROWS["a"], FALLBACK_ROWS["c"]]
    assert took < 0.25  # the fallback answered after the 10 ms hedge, long before the 300 ms share
    assert b._failures == 0 and b.allow()  # not late: the primary still had its share


def test_hedged_primary_fills_what_the_fallback_could_not_serve() -> None:
    primary = FakeDao(make_view("p", timeout_ms=300), ROWS, delay=0.05)
    fallback = FakeDao(make_view("f"), {}, error=BackendUnavailable("down"))
    chain = ResilientDao(primary, breaker(), fallbacks=[ResilientDao(fallback, breaker())], hedge_ms=5)
    result = chain.read_partial(["a", "b"], timeout_s=1.0)
    assert result.rows == [ROWS["a"], ROWS["b"]] and result.failed == []


def test_a_probe_that_waited_for_our_own_pool_lets_the_next_probe_through() -> None:
    b = breaker(threshold=1, reset=0.05)
    b.failure()
    time.sleep(0.06)
    assert b.allow()      # the probe
    b.release()           # ended Overloaded: it told nothing about the store
    assert b.allow()      # so the next call may probe
