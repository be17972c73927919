"""The public surface: exactly what __all__ says, and importing it loads no driver."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import featuredao


def test_all_lists_exactly_the_public_names() -> None:
    public = {n for n in vars(featuredao) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(featuredao, n)).__name__ == "module"}
    assert set(featuredao.__all__) == (public - modules) | {"__version__"}
    assert len(featuredao.__all__) == len(set(featuredao.__all__))


def loaded_after(code: str, modules: list[str]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has loaded once it ran ``code``."""
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {modules!r} if m in sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_importing_featuredao_imports_no_driver() -> None:
    drivers = ["pymysql", "psycopg", "redis", "happybase", "thriftpy2", "clickhouse_driver", "tablestore",
               "featuredao.adapters.sqlite"]
    assert loaded_after("import featuredao, featuredao.service, featuredao.cli", drivers) == []


def test_a_threaded_service_starts_without_asyncio(tmp_path: Path) -> None:
    """asyncio is a tenth of start-up: only afetch, on a running loop, imports it."""
    cfg = {"sources": {"db": {"type": "sqlite", "path": str(tmp_path / "x.db")}},
           "views": [{"name": "v", "entity": "item", "source": "db", "table": "t", "key": "id",
                      "features": {"a": "int"}}]}
    code = f"from featuredao import FeatureService\nFeatureService.from_config({cfg!r}).close()"
    assert loaded_after(code, ["asyncio"]) == []


def test_adapters_come_from_entry_points() -> None:
    from featuredao import registry

    assert {"sqlite", "mysql", "hologres", "clickhouse", "redis", "hbase", "tablestore"} <= set(
        registry.available())
    cls = registry.get_adapter("sqlite")
    assert cls.__module__ == "featuredao.adapters.sqlite"


def test_no_bare_top_level_adapters_package() -> None:
    out = subprocess.run([sys.executable, "-c", "import adapters"], capture_output=True, text=True,
                         cwd="/")
    assert out.returncode != 0
