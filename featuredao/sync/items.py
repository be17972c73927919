"""From source records to the items a sync job delivers: source coercion, then the job's steps."""

from __future__ import annotations

from typing import Any

from featuredao.metrics import Metrics
from featuredao.sync.pipeline import Record, StageError, Transformer, typed_many
from featuredao.sync.sink import Item
from featuredao.sync.state import CycleReport
from featuredao.types import Coercion


class ItemBuilder:
    """Turns one chunk of records into items: coerced as the source view declares, then transformed."""

    def __init__(self, job: str, coercions: tuple[Coercion, ...], transform: Transformer,
                 metrics: Metrics) -> None:
        self.job = job
        self.coercions = coercions
        self.transform = transform
        self.metrics = metrics

    def __call__(self, records: list[Record], phase: str, dead: list[dict[str, Any]],
                 report: CycleReport) -> list[Item]:
        """Items for the targets; records that fail coercion or a step go to ``dead``."""
        items = []
        rows, errors = typed_many([r.row for r in records if r.row is not None], self.coercions)
        position = 0
        steps = bool(self.transform.steps)
        for rec in records:
            if rec.row is None:
                items.append(Item(rec.key, None, None, rec.position, rec.ts))
                continue
            src, error = rows[position], errors.get(position)
            position += 1
            if src is None or error is not None:
                dead.append({"job": self.job, "target": None, "stage": "read", "reason": error,
                             "key": rec.key, "position": rec.position, "record": rec.row})
                continue
            if not steps:
                items.append(Item(rec.key, src, src, rec.position, rec.ts))
                continue
            try:
                out = self.transform(dict(src))
            except StageError as exc:
                dead.append({"job": self.job, "target": None, "stage": exc.stage, "reason": exc.reason,
                             "key": rec.key, "position": rec.position, "record": src})
                continue
            if out is None:
                report.filtered += 1
                self.metrics.sync_rows(self.job, "", "filtered")
                if phase != "scan":
                    # A row that no longer passes the filters leaves the targets (when they can delete).
                    items.append(Item(rec.key, None, src, rec.position, rec.ts))
                continue
            items.append(Item(rec.key, out, src, rec.position, rec.ts))
        return items
