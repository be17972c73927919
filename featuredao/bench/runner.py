"""Seed views with synthetic rows and measure reads: the library as a service uses it, the adapter call
and, with a baseline, the raw driver read by hand, interleaved in one run.

Paths measured for every (view, batch, concurrency, cache mode):

``service``
    ``FeatureService.fetch`` on a service that holds only the view under test (so the other views of the
    config are not read). Item views: ``fetch(None, keys)``, exactly what a recommender does with its
    candidates. A user view is fetched one user per request, so at batch 1 it is ``fetch(user)``; at larger
    batches it is ``read_view(view, keys)``, the service's one-view entry point. ``fetch`` is the
    library's real cost: the service thread pool, the view's deadline, coercion, the merge with defaults.
``dao``
    ``dao.read(keys, timeout_s=budget)``: the adapter call (normalisation, dedupe, chunking, coercion)
    with the same budget the service gives the view.
``raw``
    ``dao.raw_reader()(keys, fields)``, the same read written with the raw driver, when the adapter
    offers one and ``--baseline`` is given.

Each request draws one key list and calls every path with it, in an order rotated per request, so the
paths see the same keys and the same machine state. Worker threads (``ThreadPoolExecutor``) do this
concurrently like a real service's request threads.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from featuredao import factory, synthetic
from featuredao.bench.machine import config_hash, load_average, machine_info
from featuredao.bench.progress import Progress
from featuredao.bench.stats import LatencyStats, Summary
from featuredao.config import CacheConfig, L1Config, View
from featuredao.dao import BaseDao
from featuredao.errors import FeatureDaoError
from featuredao.service import FeatureService
from featuredao.types import Key

log = logging.getLogger("featuredao.bench")

PATHS = ("service", "dao", "raw")
CACHE_MODES = ("off", "cold", "warm")
MISS_BASE = 1_000_000_000
"""Missing keys are drawn from [MISS_BASE, 2 * MISS_BASE): far outside any seeded range."""
GIL_NOTE = ("concurrency uses threads like a real service; under CPython's GIL, throughput grows with "
            "threads only while they wait on I/O or on C code that releases the GIL")
THROUGHPUT_NOTE = "throughput per path = concurrency x requests / busy time (Little's law)"


class BenchError(Exception):
    """A benchmark request that cannot run as asked (unknown view, read-only store...)."""


@dataclass(frozen=True)
class BenchParams:
    """What ``bench run`` measures."""

    views: list[str]
    batches: list[int] = field(default_factory=lambda: [1, 100, 500])
    concurrency: list[int] = field(default_factory=lambda: [1, 8])
    requests: int | None = 200
    """Requests per cell (each request calls every path once); ignored when ``duration_s`` is set."""
    duration_s: float | None = None
    warmup: int = 10
    """Unrecorded requests per cell, run by the same threads before measuring."""
    cache: list[str] = field(default_factory=lambda: ["off"])
    baseline: bool = False
    hit_ratio: float = 1.0
    rows: int = 10_000
    """Size of the seeded key range (as given to ``bench seed --rows``)."""
    seed: int = 0
    """Seed of the key draws (not of the data)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"views": list(self.views), "batches": list(self.batches),
                "concurrency": list(self.concurrency), "requests": self.requests,
                "duration_s": self.duration_s, "warmup": self.warmup, "cache": list(self.cache),
                "baseline": self.baseline, "hit_ratio": self.hit_ratio, "rows": self.rows, "seed": self.seed}


@dataclass
class Measurement:
    """One (view, batch, concurrency, cache mode, path)."""

    view: str
    source: str
    source_type: str
    entity: str
    batch: int
    concurrency: int
    cache: str
    path: str
    call: str
    summary: Summary
    wall_s: float
    ratio_to_raw: float | None = None
    ratio_to_raw_p99: float | None = None

    def cell(self) -> tuple[str, int, int, str]:
        """The (view, batch, concurrency, cache) this record belongs to."""
        return self.view, self.batch, self.concurrency, self.cache


