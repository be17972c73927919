"""``ResilientDao.close`` closes the primary and every fallback, as its docstring says."""

from __future__ import annotations

from fakes import FakeDao, make_view

from featuredao.config import CircuitBreakerConfig
from featuredao.resilience import CircuitBreaker, ResilientDao


class ClosingDao(FakeDao):
    """A fake that records being closed."""

    closed = 0

    def close(self) -> None:
        self.closed += 1


def _breaker() -> CircuitBreaker:
    return CircuitBreaker("src", CircuitBreakerConfig(failure_threshold=5, reset_timeout_s=10))


def test_close_closes_the_primary_and_every_fallback_down_the_chain() -> None:
    primary, first, second = (ClosingDao(make_view(name)) for name in ("p", "f1", "f2"))
    inner = ResilientDao(second, _breaker())
    dao = ResilientDao(primary, _breaker(), fallbacks=[ResilientDao(first, _breaker()), inner])
    dao.close()
    assert (primary.closed, first.closed, second.closed) == (1, 1, 1)


def test_with_a_context_manager_the_fallbacks_are_closed_too() -> None:
    primary, fallback = ClosingDao(make_view("p")), ClosingDao(make_view("f"))
    with ResilientDao(primary, _breaker(), fallbacks=[fallback]) as dao:
        assert dao.read(["k"]).rows == [None]
    assert (primary.closed, fallback.closed) == (1, 1)
