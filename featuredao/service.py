"""FeatureService: one user's and many items' features from every view, under a deadline."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from os import PathLike
from types import TracebackType
from typing import Any, Self

from featuredao import factory
from featuredao.config import Config, ServiceConfig, View
from featuredao.dao import FeatureDao
from featuredao.errors import (
    ArgumentTypeError,
    Closed,
    FetchError,
    InvalidKeyError,
    Overloaded,
    UnknownView,
    UsageError,
    reason_of,
)
from featuredao.factory import SourceHealth
from featuredao.lifecycle import Gate, Slots
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
        """Item rows by id (duplicate ids collapse; an id that cannot be a dict key is left out)."""
        return {k: v for k, v in zip(self.item_ids, self.items, strict=True) if isinstance(k, Hashable)}

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape the CLI prints."""
        items = {str(k): v for k, v in zip(self.item_ids, self.items, strict=True)}
        return {"user": self.user, "items": items, "degraded": [d.to_dict() for d in self.degraded]}


@dataclass(slots=True)
class _Task:
    dao: FeatureDao
    keys: list[Key]
    timeout_s: float
    first: bool = True
    """Starts at once (first of its lane): the service may give up on it after its own timeout."""

    @property
    def view(self) -> View:
        return self.dao.view


class FeatureService:
    """What a recommendation service calls: ``fetch`` (threads) or ``await afetch`` (asyncio)."""

    def __init__(self, daos: Mapping[str, FeatureDao], settings: ServiceConfig | None = None, *,
                 on_close: Callable[[], None] | None = None, runtime: factory.Runtime | None = None,
                 metrics: Metrics | None = None) -> None:
        self.daos = dict(daos)
        self.settings = settings or ServiceConfig()
        self.runtime = runtime
        # Fallback-only views: not merged into fetch, but read_view reads them directly.
        self._extra: dict[str, FeatureDao] = dict(runtime.daos) if runtime is not None else {}
        self._metrics = metrics or Metrics()
        self._on_close = on_close
        self._pool = ThreadPoolExecutor(max_workers=self.settings.max_workers,
                                        thread_name_prefix="featuredao-view")
        self._gate = Gate("service")
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.max_in_flight = self.settings.max_in_flight or 4 * max(1, usable)
        self._slots = Slots(self.max_in_flight)
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
    def _tasks(self, user_id: Key | None, item_ids: Sequence[Key],
              deadline_ms: float | None) -> tuple[list[_Task], float]:
        budget = (deadline_ms if deadline_ms is not None else self.settings.deadline_ms) / 1000.0
        tasks = []
        if user_id is not None:
            tasks += [_Task(d, [user_id], self._share(d.view, budget)) for d in self._by_entity["user"]]
        if item_ids:
            tasks += [_Task(d, list(item_ids), self._share(d.view, budget)) for d in self._by_entity["item"]]
        return tasks, budget

    @staticmethod
    def _share(view: View, budget: float) -> float:
        """How long a view may take: its ``timeout_ms``; with a fallback chain, the whole request's
        time (the chain gives the primary its ``timeout_ms`` share and the fallbacks the rest)."""
        return budget if view.fallback else min(budget, view.timeout_ms / 1000.0)

    def _start(self, tasks: list[_Task], deadline: float) -> list[Future[BatchResult]]:
        """Answer from L1 at once where it holds every key; read the rest on workers, lane by lane.

        Views of one source share its pool: at most ``pool_size`` of them run at once, the others
        queue on the same workers (each one's time counted from when it starts, capped by the
        deadline) instead of timing out in the pool and counting as a failure of the store.
        """
        futures: list[Future[BatchResult]] = [Future() for _ in tasks]
        lanes: dict[object, list[list[tuple[_Task, Future[BatchResult]]]]] = {}
        for task, fut in zip(tasks, futures, strict=True):
            started = time.perf_counter()
            hit = task.dao.peek(task.keys)
            if hit is not None:
                self._metrics.read(task.view.name, time.perf_counter() - started, len(task.keys), hit.found)
                fut.set_result(hit)
                continue
            lane = task.dao.lane()
            if lane is None:
                lanes[id(task)] = [[(task, fut)]]
                continue
            group = lanes.setdefault(lane[0], [])
            if len(group) < max(1, lane[1]):
                group.append([(task, fut)])
            else:
                slot = group[sum(len(g) for g in group) % len(group)]
                task.first = False
                slot.append((task, fut))
        for group in lanes.values():
            for queue in group:
                self._submit(queue, deadline)
        return futures

    def _shed(self, tasks: list[_Task]) -> list[BatchResult | BaseException | None]:
        """Too many requests in flight: what L1 holds at once, defaults for the rest, no store read."""
        out: list[BatchResult | BaseException | None] = []
        shed = Overloaded(f"shed: {self.max_in_flight} requests already in flight")
        for task in tasks:
            hit = task.dao.peek(task.keys)
            if hit is None:
                self._metrics.error(task.view.name, Reason.OVERLOADED.value)
            out.append(hit if hit is not None else shed)
        return out

    def _submit(self, queue: list[tuple[_Task, Future[BatchResult]]], deadline: float) -> None:
        try:
            worker = self._pool.submit(self._run_lane, queue, deadline)
        except RuntimeError:  # shut down by close() meanwhile
            worker = None
        if worker is None or worker.cancelled():
            self._fail(queue)
            return
        # Whatever ended the lane (cancelled by close, refused by a closed gate), nobody waits in vain.
        worker.add_done_callback(lambda _: self._fail(queue))

    @staticmethod
    def _fail(queue: list[tuple[_Task, Future[BatchResult]]]) -> None:
        for _, fut in queue:
            if not fut.done():
                fut.set_exception(Closed("the service was closed"))

    def _run_lane(self, queue: list[tuple[_Task, Future[BatchResult]]], deadline: float) -> None:
        with self._gate.admit():
            for task, fut in queue:
                left = deadline - time.perf_counter()
                task.timeout_s = min(task.timeout_s, left)
                if fut.done():
                    continue
                try:
                    fut.set_result(self._read(task))
                except BaseException as exc:  # handed to the waiting request
                    fut.set_exception(exc)

    def _read(self, task: _Task) -> BatchResult:
        started = time.perf_counter()
        try:
            result = task.dao.read(task.keys, timeout_s=max(task.timeout_s, 0.0))
        except Exception as exc:
            self._metrics.error(task.view.name, reason_of(exc).value)
            raise
        self._metrics.read(task.view.name, time.perf_counter() - started, len(task.keys), result.found)
        return result

    @staticmethod
    def _wait_s(task: _Task, started: float, budget: float, admitted: float) -> float:
        """How much longer to wait for a task; a small grace lets the adapter's own deadline fire first.

        A task that starts at once may take its own timeout from when the request was admitted (time
        spent waiting for a slot is not its fault), never past the request's deadline.
        """
        deadline = started + budget * 1.1 + 0.002
        own = admitted + task.timeout_s * 1.1 + 0.002 if task.first else deadline
        return min(own, deadline) - time.perf_counter()

    @staticmethod
    def _failure(task: _Task, exc: BaseException | None) -> Degraded:
        if exc is None:
            detail = f"no answer within {task.timeout_s * 1000:.0f} ms"
            return Degraded(task.view.name, Reason.TIMEOUT, detail)
        reason = reason_of(exc)
        if reason in (Reason.CLOSED, Reason.OVERLOADED):
            # Counted in metrics; a log line per shed view would add load exactly when there is too much.
            log.debug("view %s degraded (%s): %s", task.view.name, reason.value, exc)
        elif reason is Reason.QUERY_ERROR:
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
            names = tuple(map(view.output_name, fields))
            defaults = tuple((view.output_name(f), d) for f, d in view.defaults.items() if d is not None)
            default_row = dict(zip(names, view.default_row().values(), strict=True))
            shape = self._shapes[view.name] = (fields, names, defaults, default_row)
        return shape

    def _output_rows(self, view: View, rows: Sequence[Row | None]) -> list[dict[str, FeatureValue]]:
        """A view's rows under their output names, defaults in place of nulls and missing rows.

        One dict per row, built in C (zip over precomputed names); defaults are looked at only for rows
        that hold a null.
        """
        fields, names, defaults, default_row = self._shape(view)
        out: list[dict[str, FeatureValue]] = []
        append = out.append
        renamed = names != fields
        for row in rows:
            if row is None:
                append(default_row.copy())
                continue
            values = dict(zip(names, map(row.get, fields), strict=True)) \
                if renamed or len(row) != len(fields) else dict(row)
            if defaults and None in values.values():
                for name, default in defaults:
                    if values[name] is None:
                        values[name] = default
            append(values)
        return out

    def _merge(self, user_id: Key | None, item_ids: Sequence[Key], tasks: list[_Task],
               outcomes: list[BatchResult | BaseException | None], started: float,
               strict: bool | None) -> FetchResult:
        user: dict[str, FeatureValue] = {}
        items: list[dict[str, FeatureValue]] | None = None  # built by the first item view
        degraded: list[Degraded] = []
        for task, outcome in zip(tasks, outcomes, strict=True):
            rows: Sequence[Row | None]
            if isinstance(outcome, BatchResult):
                rows = outcome.rows
                degraded.extend(outcome.degraded)
            else:
                rows = [None] * len(task.keys)
                degraded.append(self._failure(task, outcome))
            built = self._output_rows(task.view, rows)
            if task.view.entity == "user":
                user.update(built[0])
            elif items is None:
                items = built  # the first view of the items: its rows are the output rows
            else:
                for target, values in zip(items, built, strict=True):
                    target.update(values)
        if items is None:
            items = [{} for _ in item_ids]
        result = FetchResult(user_id if user_id is not None else "", user, list(item_ids), items,
                             degraded, time.perf_counter() - started)
        invalid = {d.view: [str(k) for k in d.keys] for d in degraded if d.reason is Reason.INVALID_KEY}
        if invalid:
            # One line per request: a caller's bad input is not worth a line per view, nor a traceback.
            log.warning("keys that cannot be keys of their view were answered missing: %s", invalid)
        if degraded and (self.settings.strict if strict is None else strict):
            if invalid:
                raise InvalidKeyError(invalid)
            raise FetchError(degraded)
        return result

    def _arguments(self, item_ids: Iterable[Key], deadline_ms: float | None) -> list[Key]:
        """The item ids as a list, checked with the deadline before any work starts."""
        if isinstance(item_ids, str | bytes | bytearray):
            raise ArgumentTypeError("item_ids must be a sequence of ids, not one str or bytes "
                                    f"(got {item_ids[:40]!r})")
        items = list(item_ids)
        limit = self.settings.max_keys_per_request
        if len(items) > limit:
            raise UsageError(f"{len(items)} item ids is more than service.max_keys_per_request ({limit})")
        if deadline_ms is not None and (isinstance(deadline_ms, bool)
                                        or not isinstance(deadline_ms, int | float)
                                        or not math.isfinite(deadline_ms) or deadline_ms <= 0):
            raise UsageError(f"deadline_ms must be a positive number of milliseconds (got {deadline_ms!r})")
        return items

    # -- entry points --------------------------------------------------------------------
    def fetch(self, user_id: Key | None, item_ids: Iterable[Key] = (), *,
              deadline_ms: float | None = None, strict: bool | None = None) -> FetchResult:
        """Fetch the user's and the items' features; degraded views give defaults, never raise."""
        started = time.perf_counter()
        self._check_open()
        item_ids = self._arguments(item_ids, deadline_ms)
        tasks, budget = self._tasks(user_id, item_ids, deadline_ms)
        if not self._slots.acquire(budget * self.settings.admission_wait):
            return self._merge(user_id, item_ids, tasks, self._shed(tasks), started, strict)
        try:
            admitted = time.perf_counter()
            futures = self._start(tasks, started + budget)
            outcomes: list[BatchResult | BaseException | None] = []
            for task, fut in zip(tasks, futures, strict=True):
                wait = self._wait_s(task, started, budget, admitted)
                try:
                    outcomes.append(fut.result(timeout=max(0.0, wait)))
                except FutureTimeout:
                    fut.cancel()  # a lane skips a task nobody waits for any more
                    outcomes.append(None)
                except (Exception, CancelledError) as exc:
                    outcomes.append(exc)
        finally:
            self._slots.release()
        return self._merge(user_id, item_ids, tasks, outcomes, started, strict)

    async def afetch(self, user_id: Key | None, item_ids: Iterable[Key] = (), *,
                     deadline_ms: float | None = None, strict: bool | None = None) -> FetchResult:
        """The asyncio twin of ``fetch``: reads run on the service's threads, the loop never blocks."""
        started = time.perf_counter()
        self._check_open()
        item_ids = self._arguments(item_ids, deadline_ms)
        tasks, budget = self._tasks(user_id, item_ids, deadline_ms)
        if not await self._slots.acquire_async(budget * self.settings.admission_wait):
            return self._merge(user_id, item_ids, tasks, self._shed(tasks), started, strict)
        try:
            return await self._afetch_admitted(user_id, item_ids, tasks, started, budget, strict)
        finally:
            self._slots.release()

    async def _afetch_admitted(self, user_id: Key | None, item_ids: Sequence[Key], tasks: list[_Task],
                               started: float, budget: float, strict: bool | None) -> FetchResult:
        admitted = time.perf_counter()
        waits = [asyncio.wrap_future(f) for f in self._start(tasks, started + budget)]
        outcomes: list[BatchResult | BaseException | None] = []
        for task, fut in zip(tasks, waits, strict=True):
            wait = self._wait_s(task, started, budget, admitted)
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
        self._check_open()
        return self._view(view, self._extra).read(keys, features, timeout_s=timeout_s)

    def view(self, name: str) -> View:
        """The configuration of a view (served or fallback-only)."""
        return self._view(name, self._extra).view

    def views(self) -> list[str]:
        """Every view name: served ones, then fallback-only ones."""
        return [*self.daos, *(v for v in self._extra if v not in self.daos)]

    def invalidate(self, view: str, keys: Sequence[Key]) -> None:
        """Drop keys of a view from every cache tier, in this process and (through L2 pub/sub) all others."""
        self._view(view).invalidate(keys)

    def _view(self, name: str, extra: Mapping[str, FeatureDao] | None = None) -> FeatureDao:
        dao = self.daos.get(name) or (extra or {}).get(name)
        if dao is None:
            raise UnknownView(f"unknown view {name!r}; known: {', '.join(self.views())}")
        return dao

    def health(self, timeout_s: float = 2.0) -> list[SourceHealth]:
        """Ping every source concurrently: whether it answers, how fast, and its breaker's state."""
        return [] if self.runtime is None else self.runtime.health(timeout_s)

    def _check_open(self) -> None:
        if self._gate.closed:
            raise Closed("the service is closed")

    def close(self, timeout_s: float = 0.5) -> None:
        """Refuse new requests, stop the sources' work in flight, then the workers; idempotent.

        Requests in flight get their answers (degraded ``closed`` where a read was cut); a request
        that arrives after ``close`` raises :class:`~featuredao.errors.Closed`.
        """
        if not self._gate.shut():
            return
        if self._on_close is not None:
            self._on_close()  # each source: refuse, interrupt, wait for its work, then free the pool
        self._pool.shutdown(wait=False, cancel_futures=True)
        left = self._gate.drain(timeout_s)
        if left:
            log.warning("service closed with %d worker(s) still running after %.1f s", left, timeout_s)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
