"""One target of a sync job: rows typed to its features, conflicts resolved, writes, deletes, invalidation."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from featuredao.dao import BaseDao, FeatureDao, normaliser
from featuredao.errors import BackendError, BackendQueryError, BackendUnavailable, CoercionError
from featuredao.factory import Runtime
from featuredao.metrics import Metrics
from featuredao.sync import functions
from featuredao.sync.config import SyncJob
from featuredao.sync.pipeline import StageError, typed, typed_many
from featuredao.types import Key, Row, coercion_plan

log = logging.getLogger("featuredao.sync")


@dataclass
class Item:
    """A source record after the transforms: the row to write (None: delete the key)."""

    key: Key
    row: dict[str, Any] | None
    source_row: dict[str, Any] | None
    position: Any
    ts: float | None = None


class Sink:
    """One target view: typing to its features, conflicts, writes, deletes, cache invalidation."""

    def __init__(self, runtime: Runtime, job: SyncJob, name: str, metrics: Metrics) -> None:
        self.job = job
        self.name = name
        self.dao: BaseDao = runtime.daos[name]
        self.view = self.dao.view
        self.caps = self.dao.source.capabilities
        self.served: FeatureDao | None = runtime.served.get(name) if self.view.cache is not None else None
        self.coercions = coercion_plan(self.view.features)
        self.norm = normaliser(self.view.key_type)
        self.strategy = self.job.conflict.strategy
        self.version = self.job.conflict.version
        self._metrics = metrics

    def key_texts(self, items: Sequence[Item]) -> list[tuple[str, Item]]:
        """Each item with its key as the state store records it (JSON of the normalised key); items whose
        key cannot be normalised are left out."""
        out = []
        for it in items:
            try:
                out.append((json.dumps(self.norm(it.key)), it))
            except (TypeError, ValueError):
                continue
        return out

    def apply(self, items: Sequence[Item], dead: list[dict[str, Any]]) -> tuple[int, int, list[Key]]:
        """Write and delete; return (written, deleted, keys written or deleted). Records that cannot be
        written go to ``dead``; BackendError means the target cannot take the chunk now."""
        if self.view.sequence is not None:
            return self._append(items, dead)
        latest: dict[Key, tuple[Row | None, Item]] = {}
        present = [it.row for it in items if it.row is not None]
        rows, errors = typed_many(present, self.coercions)
        position = 0
        for it in items:
            row: Row | None = None
            if it.row is not None:
                row, error = rows[position], errors.get(position)
                position += 1
                if error is not None:
                    dead.append(self._dead(it, "coerce", error))
                    continue
            try:
                key = self.norm(it.key)
            except (TypeError, ValueError) as exc:
                dead.append(self._dead(it, "coerce", f"key {it.key!r}: {exc}"))
                continue
            latest.pop(key, None)  # the last change of a key in the chunk wins
            latest[key] = (row, it)
        upserts = [(k, r, it) for k, (r, it) in latest.items() if r is not None]
        deletes = [k for k, (r, _) in latest.items() if r is None]
        if not self.caps.delete or self.strategy == "target_wins":
            deletes = []
        if upserts and self.strategy != "source_wins":
            upserts = self._resolve(upserts, dead)
        rejected: list[dict[str, Any]] = []
        written = self._write(upserts, rejected)
        if len(upserts) > 1 and written == 0 and len(rejected) == len(upserts) and \
                all(e["stage"] == "write" for e in rejected):
            # Not one row went in: the target is broken (a missing table, a bad column), not the rows.
            raise BackendQueryError(f"every row of a chunk was rejected: {rejected[0]['reason']}",
                                    source=self.dao.source.name, view=self.name)
        dead.extend(rejected)
        if deletes:
            self.dao.delete(deletes)
        touched = [k for k, _, _ in upserts] + deletes
        self._invalidate(touched)
        return written, len(deletes), touched

    def _append(self, items: Sequence[Item], dead: list[dict[str, Any]]) -> tuple[int, int, list[Key]]:
        """A sequence target: each record is one event of the key in its field named like the view's key.

        Events are appended (a record deleted at the source is not taken back); a chunk written again after
        a restart appends its events again where the store keeps duplicates (see README)."""
        assert self.view.sequence is not None
        fields = list(self.view.sequence.fields)
        events: list[tuple[Key, dict[str, Any]]] = []
        for it in items:
            if it.row is None:
                continue
            try:
                key = self.norm(it.row.get(self.view.key))
                event = {f: it.row.get(f) for f in fields}
                self.dao.sequencer_event(event)  # typed once here: a bad record is a dead letter
            except (CoercionError, TypeError, ValueError) as exc:
                dead.append(self._dead(it, "coerce", f"{type(exc).__name__}: {exc}"))
                continue
            events.append((key, event))
        if not events:
            return 0, 0, []
        written = self.dao.append(events)
        touched = list(dict.fromkeys(k for k, _ in events))
        self._invalidate(touched)
        return written, 0, touched

    def _dead(self, it: Item, stage: str, reason: str) -> dict[str, Any]:
        return {"job": self.job.name, "target": self.name, "stage": stage, "reason": reason, "key": it.key,
                "position": it.position, "record": it.source_row}

    def _resolve(self, upserts: list[tuple[Key, Row, Item]],
                 dead: list[dict[str, Any]]) -> list[tuple[Key, Row, Item]]:
        current = self.dao.lookup([k for k, _, _ in upserts])
        out = []
        custom = functions.conflict(self.strategy)
        for key, row, it in upserts:
            stored = current.get(key)
            if stored is not None and not isinstance(stored, Mapping):
                stored = None  # a row the store could not decode: the source repairs it
            theirs = None
            if stored is not None:
                try:
                    theirs = typed(dict(stored), self.coercions)
                except StageError:
                    theirs = dict(stored)
            if self.strategy == "target_wins":
                if stored is None:
                    out.append((key, row, it))
            elif self.strategy == "last_writer_wins":
                assert self.version is not None
                mine, other = row.get(self.version), None if theirs is None else theirs.get(self.version)
                if other is None:
                    out.append((key, row, it))
                    continue
                if mine is None:
                    continue  # an unversioned row never replaces a versioned one
                try:
                    if mine >= other:
                        out.append((key, row, it))
                except TypeError as exc:
                    dead.append(self._dead(it, "conflict", f"versions {mine!r} and {other!r}: {exc}"))
            elif custom is not None:
                try:
                    chosen = custom(key, dict(row), theirs)
                    if chosen is not None:
                        out.append((key, typed(dict(chosen), self.coercions), it))
                except StageError as exc:
                    dead.append(self._dead(it, "conflict", f"resolver {self.strategy!r}: {exc.reason}"))
                except Exception as exc:
                    dead.append(self._dead(it, "conflict", f"resolver {self.strategy!r}: "
                                                           f"{type(exc).__name__}: {exc}"))
            else:
                out.append((key, row, it))
        return out

    def _write(self, rows: list[tuple[Key, Row, Item]], dead: list[dict[str, Any]]) -> int:
        """Write rows; on a rejected chunk, halve it until the rejected rows are found (dead letters)."""
        if not rows:
            return 0
        try:
            return self.dao.write_checked([(k, r) for k, r, _ in rows])
        except BackendUnavailable:
            raise
        except (BackendError, CoercionError, ValueError, TypeError) as exc:
            if len(rows) == 1:
                dead.append(self._dead(rows[0][2], "write", f"{type(exc).__name__}: {exc}"))
                return 0
            mid = len(rows) // 2
            return self._write(rows[:mid], dead) + self._write(rows[mid:], dead)

    def _invalidate(self, keys: list[Key]) -> None:
        invalidate = getattr(self.served, "invalidate", None)
        if invalidate is None or not keys:
            return
        try:
            invalidate(keys)
        except Exception as exc:  # the write happened; a cache entry lives at most its TTL
            log.warning("job %s target %s: cache invalidation failed: %s", self.job.name, self.name, exc)
            self._metrics.cache(self.name, "l2", "error", len(keys))
