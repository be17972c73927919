"""The import structure: arrows point one way, and the core never imports an adapter or the test harness.

Read from the source with ``ast`` (every import counts, those under ``TYPE_CHECKING`` and inside
functions too: a reader follows them all).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"featuredao": ROOT / "featuredao", "featuredao.adapters": ROOT / "adapters"}


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of ours that ``name`` imports (a package import counts as its ``__init__``)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            # ``from pkg import mod`` imports the module; ``from pkg import name`` imports the package.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        for target in targets:
            # The longest module of ours the import names (``from featuredao import x`` may be a module).
            while target and target not in known:
                target = target.rsplit(".", 1)[0] if "." in target else ""
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_the_core_imports_no_adapter_and_not_the_test_harness() -> None:
    for name, deps in _graph().items():
        if name.startswith(("featuredao.adapters", "featuredao.testing")):
            continue
        bad = sorted(d for d in deps if d.startswith(("featuredao.adapters", "featuredao.testing")))
        assert bad == [], f"{name} imports {bad}"


def test_adapters_depend_on_the_core_interface_only() -> None:
    allowed = ("featuredao.config", "featuredao.dao", "featuredao.errors", "featuredao.types",
               "featuredao.adapters", "featuredao.lifecycle", "featuredao.validation", "featuredao.sequence")
    for name, deps in _graph().items():
        if name.startswith("featuredao.adapters"):
            bad = sorted(d for d in deps if not d.startswith(allowed))
            assert bad == [], f"{name} imports {bad}"


def _third_party(path: Path, top_level_only: bool) -> set[str]:
    """Top-level package names a module imports (at run time only: ``TYPE_CHECKING`` blocks left out)."""
    tree = ast.parse(path.read_text())
    nodes: list[ast.AST] = []
    if top_level_only:
        for node in tree.body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                nodes.extend(node.orelse)
            else:
                nodes.append(node)
    else:
        nodes = list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


# The core's own dependencies ([project] dependencies): no adapter needs to declare them.
CORE_DEPENDENCIES = {"pydantic", "cachetools", "click", "rich"}
# Third-party modules an adapter imports without declaring them in driver_modules, and why.
UNDECLARED = {
    "redis": {"orjson"},  # the JSON layout's codec, which the server and client use too: not a driver
    "tablestore": {"urllib3"},  # the tablestore SDK's own dependency, imported to filter its warnings
}
# Core modules that import a driver module an adapter declares, and why that is allowed.
CORE_USES = {
    "featuredao.cache": {"msgpack"},  # L2 values are msgpack, imported on first L2 use (redis extra)
}


def _adapter_modules(graph: dict[str, set[str]], root: str) -> set[str]:
    """``root`` and the adapter modules it imports, directly or not."""
    found, todo = {root}, [root]
    while todo:
        for dep in graph[todo.pop()]:
            if dep.startswith("featuredao.adapters.") and dep not in found:
                found.add(dep)
                todo.append(dep)
    return found


def test_every_adapter_declares_the_drivers_it_imports_and_the_core_imports_none() -> None:
    import sys

    from featuredao import registry
    from featuredao.dao import Source

    modules = _modules()
    graph = _graph()
    std = set(sys.stdlib_module_names)
    declared: dict[str, set[str]] = {}
    for name in registry.available():
        adapter = registry.get_adapter(name)
        drivers = dict(adapter.driver_modules)
        assert all(isinstance(m, str) and isinstance(d, str) and d for m, d in drivers.items()), name
        used: set[str] = set()
        for module in _adapter_modules(graph, adapter.__module__):
            used |= _third_party(modules[module], top_level_only=False)
        used -= std | CORE_DEPENDENCIES | {"__future__", "featuredao"}
        # Declared on the adapter's own class (a Source without drivers may keep the base's empty one).
        owner = next(c for c in type.mro(adapter) if "driver_modules" in vars(c))  # type: ignore[arg-type]
        assert used == set() or owner is not Source, f"{name} imports {sorted(used)} and declares none"
        assert set(drivers) <= used, f"{name} declares drivers it never imports: {set(drivers) - used}"
        assert used - set(drivers) == UNDECLARED.get(name, set()), f"{name}: undeclared {used - set(drivers)}"
        declared[name] = set(drivers)
    assert {"mysql", "hologres", "clickhouse", "redis", "hbase", "tablestore"} <= {
        n for n, d in declared.items() if d}
    drivers_of_all = set().union(*declared.values())
    for name, path in modules.items():
        if name.startswith(("featuredao.adapters", "featuredao.testing")):
            continue
        bad = _third_party(path, top_level_only=False) & drivers_of_all
        assert bad == CORE_USES.get(name, set()), f"{name} imports the driver modules {sorted(bad)}"


SPARK_MODULES = ("featuredao.spark", "featuredao.sync.spark_engine")


def test_pyspark_is_imported_lazily_and_only_by_the_spark_modules() -> None:
    # pyspark is a big optional driver (extra "spark"): the core must import and run without it.
    for name, path in _modules().items():
        if name in SPARK_MODULES:
            assert "pyspark" not in _third_party(path, top_level_only=True), f"{name} imports pyspark eagerly"
        else:
            assert "pyspark" not in _third_party(path, top_level_only=False), f"{name} imports pyspark"


def test_importing_featuredao_and_its_spark_module_loads_no_pyspark() -> None:
    import subprocess
    import sys

    code = "import sys, featuredao, featuredao.spark, featuredao.sync.cli; print('pyspark' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"
