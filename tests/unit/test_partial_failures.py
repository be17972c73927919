"""A batch the store served in part (one shard or cluster node down): what is served stays served, and
the source's breaker does not keep the whole store out. Fake DAOs; a real cluster: test_cluster_failover."""

from __future__ import annotations

import pytest
from fakes import FakeDao, make_view

from featuredao.config import CircuitBreakerConfig
from featuredao.errors import BackendUnavailable, CircuitOpen
from featuredao.resilience import BreakerState, CircuitBreaker, ResilientDao
from featuredao.service import FeatureService
from featuredao.types import Key, Reason, Row

ROWS: dict[Key, Row] = {"a": {"a": 1, "b": "pa"}, "b": {"a": 2, "b": "pb"}, "c": {"a": 3, "b": "pc"}}


def breaker(threshold: int = 2) -> CircuitBreaker:
    return CircuitBreaker("src", CircuitBreakerConfig(failure_threshold=threshold, reset_timeout_s=10))


def test_a_partial_failure_serves_what_was_served_with_a_degraded_entry() -> None:
    dao = ResilientDao(FakeDao(make_view("p"), ROWS, failing={"b"}), breaker())
    with FeatureService({"p": dao}) as service:
        result = service.fetch(None, ["a", "b", "c", "b"])
    assert [row["a"] for row in result.items] == [1, -1, 3, -1]  # b: the view's default
    assert [(d.reason, set(d.keys)) for d in result.degraded] == [(Reason.UNAVAILABLE, {"b"})]
    assert result.missing == {}  # a failed key is not known to be missing


def test_a_partial_failure_does_not_count_against_the_sources_breaker() -> None:
    b = breaker(threshold=1)
    dao = ResilientDao(FakeDao(make_view("p"), ROWS, failing={"b"}), b)
    for _ in range(5):
        assert dao.read_partial(["a", "b"]).rows[0] == ROWS["a"]
    assert b.state is BreakerState.CLOSED


def test_a_whole_failure_still_counts_and_raises() -> None:
    b = breaker(threshold=2)
    primary = FakeDao(make_view("p"), ROWS, failing={"a", "b"})
    dao = ResilientDao(primary, b)
    for _ in range(2):
        with pytest.raises(BackendUnavailable):
            dao.read(["a", "b"])
    assert b.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen):
        dao.read(["a"])


def test_keys_that_cannot_be_keys_do_not_make_a_whole_failure_partial() -> None:
    b = breaker(threshold=1)
    dao = ResilientDao(FakeDao(make_view("p"), ROWS, failing={"a"}), b)
    with pytest.raises(BackendUnavailable):
        dao.read(["a", None])  # type: ignore[list-item]  # None is answered missing, never read
    assert b.state is BreakerState.OPEN


def test_a_breaker_inside_the_dao_failing_fast_is_not_a_failure_of_the_source() -> None:
    # E.g. every key of the batch lives on one cluster node whose own breaker is open.
    b = breaker(threshold=1)
    primary = FakeDao(make_view("p"), ROWS, error=CircuitOpen("cluster node 10.0.0.1:7000: circuit open"))
    dao = ResilientDao(primary, b)
    for _ in range(3):
        with pytest.raises(CircuitOpen):
            dao.read(["a"])
    assert b.state is BreakerState.CLOSED
    assert len(primary.calls) == 3  # the source's breaker never failed fast on its behalf


def test_with_a_fallback_the_keys_it_could_not_serve_stay_missing_not_raised() -> None:
    primary = FakeDao(make_view("p"), ROWS, failing={"b", "c"})
    fallback = FakeDao(make_view("f"), {}, failing={"c"})
    dao = ResilientDao(primary, breaker(), fallbacks=[ResilientDao(fallback, breaker())])
    result = dao.read_partial(["a", "b", "c"])
    assert result.rows == [ROWS["a"], None, None]  # b: missing in the fallback; c: failed everywhere
    assert result.failed == ["c"]
    assert Reason.UNAVAILABLE in {d.reason for d in result.degraded}
    with FeatureService({"p": dao}) as service:
        served = service.fetch(None, ["a", "b", "c"])
    assert [row["a"] for row in served.items] == [1, -1, -1]
