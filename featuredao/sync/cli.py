"""``featuredao sync run/status/replay-dlq``: run the config's synchronization jobs."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import click

from featuredao.errors import ConfigError, ConfigIssue

_EXIT_GRACE_S = 5.0
"""After the chunk in flight was abandoned, how long the process may still take before it exits anyway."""


@click.group()
def sync() -> None:
    """Synchronize views: full, incremental and CDC jobs declared in the config's "sync" list."""


def _engine(config: str, job: str) -> Any:
    from featuredao.sync.engine import SyncEngine

    return SyncEngine.from_file(config, job)


def _runner(config: str, job: str) -> Any:
    """The job's engine, or for a job with parallelism its runner of worker processes (same interface)."""
    from featuredao.config import load

    jobs = {j.name: j for j in load(config).sync}
    if job in jobs and jobs[job].parallelism > 1:
        from featuredao.sync.parallel import ParallelRun

        return ParallelRun(config, job)
    return _engine(config, job)


def _spark_runner(config: str, job: str, master: str | None, follow: bool) -> Any:
    """``--engine spark``: the job's key ranges as Spark tasks (same interface as an engine)."""
    if follow:
        raise click.UsageError("--follow runs with the local engine (a Spark job runs one full pass)")
    from featuredao.sync.spark_engine import SparkSync

    return SparkSync(config, job, master=master)


@sync.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--job", required=True, help="The job to run (its name in the config).")
@click.option("--follow", is_flag=True, help="Keep running: a cycle every --interval seconds.")
@click.option("--interval", default=5.0, show_default=True, type=click.FloatRange(min=0.0),
              help="Seconds between cycles with --follow.")
@click.option("--no-progress", is_flag=True, help="No progress bar (it is drawn on terminals only).")
@click.option("--json", "as_json", is_flag=True, help="Print the report of the (last) cycle as JSON.")
@click.option("--stop-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0.0),
              help="After SIGTERM or Ctrl-C, seconds the chunk in flight may take to finish before it is "
                   "abandoned (a second signal abandons it at once).")
@click.option("--engine", "engine_kind", type=click.Choice(["local", "spark"]), default="local",
              show_default=True, help="spark: a full job's key ranges run as Spark tasks (extra 'spark').")
@click.option("--master", default=None,
              help="Spark master URL for --engine spark, e.g. local[2] (default: spark-submit's, else "
                   "local[*]).")
def run(config: str, job: str, follow: bool, interval: float, no_progress: bool, as_json: bool,
        stop_timeout: float, engine_kind: str, master: str | None) -> None:
    """Run a job: one cycle (a full pass, or every change so far), or cycles forever with --follow.

    Exit 0 when every target is up to date, 1 when a target or the source failed (their checkpoints stay
    where they were; the next run catches up), 0 after SIGTERM and 130 after Ctrl-C: the chunk in flight
    is finished (at most --stop-timeout seconds, then abandoned: read again by the next run) and what
    the targets confirmed is checkpointed.
    """
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    stop = threading.Event()
    interrupted: list[int] = []
    running: list[Any] = []
    timers: list[threading.Timer] = []
    abandoning = threading.Event()

    def abandon(code: int) -> None:
        if abandoning.is_set():
            return
        abandoning.set()
        if running:
            running[0].abandon()  # the read or write in flight ends now (its connections are closed)
        # Last resort, should a driver not notice its closed connection: the process ends regardless.
        time.sleep(_EXIT_GRACE_S)
        sys.stderr.write(f"sync {job}: still busy {_EXIT_GRACE_S:.0f}s after abandoning the chunk in flight; "
                         "exiting (confirmed chunks are checkpointed)\n")
        sys.stderr.flush()
        os._exit(code)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        interrupted.append(signum)
        stop.set()
        # The first signal lets the chunk in flight finish (at most stop_timeout); another abandons it now.
        if timers:
            timers[-1].cancel()
        timer = threading.Timer(stop_timeout if len(interrupted) == 1 else 0.0, abandon,
                                args=(130 if signal.SIGINT in interrupted else 0,))
        timer.daemon = True
        timer.start()
        timers.append(timer)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    console = Console(stderr=True)
    show = console.is_terminal and not no_progress
    try:
        if master is not None and engine_kind != "spark":
            raise click.UsageError("--master applies to --engine spark")
        spark = engine_kind == "spark"
        with _spark_runner(config, job, master, follow) if spark else _runner(config, job) as engine:
            running.append(engine)
            started = time.perf_counter()
            total = [0]
            progress = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                                TextColumn("{task.completed:,.0f} rows"),
                                TextColumn("{task.fields[rate]:,.0f} rows/s"), TimeElapsedColumn(),
                                console=console, disable=not show, transient=True)
            task = progress.add_task(f"sync {job}", total=None, rate=0.0)

            def on_progress(rows: int) -> None:
                total[0] += rows
                rate = total[0] / max(1e-9, time.perf_counter() - started)
                progress.update(task, advance=rows, rate=rate)

            def on_cycle(report: Any) -> None:
                # Failures are logged once per attempt by the engine; a cycle that moved rows is shown.
                if follow and report.read:
                    text = _summary(job, report, time.perf_counter() - started, total[0])
                    console.print(text, markup=False, highlight=False)

            with progress:
                report = engine.run(follow=follow, interval_s=interval, stop=stop, on_progress=on_progress,
                                    on_cycle=on_cycle)
            elapsed = time.perf_counter() - started
    finally:
        for timer in timers:
            timer.cancel()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if as_json:
        click.echo(json.dumps({"job": job, "read": report.read, "written": report.written,
                               "deleted": report.deleted, "filtered": report.filtered,
                               "failed": report.failed, "down": report.down,
                               "source_error": report.source_error, "interrupted": report.interrupted,
                               "failed_ranges": getattr(report, "failed_ranges", {}),
                               "elapsed_s": round(elapsed, 3)}))
    elif not follow:
        click.echo(_summary(job, report, elapsed, total[0]))
    if signal.SIGINT in interrupted:
        sys.exit(130)
    if interrupted:
        return  # SIGTERM: stopped as asked
    if not report.ok:
        sys.exit(1)


