"""Key ranges of a sync job: split points, the pass plan they are persisted in, one range run in-process.

A job with ``"parallelism": N`` splits its source's key space into ranges ``(lower, upper]`` (the first
open below, the last open above) at split points taken from the source (key quantiles in SQL, or a
sample of a scan where the adapter offers none). The split points are persisted with the pass (the
``@pass`` checkpoint of the job), so a restart reuses the same ranges; a new full pass takes new ones.
Every range has its own checkpoint per target (``<target>@<range id>``), and all ranges mark the keys
they write in the target's one seen-key registry with the pass's generation, so ``delete_missing``
deletes, after every range finished, exactly the keys this job wrote that the whole pass did not see.

Public names (what a runner, local or Spark, needs):

* :class:`Range` - one range: ``id``, ``lower`` (exclusive, None: open), ``upper`` (inclusive, None: open).
* :func:`ranges` - the ranges of a list of split points; :func:`split_points` - a source's split points.
* :class:`PassPlan` - a pass as persisted (generation, ranges); :func:`load_plan` reads it.
* :func:`plan_pass` - the running pass's plan, or a new pass (new split points) when none is running.
* :func:`pending` - the ranges a target has not finished in the plan.
* :func:`run_range` - run ONE range to its end in the calling process (config path or dict, job, range id).
* :func:`finish_pass` - once no range is pending: the pass's deletes, then the pass is closed.
* :func:`range_status` - every range's checkpoint per target (what ``featuredao sync status`` shows).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featuredao.config import Config, load
from featuredao.dao import BaseDao
from featuredao.errors import ConfigError, ConfigIssue
from featuredao.metrics import Metrics
from featuredao.sync.engine import SyncEngine
from featuredao.sync.pipeline import Record
from featuredao.sync.state import CycleReport, TargetState
from featuredao.types import Key

PLAN = "@pass"
"""The name of a job's pass plan among its checkpoints (target names cannot hold ``@``)."""
_SAMPLE_PER_RANGE = 64


@dataclass(frozen=True, slots=True)
class Range:
    """Keys ``k`` with ``lower < k <= upper`` (a None bound is open)."""

    id: int
    lower: Key | None
    upper: Key | None

    def holds(self, key: Key) -> bool:
        """Whether ``key`` is in this range (in the keys' natural order)."""
        above = self.lower is None or key > self.lower  # type: ignore[operator]
        return above and (self.upper is None or key <= self.upper)  # type: ignore[operator]


def ranges(points: list[Key]) -> list[Range]:
    """The ranges between sorted, distinct split points: ``len(points) + 1``, covering every key once."""
    bounds: list[Key | None] = [None, *points, None]
    return [Range(i, bounds[i], bounds[i + 1]) for i in range(len(points) + 1)]


def split_points(source: BaseDao, n: int, *, batch_size: int = 1000) -> list[Key]:
    """Up to ``n - 1`` distinct keys of ``source`` in scan order splitting it into ``n`` ranges of about equal
    size: the adapter's quantiles, else a bounded reservoir sample of one key scan."""
    if n <= 1:
        return []
    points = source.split_points(n)
    if points is None:
        points = _sampled(source, n, batch_size)
    out: list[Key] = []
    for p in points:  # already in the source's order; equal neighbours would make empty duplicate ranges
        if not out or p != out[-1]:
            out.append(p)
    return out


