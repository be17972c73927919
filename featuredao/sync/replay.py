"""Replaying a sync job's dead letters: each key's current source row through the pipeline again."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from featuredao.dao import BaseDao, normaliser
from featuredao.errors import BackendError
from featuredao.sync.config import SyncJob
from featuredao.sync.items import ItemBuilder
from featuredao.sync.pipeline import DeadLetters, Record
from featuredao.sync.sink import Item, Sink
from featuredao.sync.state import CycleReport, ReplayReport, canon


def replay_dead_letters(job: SyncJob, source: BaseDao, sinks: Mapping[str, Sink], dlq: DeadLetters,
                        build: ItemBuilder) -> ReplayReport:
    """Push the job's dead letters through the pipeline again, with each key's current source row.

    A key the source no longer has is deleted from targets that can delete. Entries that fail again
    are kept (with the new reason); entries of other jobs are untouched.
    """
    report = ReplayReport()
    entries = dlq.read()
    mine = [e for e in entries if e.get("job") == job.name and "key" in e]
    others = [e for e in entries if not (e.get("job") == job.name and "key" in e)]
    remaining: list[dict[str, Any]] = []
    size = job.batch_size
    for i in range(0, len(mine), size):
        chunk = mine[i:i + size]
        report.replayed += len(chunk)
        try:
            current = source.lookup([e["key"] for e in chunk])
        except BackendError as exc:
            report.down[job.source] = f"{type(exc).__name__}: {exc}"
            remaining.extend(chunk)
            report.kept += len(chunk)
            continue
        src_norm = normaliser(source.view.key_type)
        records = []
        for e in chunk:
            raw = current.get(src_norm(e["key"]))
            row = dict(raw) if isinstance(raw, Mapping) else None
            records.append(Record(e.get("position"), src_norm(e["key"]), row))
        dead: list[dict[str, Any]] = []
        scratch = CycleReport()
        items = build(records, "replay", dead, scratch)
        by_target: dict[str, list[Item]] = {t: [] for t in job.targets}
        wanted = {t: {src_norm(e["key"]) for e in chunk if e.get("target") in (None, t)}
                  for t in job.targets}
        for it in items:
            for t in job.targets:
                if it.key in wanted[t]:
                    by_target[t].append(it)
        for t, its in by_target.items():
            if not its:
                continue
            t_dead: list[dict[str, Any]] = []
            try:
                sinks[t].apply(its, t_dead)
            except BackendError as exc:
                report.down[t] = f"{type(exc).__name__}: {exc}"
                keep = [e for e in chunk if e.get("target") in (None, t)]
                remaining.extend({**e, "target": t} for e in keep)
                report.kept += len(keep)
                continue
            dead.extend(t_dead)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        remaining.extend({"ts": stamp, **d} for d in dead)
        report.failed_again += len(dead)
    report.resolved = report.replayed - report.failed_again - report.kept
    dlq.replace(others + _dedupe(remaining))
    return report


def _dedupe(entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for e in entries:
        k = canon([e.get("key"), e.get("target"), e.get("stage"), e.get("reason")])
        if k not in seen:
            seen.add(k)
            out.append(e)
    return out