def _summary(job: str, report: Any, elapsed: float, rows: int) -> str:
    rate = rows / elapsed if elapsed > 0 else 0.0
    text = (f"job {job}: read {report.read:,}, written {report.written:,}, deleted {report.deleted:,}, "
            f"filtered {report.filtered:,}, dead letters {report.failed:,} ({rate:,.0f} rows/s)")
    if report.source_error:
        text += f"; source failed: {report.source_error}"
    for target, error in report.down.items():
        text += f"; target {target} not updated: {error}"
    if report.interrupted:
        text += "; interrupted"
    return text


@sync.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--job", help="Only this job.")
@click.option("--json", "as_json", is_flag=True, help="Print the checkpoints as JSON lines.")
def status(config: str, job: str | None, as_json: bool) -> None:
    """Every job's targets: phase, cursor, pass, rows written, last error, dead letters."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from featuredao.config import load
    from featuredao.sync.partitions import range_status

    cfg = load(config)
    names = [j.name for j in cfg.sync]
    if job is not None and job not in names:
        raise ConfigError([ConfigIssue("$.sync", f"no job named {job!r}; known: {', '.join(names) or 'none'}",
                                       repr(job))])
    rows: list[dict[str, Any]] = []
    for name in [job] if job else names:
        with _engine(config, name) as engine:
            rows.extend(engine.status())
            rows.extend(range_status(engine))
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, default=str))
        return
    if not rows:
        click.echo("no sync jobs in this config")
        return
    table = Table(title="featuredao sync status")
    for col in ("job", "mode", "target", "range", "phase", "cursor", "passes", "written", "deleted",
                "dead letters", "updated", "lag s", "error"):
        table.add_column(col)
    for r in rows:
        stamp = r["updated_at"]
        updated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "-"
        # A range is shown as (lower, upper]; a target's own row covers the whole key space.
        where = "-" if "range" not in r else \
            f"{r['range']}: ({json.dumps(r['lower'])}, {json.dumps(r['upper'])}]"
        cells = (r["job"], r["mode"], r["target"], where, r["phase"], json.dumps(r["cursor"], default=str),
                 str(r["passes"]), f"{r['written']:,}", f"{r['deleted']:,}", str(r.get("dead_letters", "")),
                 updated,
                 "-" if r["lag_s"] is None else f"{r['lag_s']:.2f}", r["last_error"] or "")
        table.add_row(*(escape(c) for c in cells))  # an error quoting "[mysqld]" is text, not markup
    Console().print(table)


@sync.command("replay-dlq")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--job", required=True, help="Replay this job's dead letters.")
def replay_dlq(config: str, job: str) -> None:
    """Send a job's dead letters through the pipeline again, with each key's current source row.

    Entries that succeed leave the file, entries that fail again stay with their new reason; exit 1 if
    any entry remains.
    """
    with _engine(config, job) as engine:
        report = engine.replay_dlq()
        path = Path(engine.dlq.path)
    click.echo(f"job {job}: replayed {report.replayed}, resolved {report.resolved}, failed again "
               f"{report.failed_again}, kept {report.kept} ({path})")
    for what, error in report.down.items():
        click.echo(f"{what} unavailable: {error}", err=True)
    if report.failed_again or report.kept:
        sys.exit(1)
