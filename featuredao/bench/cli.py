"""``featuredao bench``: seed views with synthetic rows and benchmark them (exit 0 ok, 1 runtime failure,
2 usage or config, 130 interrupted after printing what was measured).

Only click and the standard library are imported here; the runner, HdrHistogram and matplotlib load
when a command runs.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

DEFAULT_DATA_DIR = "featuredao-bench"


def _ints(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        out = [int(p) for p in (s.strip() for s in value.split(",")) if p]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not out or any(v < 1 for v in out):
        raise click.BadParameter("expected positive integers")
    return list(dict.fromkeys(out))


def _names(value: str | None) -> list[str]:
    return list(dict.fromkeys(p for p in (s.strip() for s in (value or "").split(",")) if p))


def _cache_modes(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    from featuredao.bench.runner import CACHE_MODES

    modes = _names(value)
    bad = [m for m in modes if m not in CACHE_MODES]
    if bad or not modes:
        raise click.BadParameter(f"use one or more of {', '.join(CACHE_MODES)} (comma-separated)")
    return modes


def default_config(data_dir: Path) -> Path:
    """The embedded SQLite default: the demo's user and item views in ``data_dir`` (no server)."""
    from featuredao.demo import demo_config

    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "featuredao.json"
    cfg = demo_config()
    # The demo's two stored views; the views keyed by features and the derived features are the demo's,
    # not a store to measure.
    cfg["views"] = [v for v in cfg["views"] if "key_from" not in v]
    cfg.pop("derived", None)
    text = json.dumps(cfg, indent=2) + "\n"
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def _config_views(config: Path) -> list[str]:
    from featuredao.config import load

    return list(load(config).views)


def _unseeded(config: Path, views: list[str], rows: int) -> list[str]:
    from featuredao import factory, synthetic

    runtime = factory.build(config)
    try:
        out = []
        for name in views:
            if name not in runtime.daos:
                raise click.UsageError(f"unknown view {name!r}; known: {', '.join(runtime.daos)}")
            dao = runtime.daos[name]
            dao.prepare()
            if dao.read([synthetic.key_for(dao.view, rows - 1)])[0] is None:
                out.append(name)
        return out
    finally:
        runtime.close()


@click.group(invoke_without_command=True)
@click.pass_context
def bench(ctx: click.Context) -> None:
    """Benchmark feature views: the library as a service uses it, the adapter call and the raw driver.

    Without a subcommand: `bench run` on the embedded SQLite default (no server), with --baseline.
    """
    if ctx.invoked_subcommand is None:
        # Parsed like `bench run --baseline`, so option callbacks run as on the command line.
        with run_command.make_context("run", ["--baseline"], parent=ctx) as sub:
            run_command.invoke(sub)


@bench.command("seed")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--view", "views", required=True, help="View name(s), comma-separated.")
@click.option("--rows", default=10_000, show_default=True, type=click.IntRange(min=1),
              help="Rows written: keys 0..N-1 of each view.")
@click.option("--seed", "data_seed", default=0, show_default=True, help="Seed of the synthetic values.")
@click.option("--chunk", default=5000, show_default=True, type=click.IntRange(min=1),
              help="Rows per upsert call.")
@click.option("--progress/--no-progress", default=True, help="Progress bar on stderr (terminals only).")
def seed_command(config: Path, views: str, rows: int, data_seed: int, chunk: int, progress: bool) -> None:
    """prepare() each view's storage, then upsert N deterministic synthetic rows through its adapter.

    The same seed writes the same rows into any store, so benchmarks of different stores read the same
    data.
    """
    from featuredao.bench import runner

    try:
        written = runner.seed(config, _names(views), rows, data_seed, chunk=chunk, progress=progress)
    except runner.BenchError as exc:
        raise click.UsageError(str(exc)) from None
    for name, count in written.items():
        click.echo(f"{name}: {count:,} rows written (seed {data_seed})")


@bench.command("run")
@click.argument("config", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--view", "views", help="View name(s), comma-separated: several = side by side. "
              "[default: every view of the config]")
@click.option("--batch", "batches", default="1,100,500", show_default=True, callback=_ints,
              help="Keys per request, comma-separated.")
