"""What a benchmark result records about the machine and the run: cores, versions, load, config hash."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from featuredao import registry
from featuredao.errors import FeatureDaoError


def _version(module: str, dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        found = getattr(sys.modules.get(module), "__version__", None)
        return str(found) if found is not None else None


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none): a busy machine is noisy."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(load_avg: list[float] | None = None,
                 adapters: Sequence[str] | None = None) -> dict[str, Any]:
    """Cores, Python, platform, the versions of featuredao and of every driver module loaded, and the
    load average when the run started."""
    import featuredao

    versions: dict[str, str] = {"featuredao": featuredao.__version__}
    if "sqlite3" in sys.modules:
        versions["sqlite3"] = str(sys.modules["sqlite3"].sqlite_version)
    # Each adapter declares its driver modules (by distribution name); record those loaded.
    drivers: dict[str, str] = {}
    for name in registry.available():
        try:
            drivers.update(registry.get_adapter(name).driver_modules)
        except FeatureDaoError:  # an adapter whose driver is not installed
            continue
    for module, dist in drivers.items():
        if module in sys.modules:
            found = _version(module, dist)
            if found is not None:
                versions[module] = found
    for module, dist in (("hdrh", "hdrhistogram"),):
        found = _version(module, dist)
        if found is not None:
            versions[dist] = found
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    return {
        "cores": os.cpu_count() or 1,
        "usable_cores": usable or 1,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "gil": bool(gil),
        "platform": platform.platform(),
        # The adapters this run measured (others may be loaded in the same process).
        "adapters": sorted(set(adapters)) if adapters is not None else
        sorted(m.rsplit(".", 1)[-1] for m in sys.modules if m.startswith("featuredao.adapters.")
               and not m.rsplit(".", 1)[-1].startswith("_")),
        "versions": versions,
        "load_avg": load_avg,
    }


def config_hash(path: str | os.PathLike[str]) -> str:
    """sha256 of the config file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
