"""The contract suite's one parametrized fixture: every adapter variant found in backends/."""

from __future__ import annotations

import importlib
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from backends.base import ContractBackend

from featuredao import factory, registry
from featuredao.dao import BaseDao

FEATURES = {
    "f_int": "int", "f_float": "float", "f_str": "str", "f_bool": "bool",
    "f_ints": "list[int]", "f_floats": "list[float]", "f_strs": "list[str]",
}
DEFAULTS = {"f_int": -1, "f_float": -1.0, "f_str": "", "f_bool": False}
SMALL_BATCH = 7  # chunking is tested with batches far larger than this


def _variants() -> list[Any]:
    params = []
    for path in sorted((Path(__file__).parent / "backends").glob("*.py")):
        if path.stem in ("__init__", "base"):
            continue
        module = importlib.import_module(f"backends.{path.stem}")
        for variant, marker in module.VARIANTS:
            params.append(pytest.param((module, variant), id=variant, marks=getattr(pytest.mark, marker)))
    return params


def has(module: Any, variant: str, flag: str) -> bool:
    """Whether a variant can do ``flag``: a capability of its adapter (the module's name), or ``slow``."""
    if flag == "slow":
        return hasattr(module, "slow")
    caps = registry.get_adapter(module.__name__.rsplit(".", 1)[1]).capabilities
    return bool(getattr(caps, flag)) and flag not in getattr(module, "LACKS", {}).get(variant, ())


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs(*flags): run only on contract variants that have every "
                                       "capability flag (or 'slow': a slow-read hook)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (never skip) contract tests a variant cannot run: a skipped test fails scripts/test."""
    kept, dropped = [], []
    for item in items:
        marker = item.get_closest_marker("needs")
        callspec = getattr(item, "callspec", None)
        param = callspec.params.get("backend") if callspec is not None else None
        if marker is not None and param is not None and not all(has(*param, f) for f in marker.args):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


_tables = itertools.count()


def build_dao(backend: ContractBackend, source: dict[str, Any], key_type: str = "str",
              features: dict[str, str] | None = None) -> tuple[factory.Runtime, BaseDao]:
    """Build one view on a fresh table of the backend, its storage created."""
    table = f"{backend.table_prefix}{next(_tables)}_{key_type}"
    cfg = {
        "sources": {"store": source},
        "views": [{"name": "contract_view", "entity": "item", "source": "store", "table": table,
                   "key": "id", "key_type": key_type, "features": features or FEATURES,
                   "defaults": DEFAULTS if features is None else {}, "options": backend.view_options}],
    }
    runtime = factory.build(cfg)
    dao = runtime.daos["contract_view"]
    assert isinstance(dao, BaseDao)
    return runtime, dao


@pytest.fixture(params=_variants())
def backend(request: pytest.FixtureRequest) -> ContractBackend:
    module, variant = request.param
    made: ContractBackend = module.make(variant, request)
    made.slow = getattr(module, "slow", None)
    return made


def _open(backend: ContractBackend, key_type: str, batch_size: int | None) -> Iterator[BaseDao]:
    source = dict(backend.source)
    if batch_size is not None:
        source["batch_size"] = batch_size
    runtime, dao = build_dao(backend, source, key_type)
    try:
        dao.prepare()
        yield dao
    finally:
        runtime.close()


@pytest.fixture
def dao(backend: ContractBackend) -> Iterator[BaseDao]:
    """A view with string keys and the default batch size, on an empty table."""
    yield from _open(backend, "str", None)


@pytest.fixture
def small_batch_dao(backend: ContractBackend) -> Iterator[BaseDao]:
    """A view whose source sends at most SMALL_BATCH keys per round trip."""
    yield from _open(backend, "str", SMALL_BATCH)


@pytest.fixture
def int_dao(backend: ContractBackend) -> Iterator[BaseDao]:
    """A view with integer keys."""
    yield from _open(backend, "int", None)