@dataclass
class BenchResult:
    """Everything one ``bench run`` measured (possibly cut short by Ctrl-C)."""

    params: BenchParams
    machine: dict[str, Any]
    config_path: str
    config_hash: str
    started_at: str
    records: list[Measurement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False
    elapsed_s: float = 0.0


# -- keys --------------------------------------------------------------------------------------------
def key_indices(batch: int, rows: int, hit_ratio: float, rng: random.Random) -> list[int]:
    """Synthetic row indices for one request: about ``hit_ratio`` of them in ``[0, rows)``, distinct when
    the range allows, the rest missing (far outside the range), in random order."""
    want = batch * hit_ratio
    hits = int(want)
    if rng.random() < want - hits:
        hits += 1
    out = rng.sample(range(rows), hits) if hits <= rows else rng.choices(range(rows), k=hits)
    if hits < batch:
        out += [MISS_BASE + rng.randrange(MISS_BASE) for _ in range(batch - hits)]
        rng.shuffle(out)
    return out


def request_keys(view: View, batch: int, params: BenchParams, phase: str, ticket: int) -> list[Key]:
    """The keys of request ``ticket``: the same indices for every view, path, concurrency and cache mode,
    so side-by-side stores and interleaved paths read the same logical rows."""
    rng = random.Random(f"{params.seed}:{batch}:{phase}:{ticket}")
    return [synthetic.key_for(view, i) for i in key_indices(batch, params.rows, params.hit_ratio, rng)]


def _keys_of(view: View, batch: int, params: BenchParams, phase: str) -> Callable[[int], list[Key]]:
    def keys(ticket: int) -> list[Key]:
        return request_keys(view, batch, params, phase, ticket)
    return keys

# -- the run -----------------------------------------------------------------------------------------
Call = Callable[[list[Key]], bool]
"""One path's read of a key list; returns whether the result was degraded."""


def make_service(runtime: factory.Runtime, view: str, cache: str) -> FeatureService:
    """The service the ``service`` path calls: only the view under test, with breaker and fallbacks.

    ``off`` leaves any cache out; ``cold`` and ``warm`` put a fresh cache in front (the view's own cache
    config, or an L1-only one), which ``warm`` fills with one pass over the seeded range before measuring.
    The ``dao`` and ``raw`` paths stay uncached, so the cache's effect shows as the service/dao ratio.
    """
    tiers: CacheConfig | bool = False
    if cache != "off":
        tiers = runtime.config.views[view].cache or CacheConfig(l1=L1Config())
    return FeatureService({view: factory.compose(runtime, view, cache=tiers)}, runtime.config.service)


def _budget_s(runtime: factory.Runtime, view: View) -> float:
    return min(runtime.config.service.deadline_ms, view.timeout_ms) / 1000.0


def path_calls(runtime: factory.Runtime, service: FeatureService, view: View, batch: int,
               baseline: bool) -> tuple[dict[str, Call], dict[str, str]]:
    """The callables of every path for one view and batch size, and how each is called (for the report)."""
    dao: BaseDao = runtime.daos[view.name]
    budget = _budget_s(runtime, view)
    fields = list(view.features)
    calls: dict[str, Call] = {}
    how: dict[str, str] = {}
    if view.entity == "item":
        def fetch_items(keys: list[Key]) -> bool:
            return bool(service.fetch(None, keys).degraded)
        calls["service"], how["service"] = fetch_items, "FeatureService.fetch(None, keys)"
    elif batch == 1:
        def fetch_user(keys: list[Key]) -> bool:
            return bool(service.fetch(keys[0]).degraded)
        calls["service"], how["service"] = fetch_user, "FeatureService.fetch(user)"
    else:
        def read_view(keys: list[Key]) -> bool:
            return bool(service.read_view(view.name, keys, timeout_s=budget).degraded)
        calls["service"], how["service"] = read_view, "FeatureService.read_view(view, keys)"

    def dao_read(keys: list[Key]) -> bool:
        return bool(dao.read(keys, timeout_s=budget).degraded)
    calls["dao"], how["dao"] = dao_read, "dao.read(keys, timeout_s)"

    if view.sequence is not None:
        seq_raw = dao.raw_sequence_reader() if baseline else None
        if seq_raw is not None:
            query, seq_reader = dao.sequence_query(None), seq_raw

            def raw_sequences(keys: list[Key]) -> bool:
                seq_reader(keys, query)
                return False
            calls["raw"], how["raw"] = raw_sequences, "dao.raw_sequence_reader()(keys, query)"
        return calls, how
    raw = dao.raw_reader() if baseline else None
    if raw is not None:
        reader = raw

        def raw_read(keys: list[Key]) -> bool:
            reader(keys, fields)
            return False
        calls["raw"], how["raw"] = raw_read, "dao.raw_reader()(keys, fields)"
    return calls, how


@dataclass
class _Phase:
    """Shared state of the worker threads of one phase (warmup or measure) of one cell."""

    calls: dict[str, Call]
    keys: Callable[[int], list[Key]]
    requests: int | None
    duration_s: float | None
    stop: threading.Event
    done: list[int]
    first_errors: dict[str, str]
    tickets: Iterator[int] = field(default_factory=itertools.count)

    def worker(self, index: int) -> dict[str, LatencyStats]:
        stats = {p: LatencyStats() for p in self.calls}
        order = list(self.calls.items())
        end = None if self.duration_s is None else time.perf_counter() + self.duration_s
        clock = time.perf_counter_ns
        while not self.stop.is_set():
            ticket = next(self.tickets)  # itertools.count: atomic under the GIL
            if self.requests is not None and ticket >= self.requests:
                break
            if end is not None and time.perf_counter() >= end:
                break
            keys = self.keys(ticket)
            turn = ticket % len(order)
            for path, call in order[turn:] + order[:turn]:
                started = clock()
                try:
                    degraded = call(keys)
                except Exception as exc:
                    stats[path].record_error()
                    self.first_errors.setdefault(path, f"{type(exc).__name__}: {exc}")
                    continue
                stats[path].record((clock() - started) / 1000.0, len(keys), degraded=degraded)
            self.done[index] += 1
        return stats


def _run_phase(pool: ThreadPoolExecutor, concurrency: int, phase: _Phase,
               on_progress: Callable[[float], None] | None) -> tuple[dict[str, LatencyStats], float, bool]:
    """Run one phase on the pool; Ctrl-C stops the workers and keeps what they measured."""
    interrupted = False
    started = time.perf_counter()
    futures = [pool.submit(phase.worker, i) for i in range(concurrency)]
    try:
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            for fut in finished:
                if fut.exception() is not None:
                    phase.stop.set()
            if on_progress is not None:
                if phase.duration_s is not None:
                    on_progress(min(time.perf_counter() - started, phase.duration_s))
                else:
                    on_progress(sum(phase.done))
    except KeyboardInterrupt:
        interrupted = True
        phase.stop.set()
        wait(futures)
    finally:
        phase.stop.set()
    wall = time.perf_counter() - started
    merged = {p: LatencyStats() for p in phase.calls}
    for fut in futures:
        for path, stats in fut.result().items():  # a worker's own bug surfaces here
            merged[path].merge(stats)
    return merged, wall, interrupted


def _warm(service: FeatureService, view: View, rows: int, chunk: int) -> None:
    for start in range(0, rows, chunk):
        keys = [synthetic.key_for(view, i) for i in range(start, min(rows, start + chunk))]
        service.read_view(view.name, keys)


def _check_seeded(runtime: factory.Runtime, view: View, rows: int) -> str | None:
    """A note when the first or last key of the range is missing (unseeded store, wrong --rows)."""
    probe = [synthetic.key_for(view, 0), synthetic.key_for(view, rows - 1)]
    try:
        found = runtime.daos[view.name].read(probe)
    except FeatureDaoError as exc:
        return f"view {view.name}: probing the seeded range failed: {type(exc).__name__}: {exc}"
    if found[0] is None or found[1] is None:
        return (f"view {view.name}: key {probe[0] if found[0] is None else probe[1]!r} is missing: seed the "
                f"view with `featuredao bench seed CONFIG --view {view.name} --rows {rows}` (or pass the "
                f"--rows it was seeded with); missing keys make the figures meaningless")
    return None


def cells(params: BenchParams) -> list[tuple[int, int, str, str]]:
    """(batch, concurrency, cache, view) in run order: views innermost, so stores alternate in time."""
    return [(b, c, m, v) for b in params.batches for c in params.concurrency for m in params.cache
            for v in params.views]


def _validate(params: BenchParams, runtime: factory.Runtime) -> None:
    unknown = [v for v in params.views if v not in runtime.daos]
    if unknown:
        raise BenchError(f"unknown view(s) {', '.join(unknown)}; known: {', '.join(runtime.daos)}")
    if not params.views:
        raise BenchError("no view to measure")
    bad_cache = [m for m in params.cache if m not in CACHE_MODES]
    if bad_cache:
        raise BenchError(f"unknown cache mode(s) {', '.join(bad_cache)}; use {', '.join(CACHE_MODES)}")
    if any(b < 1 for b in params.batches) or any(c < 1 for c in params.concurrency):
        raise BenchError("batch sizes and concurrency levels must be positive")
    if not 0.0 <= params.hit_ratio <= 1.0:
        raise BenchError("the hit ratio is between 0 and 1")
    if params.rows < 1:
        raise BenchError("--rows must be positive")
    if params.duration_s is None and (params.requests is None or params.requests < 1):
        raise BenchError("give a positive --requests or a --duration")


def run(config_path: str | os.PathLike[str], params: BenchParams, *, progress: bool = True,
        warn: Callable[[str], None] | None = None) -> BenchResult:
    """Measure every cell; Ctrl-C stops the run and returns what was measured so far."""
    runtime = factory.build(config_path)
    try:
        _validate(params, runtime)
        result = BenchResult(params, {}, str(config_path), config_hash(config_path),
                             datetime.now(UTC).isoformat(timespec="seconds"))
        load = load_average()
        started = time.perf_counter()
        try:
            _run_cells(runtime, params, result, progress, warn or (lambda _msg: None))
        except KeyboardInterrupt:
            result.interrupted = True
        result.elapsed_s = time.perf_counter() - started
        used = {runtime.config.sources[runtime.config.views[v].source].type for v in params.views}
        result.machine = machine_info(load, sorted(used))
        _ratios(result.records)
        return result
    finally:
        runtime.close()


def _run_cells(runtime: factory.Runtime, params: BenchParams, result: BenchResult, progress: bool,
               warn: Callable[[str], None]) -> None:
    for name in params.views:
        note = _check_seeded(runtime, runtime.daos[name].view, params.rows)
        if note is not None:
            result.notes.append(note)
            warn(note)
    order = cells(params)
    per_cell = params.duration_s if params.duration_s is not None else float(params.requests or 0)
    unit = "s" if params.duration_s is not None else "requests"
    missing_baseline: set[str] = set()
    errors_noted: set[tuple[str, str]] = set()
    with Progress(per_cell * len(order), unit, progress) as bar:
        for batch, concurrency, cache, name in order:
            view = runtime.daos[name].view
            bar.cell(f"{name} batch={batch} conc={concurrency} cache={cache}")
            service = make_service(runtime, name, cache)
            try:
                calls, how = path_calls(runtime, service, view, batch, params.baseline)
                if params.baseline and "raw" not in calls and name not in missing_baseline:
                    missing_baseline.add(name)
                    result.notes.append(f"view {name}: its adapter offers no raw baseline")
                if cache == "warm":
                    _warm(service, view, params.rows, max(params.batches))
                first_errors: dict[str, str] = {}
                with ThreadPoolExecutor(concurrency, thread_name_prefix="bench") as pool:
                    interrupted = False
                    if params.warmup > 0:
                        warm = _Phase(calls, _keys_of(view, batch, params, "w"),
                                      params.warmup, None, threading.Event(), [0] * concurrency, {})
                        _, _, interrupted = _run_phase(pool, concurrency, warm, None)
                    if interrupted:
                        raise KeyboardInterrupt
                    phase = _Phase(calls, _keys_of(view, batch, params, "m"),
                                   params.requests if params.duration_s is None else None, params.duration_s,
                                   threading.Event(), [0] * concurrency, first_errors)
                    merged, wall, interrupted = _run_phase(pool, concurrency, phase, bar.update)
            finally:
                service.close()
            source = runtime.config.sources[view.source]
            for path in PATHS:
                stats = merged.get(path)
                if stats is None or (stats.count == 0 and stats.errors == 0):
                    continue
                result.records.append(Measurement(name, source.name, source.type, view.entity, batch,
                                             concurrency, cache, path, how[path],
                                             stats.summary(concurrency), wall))
            for path, message in first_errors.items():
                if (name, path) not in errors_noted:
                    errors_noted.add((name, path))
                    note = f"view {name} path {path}: calls failed, first error: {message}"
                    result.notes.append(note)
                    warn(note)
            if interrupted:
                raise KeyboardInterrupt


def _ratios(records: Sequence[Measurement]) -> None:
    raw = {r.cell(): r for r in records if r.path == "raw"}
    for rec in records:
        base = raw.get(rec.cell())
        if base is None:
            continue
        if base.summary.p50_ms > 0 and rec.summary.requests:
            rec.ratio_to_raw = rec.summary.p50_ms / base.summary.p50_ms
        if base.summary.p99_ms > 0 and rec.summary.requests:
            rec.ratio_to_raw_p99 = rec.summary.p99_ms / base.summary.p99_ms


# -- seeding -----------------------------------------------------------------------------------------
def seed(config_path: str | os.PathLike[str], views: Sequence[str], rows: int, seed: int = 0, *,
         chunk: int = 5000, progress: bool = True) -> dict[str, int]:
    """prepare() each view's storage, then upsert ``rows`` synthetic rows in chunks; rows written by view."""
    if rows < 1:
        raise BenchError("--rows must be positive")
    runtime = factory.build(config_path)
    written: dict[str, int] = {}
    try:
        unknown = [v for v in views if v not in runtime.daos]
        if unknown:
            raise BenchError(f"unknown view(s) {', '.join(unknown)}; known: {', '.join(runtime.daos)}")
        with Progress(float(rows * len(views)), "rows", progress) as bar:
            for name in views:
                dao = runtime.daos[name]
                if not dao.source.capabilities.write:
                    raise BenchError(f"view {name}: its adapter is read-only, it cannot be seeded")
                if dao.source.capabilities.create:
                    dao.prepare()
                bar.cell(f"seeding {name}")
                sequence = dao.view.sequence is not None
                # A sequence view holds ~100 events per key: fewer keys per chunk keep memory flat.
                step = max(1, chunk // synthetic.SEQUENCE_MEDIAN) if sequence else chunk
                for start in range(0, rows, step):
                    n = min(step, rows - start)
                    if sequence:
                        dao.append(synthetic.event_rows(dao.view, n, seed=seed, start=start))
                    else:
                        dao.upsert(synthetic.rows(dao.view, n, seed=seed, start=start))
                    bar.update(start + n)
                written[name] = rows
    finally:
        runtime.close()
    return written

