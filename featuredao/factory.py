"""Build sources and DAOs from a validated configuration."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

from featuredao import config as config_mod
from featuredao import registry
from featuredao.cache import CachedDao
from featuredao.config import CacheConfig, Config
from featuredao.dao import BaseDao, FeatureDao, Source
from featuredao.lifecycle import close_together
from featuredao.metrics import Metrics
from featuredao.resilience import CircuitBreaker, ResilientDao
from featuredao.sequence_merge import JoinedSequences, MergedSequences

log = logging.getLogger("featuredao")


@dataclass(frozen=True, slots=True)
class SourceHealth:
    """One source's answer to a ping."""

    source: str
    type: str
    ok: bool
    latency_ms: float
    breaker: str
    error: str = ""


class Holders:
    """How many runtimes hold each source and DAO: a runtime's close frees only what no other one holds.

    Runtimes built one from another (``build(..., previous=)``) share one of these.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, tuple[object, int]] = {}  # the object itself keeps its id from being reused

    def hold(self, thing: object) -> None:
        with self._lock:
            count = self._held.get(id(thing), (thing, 0))[1]
            self._held[id(thing)] = (thing, count + 1)

    def release(self, thing: object) -> bool:
        """Drop one hold; True when nobody holds it any more (the caller closes it)."""
        with self._lock:
            count = self._held.get(id(thing), (thing, 1))[1] - 1
            if count > 0:
                self._held[id(thing)] = (thing, count)
                return False
            self._held.pop(id(thing), None)
            return True

    def held(self, thing: object) -> bool:
        with self._lock:
            return id(thing) in self._held


@dataclass
class Runtime:
    """Everything a configuration builds: sources, plain view DAOs and the composed ones a service serves."""

    config: Config
    sources: dict[str, Source] = field(default_factory=dict)
    daos: dict[str, BaseDao] = field(default_factory=dict)
    """Each view's own DAO, straight on its store."""
    served: dict[str, FeatureDao] = field(default_factory=dict)
    """Each served view (fallback-only views excluded) wrapped in breaker, fallbacks and cache."""
    breakers: dict[str, CircuitBreaker] = field(default_factory=dict)
    holders: Holders = field(default_factory=Holders, repr=False)
    kept: frozenset[str] = frozenset()
    """Served views taken over from the runtime this one was built from, with their L1 caches."""
    _closed: bool = field(default=False, repr=False)

    def close(self) -> None:
        """Close every source at once (refuse, interrupt, wait for its work, free its pool), waiting at most
        its ``close_timeout_s`` in all (a source still freeing then ends on its own), then every DAO.

        Idempotent. What a runtime built from this one took over stays open until that one closes too.
        """
        if self._closed:
            return
        self._closed = True
        closing = [s for s in self.sources.values() if self.holders.release(s)]
        # At once: several frozen stores cost the close one bound, not one each.
        close_together({f"source {s.name}": s.close for s in closing},
                       max((s.close_timeout_s for s in closing), default=0.0))
        daos = {id(d): d for d in [*self.served.values(), *self.daos.values()]}
        for dao in daos.values():
            if not self.holders.release(dao):
                continue
            try:
                dao.close()
            except Exception:
                log.exception("closing view %s failed", dao.view.name)

    def health(self, timeout_s: float = 2.0) -> list[SourceHealth]:
        """Ping every source concurrently: whether it answers, how fast, and its breaker's state."""
        def check(name: str) -> SourceHealth:
            source, kind = self.sources[name], self.config.sources[name].type
            breaker = self.breakers[name].state.value
            started = time.perf_counter()
            try:
                with source.operation():
                    source.ping()
            except Exception as exc:
                return SourceHealth(name, kind, False, (time.perf_counter() - started) * 1000, breaker,
                                    f"{type(exc).__name__}: {exc}")
            return SourceHealth(name, kind, True, (time.perf_counter() - started) * 1000, breaker)

        if not self.sources:
            return []
        # Not a with-block: leaving one waits for every ping, and a hung store must not hold the caller.
        pool = ThreadPoolExecutor(max_workers=len(self.sources), thread_name_prefix="featuredao-health")
        futures = {n: pool.submit(check, n) for n in self.sources}
        out = []
        for name, fut in futures.items():
            try:
                out.append(fut.result(timeout=timeout_s))
            except FutureTimeout:
                out.append(SourceHealth(name, self.config.sources[name].type, False, timeout_s * 1000,
                                        self.breakers[name].state.value, "no answer in time"))
        pool.shutdown(wait=False, cancel_futures=True)
        return out


