"""Circuit breakers, retries and fallback chains: a wrapper that composes any FeatureDao."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from featuredao.config import CircuitBreakerConfig, RetryConfig
from featuredao.dao import FeatureDao, invalid_keys
from featuredao.deadline import Deadline
from featuredao.errors import (
    BackendQueryError,
    BackendTimeout,
    BackendUnavailable,
    CircuitOpen,
    Overloaded,
    UsageError,
    reason_of,
)
from featuredao.keys import normalise, normaliser, readable
from featuredao.metrics import Metrics
from featuredao.steps import ReadSteps
from featuredao.types import BatchResult, Degraded, FeatureValue, Key, Reason

if TYPE_CHECKING:  # asyncio is imported where a loop runs: at import it costs start-up ~10%
    pass

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

    def release(self) -> None:
        """A call it let through told nothing about the store (it waited for our own pool): a half-open
        breaker may send the next probe."""
        with self._lock:
            self._probing = False

    def failure(self) -> None:
        """Record a call the store failed (unavailable or late)."""
        if not self.config.enabled:
            return  # a disabled breaker never opens (nor says it did)
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


class _Claim:
    """Who records a primary's outcome on the breaker: the read when it ends, or the caller who gave up."""

    __slots__ = ("_lock", "_taken")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._taken = False

    def take(self) -> bool:
        """True for the first caller only."""
        with self._lock:
            first, self._taken = not self._taken, True
            return first


# Primaries of views with a fallback run here, so a store that stops answering (a frozen server
# holds the driver's socket read) costs the request only the primary's share of its deadline.
_Ask = tuple[Sequence[str] | None, float | None]
"""What a read asks for, passed down the chain: (features, as_of)."""

_primaries = ThreadPoolExecutor(max_workers=64, thread_name_prefix="featuredao-primary")


def served_some(result: BatchResult) -> bool:
    """Did the store serve part of the batch: a key it was asked for that did not fail?"""
    failed = set(result.failed)
    return any(k not in failed for k in readable(result.keys))


