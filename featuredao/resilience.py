"""Circuit breakers, retries and fallback chains: a wrapper that composes any FeatureDao."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum

from featuredao.config import CircuitBreakerConfig, RetryConfig
from featuredao.dao import FeatureDao
from featuredao.errors import BackendTimeout, BackendUnavailable, CircuitOpen, Overloaded, reason_of
from featuredao.metrics import Metrics
from featuredao.types import BatchResult, Degraded, FeatureValue, Key, Reason

log = logging.getLogger("featuredao")


class BreakerState(StrEnum):
    """Where a circuit breaker stands."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after N consecutive failures, fails fast while open, lets one probe through after the reset."""

    def __init__(self, name: str, config: CircuitBreakerConfig | None = None,
                 metrics: Metrics | None = None) -> None:
        self.name = name
        self.config = config or CircuitBreakerConfig()
        self._metrics = metrics or Metrics.disabled()
        self._lock = threading.Lock()
        self._failures = 0
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        """The current state (an open breaker past its reset timeout reports half-open)."""
        with self._lock:
            if self._state is BreakerState.OPEN and self._reset_due():
                return BreakerState.HALF_OPEN
            return self._state

    def _reset_due(self) -> bool:
        return time.monotonic() - self._opened_at >= self.config.reset_timeout_s

    def allow(self) -> bool:
        """May a call go to the store now? In half-open state only one probe at a time may."""
        if not self.config.enabled:
            return True
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.OPEN and self._reset_due():
                self._set(BreakerState.HALF_OPEN)
            if self._state is BreakerState.HALF_OPEN and not self._probing:
                self._probing = True
                return True
            return False

    def success(self) -> None:
        """Record a call the store served."""
        with self._lock:
            self._failures = 0
            self._probing = False
            if self._state is not BreakerState.CLOSED:
                log.warning("circuit of source %s closed again", self.name)
                self._set(BreakerState.CLOSED)

    def failure(self) -> None:
        """Record a call the store failed (unavailable or late)."""
        with self._lock:
            self._failures += 1
            self._probing = False
            if self._state is BreakerState.HALF_OPEN or (
                    self._state is BreakerState.CLOSED and self._failures >= self.config.failure_threshold):
                if self._state is BreakerState.CLOSED:
                    log.warning("circuit of source %s opened after %d consecutive failures", self.name,
                                self._failures)
                self._opened_at = time.monotonic()
                self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        self._state = state
        self._metrics.breaker_state(self.name, state.value)


