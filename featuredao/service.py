"""FeatureService: one user's and many items' features from every view, under a deadline."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from os import PathLike
from types import TracebackType
from typing import Any, Self

from featuredao import factory
from featuredao.cache import CachedDao
from featuredao.config import Config, ServiceConfig, View
from featuredao.dao import FeatureDao
from featuredao.errors import (
    BackendQueryError,
    BackendTimeout,
    BackendUnavailable,
    CircuitOpen,
    FetchError,
)
from featuredao.metrics import Metrics
from featuredao.types import BatchResult, Degraded, FeatureValue, Key, Reason, Row

log = logging.getLogger("featuredao")


@dataclass
class FetchResult:
    """Merged features: the user's, and each item's in input order, plus what was degraded."""

    user_id: Key
    user: dict[str, FeatureValue]
    item_ids: list[Key]
    items: list[dict[str, FeatureValue]]
    degraded: list[Degraded] = field(default_factory=list)
    elapsed_s: float = 0.0

    def items_by_id(self) -> dict[Key, dict[str, FeatureValue]]:
        """Item rows by id (duplicate ids collapse)."""
        return dict(zip(self.item_ids, self.items, strict=True))

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape the CLI prints."""
        return {"user": self.user, "items": {str(k): v for k, v in self.items_by_id().items()},
                "degraded": [d.to_dict() for d in self.degraded]}


@dataclass(frozen=True, slots=True)
class SourceHealth:
    """One source's answer to a ping."""

    source: str
    type: str
    ok: bool
    latency_ms: float
    breaker: str
    error: str = ""


@dataclass(frozen=True, slots=True)
class _Task:
    view: View
    keys: list[Key]
    timeout_s: float


def _reason(exc: BaseException) -> Reason:
    if isinstance(exc, CircuitOpen):
        return Reason.CIRCUIT_OPEN
    if isinstance(exc, BackendTimeout):
        return Reason.TIMEOUT
    if isinstance(exc, BackendUnavailable):
        return Reason.UNAVAILABLE
    if isinstance(exc, BackendQueryError):
        return Reason.QUERY_ERROR
    return Reason.ERROR


