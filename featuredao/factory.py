"""Build sources and DAOs from a validated configuration."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

from featuredao import config as config_mod
from featuredao import registry
from featuredao.config import Config
from featuredao.dao import FeatureDao, Source

log = logging.getLogger("featuredao")


@dataclass
class Runtime:
    """Everything a configuration builds: one Source per source, one FeatureDao per view."""

    config: Config
    sources: dict[str, Source] = field(default_factory=dict)
    daos: dict[str, FeatureDao] = field(default_factory=dict)

    def close(self) -> None:
        """Close every DAO, then every source (their pools)."""
        for dao in self.daos.values():
            dao.close()
        for source in self.sources.values():
            try:
                source.close()
            except Exception:  # closing must go on for the others
                log.exception("closing source %s failed", source.name)


def build(cfg: Config | str | PathLike[str] | Mapping[str, Any]) -> Runtime:
    """Create every source and view DAO; adapters connect lazily, so a down store does not fail this."""
    if not isinstance(cfg, Config):
        cfg = config_mod.load(cfg)
    runtime = Runtime(cfg)
    try:
        for name, spec in cfg.sources.items():
            runtime.sources[name] = registry.get_adapter(spec.type)(name, spec.options)
        for name, view in cfg.views.items():
            runtime.daos[name] = runtime.sources[view.source].dao(view)
    except BaseException:
        runtime.close()
        raise
    return runtime