def _sampled(source: BaseDao, n: int, batch_size: int) -> list[Key]:
    size = _SAMPLE_PER_RANGE * n
    sample: list[Key] = []
    seen = 0
    rng = random.Random(0)  # reproducible for one content
    after: Key | None = None
    while True:
        rows = source.scan(after, batch_size)
        for key, _ in rows:
            seen += 1
            if len(sample) < size:
                sample.append(key)
            else:
                j = rng.randrange(seen)
                if j < size:
                    sample[j] = key
        if len(rows) < batch_size:
            break
        after = rows[-1][0]
    sample.sort()
    if not sample:
        return []
    return [sample[min(len(sample) - 1, (i * len(sample)) // n)] for i in range(1, n)]


@dataclass(frozen=True, slots=True)
class PassPlan:
    """A pass as persisted: its generation (seen-key marks), split points and state."""

    generation: int
    parallelism: int
    points: list[Key]
    phase: str
    """``scan`` (ranges running), ``idle`` (the pass is over; full jobs) or ``changes`` (incremental)."""
    started_at: float

    @property
    def ranges(self) -> list[Range]:
        """The pass's ranges."""
        return ranges(self.points)

    def to_json(self) -> dict[str, Any]:
        """The persisted form."""
        return {"generation": self.generation, "parallelism": self.parallelism, "splits": self.points,
                "phase": self.phase, "started_at": self.started_at}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PassPlan:
        """Read the persisted form."""
        return cls(int(data["generation"]), int(data["parallelism"]), list(data["splits"]),
                   str(data["phase"]), float(data.get("started_at") or 0.0))


def range_name(target: str, range_id: int) -> str:
    """The checkpoint name of one target in one range."""
    return f"{target}@{range_id}"


def load_plan(engine: SyncEngine) -> PassPlan | None:
    """The job's persisted pass plan, if any."""
    data = engine.store.load(engine.job.name).get(PLAN)
    return None if data is None else PassPlan.from_json(data)


def plan_pass(engine: SyncEngine, n: int | None = None) -> PassPlan:
    """The plan the ranges run under: the running pass's (its persisted ranges, whatever ``n`` is now),
    else a new one with ``n`` (default: the job's parallelism) ranges from new split points."""
    job = engine.job
    n = n or job.parallelism
    stored = engine.store.load(job.name)
    old = PassPlan.from_json(stored[PLAN]) if PLAN in stored else None
    if old is not None and old.phase == "scan":
        return old  # a restart: the same ranges, each from its checkpoint
    if old is not None and job.mode == "incremental" and old.parallelism == n and old.phase == "changes":
        return old
    gens = [int(v.get("generation", 0)) for v in stored.values() if isinstance(v, Mapping)]
    points = split_points(engine.source, n, batch_size=job.batch_size)
    plan = PassPlan(max(gens, default=0) + 1, n, points, "changes" if job.mode == "incremental" else "scan",
                time.time())
    values: dict[str, Any] = {PLAN: plan.to_json()}
    for target in job.targets:
        if job.mode == "incremental":
            # New ranges start at the lowest watermark any earlier checkpoint of the target reached
            # (re-reading a little is harmless: at least once), the whole key space being covered again.
            cursors = [v.get("cursor") for name, v in stored.items()
                       if name == target or name.startswith(f"{target}@")]
            start = None if not cursors or None in cursors else min(cursors, key=_watermark_order)
            for r in plan.ranges:
                values[range_name(target, r.id)] = TargetState(target, "changes", start,
                                                               plan.generation).to_json()
        else:
            for r in plan.ranges:
                start = TargetState(target, "scan", r.lower, plan.generation)
                values[range_name(target, r.id)] = start.to_json()
            # The target's own checkpoint says a pass is on (a run without parallelism scans it all again).
            state = TargetState.from_json(target, stored.get(target, {}), "idle")
            state.phase, state.cursor, state.generation = "scan", None, plan.generation
            values[target] = state.to_json()
    # Ranges of an earlier plan that this one lacks are dropped from the status by the stale names check.
    engine.store.commit(job.name, values)
    return plan


def _watermark_order(cursor: Any) -> tuple[Any, ...]:
    return tuple(cursor) if isinstance(cursor, list | tuple) else (cursor,)


def pending(engine: SyncEngine, plan: PassPlan) -> list[int]:
    """Ids of the ranges some target has not finished (incremental: every range, each catches up)."""
    if plan.phase == "changes":
        return [r.id for r in plan.ranges]
    stored = engine.store.load(engine.job.name)
    out = []
    for r in plan.ranges:
        for target in engine.job.targets:
            data = stored.get(range_name(target, r.id), {})
            if data.get("phase") != "done" or data.get("generation") != plan.generation:
                out.append(r.id)
                break
    return out


class RangeEngine(SyncEngine):
    """A :class:`SyncEngine` confined to one range of the job's plan, with that range's checkpoints."""

    def __init__(self, cfg: Config, job: str, range_id: int, *, base_dir: Path | None = None,
                 config_name: str = "featuredao", metrics: Metrics | None = None) -> None:
        super().__init__(cfg, job, base_dir=base_dir, config_name=config_name, metrics=metrics)
        plan = load_plan(self)
        if plan is None or not 0 <= range_id < len(plan.ranges):
            self.close()
            count = 0 if plan is None else len(plan.ranges)
            raise ConfigError([ConfigIssue("$.sync", f"job {job!r} has no range {range_id} in its pass plan "
                                           f"({count} ranges; plan_pass makes them)", repr(range_id))])
        self.plan = plan
        self.range = plan.ranges[range_id]

    def load_states(self) -> dict[str, TargetState]:
        """This range's checkpoint of every target."""
        stored = self.store.load(self.job.name)
        states = {}
        for name in self.job.targets:
            state = TargetState.from_json(name, stored.get(range_name(name, self.range.id), {}), "done")
            old = self.states.get(name)
            if old is not None:
                state.down_until, state.failures = old.down_until, old.failures
            states[name] = state
        self.states = states
        return states

    def _save(self, state: TargetState) -> None:
        self.store.commit(self.job.name, {range_name(state.name, self.range.id): state.to_json()})

    def _commit(self, state: TargetState, seen: tuple[str, Any, int] | None = None,
                forget: tuple[str, Any] | None = None) -> None:
        # Seen keys go to the target's one registry (group = target): the pass's deletes see every range.
        state.updated_at = time.time()
        name = range_name(state.name, self.range.id)
        self.store.commit(self.job.name, {name: state.to_json()}, seen, forget)

    def _begin(self, states: Mapping[str, TargetState]) -> None:
        self._prepare_targets(states)  # the pass was started by plan_pass, not per range

    def _read(self, phase: str, cursor: Any, limit: int) -> tuple[list[Record], Any, bool | None]:
        r = self.range
        if phase == "scan":
            rows = self.source.scan(cursor, limit, upper=r.upper)
            return [Record(k, k, dict(v)) for k, v in rows], None, None
        if phase == "changes":
            assert self.job.watermark is not None
            after = None if cursor is None else (cursor[0], cursor[1])
            found = self.source.changes(self.job.watermark, after, limit, lower=r.lower, upper=r.upper)
            return [Record([w, k], k, dict(v)) for w, k, v in found], None, None
        return super()._read(phase, cursor, limit)

    def _scan_done(self, s: TargetState, done: set[str]) -> None:
        s.phase = "done"  # the pass's deletes wait for every range (finish_pass)
        done.add(s.name)


def _config(config: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[Config, Path | None, str]:
    if isinstance(config, Mapping):
        return load(config), None, "featuredao"
    path = Path(config)
    return load(path), path.resolve().parent, path.stem


def open_range(config: str | os.PathLike[str] | Mapping[str, Any], job: str, range_id: int, *,
               base_dir: Path | None = None, config_name: str | None = None,
               metrics: Metrics | None = None) -> RangeEngine:
    """The engine of one range (paths relative to the config file, or to ``base_dir`` for a dict)."""
    cfg, where, name = _config(config)
    return RangeEngine(cfg, job, range_id, base_dir=base_dir or where, config_name=config_name or name,
                       metrics=metrics)


def run_range(config: str | os.PathLike[str] | Mapping[str, Any], job: str, range_id: int, *,
              base_dir: Path | None = None, config_name: str | None = None,
              stop: threading.Event | None = None,
              on_progress: Callable[[int], None] | None = None) -> CycleReport:
    """Run one range of the job's current plan to its end in this process (a full range's scan, or an
    incremental range's changes so far), from its checkpoints; the plan must exist (:func:`plan_pass`)."""
    with open_range(config, job, range_id, base_dir=base_dir, config_name=config_name) as engine:
        return engine.run(stop=stop, on_progress=on_progress)


def finish_pass(engine: SyncEngine, plan: PassPlan) -> CycleReport:
    """After every range of a full pass finished: each target's deletes (``delete_missing``: keys it wrote
    that the pass did not see), then the pass is closed. Incremental plans stay open (nothing to do)."""
    report = CycleReport()
    if plan.phase != "scan":
        return report
    job = engine.job
    stored = engine.store.load(job.name)
    for target in job.targets:
        state = TargetState.from_json(target, stored.get(target, {}), "idle")
        if state.phase == "scan" and state.generation == plan.generation:
            names = [range_name(target, r.id) for r in plan.ranges]
            state.written += sum(int(stored.get(n, {}).get("written", 0)) for n in names)
            state.failed += sum(int(stored.get(n, {}).get("failed", 0)) for n in names)
            state.passes += 1
            state.phase, state.cursor = ("delete" if job.delete_missing else "idle"), None
            state.updated_at = time.time()
            engine.store.commit(job.name, {target: state.to_json()})
    if job.delete_missing:
        # The engine's own delete phase on the target checkpoints set just now; not a cycle, whose start
        # would begin a new pass for a target already idle.
        engine._pump(engine.load_states(), threading.Event(), None, report)
        if not report.ok:
            return report
    states = engine.store.load(job.name)
    if all(states.get(t, {}).get("phase") == "idle" for t in job.targets):
        engine.store.commit(job.name, {PLAN: {**plan.to_json(), "phase": "idle", "finished_at": time.time()}})
    return report


def range_status(engine: SyncEngine) -> list[dict[str, Any]]:
    """Every range's checkpoint per target in the job's plan (none without a plan)."""
    stored = engine.store.load(engine.job.name)
    if PLAN not in stored:
        return []
    plan = PassPlan.from_json(stored[PLAN])
    out = []
    for r in plan.ranges:
        for target in engine.job.targets:
            data = stored.get(range_name(target, r.id))
            if data is None:
                continue
            state = TargetState.from_json(target, data, "done")
            out.append({"job": engine.job.name, "mode": engine.job.mode, "source": engine.job.source,
                        "target": target, "range": r.id, "lower": r.lower, "upper": r.upper,
                        "pass_phase": plan.phase, **state.to_json()})
    return out


__all__ = ["PLAN", "PassPlan", "Range", "RangeEngine", "finish_pass", "load_plan", "open_range", "pending",
           "plan_pass", "range_name", "range_status", "ranges", "run_range", "split_points"]