class ResilientDao(FeatureDao):
    """Breaker, retries and a fallback chain around one view's DAO; only failed keys go to the fallback."""

    def __init__(self, primary: FeatureDao, breaker: CircuitBreaker, retries: RetryConfig | None = None,
                 fallbacks: Sequence[FeatureDao] = (), fallback_on_missing: bool = False,
                 metrics: Metrics | None = None) -> None:
        self.primary = primary
        self.view = primary.view
        self.breaker = breaker
        self.retries = retries or RetryConfig()
        self.fallbacks = list(fallbacks)
        self.fallback_on_missing = fallback_on_missing
        self._metrics = metrics or Metrics.disabled()

    def read_partial(self, keys: Sequence[Key], features: Sequence[str] | None = None, *,
                     timeout_s: float | None = None) -> BatchResult:
        """Like ``read``; keys no link of the chain could serve stay in ``failed``."""
        deadline = None if timeout_s is None else time.perf_counter() + timeout_s
        result = self._guarded(self.primary, self.breaker, keys, features, deadline)
        pending = list(dict.fromkeys(result.failed))
        if self.fallback_on_missing:
            pending += [k for k, r in zip(result.keys, result.rows, strict=True)
                        if r is None and k not in result.failed]
            pending = list(dict.fromkeys(pending))
        if not pending or not self.fallbacks:
            return result
        if result.error is not None:
            result.degraded.append(self._degraded(self.primary, result.error, pending))
        position: dict[Key, list[int]] = {}
        for i, k in enumerate(result.keys):
            position.setdefault(k, []).append(i)
        for fallback in self.fallbacks:
            if not pending:
                break
            remaining = None if deadline is None else deadline - time.perf_counter()
            if remaining is not None and remaining <= 0:
                break
            self._metrics.fallback(self.view.name, fallback.view.name)
            part = fallback.read_partial(pending, features, timeout_s=remaining)
            result.degraded.extend(part.degraded)
            still: list[Key] = []
            for key, row in zip(part.keys, part.rows, strict=True):
                if row is not None:
                    for i in position.get(key, ()):
                        result.rows[i] = row
                elif key in part.failed or self.fallback_on_missing:
                    still.append(key)
            if part.error is not None:
                result.degraded.append(self._degraded(fallback, part.error, list(part.failed)))
            served = len(pending) - len(still)
            if served:
                result.degraded.append(Degraded(self.view.name, Reason.FALLBACK,
                                                f"{served} key(s) served by fallback {fallback.view.name!r}"))
            pending = still
        # Keys a fallback found missing are missing, not failed.
        failed = set(result.failed) & set(pending)
        result.failed = [k for k in result.failed if k in failed]
        if not result.failed:
            result.error = None
        return result

    def _guarded(self, dao: FeatureDao, breaker: CircuitBreaker, keys: Sequence[Key],
                 features: Sequence[str] | None, deadline: float | None) -> BatchResult:
        """One link of the chain: breaker, then bounded jittered retries of what failed."""
        if not breaker.allow():
            err = CircuitOpen("circuit open: failing fast", source=breaker.name, view=dao.view.name)
            return BatchResult(list(keys), [None] * len(keys), failed=list(keys), error=err)
        attempt = 0
        result = self._attempt(dao, keys, features, deadline)
        # A timeout used the time up; an overloaded pool is not helped by asking again.
        while result.failed and attempt < self.retries.max and \
                not isinstance(result.error, BackendTimeout | Overloaded):
            attempt += 1
            pause = self.retries.backoff_ms / 1000 * attempt * (0.5 + random.random())
            left = self._left(deadline)
            if left is not None and left <= pause:
                break
            time.sleep(pause)
            again = self._attempt(dao, result.failed, features, deadline)
            result = self._merge_retry(result, again)
        if not result.failed:
            breaker.success()
        elif not isinstance(result.error, Overloaded):  # waiting for our own pool is not the store's fault
            breaker.failure()
        return result

    def _attempt(self, dao: FeatureDao, keys: Sequence[Key], features: Sequence[str] | None,
                 deadline: float | None) -> BatchResult:
        try:
            return dao.read_partial(keys, features, timeout_s=self._left(deadline))
        except BackendUnavailable as exc:  # a DAO whose read_partial raises all the same
            return BatchResult(list(keys), [None] * len(keys), failed=list(keys), error=exc)

    @staticmethod
    def _merge_retry(first: BatchResult, again: BatchResult) -> BatchResult:
        rows = dict(zip(again.keys, again.rows, strict=True))
        for i, key in enumerate(first.keys):
            if key in rows and rows[key] is not None:
                first.rows[i] = rows[key]
        first.degraded.extend(again.degraded)
        first.failed = list(again.failed)
        first.error = again.error
        return first

    @staticmethod
    def _left(deadline: float | None) -> float | None:
        return None if deadline is None else deadline - time.perf_counter()

    def _degraded(self, dao: FeatureDao, error: BaseException, keys: list[Key]) -> Degraded:
        reason = reason_of(error)
        self._metrics.error(dao.view.name, reason.value)
        return Degraded(dao.view.name, reason, str(error), tuple(keys[:20]))

    def upsert(self, rows: Iterable[tuple[Key, Mapping[str, FeatureValue]]]) -> int:
        """Writes go to the primary only: a fallback is a read path."""
        return self.primary.upsert(rows)

    def ping(self) -> None:
        """Ping the primary."""
        self.primary.ping()

    def lane(self) -> tuple[str, int] | None:
        """The primary's lane (fallbacks are read only for what it could not serve)."""
        return self.primary.lane()

    def close(self) -> None:
        """Close the primary and the fallbacks."""
        for dao in (self.primary, *self.fallbacks):
            dao.close()

    def __repr__(self) -> str:
        chain = ", ".join(f.view.name for f in self.fallbacks)
        return f"ResilientDao({self.primary!r}, fallbacks=[{chain}])"
