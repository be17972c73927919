"""Build sources and DAOs from a validated configuration."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

from featuredao import config as config_mod
from featuredao import registry
from featuredao.cache import CachedDao
from featuredao.config import Config
from featuredao.dao import FeatureDao, Source
from featuredao.metrics import Metrics
from featuredao.resilience import CircuitBreaker, ResilientDao

log = logging.getLogger("featuredao")


@dataclass
class Runtime:
    """Everything a configuration builds: sources, plain view DAOs and the composed ones a service serves."""

    config: Config
    sources: dict[str, Source] = field(default_factory=dict)
    daos: dict[str, FeatureDao] = field(default_factory=dict)
    """Each view's own DAO, straight on its store."""
    served: dict[str, FeatureDao] = field(default_factory=dict)
    """Each served view (fallback-only views excluded) wrapped in breaker, fallbacks and cache."""
    breakers: dict[str, CircuitBreaker] = field(default_factory=dict)

    def close(self) -> None:
        """Close every DAO, then every source (their pools)."""
        for dao in [*self.served.values(), *self.daos.values()]:
            try:
                dao.close()
            except Exception:
                log.exception("closing view %s failed", dao.view.name)
        for source in self.sources.values():
            try:
                source.close()
            except Exception:  # closing must go on for the others
                log.exception("closing source %s failed", source.name)


def build(cfg: Config | str | PathLike[str] | Mapping[str, Any], metrics: Metrics | None = None) -> Runtime:
    """Create every source and view DAO; adapters connect lazily, so a down store does not fail this."""
    if not isinstance(cfg, Config):
        cfg = config_mod.load(cfg)
    metrics = metrics or Metrics()
    runtime = Runtime(cfg)
    try:
        for name, spec in cfg.sources.items():
            runtime.sources[name] = registry.get_adapter(spec.type)(name, spec.options)
            runtime.breakers[name] = CircuitBreaker(name, spec.circuit_breaker, metrics)
        for name, view in cfg.views.items():
            runtime.daos[name] = runtime.sources[view.source].dao(view)
        fallback_only = cfg.fallback_only
        for name, view in cfg.views.items():
            if name in fallback_only:
                continue
            runtime.served[name] = _compose(runtime, view.name, metrics)
    except BaseException:
        runtime.close()
        raise
    return runtime


def _compose(runtime: Runtime, name: str, metrics: Metrics) -> FeatureDao:
    """Cache(Resilient(view, fallbacks=[Resilient(fallback), ...])): cache hits skip everything else."""
    cfg = runtime.config
    view = cfg.views[name]

    def guarded(view_name: str, fallbacks: list[FeatureDao]) -> ResilientDao:
        source = cfg.views[view_name].source
        return ResilientDao(runtime.daos[view_name], runtime.breakers[source], cfg.sources[source].retries,
                            fallbacks, view.fallback_on_missing, metrics)

    dao: FeatureDao = guarded(name, [guarded(f, []) for f in view.fallback])
    if view.cache is not None:
        l2 = runtime.sources[view.cache.l2.source].key_value() if view.cache.l2 is not None else None
        dao = CachedDao(dao, view.cache, l2, metrics)
    return dao
