"""Benchmark outputs: the ``--out`` JSON document, the ``--report`` Markdown and the ``--plot`` PNG."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from featuredao.bench.runner import GIL_NOTE, PATHS, THROUGHPUT_NOTE, BenchResult, Measurement

SCHEMA_VERSION = 1

# Every record of ``--out``: field -> JSON type(s) (the README documents the same table).
RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "view": (str,), "source": (str,), "source_type": (str,), "entity": (str,),
    "batch": (int,), "concurrency": (int,), "cache": (str,), "path": (str,), "call": (str,),
    "requests": (int,), "keys": (int,), "errors": (int,), "degraded": (int,),
    "p50_ms": (float,), "p90_ms": (float,), "p99_ms": (float,), "p999_ms": (float,),
    "mean_ms": (float,), "max_ms": (float,), "rps": (float,), "keys_per_s": (float,),
    "busy_s": (float,), "wall_s": (float,),
    "ratio_to_raw": (float, type(None)), "ratio_to_raw_p99": (float, type(None)),
}
MACHINE_FIELDS: dict[str, tuple[type, ...]] = {
    "cores": (int,), "usable_cores": (int,), "python": (str,), "gil": (bool,), "platform": (str,),
    "adapters": (list,), "versions": (dict,), "load_avg": (list, type(None)),
}


def record_dict(rec: Measurement) -> dict[str, Any]:
    """One ``records`` entry of the JSON document."""
    out: dict[str, Any] = {
        "view": rec.view, "source": rec.source, "source_type": rec.source_type, "entity": rec.entity,
        "batch": rec.batch, "concurrency": rec.concurrency, "cache": rec.cache, "path": rec.path,
        "call": rec.call,
    }
    for name, value in rec.summary.to_dict().items():
        out[name] = float(value) if name.endswith(("_ms", "_s")) or name in ("rps",) else value
    out["wall_s"] = float(rec.wall_s)
    out["ratio_to_raw"] = rec.ratio_to_raw
    out["ratio_to_raw_p99"] = rec.ratio_to_raw_p99
    return out


def to_json(result: BenchResult) -> dict[str, Any]:
    """The ``--out`` document (schema 1, see README)."""
    return {
        "schema": SCHEMA_VERSION,
        "created": result.started_at,
        "machine": result.machine,
        "config": result.config_path,
        "config_hash": result.config_hash,
        "params": result.params.to_dict(),
        "interrupted": result.interrupted,
        "elapsed_s": result.elapsed_s,
        "notes": list(result.notes),
        "records": [record_dict(r) for r in result.records],
    }


def write_json(result: BenchResult, path: str | os.PathLike[str]) -> None:
    """Write ``--out``."""
    Path(path).write_text(json.dumps(to_json(result), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def schema_problems(doc: Any) -> list[str]:
    """What in a document does not follow schema 1 (empty: it conforms). Used by the tests."""
    problems: list[str] = []
    if not isinstance(doc, dict):
        return ["the document is not an object"]
    if doc.get("schema") != SCHEMA_VERSION:
        problems.append(f"schema is {doc.get('schema')!r}, not {SCHEMA_VERSION}")
    for key, kind in (("config_hash", str), ("machine", dict), ("records", list), ("params", dict),
                      ("interrupted", bool), ("notes", list)):
        if not isinstance(doc.get(key), kind):
            problems.append(f"{key} is not a {kind.__name__}")
    machine: dict[str, Any] = doc["machine"] if isinstance(doc.get("machine"), dict) else {}
    for key, kinds in MACHINE_FIELDS.items():
        if not isinstance(machine.get(key), kinds):
            problems.append(f"machine.{key} is not {'/'.join(k.__name__ for k in kinds)}")
    records: list[Any] = doc["records"] if isinstance(doc.get("records"), list) else []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            problems.append(f"records[{i}] is not an object")
            continue
        if set(rec) != set(RECORD_FIELDS):
            problems.append(f"records[{i}] keys differ: missing {sorted(set(RECORD_FIELDS) - set(rec))}, "
                            f"extra {sorted(set(rec) - set(RECORD_FIELDS))}")
        for key, kinds in RECORD_FIELDS.items():
            value = rec.get(key)
            wrong = not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
            if key in rec and wrong:
                problems.append(f"records[{i}].{key} = {value!r} is not "
                                f"{'/'.join(k.__name__ for k in kinds)}")
        if rec.get("path") not in PATHS:
            problems.append(f"records[{i}].path {rec.get('path')!r} is not one of {PATHS}")
    return problems


# -- Markdown ----------------------------------------------------------------------------------------
def _ms(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def _load(value: Any) -> str:
    return "n/a" if not value else " / ".join(f"{v:.2f}" for v in value)


def _rate(value: float) -> str:
    return f"{value:,.0f}"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _ordered(records: Sequence[Measurement]) -> list[Measurement]:
    return sorted(records, key=lambda r: (r.batch, r.concurrency, r.cache, r.view, PATHS.index(r.path)))


def markdown(result: BenchResult) -> str:
    """The ``--report`` Markdown: context, the GIL caveat, one table of every record."""
    m = result.machine
    p = result.params
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())
    size = (f"{p.duration_s:g} s per cell" if p.duration_s is not None
            else f"{p.requests} requests per cell")
    lines = [
        "# featuredao bench",
        "",
        f"- config: `{result.config_path}` (sha256 `{result.config_hash[:16]}...`)",
        f"- machine: {m.get('cores')} cores ({m.get('usable_cores')} usable), {m.get('python')}"
        f"{'' if m.get('gil', True) else ' (free-threaded)'}, {m.get('platform')}; load average at start "
        f"{_load(m.get('load_avg'))}",
        f"- versions: {versions}",
        f"- run: {size} (each request calls every path with the same keys), warmup {p.warmup}, "
        f"hit ratio {p.hit_ratio:g}, keys from {p.rows:,} seeded rows, key seed {p.seed}, "
        f"cache {', '.join(p.cache)}; {result.elapsed_s:.1f} s",
        f"- threads: {GIL_NOTE}. This machine has {m.get('cores')} cores.",
        f"- {THROUGHPUT_NOTE}; x raw = p50 / raw p50 (featuredao overhead over the hand-written read).",
        "- paths: `service` = the library as a service calls it (`FeatureService.fetch`, one view), "
        "`dao` = the adapter call (`dao.read`), `raw` = the same read written with the driver by hand.",
    ]
    if result.interrupted:
        lines.append("- **interrupted (Ctrl-C): figures so far only**")
    lines += [f"- note: {n}" for n in result.notes]
    lines += [
        "",
        "| view | batch | conc | cache | path | requests | p50 ms | p90 ms | p99 ms | p99.9 ms | mean ms "
        "| max ms | req/s | keys/s | errors | degraded | x raw |",
        "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: |",
    ]
    for r in _ordered(result.records):
        s = r.summary
        lines.append(
            f"| {r.view} | {r.batch} | {r.concurrency} | {r.cache} | {r.path} | {s.requests} "
            f"| {_ms(s.p50_ms)} | {_ms(s.p90_ms)} | {_ms(s.p99_ms)} | {_ms(s.p999_ms)} | {_ms(s.mean_ms)} "
            f"| {_ms(s.max_ms)} | {_rate(s.rps)} | {_rate(s.keys_per_s)} | {s.errors} | {s.degraded} "
            f"| {_ratio(r.ratio_to_raw)} |")
    calls = sorted({(r.view, r.path, r.call) for r in result.records})
    if calls:
        lines += ["", "Calls: " + "; ".join(f"{v} {p_}: `{c}`" for v, p_, c in calls) + "."]
    views = list(dict.fromkeys(r.view for r in result.records))
    if len(views) > 1:
        lines += ["", "## Side by side (service path, p50 / p99 ms)", "",
                  "| batch | conc | cache | " + " | ".join(views) + " |",
                  "| ---: | ---: | --- | " + " | ".join("---:" for _ in views) + " |"]
        by_cell = {(r.batch, r.concurrency, r.cache, r.view): r for r in result.records
                   if r.path == "service"}
        for b, c, cache in dict.fromkeys((r.batch, r.concurrency, r.cache) for r in _ordered(result.records)):
            cols = []
            for v in views:
                rec = by_cell.get((b, c, cache, v))
                cols.append("" if rec is None else f"{_ms(rec.summary.p50_ms)} / {_ms(rec.summary.p99_ms)}")
            lines.append(f"| {b} | {c} | {cache} | " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


# -- charts ------------------------------------------------------------------------------------------
_COLOURS = {"service": "#1f77b4", "dao": "#ff7f0e", "raw": "#2ca02c"}


def plot(result: BenchResult, out: str | os.PathLike[str]) -> None:
    """PNG: per view, p50 (solid) and p99 (dashed) vs batch size at the lowest concurrency (top row), and
    keys/s of the service path vs concurrency, one line per batch size (bottom row). Rows share their
    y axis so stores compare side by side."""
    # Imported here: matplotlib is heavy and optional. Figure + the Agg canvas: no pyplot global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    records = list(result.records)
    views = list(dict.fromkeys(r.view for r in records)) or ["(no data)"]
    caches = list(dict.fromkeys(r.cache for r in records))
    fig = Figure(figsize=(5.2 * len(views), 8.0), layout="constrained")
    FigureCanvasAgg(fig)
    # Rows share their y axis so stores compare side by side.
    axes = fig.subplots(2, len(views), squeeze=False, sharey="row")
    low = min((r.concurrency for r in records), default=1)
    batches = sorted({r.batch for r in records})
    cmap = _batch_colours(len(batches))
    for col, view in enumerate(views):
        lat, thr = axes[0][col], axes[1][col]
        mine = [r for r in records if r.view == view]
        for cache in caches:
            for path in PATHS:
                pts = sorted((r.batch, r.summary.p50_ms, r.summary.p99_ms) for r in mine
                             if r.path == path and r.cache == cache and r.concurrency == low
                             and r.summary.requests)
                if not pts:
                    continue
                label = path if len(caches) == 1 else f"{path} [{cache}]"
                xs = [x for x, _, _ in pts]
                lat.plot(xs, [y for _, y, _ in pts], "o-", color=_COLOURS[path], label=f"{label} p50")
                lat.plot(xs, [y for _, _, y in pts], "s--", color=_COLOURS[path], alpha=0.7,
                         label=f"{label} p99")
        source = mine[0].source_type if mine else ""
        lat.set_title(f"{view} ({source}): latency vs batch, concurrency {low}", fontsize=10)
        lat.set_xlabel("batch size (keys per request)")
        lat.set_ylabel("latency (ms)")
        lat.set_xscale("log")
        lat.set_yscale("log")
        mine_batches = sorted({r.batch for r in mine})
        if mine_batches:
            lat.set_xticks(mine_batches, [str(b) for b in mine_batches])
            lat.xaxis.set_minor_locator(NullLocator())
        lat.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        lat.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        lat.yaxis.set_minor_formatter(NullFormatter())
        lat.grid(True, which="both", alpha=0.3)
        if mine:
            lat.legend(fontsize=8)
        for i, batch in enumerate(batches):
            for cache in caches:
                pts2 = sorted((r.concurrency, r.summary.keys_per_s) for r in mine
                              if r.path == "service" and r.batch == batch and r.cache == cache
                              and r.summary.requests)
                if not pts2:
                    continue
                label = f"batch {batch}" if len(caches) == 1 else f"batch {batch} [{cache}]"
                thr.plot([x for x, _ in pts2], [y for _, y in pts2], "o-", color=cmap[i], label=label)
        thr.set_title(f"{view} ({source}): service throughput vs concurrency", fontsize=10)
        thr.set_xlabel(f"concurrency (threads; {result.machine.get('cores', '?')} cores, GIL)")
        thr.set_ylabel("keys/s (log)")
        thr.set_yscale("log")
        thr.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        thr.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
        thr.yaxis.set_minor_formatter(NullFormatter())
        thr.set_xscale("log", base=2)
        concs = sorted({r.concurrency for r in mine})
        if concs:
            thr.set_xticks(concs, [str(c) for c in concs])
        thr.grid(True, alpha=0.3)
        if mine:
            thr.legend(fontsize=8)
    title = "featuredao bench" + (" (interrupted: partial)" if result.interrupted else "")
    fig.suptitle(f"{title}: config {result.config_hash[:12]}")
    fig.savefig(os.fspath(out), dpi=100, format="png")


def _batch_colours(n: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.15 + 0.7 * i / max(1, n - 1)) for i in range(max(1, n))]
