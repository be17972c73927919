"""Closing under load, on every adapter: no crash, no hang, no exception but ``Closed``, in real processes.

Each case runs ``close_stress.py`` in a subprocess (a segfault must not take the test run down with
it) over several cycles of: 8 threads calling featuredao back to back, ``close()`` from the main
thread after a random few milliseconds, then one call after close.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from backends.base import ContractBackend
from conftest import FEATURES, _variants

from featuredao.registry import get_adapter

SCRIPT = Path(__file__).with_name("close_stress.py")
_tables = itertools.count()


def _one_per_module() -> list[Any]:
    """The first variant of each store (marker): layouts of one adapter share its pool and its close."""
    seen: set[str] = set()
    out = []
    for param in _variants():
        store = param.marks[0].name
        if store not in seen:
            seen.add(store)
            out.append(param)
    return out


@pytest.fixture(params=_one_per_module())
def store(request: pytest.FixtureRequest) -> ContractBackend:
    module, variant = request.param
    made: ContractBackend = module.make(variant, request)
    return made


def _config(backend: ContractBackend, views: int) -> dict[str, Any]:
    batch = next(_tables)
    source = {**backend.source, "pool_size": 4}
    return {
        "sources": {"store": source},
        "views": [{"name": f"v{i}", "entity": "item", "source": "store",
                   "table": f"{backend.table_prefix}close{batch}_{i}", "key": "id", "features": FEATURES,
                   "prefix": f"v{i}_",
                   "timeout_ms": 1000, "options": backend.view_options} for i in range(views)],
        "service": {"deadline_ms": 2000},
    }


def _stress(tmp_path: Path, cfg: dict[str, Any], mode: str, cycles: int) -> dict[str, Any]:
    path = tmp_path / f"close_{mode}.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, str(SCRIPT), str(path), mode, str(cycles)], capture_output=True,
                          text=True, timeout=240, cwd=SCRIPT.parent)
    assert proc.returncode == 0, \
        f"exit {proc.returncode} (negative: killed by a signal)\n{proc.stderr[-3000:]}"
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["problems"] == [], report
    assert report["calls"] > 0, "the load never ran: the test would prove nothing"
    return report


@pytest.mark.parametrize("mode", ["fetch", "read", "upsert"])
def test_close_under_load(store: ContractBackend, mode: str, tmp_path: Path) -> None:
    backend = store
    if mode == "upsert" and not get_adapter(backend.source["type"]).capabilities.write:
        pytest.fail("every adapter of the harness has a write path")  # a flag no adapter clears today
    embedded = backend.unreachable is not None and "path" in backend.unreachable
    cfg = _config(backend, views=50 if embedded else 8)
    _stress(tmp_path, cfg, mode, cycles=30 if embedded else 8)