class ResilientDao(FeatureDao):
    """Breaker, retries and a fallback chain around one view's DAO; only failed keys go to the fallback.

    With a fallback chain, the view's ``timeout_ms`` is the primary's share of the caller's time: keys
    the primary has not answered by then (failed or late) go down the chain with the time left. With
    ``hedge_ms``, the chain starts that early while the primary may still answer; per key the first
    answer wins. A late primary counts as a failure of its source.
    """

    def __init__(self, primary: FeatureDao, breaker: CircuitBreaker, retries: RetryConfig | None = None,
                 fallbacks: Sequence[FeatureDao] = (), fallback_on_missing: bool = False,
                 metrics: Metrics | None = None, hedge_ms: float | None = None) -> None:
        self.primary = primary
        self.view = primary.view
        self.breaker = breaker
        self.retries = retries or RetryConfig()
        self.fallbacks = list(fallbacks)
        self.fallback_on_missing = fallback_on_missing
        self.hedge_s = None if hedge_ms is None else hedge_ms / 1000
        self._norm = normaliser(self.view.key_type)
        self._key_type: type[Any] = int if self.view.key_type == "int" else str
        self._metrics = metrics or Metrics.disabled()

    def read_partial(self, keys: Sequence[Key], features: Sequence[str] | None = None, *,
                     timeout_s: float | None = None, as_of: float | None = None,
                     deadline: Deadline | None = None) -> BatchResult:
        """Like ``read``; keys no link of the chain could serve stay in ``failed``."""
        deadline = Deadline.of(deadline, timeout_s)
        # Keys in the view's type once, here: the chain passes InvalidKey placeholders along unread.
        keys, invalid = normalise(keys, self._norm, self._key_type)
        result = self._read_chain(keys, (features, as_of), deadline)
        if invalid:
            result.degraded.insert(0, invalid_keys(self.view.name, self.view.key_type, invalid))
        return result

    def _read_chain(self, keys: list[Key], ask: _Ask, deadline: Deadline) -> BatchResult:
        if not self.fallbacks:
            return self._guarded(self.primary, self.breaker, keys, ask, deadline)
        # The primary's share of the caller's deadline, never past it.
        share = deadline.within(self.view.timeout_ms / 1000)
        claim = _Claim()
        try:
            running = _primaries.submit(self._guarded, self.primary, self.breaker, keys, ask, share, claim)
        except RuntimeError:  # the interpreter is shutting down
            return self._guarded(self.primary, self.breaker, keys, ask, share)
        # A little grace lets a primary that honours its deadline report why it stopped.
        give_up = Deadline(None if share.at is None else share.at + 0.002)
        first_look = give_up.within(self.hedge_s)
        result = self._await(running, first_look)
        hedged: BatchResult | None = None
        if result is None and first_look is not give_up:
            # Hedge: the chain serves every key now; the primary may still answer before its share ends.
            hedged = self._down_the_chain(self._all_failed(keys, None), list(dict.fromkeys(keys)),
                                          ask, deadline)
            if not hedged.failed:
                self._abandon(running, claim, breaker_failure=False)
                return hedged
            result = self._await(running, give_up)
        if result is None:
            self._abandon(running, claim, breaker_failure=True)
            late = BackendTimeout(f"no answer within its share ({self.view.timeout_ms} ms)",
                                  source=self.breaker.name, view=self.primary.view.name)
            result = self._all_failed(keys, late)
        if hedged is not None:
            return self._first_answers(hedged, result)
        pending = list(dict.fromkeys(result.failed))
        if self.fallback_on_missing:
            pending += [k for k, r in zip(result.keys, result.rows, strict=True)
                        if r is None and k not in result.failed]
            pending = list(dict.fromkeys(pending))
        if not pending:
            return result
        if result.error is not None:
            result.degraded.append(self._degraded(self.primary, result.error, pending))
        return self._down_the_chain(result, pending, ask, deadline)

    @staticmethod
    def _await(running: Future[BatchResult], until: Deadline) -> BatchResult | None:
        try:
            return running.result(timeout=until.remaining())
        except FutureTimeout:
            return None

    def _abandon(self, running: Future[BatchResult], claim: _Claim, breaker_failure: bool) -> None:
        """Stop waiting for the primary; it ends on its own (its driver's timeouts) and is ignored."""
        if claim.take():  # taken either way: the read then records nothing
            if breaker_failure:
                self.breaker.failure()
            else:
                self.breaker.release()  # it may have been a half-open breaker's probe
        running.cancel()

    @staticmethod
    def _all_failed(keys: Sequence[Key], error: BaseException | None) -> BatchResult:
        return BatchResult(list(keys), [None] * len(keys), failed=list(keys), error=error)

    @staticmethod
    def _first_answers(hedged: BatchResult, primary: BatchResult) -> BatchResult:
        """The chain's rows where it answered, the primary's for the keys it left failed."""
        rows = dict(zip(primary.keys, primary.rows, strict=True))
        served = set(primary.keys) - set(primary.failed)
        still = [k for k in hedged.failed if k not in served]
        for i, key in enumerate(hedged.keys):
            if key in served and hedged.rows[i] is None and key in hedged.failed:
                hedged.rows[i] = rows.get(key)
        hedged.degraded.extend(primary.degraded)
        hedged.failed = still
        if not still:
            hedged.error = None
        return hedged

    def _down_the_chain(self, result: BatchResult, pending: list[Key], ask: _Ask,
                        deadline: Deadline) -> BatchResult:
        """Send ``pending`` keys to each fallback in turn, with the time the caller has left."""
        position: dict[Key, list[int]] = {}
        for i, k in enumerate(result.keys):
            position.setdefault(k, []).append(i)
        for fallback in self.fallbacks:
            if not pending:
                break
            if deadline.expired:
                break
            self._metrics.fallback(self.view.name, fallback.view.name)
            part = fallback.read_partial(pending, ask[0], as_of=ask[1], deadline=deadline)
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
                 ask: _Ask, deadline: Deadline,
                 claim: _Claim | None = None) -> BatchResult:
        """One link of the chain: breaker, then bounded jittered retries of what failed."""
        if not breaker.allow():
            return self._refused(dao, breaker, keys)
        try:
            result = self._retried(dao, keys, ask, deadline)
        except BaseException as exc:
            self._raised(breaker, exc, claim)
            raise
        return self._counted(breaker, result, claim)

    def grouped(self) -> bool:
        """A view without fallbacks whose DAO reads in a group."""
        return not self.fallbacks and self.primary.grouped()

    def read_steps(self, keys: Sequence[Key], features: Sequence[str] | None = None, *,
                   as_of: float | None = None, deadline: Deadline) -> ReadSteps:
        """``read_partial`` as steps, for a view without fallbacks: the same breaker and retries."""
        norm, invalid = normalise(keys, self._norm, self._key_type)
        breaker = self.breaker
        if not breaker.allow():
            result = self._refused(self.primary, breaker, norm)
        else:
            try:
                result = yield from self._attempt_steps(norm, features, as_of, deadline)
                for pause in self._pauses(deadline, result):
                    time.sleep(pause)
                    again = yield from self._attempt_steps(result.failed, features, as_of, deadline)
                    result = self._merge_retry(result, again)
                    if not self._retriable(result):
                        break
            except GeneratorExit:
                breaker.release()  # given up unread: nothing learnt about the store
                raise
            except BaseException as exc:
                self._raised(breaker, exc, None)
                raise
            result = self._counted(breaker, result, None)
        if invalid:
            result.degraded.insert(0, invalid_keys(self.view.name, self.view.key_type, invalid))
        return result

    def _attempt_steps(self, keys: Sequence[Key], features: Sequence[str] | None, as_of: float | None,
                       deadline: Deadline) -> ReadSteps:
        try:
            return (yield from self.primary.read_steps(keys, features, as_of=as_of, deadline=deadline))
        except BackendUnavailable as exc:
            return BatchResult(list(keys), [None] * len(keys), failed=list(keys), error=exc)

    def native_async(self) -> bool:
        """A view without fallbacks whose DAO reads on the loop (a chain runs on the service's threads)."""
        return not self.fallbacks and self.primary.native_async()

    def bounded_reads(self) -> bool:
        """A view without fallbacks whose DAO's reads are bounded (retries stay within the time left)."""
        return not self.fallbacks and self.primary.bounded_reads()

    async def aread_partial(self, keys: Sequence[Key], features: Sequence[str] | None = None, *,
                            timeout_s: float | None = None, as_of: float | None = None,
                            deadline: Deadline | None = None) -> BatchResult:
        """``read_partial`` on the loop: the same breaker and retries, for a view without fallbacks."""
        import asyncio
        deadline = Deadline.of(deadline, timeout_s)
        if not self.native_async():
            return await super().aread_partial(keys, features, as_of=as_of, deadline=deadline)
        norm, invalid = normalise(keys, self._norm, self._key_type)
        if not self.breaker.allow():
            result = self._refused(self.primary, self.breaker, norm)
        else:
            try:
                result = await self._aretried(self.primary, norm, features, as_of, deadline)
            except asyncio.CancelledError:
                # The request gave up on the read (its deadline, on a loop too busy to see the read's own
                # timeout first): nothing learnt about the store, as when a read waited for our own pool.
                self.breaker.release()
                raise
            except BaseException as exc:
                self._raised(self.breaker, exc, None)
                raise
            result = self._counted(self.breaker, result, None)
        if invalid:
            result.degraded.insert(0, invalid_keys(self.view.name, self.view.key_type, invalid))
        return result

    async def _aretried(self, dao: FeatureDao, keys: Sequence[Key], features: Sequence[str] | None,
                        as_of: float | None, deadline: Deadline) -> BatchResult:
        import asyncio
        async def attempt(these: Sequence[Key]) -> BatchResult:
            try:
                return await dao.aread_partial(these, features, as_of=as_of, deadline=deadline)
            except BackendUnavailable as exc:
                return BatchResult(list(these), [None] * len(these), failed=list(these), error=exc)

        result = await attempt(keys)
        for pause in self._pauses(deadline, result):
            await asyncio.sleep(pause)
            result = self._merge_retry(result, await attempt(result.failed))
            if not self._retriable(result):
                break
        return result

    @staticmethod
    def _refused(dao: FeatureDao, breaker: CircuitBreaker, keys: Sequence[Key]) -> BatchResult:
        err = CircuitOpen("circuit open: failing fast", source=breaker.name, view=dao.view.name)
        return BatchResult(list(keys), [None] * len(keys), failed=list(keys), error=err)

    @staticmethod
    def _raised(breaker: CircuitBreaker, exc: BaseException, claim: _Claim | None) -> None:
        # Every call the breaker let through is recorded, or a half-open breaker waits for its probe
        # forever. A store that answered with an error is up; anything else counts against it.
        if claim is None or claim.take():
            if isinstance(exc, BackendQueryError | UsageError):
                breaker.success()
            else:
                breaker.failure()

    @staticmethod
    def _counted(breaker: CircuitBreaker, result: BatchResult, claim: _Claim | None) -> BatchResult:
        """Tell the breaker how the read went (unless the caller gave up on it and counted it already)."""
        if claim is not None and not claim.take():
            return result
        if not result.failed:
            breaker.success()
        elif isinstance(result.error, Overloaded | CircuitOpen):
            # Waiting for our own pool is not the store's fault; a breaker inside the DAO (a cluster
            # node's) failing fast tells nothing new about the store.
            breaker.release()
        elif served_some(result):
            # Part of the batch was served: the store answers, the failed part is its own (a cluster node,
            # which the adapter tracks with a breaker of its own). It must not keep the whole store out.
            breaker.success()
        else:
            breaker.failure()
        return result

    def _retried(self, dao: FeatureDao, keys: Sequence[Key], ask: _Ask,
                 deadline: Deadline) -> BatchResult:
        result = self._attempt(dao, keys, ask, deadline)
        for pause in self._pauses(deadline, result):
            time.sleep(pause)
            result = self._merge_retry(result, self._attempt(dao, result.failed, ask, deadline))
            if not self._retriable(result):
                break
        return result

    def _pauses(self, deadline: Deadline, first: BatchResult) -> Iterator[float]:
        """The jittered pause before each retry while one is worth it and fits in the time left."""
        if not self._retriable(first):
            return
        for attempt in range(1, self.retries.max + 1):
            pause = self.retries.backoff_ms / 1000 * attempt * (0.5 + random.random())
            left = deadline.remaining()
            if left is not None and left <= pause:
                return
            yield pause

    @staticmethod
    def _retriable(result: BatchResult) -> bool:
        # A timeout used the time up; an overloaded pool is not helped by asking again.
        return bool(result.failed) and not isinstance(result.error, BackendTimeout | Overloaded)

    def _attempt(self, dao: FeatureDao, keys: Sequence[Key], ask: _Ask,
                 deadline: Deadline) -> BatchResult:
        try:
            return dao.read_partial(keys, ask[0], as_of=ask[1], deadline=deadline)
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

    def _degraded(self, dao: FeatureDao, error: BaseException, keys: list[Key]) -> Degraded:
        reason = reason_of(error)
        self._metrics.error(dao.view.name, reason.value)
        return Degraded(dao.view.name, reason, str(error), tuple(keys[:20]))

    def upsert(self, rows: Iterable[tuple[Key, Mapping[str, FeatureValue]]]) -> int:
        """Writes go to the primary only: a fallback is a read path."""
        return self.primary.upsert(rows)

    def append(self, events: Iterable[tuple[Key, Mapping[str, FeatureValue]]]) -> int:
        """Events go to the primary only."""
        return self.primary.append(events)

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
