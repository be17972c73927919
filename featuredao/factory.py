"""Build sources and DAOs from a validated configuration."""

from __future__ import annotations

import logging
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

    def close(self) -> None:
        """Close every source (refuse, interrupt, wait for its work, free its pool), then every DAO."""
        for source in self.sources.values():
            try:
                source.close()
            except Exception:  # closing must go on for the others
                log.exception("closing source %s failed", source.name)
        for dao in [*self.served.values(), *self.daos.values()]:
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


def build(cfg: Config | str | PathLike[str] | Mapping[str, Any], metrics: Metrics | None = None) -> Runtime:
    """Create every source and view DAO; adapters connect lazily, so a down store does not fail this."""
    if not isinstance(cfg, Config):
        cfg = config_mod.load(cfg)
    metrics = metrics or Metrics()
    runtime = Runtime(cfg)
    try:
        for name, spec in cfg.sources.items():
            source: Source = registry.get_adapter(spec.type)(name, spec.options)
            runtime.sources[name] = source
            runtime.breakers[name] = CircuitBreaker(name, spec.circuit_breaker, metrics)
        for name, view in cfg.views.items():
            runtime.daos[name] = runtime.sources[view.source].dao(view)
        aside = cfg.fallback_only | cfg.merge_only
        # Table views first: a sequence view joins the item view a request serves (one cache, not two).
        order = sorted((n for n in cfg.views if n not in aside),
                       key=lambda n: cfg.views[n].kind == "sequence")
        for name in order:
            runtime.served[name] = compose(runtime, name, metrics)
        runtime.served = {n: runtime.served[n] for n in cfg.views if n in runtime.served}
    except BaseException:
        runtime.close()
        raise
    return runtime


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
