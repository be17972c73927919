"""FeatureService: one user's and many items' features from every view, under a deadline."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from os import PathLike
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from featuredao import factory, stages
from featuredao._service_reads import ServiceReads
from featuredao.config import Config, ServiceConfig, View
from featuredao.dao import FeatureDao
from featuredao.deadline import Deadline
from featuredao.errors import (
    ArgumentTypeError,
    Closed,
    FetchError,
    InvalidKeyError,
    UnknownView,
    UsageError,
)
from featuredao.factory import SourceHealth
from featuredao.lifecycle import Gate, Slots
from featuredao.metrics import Metrics
from featuredao.request import Part, Request, Shape, shape
from featuredao.types import (
    BatchResult,
    CoercionError,
    Degraded,
    FeatureType,
    FeatureValue,
    Key,
    Reason,
    coerce,
)

if TYPE_CHECKING:  # asyncio is imported where a loop runs: at import it costs start-up ~10%
    pass

log = logging.getLogger("featuredao")

REQUEST_TIME = "request_time"
"""The context feature a request's time comes in (epoch seconds): accepted even when not declared."""


@dataclass
class FetchResult:
    """Merged features: the user's, and each item's in input order, plus what was degraded."""

    user_id: Key
    user: dict[str, FeatureValue]
    item_ids: list[Key]
    items: list[dict[str, FeatureValue]]
    degraded: list[Degraded] = field(default_factory=list)
    elapsed_s: float = 0.0
    entities: dict[str, dict[str, FeatureValue]] = field(default_factory=dict)
    """Rows of the other request-level entities (``fetch(keys=...)``), by entity."""
    context: dict[str, FeatureValue] = field(default_factory=dict)
    """The request's context features, validated, defaults filled in."""
    missing: dict[str, list[Key]] = field(default_factory=dict)
    """Per view, the keys it read and did not find (or found too old): an unknown user shows here."""

    def items_by_id(self) -> dict[Key, dict[str, FeatureValue]]:
        """Item rows by id (duplicate ids collapse; an id that cannot be a dict key is left out)."""
        return {k: v for k, v in zip(self.item_ids, self.items, strict=True) if isinstance(k, Hashable)}

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape the CLI prints."""
        items = {str(k): v for k, v in zip(self.item_ids, self.items, strict=True)}
        out: dict[str, Any] = {"user": self.user, "items": items}
        if self.entities:
            out["entities"] = self.entities
        if self.context:
            out["context"] = self.context
        out["missing"] = {view: [str(k) for k in keys] for view, keys in self.missing.items()}
        out["degraded"] = [d.to_dict() for d in self.degraded]
        return out


def _cancelling() -> bool:
    """Whether the running task itself is being cancelled (not merely something it awaited)."""
    import asyncio
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class FeatureService(ServiceReads):
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
        self._shapes: dict[str, Shape] = {}
        served = {name: dao.view for name, dao in self.daos.items()}
        # Views keyed by other views' features run after them: stages in dependency order.
        self._stages = [[self.daos[name] for name in stage] for stage in stages.plan(served)]
        self._own_keys = stages.request_keys(served)
        self._entities = {view.entity for view in served.values()} - {"user", "item"}
        self.context_features = dict(runtime.config.context) if runtime is not None else {}
        self.derived = list(runtime.config.derived) if runtime is not None else []
        self.scenes = dict(runtime.config.scenes) if runtime is not None else {}
        # Per scene, the same stages restricted to its views (validated to include what they are keyed by).
        self._scene_stages = {
            name: [kept for stage in self._stages
                   if (kept := [d for d in stage if d.view.name in spec.views])]
            for name, spec in self.scenes.items()}
        # What reload() re-reads (from_config records the file or dict it was given), one reload at a time.
        self._origin: Config | str | PathLike[str] | Mapping[str, Any] | None = (
            runtime.config if runtime is not None else None)
        self._reload_lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: Config | str | PathLike[str] | Mapping[str, Any]) -> FeatureService:
        """Build every source and view from a config file, dict or Config."""
        metrics = Metrics()
        runtime = factory.build(cfg, metrics)
        service = cls(runtime.served, runtime.config.service, on_close=runtime.close, runtime=runtime,
                      metrics=metrics)
        service._origin = cfg
        return service

    # -- planning and merging are shared by fetch and afetch -----------------------------
    @staticmethod
    def _share(view: View, budget: float) -> float:
        """How long a view may take: its ``timeout_ms``; with a fallback chain, the whole request's
        time (the chain gives the primary its ``timeout_ms`` share and the fallbacks the rest)."""
        return budget if view.fallback else min(budget, view.timeout_ms / 1000.0)

    def _shape(self, view: View) -> Shape:
        found = self._shapes.get(view.name)
        if found is None:
            found = self._shapes[view.name] = shape(view)
        return found

    def _parts(self, request: Request, stage: list[FeatureDao], budget: float) -> list[Part]:
        parts = []
        for dao in stage:
            part = request.part(dao, self._share(dao.view, budget), self._own_keys)
            if part is not None:
                parts.append(part)
        return parts

    def _absorb(self, request: Request, parts: list[Part],
                outcomes: list[BatchResult | BaseException | None]) -> None:
        now = time.time()
        for part, outcome in zip(parts, outcomes, strict=True):
            request.absorb(part, outcome, self._shape(part.view), now)

    def _result(self, request: Request, context: dict[str, FeatureValue], started: float,
                strict: bool | None) -> FetchResult:
        if self.derived:
            request.derive(self.derived, context, self._own_keys)
        degraded = request.degraded
        result = FetchResult(request.user_id if request.user_id is not None else "", request.user,
                             request.item_ids, request.items, degraded, time.perf_counter() - started,
                             request.entities, context, request.missing)
        invalid = {d.view: [str(k) for k in d.keys] for d in degraded if d.reason is Reason.INVALID_KEY}
        if invalid:
            # One line per request: a caller's bad input is not worth a line per view, nor a traceback.
            log.warning("keys that cannot be keys of their view were answered missing: %s", invalid)
        if degraded and (self.settings.strict if strict is None else strict):
            if invalid:
                raise InvalidKeyError(invalid)
            raise FetchError(degraded)
        return result

    def _context(self, given: Mapping[str, Any] | None,
                 degraded: list[Degraded]) -> dict[str, FeatureValue]:
        """The request's context: declared features, coerced; unknown names are the caller's error."""
        given = given or {}
        unknown = sorted(set(given) - set(self.context_features) - {REQUEST_TIME})
        if unknown:
            known = ", ".join(self.context_features) or "none declared"
            raise UsageError(f"unknown context features {unknown}; known: {known}")
        out: dict[str, FeatureValue] = {}
        for name, feature in self.context_features.items():
            value = given.get(name)
            if value is None:
                out[name] = feature.default
                continue
            try:
                out[name] = coerce(value, feature.type)
            except CoercionError as exc:
                out[name] = feature.default
                degraded.append(Degraded("context", Reason.COERCION, f"{name}: {exc}", (), name))
        if REQUEST_TIME not in self.context_features and given.get(REQUEST_TIME) is not None:
            # Always accepted: where sequence windows end (epoch seconds), e.g. to replay a past request.
            try:
                out[REQUEST_TIME] = coerce(given[REQUEST_TIME], FeatureType.FLOAT)
            except CoercionError as exc:
                degraded.append(Degraded("context", Reason.COERCION, f"{REQUEST_TIME}: {exc}", (),
                                         REQUEST_TIME))
        return out

    def _request_keys(self, keys: Mapping[str, Key] | None) -> dict[str, Key]:
        keys = dict(keys or {})
        unknown = sorted(set(keys) - self._entities)
        if unknown:
            known = ", ".join(sorted(self._entities)) or "none"
            raise UsageError(f"keys for unknown entities {unknown}; entities with views: {known}")
        return keys

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
              context: Mapping[str, Any] | None = None, keys: Mapping[str, Key] | None = None,
              scene: str | None = None, deadline_ms: float | None = None,
              strict: bool | None = None) -> FetchResult:
        """Fetch the user's, the items' and the other entities' features; degraded views give defaults,
        never raise (but for the caller's own errors: see ``UsageError``)."""
        started = time.perf_counter()
        request, ctx, budget, plan = self._begin(user_id, item_ids, context, keys, scene, deadline_ms)
        deadline = Deadline.after(budget, start=started)  # the request's one deadline, passed down
        if not self._slots.acquire(budget * self.settings.admission_wait):
            return self._shed_request(request, plan, budget, ctx, started, strict)
        try:
            for stage in plan:
                parts = self._parts(request, stage, budget)
                begun = time.perf_counter()
                futures = self._start(parts, deadline, inline=True)
                outcomes: list[BatchResult | BaseException | None] = []
                for part, fut in zip(parts, futures, strict=True):
                    wait = self._wait_s(part, started, budget, begun)
                    try:
                        outcomes.append(fut.result(timeout=max(0.0, wait)))
                    except FutureTimeout:
                        fut.cancel()  # a lane skips a part nobody waits for any more
                        outcomes.append(None)
                    except (Exception, CancelledError) as exc:
                        outcomes.append(exc)
                self._absorb(request, parts, outcomes)
        finally:
            self._slots.release()
        return self._result(request, ctx, started, strict)

    async def afetch(self, user_id: Key | None, item_ids: Iterable[Key] = (), *,
                     context: Mapping[str, Any] | None = None, keys: Mapping[str, Key] | None = None,
                     scene: str | None = None, deadline_ms: float | None = None,
                     strict: bool | None = None) -> FetchResult:
        """The asyncio twin of ``fetch``: a view whose driver has an asyncio client is read on the loop,
        the others on the service's threads; the loop never blocks."""
        import asyncio
        started = time.perf_counter()
        request, ctx, budget, plan = self._begin(user_id, item_ids, context, keys, scene, deadline_ms)
        deadline = Deadline.after(budget, start=started)
        if not await self._slots.acquire_async(budget * self.settings.admission_wait):
            return self._shed_request(request, plan, budget, ctx, started, strict)
        try:
            for stage in plan:
                parts = self._parts(request, stage, budget)
                begun = time.perf_counter()
                waits = self._astart(parts, deadline)
                outcomes: list[BatchResult | BaseException | None] = []
                for part, fut in zip(parts, waits, strict=True):
                    wait = self._wait_s(part, started, budget, begun)
                    try:
                        outcomes.append(await asyncio.wait_for(asyncio.shield(fut), timeout=max(0.0, wait)))
                    except TimeoutError:
                        fut.cancel()
                        outcomes.append(None)
                    except asyncio.CancelledError:
                        if fut.cancelled() and not _cancelling():
                            outcomes.append(None)  # the part was stopped (close): not this request
                        else:
                            raise
                    except Exception as exc:
                        outcomes.append(exc)
                self._absorb(request, parts, outcomes)
        finally:
            self._slots.release()
        return self._result(request, ctx, started, strict)

    def _shed_request(self, request: Request, plan: list[list[FeatureDao]], budget: float,
                      ctx: dict[str, FeatureValue], started: float, strict: bool | None) -> FetchResult:
        """No slot in time: every stage answered at once from L1 and defaults, no store read."""
        for stage in plan:
            parts = self._parts(request, stage, budget)
            self._absorb(request, parts, self._shed(parts))
        return self._result(request, ctx, started, strict)

    def _begin(self, user_id: Key | None, item_ids: Iterable[Key], context: Mapping[str, Any] | None,
               keys: Mapping[str, Key] | None, scene: str | None, deadline_ms: float | None
               ) -> tuple[Request, dict[str, FeatureValue], float, list[list[FeatureDao]]]:
        """Check the arguments (the caller's errors raise here, before any work) and set the request up."""
        self._check_open()
        items = self._arguments(item_ids, deadline_ms)
        plan = self._stages
        default_ms: float = self.settings.deadline_ms
        if scene is not None:
            if scene not in self.scenes:
                known = ", ".join(self.scenes) or "none configured"
                raise UsageError(f"unknown scene {scene!r}; known: {known}")
            plan = self._scene_stages[scene]
            default_ms = self.scenes[scene].deadline_ms or default_ms
        budget = (deadline_ms if deadline_ms is not None else default_ms) / 1000.0
        request = Request(user_id, items, self._request_keys(keys))
        ctx = self._context(context, request.degraded)
        at = ctx.get(REQUEST_TIME)
        request.as_of = float(at) if isinstance(at, int | float) and not isinstance(at, bool) else None
        return request, ctx, budget, plan

    def read_view(self, view: str, keys: Sequence[Key], features: Sequence[str] | None = None, *,
                  timeout_s: float | None = None, as_of: float | None = None) -> BatchResult:
        """Read one view directly (no merging, no defaults for missing keys)."""
        self._check_open()
        return self._view(view, self._extra).read(keys, features, timeout_s=timeout_s, as_of=as_of)

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
        bound = Deadline.after(timeout_s)  # one bound for the sources' close and the workers' drain
        if self._on_close is not None:
            self._on_close()  # every source at once: refuse, interrupt, wait for its work, free the pool
        self._pool.shutdown(wait=False, cancel_futures=True)
        left = self._gate.drain(bound.remaining() or 0.0)
        if left:
            log.warning("service closed with %d worker(s) still running after %.1f s", left, timeout_s)

    def reload(self, cfg: Config | str | PathLike[str] | Mapping[str, Any] | None = None, *,
               drain_s: float | None = None) -> factory.Runtime:
        """Swap in a new config; unchanged sources keep their pools, unchanged views their L1 caches.

        ``cfg`` None: the config the service was built from, read again. The new config is loaded and
        built in full first: a bad one raises ConfigError (a store error its adapter's) and the service
        goes on as it was. The swap is one step: a request that started before it reads the views it
        started with (merged and derived under the new config), and what the new config no longer uses
        is closed once such requests are done, at most ``drain_s`` later (default: the old config's
        longest deadline), reads still running then are cut as by ``close``. ``service.max_workers``
        and ``max_in_flight`` keep their running values. Returns the new runtime.
        """
        with self._reload_lock:
            self._check_open()
            old = self.runtime
            if old is None or self._origin is None or self._on_close != old.close:
                raise UsageError("only a service built by from_config can reload: it owns its runtime")
            runtime = factory.build(self._origin if cfg is None else cfg, self._metrics, previous=old)
            try:
                fresh = FeatureService(runtime.served, runtime.config.service, on_close=runtime.close,
                                       runtime=runtime, metrics=self._metrics)
                fresh._pool.shutdown(wait=False)  # never started: requests keep this service's workers
                for dao in fresh.daos.values():
                    fresh._shape(dao.view)  # filled before the swap: a late old request cannot seed it
            except BaseException:
                runtime.close()
                raise
            own = {"_pool", "_gate", "_slots", "max_in_flight", "_metrics", "_origin", "_reload_lock"}
            state = {k: v for k, v in vars(fresh).items() if k not in own}
            if cfg is not None and not isinstance(cfg, Config):
                state["_origin"] = cfg
            before = dict(vars(self))  # holds the old values: nothing is freed (no code runs) mid-update
            vars(self).update(state)
            del before
            if self._gate.closed:  # closed during the build: close() closed the old runtime, not this one
                runtime.close()
                return runtime
            longest = max([old.config.service.deadline_ms,
                           *(s.deadline_ms or 0 for s in old.config.scenes.values())]) / 1000
            time.sleep(max(0.0, longest * 1.1 + 0.01 if drain_s is None else drain_s))
            old.close()  # frees only what the new runtime did not take over
            return runtime

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