def build(cfg: Config | str | PathLike[str] | Mapping[str, Any], metrics: Metrics | None = None, *,
          previous: Runtime | None = None) -> Runtime:
    """Create every source and view DAO; adapters connect lazily, so a down store does not fail this.

    ``previous``: a running runtime to take over from. Its sources whose settings are unchanged are used
    as they are (pool, breaker), and so are its served views whose settings, fallbacks, merged and
    joined views and sources are all unchanged (with their L1 caches). Each runtime's ``close`` then
    frees only what the other does not hold, whichever closes first.
    """
    if not isinstance(cfg, Config):
        cfg = config_mod.load(cfg)
    metrics = metrics or Metrics()
    carried = Carry.of(previous, cfg) if previous is not None else Carry()
    runtime = Runtime(cfg, holders=previous.holders if previous is not None else Holders(),
                      kept=frozenset(carried.served))
    try:
        for name, spec in cfg.sources.items():
            if previous is not None and name in carried.sources:
                runtime.sources[name] = previous.sources[name]
                runtime.breakers[name] = previous.breakers[name]
            else:
                runtime.sources[name] = registry.get_adapter(spec.type)(name, spec.options)
                runtime.breakers[name] = CircuitBreaker(name, spec.circuit_breaker, metrics)
            runtime.holders.hold(runtime.sources[name])
        for name, view in cfg.views.items():
            if previous is not None and name in carried.daos:
                runtime.daos[name] = previous.daos[name]
            else:
                runtime.daos[name] = runtime.sources[view.source].dao(view)
            runtime.holders.hold(runtime.daos[name])
        aside = cfg.fallback_only | cfg.merge_only
        # Table views first: a sequence view joins the item view a request serves (one cache, not two).
        order = sorted((n for n in cfg.views if n not in aside),
                       key=lambda n: cfg.views[n].kind == "sequence")
        for name in order:
            if previous is not None and name in carried.served:
                runtime.served[name] = previous.served[name]
            else:
                runtime.served[name] = compose(runtime, name, metrics)
            runtime.holders.hold(runtime.served[name])
        runtime.served = {n: runtime.served[n] for n in cfg.views if n in runtime.served}
    except BaseException:
        runtime.close()
        raise
    return runtime


@dataclass
class Carry:
    """What a new runtime takes over from the one it replaces: source, view DAO and served view names."""

    sources: set[str] = field(default_factory=set)
    daos: set[str] = field(default_factory=set)
    served: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, previous: Runtime, cfg: Config) -> Carry:
        """Unchanged sources, and served views whose every part is unchanged and safe to share."""
        old = previous.config
        sources = {n for n, spec in cfg.sources.items()
                   if n in previous.sources and old.sources.get(n) == spec
                   and previous.holders.held(previous.sources[n]) and not previous.sources[n].closed}

        def same(name: str) -> bool:
            view = cfg.views[name]
            tiers = view.cache
            return (old.views.get(name) == view and view.source in sources
                    and (tiers is None or tiers.l2 is None or tiers.l2.source in sources))

        served = {n for n in cfg.views if n not in cfg.fallback_only | cfg.merge_only}
        parts = {n: _parts(cfg, n) for n in served}
        kept = {n for n in served if n in previous.served and previous.holders.held(previous.served[n])
                and all(same(v) for v in parts[n])}
        while True:
            # Closing a served view the old runtime does not hand over closes its own DAO and its
            # fallbacks' (merge and join wrappers close nothing they wrap): none of those may be shared.
            freed = {v for n in previous.served if n not in kept for v in (n, *old.views[n].fallback)}
            # A kept view that joins a served item view shares that view's cache: both kept, or neither.
            still = {n for n in kept if not parts[n] & freed
                     and all(j in kept for j in _joins(cfg, parts[n]) if j in served)}
            if still == kept:
                break
            kept = still
        daos = {v for n in kept for v in parts[n]}
        return cls(sources, daos, kept)


def _parts(cfg: Config, name: str) -> set[str]:
    """Every view a served view's composition reads: itself, its fallbacks, merged and joined views."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        view = cfg.views[todo.pop()]
        if view.name in seen:
            continue
        seen.add(view.name)
        todo.extend(view.fallback)
        if view.sequence is not None:
            todo.extend(view.sequence.merge)
            if view.sequence.join is not None:
                todo.append(view.sequence.join.view)
    return seen


def _joins(cfg: Config, names: set[str]) -> set[str]:
    """The item views these views join."""
    return {seq.join.view for n in names if (seq := cfg.views[n].sequence) is not None and seq.join}


def compose(runtime: Runtime, name: str, metrics: Metrics | None = None, *,
            cache: CacheConfig | bool | None = True) -> FeatureDao:
    """Cache(Resilient(view, fallbacks=[Resilient(fallback), ...])): cache hits skip everything else.

    A sequence view is then merged with the views it names in ``merge`` (each composed the same way)
    and joined with its item view. ``cache``: True uses the view's own cache config, False none, a
    ``CacheConfig`` that one instead.
    """
    cfg = runtime.config
    view = cfg.views[name]
    metrics = metrics or Metrics.disabled()

    def guarded(view_name: str, fallbacks: list[FeatureDao]) -> ResilientDao:
        source = cfg.views[view_name].source
        return ResilientDao(runtime.daos[view_name], runtime.breakers[source], cfg.sources[source].retries,
                            fallbacks, view.fallback_on_missing, metrics,
                            hedge_ms=view.hedge_ms if fallbacks else None)

    dao: FeatureDao = guarded(name, [guarded(f, []) for f in view.fallback])
    tiers = view.cache if cache is True else cache or None
    if tiers is not None:
        l2 = runtime.sources[tiers.l2.source].key_value() if tiers.l2 is not None else None
        dao = CachedDao(dao, tiers, l2, metrics)
    if view.sequence is not None and view.sequence.merge:
        dao = MergedSequences(dao, [compose(runtime, other, metrics, cache=cache)
                                    for other in view.sequence.merge])
    if view.sequence is not None and view.sequence.join is not None:
        joined = view.sequence.join.view
        items = runtime.served.get(joined) or compose(runtime, joined, metrics, cache=cache)
        dao = JoinedSequences(dao, items)
    return dao