@click.option("--concurrency", default="1,8", show_default=True, callback=_ints,
              help="Threads issuing requests, comma-separated.")
@click.option("--requests", type=click.IntRange(min=1), help="Requests per cell [default: 200].")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), help="Seconds per cell.")
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(min=0),
              help="Unrecorded requests per cell before measuring.")
@click.option("--cache", default="off", show_default=True, callback=_cache_modes,
              help="Cache mode(s): off, cold, warm (comma-separated): no cache, a fresh cache, a fresh "
                   "cache filled once before measuring.")
@click.option("--baseline", is_flag=True, help="Also time the adapter's hand-written raw-driver read.")
@click.option("--hit-ratio", default=1.0, show_default=True, type=click.FloatRange(0, 1),
              help="Share of keys drawn from the seeded range; the rest are missing keys.")
@click.option("--rows", default=10_000, show_default=True, type=click.IntRange(min=1),
              help="Size of the seeded key range (as given to `bench seed --rows`).")
@click.option("--seed", "key_seed", default=0, show_default=True, help="Seed of the key draws.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the JSON results.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), help="Write a Markdown report.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write PNG charts.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DATA_DIR,
              show_default=True, help="Without CONFIG: where the embedded SQLite default lives.")
@click.option("--progress/--no-progress", default=True, help="Progress bar on stderr (terminals only).")
def run_command(config: Path | None, views: str | None, batches: list[int], concurrency: list[int],
                requests: int | None, duration: float | None, warmup: int, cache: list[str],
                baseline: bool, hit_ratio: float, rows: int, key_seed: int, out: Path | None,
                report: Path | None, plot: Path | None, data_dir: Path, progress: bool) -> None:
    """Measure views x batch sizes x concurrency levels; print a Markdown table, optionally write JSON,
    a Markdown report and PNG charts. Ctrl-C prints (and writes) what was measured so far.

    Without CONFIG, runs on the embedded SQLite default in --data-dir, seeding it first if needed.
    """
    from featuredao.bench import report as report_mod
    from featuredao.bench import runner

    if requests is not None and duration is not None:
        raise click.UsageError("give --requests or --duration, not both")
    if config is None:
        config = default_config(data_dir)
        names = _names(views) or _config_views(config)
        todo = _unseeded(config, names, rows)
        if todo:
            click.echo(f"seeding {', '.join(todo)} with {rows:,} rows in {data_dir}", err=True)
            runner.seed(config, todo, rows, 0, progress=progress)
    else:
        names = _names(views) or _config_views(config)
    params = runner.BenchParams(
        views=names, batches=batches, concurrency=concurrency,
        requests=None if duration is not None else (requests or 200), duration_s=duration, warmup=warmup,
        cache=cache, baseline=baseline, hit_ratio=hit_ratio, rows=rows, seed=key_seed)
    # Degraded reads are counted in the results; their per-call log warnings would flood stderr (-v
    # on `featuredao` keeps them).
    lib_log = logging.getLogger("featuredao")
    level = lib_log.level
    if lib_log.getEffectiveLevel() >= logging.WARNING:
        lib_log.setLevel(logging.ERROR)
    try:
        result = runner.run(config, params, progress=progress,
                            warn=lambda msg: click.echo(f"warning: {msg}", err=True))
    except runner.BenchError as exc:
        raise click.UsageError(str(exc)) from None
    finally:
        lib_log.setLevel(level)
    click.echo(report_mod.markdown(result), nl=False)
    if out is not None:
        report_mod.write_json(result, out)
        click.echo(f"results: {out}", err=True)
    if report is not None:
        report.write_text(report_mod.markdown(result), encoding="utf-8")
        click.echo(f"report: {report}", err=True)
    if plot is not None:
        report_mod.plot(result, plot)
        click.echo(f"charts: {plot}", err=True)
    if result.interrupted:
        click.echo("interrupted: the figures above are what was measured before Ctrl-C", err=True)
        sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    """``python -m featuredao.bench``: the group on its own, with featuredao's exit codes."""
    from featuredao.exits import run

    run(bench, argv, "featuredao bench")


__all__ = ["bench", "main"]
