"""Run a sync job: read the source in chunks, transform, resolve conflicts, write every target, checkpoint.

Each target has its own checkpoint (phase, cursor, pass generation), advanced in one state-store
transaction only after that target confirmed the chunk. Targets at the same cursor share one source
read; a target that fell behind (it was down) reads on its own, bounded by the cursor of the next
target ahead, and joins it when it gets there. A target that fails is left behind with its
checkpoint untouched and retried later; the others go on.

Delivery is at least once: a chunk written but not yet checkpointed when the process dies is written
again after a restart (upserts are idempotent, and ``last_writer_wins`` keeps replays harmless).

A source that fails (down, refusing, not set up for a change feed) is reported once per attempt,
recorded on every target's checkpoint (``last_error``) and retried with the same backoff as a target.
A cdc job checks the feed's prerequisites when it starts (and after a failure); a change feed that lost
changes after the checkpoint (an expired binlog, a dropped slot) is an error saying that a new snapshot
is needed, or, with ``"on_gap": "resnapshot"``, a new snapshot that also deletes from the targets the
keys the source lost meanwhile. ``abandon`` (another thread) ends a cycle at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from featuredao import registry as adapter_registry
from featuredao.config import Config
from featuredao.dao import BaseDao, Source, StateStore
from featuredao.errors import BackendError, Closed, ConfigError, ConfigIssue, Unsupported
from featuredao.factory import Runtime, build
from featuredao.metrics import Metrics
from featuredao.sync.config import SyncJob
from featuredao.sync.items import ItemBuilder
from featuredao.sync.pipeline import DeadLetters, Record, Transformer
from featuredao.sync.replay import replay_dead_letters
from featuredao.sync.sink import Item, Sink
from featuredao.sync.state import (
    FIRST_PHASE,
    CycleReport,
    ReplayReport,
    TargetState,
    applied_everywhere,
    backoff_s,
    canon,
    cursor_le,
    cursor_order,
    feed_from,
)
from featuredao.types import coercion_plan

__all__ = ["CycleReport", "ReplayReport", "SyncEngine", "TargetState"]

log = logging.getLogger("featuredao.sync")


class SyncEngine:
    """One job of a configuration, with its runtime, checkpoint store and dead-letter file."""

    def __init__(self, cfg: Config, job: str, *, base_dir: Path | None = None,
                 config_name: str = "featuredao", metrics: Metrics | None = None) -> None:
        jobs = {j.name: j for j in cfg.sync}
        if job not in jobs:
            known = ", ".join(jobs) or "none"
            raise ConfigError([ConfigIssue("$.sync", f"no job named {job!r}; known: {known}", repr(job))])
        self.job: SyncJob = jobs[job]
        self.base_dir = base_dir or Path.cwd()
        self.metrics = metrics or Metrics()
        self.runtime: Runtime = build(cfg, self.metrics)
        self._own_state: Source | None = None
        try:
            self.source: BaseDao = self.runtime.daos[self.job.source]
            self.sinks = {name: Sink(self.runtime, self.job, name, self.metrics) for name in self.job.targets}
            self.store = self._state_store(cfg, config_name)
        except BaseException:
            self.close()
            raise
        path = Path(self.job.dead_letter or f"{config_name}.{self.job.name}.dlq.jsonl")
        self.dlq = DeadLetters(path if path.is_absolute() else self.base_dir / path)
        self.items = ItemBuilder(self.job.name, coercion_plan(self.source.view.features),
                                 Transformer(self.job.steps), self.metrics)
        self.states: dict[str, TargetState] = {}
        self._prepared: set[str] = set()
        self._feed_acked: Any = None
        self._read_started = 0.0
        self._read_rows = 0
        self._following = False
        self._feed_checked = False
        self._source_failures = 0
        self._source_down_until = 0.0
        self._source_error: str | None = None
        # cdc: every key written is recorded with its snapshot's generation (forgotten when deleted), so
        # a new snapshot after a gap in the feed deletes from the targets the keys the source lost.
        self._track_keys = self.job.mode == "cdc"

    @classmethod
    def from_file(cls, path: str | Path, job: str, metrics: Metrics | None = None) -> SyncEngine:
        """Load a config file and build the engine of one of its jobs (paths relative to the file)."""
        from featuredao.config import load

        path = Path(path)
        return cls(load(path), job, base_dir=path.resolve().parent, config_name=path.stem, metrics=metrics)

    def _state_store(self, cfg: Config, config_name: str) -> StateStore:
        if self.job.checkpoint_source is not None:
            return self.runtime.sources[self.job.checkpoint_source].state_store()
        # The embedded default: a SQLite file next to the config, through the adapter functions.
        adapter = adapter_registry.get_adapter("sqlite")
        # Parallel workers share the file: a commit waits for another's rather than failing.
        options = adapter.options_model.model_validate({"path": str(self.base_dir / f"{config_name}.sync.db"),
                                                        "pool_size": 1, "busy_timeout_ms": 60_000})
        self._own_state = adapter("_sync_state", options)
        return self._own_state.state_store()

    def abandon(self) -> None:
        """Interrupt the running cycle (from another thread): the job's sources and targets are closed,
        so a read or write in progress ends now. What the targets confirmed is checkpointed already; the
        chunk in flight is read again by the next run. The default checkpoint store stays open."""
        self.runtime.close()

    def close(self) -> None:
        """Close the runtime and the checkpoint store."""
        if self._own_state is not None:
            self._own_state.close()
            self._own_state = None
        self.runtime.close()

    def __enter__(self) -> SyncEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- checkpoints ------------------------------------------------------------------------------
    def load_states(self) -> dict[str, TargetState]:
        """Read every target's checkpoint (health kept from earlier cycles of this process)."""
        stored = self.store.load(self.job.name)
        first = FIRST_PHASE[self.job.mode]
        states = {}
        for name in self.job.targets:
            state = TargetState.from_json(name, stored.get(name, {}), first)
            old = self.states.get(name)
            if old is not None:
                state.down_until, state.failures = old.down_until, old.failures
            states[name] = state
        self.states = states
        return states

    def _save(self, state: TargetState) -> None:
        """Store a checkpoint as it is (no timestamp: nothing was confirmed)."""
        self.store.commit(self.job.name, {state.name: state.to_json()})

    def _commit(self, state: TargetState, seen: tuple[str, Sequence[str], int] | None = None,
                forget: tuple[str, Sequence[str]] | None = None) -> None:
        state.updated_at = time.time()
        self.store.commit(self.job.name, {state.name: state.to_json()}, seen, forget)

    # -- one cycle --------------------------------------------------------------------------------
    def cycle(self, stop: threading.Event | None = None,
              on_progress: Callable[[int], None] | None = None) -> CycleReport:
        """Bring every reachable target up to the source (one full pass, or every change so far)."""
        stop = stop or threading.Event()
        report = CycleReport()
        try:
            self._cycle(stop, on_progress, report)
        except Closed:
            if not stop.is_set() and not self.runtime_closed():
                raise
            # abandon() or close() interrupted the cycle: what the targets confirmed is checkpointed.
            report.interrupted = True
        return report

    def runtime_closed(self) -> bool:
        """True once ``abandon`` or ``close`` closed the job's sources."""
        return any(src.closed for src in self.runtime.sources.values())

    def _cycle(self, stop: threading.Event, on_progress: Callable[[int], None] | None,
               report: CycleReport) -> None:
        states = self.load_states()
        now = time.time()
        for s in states.values():
            if s.down_until > now:
                report.down[s.name] = s.last_error or "down"
        if self._source_down_until > now:
            report.source_error = self._source_error  # still in its backoff: not tried now
            return
        resnapshot = self.job.on_gap == "resnapshot"
        while True:
            try:
                self._begin(states)
                self._pump(states, stop, on_progress, report)
            except (BackendError, Unsupported) as exc:
                if resnapshot and getattr(exc, "feed_gap", False):
                    resnapshot = False  # once per cycle
                    self._resnapshot(states, exc)
                    continue
                self._source_failed(exc, states, report)
                return
            break
        self._source_failures, self._source_down_until, self._source_error = 0, 0.0, None

    def _pump(self, states: Mapping[str, TargetState], stop: threading.Event,
              on_progress: Callable[[int], None] | None, report: CycleReport) -> None:
        """Read, transform and deliver chunk after chunk until every target is done (source errors raise)."""
        done: set[str] = set()
        self._read_started, self._read_rows = time.perf_counter(), 0
        while True:
            if stop.is_set():
                report.interrupted = True
                return
            active = [s for s in states.values()
                      if s.name not in done and s.name not in report.down
                      and s.phase not in ("idle", "new", "done")]
            if not active:
                return
            groups: dict[tuple[str, str], list[TargetState]] = {}
            for s in active:
                groups.setdefault((s.phase, canon(s.cursor)), []).append(s)
            ordered = sorted(groups.values(),
                             key=lambda g: (g[0].phase != "delete", cursor_order(g[0].cursor)))
            members = ordered[0]
            phase = members[0].phase
            if phase == "delete":
                for s in members:
                    self._delete_step(s, report, done)
                continue
            ahead = [g[0].cursor for g in ordered[1:] if g[0].phase == phase]
            bound = ahead[0] if ahead else None
            self._read_step(phase, members, bound, report, done, on_progress)

    def _source_failed(self, exc: BaseException, states: Mapping[str, TargetState],
                       report: CycleReport) -> None:
        """Report a source failure once, back off as for a target, and record it on every checkpoint."""
        self._source_failures += 1
        self._feed_checked = False  # the prerequisites (and gaps) are checked again on the next attempt
        backoff = backoff_s(self.job.retry_backoff_s, self._source_failures)
        self._source_down_until = time.time() + backoff
        message = f"{type(exc).__name__}: {exc}"
        if getattr(exc, "feed_gap", False):
            message += (f' (set "on_gap": "resnapshot" on job {self.job.name!r} to take the new snapshot '
                        "automatically)")
        self._source_error = report.source_error = message
        then = f"retried in {backoff:.1f}s" if self._following else "the next run retries"
        log.warning("job %s: source %s failed (attempt %d; %s; checkpoints stay): %s", self.job.name,
                    self.job.source, self._source_failures, then, message)
        for s in states.values():
            if s.name in report.down:
                continue  # a target that is down keeps its own error
            s.last_error = f"source {self.job.source}: {message}"
            try:
                self._commit(s)  # the cursor is unchanged
            except Exception as err:  # the checkpoint store may be that very source
                log.warning("job %s: recording the source failure on %s failed: %s", self.job.name, s.name,
                            err)

    def _resnapshot(self, states: Mapping[str, TargetState], exc: BaseException) -> None:
        """on_gap=resnapshot: every target starts over with a new snapshot (stale keys deleted after it)."""
        log.warning("job %s: %s: %s; taking a new snapshot (on_gap: resnapshot)", self.job.name,
                    type(exc).__name__, exc)
        for s in states.values():
            if s.phase != "new":
                s.phase, s.cursor, s.feed_start = "new", None, None
                s.last_error = f"new snapshot after a gap in the change feed: {type(exc).__name__}: {exc}"
                self._commit(s)
        self._feed_checked, self._feed_acked = False, None

    def _prepare_targets(self, states: Mapping[str, TargetState]) -> None:
        for s in states.values():
            if s.name not in self._prepared and s.down_until <= time.time():
                try:
                    self.sinks[s.name].dao.prepare()  # create the table where the store has one
                    self._prepared.add(s.name)
                except BackendError as exc:
                    log.warning("job %s: preparing target %s failed: %s", self.job.name, s.name, exc)

    def _begin(self, states: Mapping[str, TargetState]) -> None:
        """Start a pass (full), or install the change feed and take its position before the snapshot."""
        self._prepare_targets(states)
        for s in states.values():
            if self.job.mode == "full" and s.phase == "idle":
                s.generation += 1
                s.phase, s.cursor = "scan", None
                self._commit(s)
        if self.job.mode != "cdc":
            return
        if not self._feed_checked:
            self._check_feed(states)
        for s in states.values():
            if s.phase == "new":
                self.source.install_feed()
                start = self.source.feed_position()
                s.generation += 1
                s.phase, s.cursor, s.feed_start = "snapshot", None, start if start is not None else 0
                self._commit(s)

    def _check_feed(self, states: Mapping[str, TargetState]) -> None:
        """The feed's prerequisites, and that it still holds every change after the lowest checkpoint."""
        check = getattr(self.source, "check_feed", None)  # optional: adapters that can tell
        if check is not None:
            positions = [p for p in (feed_from(s) for s in states.values()) if p is not None]
            check(min(positions, key=cursor_order) if positions else None)
        self._feed_checked = True

    def _read(self, phase: str, cursor: Any, limit: int) -> tuple[list[Record], Any, bool | None]:
        """A chunk of records, and for a change feed that says so: the position it read up to (at or
        after the last record: transactions of other tables move the cursor too) and whether it
        reached the feed's end (None: the chunk is the last when it is short)."""
        if phase in ("scan", "snapshot"):
            return [Record(k, k, dict(r)) for k, r in self.source.scan(cursor, limit)], None, None
        if phase == "changes":
            assert self.job.watermark is not None
            after = None if cursor is None else (cursor[0], cursor[1])
            rows = self.source.changes(self.job.watermark, after, limit)
            return [Record([w, k], k, dict(r)) for w, k, r in rows], None, None
        changes = self.source.feed(cursor, limit)
        records = [Record(c.position, c.key, None if c.row is None else dict(c.row), c.ts) for c in changes]
        at_end = getattr(changes, "at_end", None)
        return records, getattr(changes, "tail", None), None if at_end is None else bool(at_end)

    def _throttle(self, rows: int) -> None:
        self._read_rows += rows
        rate = self.job.rate_limit_rows_s
        if rate:
            wait = self._read_rows / rate - (time.perf_counter() - self._read_started)
            if wait > 0:
                time.sleep(wait)

    def _read_step(self, phase: str, members: list[TargetState], bound: Any, report: CycleReport,
                   done: set[str], on_progress: Callable[[int], None] | None) -> None:
        cursor = members[0].cursor
        limit = self.job.batch_size
        records, tail, at_end = self._read(phase, cursor, limit)
        exhausted = len(records) < limit if at_end is None else at_end
        reach = records[-1].position if records else None
        if tail is not None and (reach is None or not cursor_le(tail, reach)):
            reach = tail
        if reach is not None and cursor is not None and cursor_le(reach, cursor):
            reach = None
        if reach is None and not exhausted:
            exhausted = True  # no progress: never spin on a feed that says it has more
        if bound is not None:
            kept = [r for r in records if cursor_le(r.position, bound)]
            reached = exhausted or len(kept) < len(records) or \
                (reach is not None and not cursor_le(reach, bound))
            records, exhausted = kept, False
            new_cursor = bound if reached else reach
        else:
            new_cursor = cursor if reach is None else reach
        report.read += len(records)
        self.metrics.sync_rows(self.job.name, "", "read", len(records))
        self._throttle(len(records))
        dead: list[dict[str, Any]] = []
        items = self.items(records, phase, dead, report)
        for s in members:
            self._deliver(s, phase, items, new_cursor, exhausted, report, done)
        # Transform failures concern every target: recorded once, attributed to no target.
        if dead:
            self.dlq.add(dead)
            report.failed += len(dead)
            self.metrics.sync_rows(self.job.name, "", "failed", len(dead))
        if phase == "stream":
            self._ack_feed()
        if on_progress is not None:
            on_progress(len(records))
    def _deliver(self, s: TargetState, phase: str, items: list[Item],
                 new_cursor: Any, exhausted: bool, report: CycleReport, done: set[str]) -> None:
        sink = self.sinks[s.name]
        dead: list[dict[str, Any]] = []
        try:
            written, deleted, _ = sink.apply(items, dead)
        except BackendError as exc:
            self._mark_down(s, exc, report)
            return
        if dead:
            self.dlq.add(dead)  # before the checkpoint: a crash in between re-records, never loses
        seen = None
        forget = None
        if phase == "scan" and self.job.delete_missing:
            seen = (s.name, [k for k, _ in sink.key_texts(items)], s.generation)
        elif self._track_keys and phase in ("snapshot", "stream"):
            last = {k: it.row is not None for k, it in sink.key_texts(items)}
            seen = (s.name, [k for k, present in last.items() if present], s.generation)
            forget = (s.name, [k for k, present in last.items() if not present])
        s.cursor = new_cursor
        s.written += written
        s.deleted += deleted
        s.failed += len(dead)
        s.last_error, s.failures, s.down_until = None, 0, 0.0
        times = [it.ts for it in items if it.ts is not None]
        if times:
            s.lag_s = max(0.0, time.time() - max(times))
            self.metrics.sync_lag(self.job.name, s.name, s.lag_s)
        elif exhausted and phase == "stream":
            s.lag_s = 0.0  # caught up with the feed
        if exhausted:
            if phase == "scan":
                self._scan_done(s, done)
            elif phase == "snapshot":
                if self._track_keys:
                    s.phase = "delete"  # keys of an earlier snapshot the source no longer has go first
                else:
                    s.phase, s.cursor = "stream", s.feed_start
            else:
                done.add(s.name)
        self._commit(s, seen, forget)
        report.written += written
        report.deleted += deleted
        report.failed += len(dead)
        self.metrics.sync_rows(self.job.name, s.name, "written", written)
        self.metrics.sync_rows(self.job.name, s.name, "deleted", deleted)
        self.metrics.sync_rows(self.job.name, s.name, "failed", len(dead))

    def _scan_done(self, s: TargetState, done: set[str]) -> None:
        """A target's full scan reached the end: the pass's deletes next, or the pass is over."""
        s.passes += 1
        s.phase = "delete" if self.job.delete_missing else "idle"
        if s.phase == "idle":
            done.add(s.name)

    def _delete_step(self, s: TargetState, report: CycleReport, done: set[str]) -> None:
        """After a full pass: delete the keys the pass did not see, chunk by chunk."""
        sink = self.sinks[s.name]
        stale = self.store.unseen(self.job.name, s.name, s.generation, self.job.batch_size)
        if not stale:
            if self.job.mode == "cdc":
                s.phase, s.cursor = "stream", s.feed_start  # after a snapshot: stream from its position
            else:
                s.phase = "idle"
                done.add(s.name)
            self._commit(s)
            return
        keys = [json.loads(k) for k in stale]
        try:
            sink.dao.delete(keys)
            sink._invalidate(keys)
        except BackendError as exc:
            self._mark_down(s, exc, report)
            return
        s.deleted += len(keys)
        report.deleted += len(keys)
        self.metrics.sync_rows(self.job.name, s.name, "deleted", len(keys))
        self._commit(s, forget=(s.name, stale))

    def _mark_down(self, s: TargetState, exc: BaseException, report: CycleReport) -> None:
        s.failures += 1
        backoff = backoff_s(self.job.retry_backoff_s, s.failures)
        s.down_until = time.time() + backoff
        s.last_error = f"{type(exc).__name__}: {exc}"
        report.down[s.name] = s.last_error
        log.warning("job %s: target %s failed, retried in %.1fs (its checkpoint stays): %s", self.job.name,
                    s.name, backoff, s.last_error)
        try:
            self._save(s)  # the cursor is unchanged
        except Exception:
            log.exception("job %s: recording the failure of %s failed", self.job.name, s.name)

    def _ack_feed(self) -> None:
        """Let the feed drop what every target (down ones included) has applied."""
        low = applied_everywhere(self.states.values())
        if low is None:
            return
        if self._feed_acked is None or cursor_order(low) > cursor_order(self._feed_acked):
            self.source.ack_feed(low)
            self._feed_acked = low

    # -- running ----------------------------------------------------------------------------------
    def run(self, *, follow: bool = False, interval_s: float = 5.0, stop: threading.Event | None = None,
            on_progress: Callable[[int], None] | None = None,
            on_cycle: Callable[[CycleReport], None] | None = None) -> CycleReport:
        """One cycle, or cycles every ``interval_s`` until ``stop`` is set (follow)."""
        stop = stop or threading.Event()
        self._following = follow
        while True:
            report = self.cycle(stop, on_progress)
            if on_cycle is not None:
                on_cycle(report)
            if not follow or stop.is_set() or report.interrupted:
                return report
            # A failing source is tried again when its backoff is over, not before.
            stop.wait(max(interval_s, self._source_down_until - time.time()))

    # -- status and dead letters ------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        """Every target's checkpoint, plus the job's dead-letter count."""
        dlq = self.dlq.count(self.job.name)
        out = []
        for s in self.load_states().values():
            out.append({"job": self.job.name, "mode": self.job.mode, "source": self.job.source,
                        "target": s.name, **s.to_json(), "dead_letters": dlq})
        return out
    def replay_dlq(self) -> ReplayReport:
        """Push this job's dead letters through the pipeline again, with each key's current source row.

        A key the source no longer has is deleted from targets that can delete. Entries that fail again
        are kept (with the new reason); entries of other jobs are untouched.
        """
        return replay_dead_letters(self.job, self.source, self.sinks, self.dlq, self.items)