class FeatureService:
    """What a recommendation service calls: ``fetch`` (threads) or ``await afetch`` (asyncio)."""

    def __init__(self, daos: Mapping[str, FeatureDao], settings: ServiceConfig | None = None, *,
                 on_close: Callable[[], None] | None = None, runtime: factory.Runtime | None = None,
                 metrics: Metrics | None = None) -> None:
        self.daos = dict(daos)
        self.settings = settings or ServiceConfig()
        self.runtime = runtime
        self._metrics = metrics or Metrics()
        self._on_close = on_close
        self._pool = ThreadPoolExecutor(max_workers=self.settings.max_workers,
                                        thread_name_prefix="featuredao-view")
        self._shapes: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, FeatureValue], ...],
                                      dict[str, FeatureValue]]] = {}
        self._by_entity: dict[str, list[FeatureDao]] = {"user": [], "item": []}
        for dao in self.daos.values():
            self._by_entity.setdefault(dao.view.entity, []).append(dao)

    @classmethod
    def from_config(cls, cfg: Config | str | PathLike[str] | Mapping[str, Any]) -> FeatureService:
        """Build every source and view from a config file, dict or Config."""
        metrics = Metrics()
        runtime = factory.build(cfg, metrics)
        return cls(runtime.served, runtime.config.service, on_close=runtime.close, runtime=runtime,
                   metrics=metrics)

    # -- planning and merging are shared by fetch and afetch -----------------------------
    def _plan(self, user_id: Key | None, item_ids: Sequence[Key],
              deadline_ms: float | None) -> tuple[list[_Task], float]:
        budget = (deadline_ms if deadline_ms is not None else self.settings.deadline_ms) / 1000.0
        tasks = []
        if user_id is not None:
            tasks += [_Task(d.view, [user_id], min(budget, d.view.timeout_ms / 1000.0))
                      for d in self._by_entity["user"]]
        if item_ids:
            tasks += [_Task(d.view, list(item_ids), min(budget, d.view.timeout_ms / 1000.0))
                      for d in self._by_entity["item"]]
        return tasks, budget

    def _start(self, task: _Task) -> Future[BatchResult]:
        """Answer from memory at once when the view's L1 holds every key; otherwise read on a worker."""
        dao = self.daos[task.view.name]
        if isinstance(dao, CachedDao):
            started = time.perf_counter()
            hit = dao.peek(task.keys)
            if hit is not None:
                self._metrics.read(task.view.name, time.perf_counter() - started, len(task.keys), hit.found)
                done: Future[BatchResult] = Future()
                done.set_result(hit)
                return done
        return self._pool.submit(self._read, task)

    def _read(self, task: _Task) -> BatchResult:
        started = time.perf_counter()
        try:
            result = self.daos[task.view.name].read(task.keys, timeout_s=task.timeout_s)
        except Exception as exc:
            self._metrics.error(task.view.name, _reason(exc).value)
            raise
        self._metrics.read(task.view.name, time.perf_counter() - started, len(task.keys), result.found)
        return result

    @staticmethod
    def _failure(task: _Task, exc: BaseException | None) -> Degraded:
        if exc is None:
            detail = f"no answer within {task.timeout_s * 1000:.0f} ms"
            return Degraded(task.view.name, Reason.TIMEOUT, detail)
        reason = _reason(exc)
        if reason is Reason.QUERY_ERROR:
            log.error("view %s: the store rejected the query: %s", task.view.name, exc)
        elif reason is Reason.ERROR:
            log.error("view %s: unexpected error", task.view.name, exc_info=exc)
        else:
            log.warning("view %s degraded (%s): %s", task.view.name, reason.value, exc)
        return Degraded(task.view.name, reason, str(exc))

    def _shape(self, view: View) -> tuple[tuple[str, ...], tuple[str, ...],
                                          tuple[tuple[str, FeatureValue], ...], dict[str, FeatureValue]]:
        """A view's fields, their output names, the defaults to fill in and the all-default row."""
        shape = self._shapes.get(view.name)
        if shape is None:
            fields = tuple(view.features)
            names = tuple(view.prefix + f for f in fields)
            defaults = tuple((view.prefix + f, d) for f, d in view.defaults.items() if d is not None)
            default_row = {view.prefix + f: view.defaults.get(f) for f in fields}
            shape = self._shapes[view.name] = (fields, names, defaults, default_row)
        return shape

    def _merge(self, user_id: Key | None, item_ids: Sequence[Key], tasks: list[_Task],
               outcomes: list[BatchResult | BaseException | None], started: float,
               strict: bool | None) -> FetchResult:
        user: dict[str, FeatureValue] = {}
        items: list[dict[str, FeatureValue]] = [{} for _ in item_ids]
        degraded: list[Degraded] = []
        for task, outcome in zip(tasks, outcomes, strict=True):
            view = task.view
            rows: Sequence[Row | None]
            if isinstance(outcome, BatchResult):
                rows = outcome.rows
                degraded.extend(outcome.degraded)
            else:
                rows = [None] * len(task.keys)
                degraded.append(self._failure(task, outcome))
            targets = [user] if view.entity == "user" else items
            fields, names, defaults, default_row = self._shape(view)
            renamed = names != fields
            for target, row in zip(targets, rows, strict=True):
                if row is None:
                    target.update(default_row)
                    continue
                # Whole-row C operations: this loop is per row, not per value.
                if renamed or len(row) != len(fields):
                    values = dict(zip(names, map(row.get, fields), strict=True))
                else:
                    values = dict(row)
                for name, default in defaults:
                    if values[name] is None:
                        values[name] = default
                target.update(values)
        result = FetchResult(user_id if user_id is not None else "", user, list(item_ids), items,
                             degraded, time.perf_counter() - started)
        if degraded and (self.settings.strict if strict is None else strict):
            raise FetchError(degraded)
        return result

    # -- entry points --------------------------------------------------------------------
    def fetch(self, user_id: Key | None, item_ids: Sequence[Key] = (), *,
              deadline_ms: float | None = None, strict: bool | None = None) -> FetchResult:
        """Fetch the user's and the items' features; degraded views give defaults, never raise."""
        started = time.perf_counter()
        tasks, budget = self._plan(user_id, item_ids, deadline_ms)
        futures: list[Future[BatchResult]] = [self._start(t) for t in tasks]
        outcomes: list[BatchResult | BaseException | None] = []
        for task, fut in zip(tasks, futures, strict=True):
            # A small grace lets the adapter's own deadline fire first and report why.
            wait = min(task.timeout_s, budget) * 1.1 + 0.002 - (time.perf_counter() - started)
            try:
                outcomes.append(fut.result(timeout=max(0.0, wait)))
            except FutureTimeout:
                fut.cancel()
                outcomes.append(None)
            except Exception as exc:
                outcomes.append(exc)
        return self._merge(user_id, item_ids, tasks, outcomes, started, strict)

    async def afetch(self, user_id: Key | None, item_ids: Sequence[Key] = (), *,
                     deadline_ms: float | None = None, strict: bool | None = None) -> FetchResult:
        """The asyncio twin of ``fetch``: reads run on the service's threads, the loop never blocks."""
        started = time.perf_counter()
        tasks, budget = self._plan(user_id, item_ids, deadline_ms)
        waits = [asyncio.wrap_future(self._start(t)) for t in tasks]
        outcomes: list[BatchResult | BaseException | None] = []
        for task, fut in zip(tasks, waits, strict=True):
            wait = min(task.timeout_s, budget) * 1.1 + 0.002 - (time.perf_counter() - started)
            try:
                outcomes.append(await asyncio.wait_for(asyncio.shield(fut), timeout=max(0.0, wait)))
            except TimeoutError:
                fut.cancel()
                outcomes.append(None)
            except Exception as exc:
                outcomes.append(exc)
        return self._merge(user_id, item_ids, tasks, outcomes, started, strict)

    def read_view(self, view: str, keys: Sequence[Key], features: Sequence[str] | None = None, *,
                  timeout_s: float | None = None) -> BatchResult:
        """Read one view directly (no merging, no defaults for missing keys)."""
        dao = self.daos.get(view)
        if dao is None and self.runtime is not None:
            dao = self.runtime.daos.get(view)  # a fallback-only view, read directly
        if dao is None:
            raise KeyError(f"unknown view {view!r}; known: {', '.join(self.views())}")
        return dao.read(keys, features, timeout_s=timeout_s)

    def views(self) -> list[str]:
        """Every view name: served ones, then fallback-only ones."""
        extra = [] if self.runtime is None else [v for v in self.runtime.daos if v not in self.daos]
        return [*self.daos, *extra]

    def invalidate(self, view: str, keys: Sequence[Key]) -> None:
        """Drop keys of a view from every cache tier, in this process and (through L2 pub/sub) all others."""
        dao = self.daos.get(view)
        if dao is None:
            raise KeyError(f"unknown view {view!r}")
        if isinstance(dao, CachedDao):
            dao.invalidate(keys)

    def health(self, timeout_s: float = 2.0) -> list[SourceHealth]:
        """Ping every source concurrently: whether it answers, how fast, and its breaker's state."""
        if self.runtime is None:
            return []
        runtime = self.runtime

        def check(name: str) -> SourceHealth:
            started = time.perf_counter()
            breaker = runtime.breakers[name].state.value
            try:
                runtime.sources[name].ping()
            except Exception as exc:
                mapped = runtime.sources[name].translate(exc)
                return SourceHealth(name, runtime.config.sources[name].type, False,
                                    (time.perf_counter() - started) * 1000, breaker,
                                    f"{type(mapped).__name__}: {mapped}")
            return SourceHealth(name, runtime.config.sources[name].type, True,
                                (time.perf_counter() - started) * 1000, breaker)

        futures = {n: self._pool.submit(check, n) for n in runtime.sources}
        out = []
        for name, fut in futures.items():
            try:
                out.append(fut.result(timeout=timeout_s))
            except FutureTimeout:
                out.append(SourceHealth(name, runtime.config.sources[name].type, False, timeout_s * 1000,
                                        runtime.breakers[name].state.value, "no answer in time"))
        return out

    def close(self) -> None:
        """Stop the worker threads and close every source."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._on_close is not None:
            self._on_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
