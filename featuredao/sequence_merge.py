"""Sequence views composed with others: merged views (older events offline) and joined item features.

Both wrap any sequence view's DAO, as the cache and the fallback chain do; ``factory.compose`` builds them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from itertools import repeat
from operator import methodcaller
from typing import Any

from featuredao.dao import FeatureDao
from featuredao.deadline import Deadline
from featuredao.errors import reason_of
from featuredao.sequence import ZERO, Event, Sequencer
from featuredao.types import BatchResult, Degraded, FeatureValue, Key, Reason

# Merged views' reads run here while the primary reads in the caller's thread (threads start on demand).
_merges = ThreadPoolExecutor(max_workers=16, thread_name_prefix="featuredao-merge")


class _Wrapper(FeatureDao):
    """Writes, pings and cache invalidation go to the wrapped sequence view; reads are the wrapper's."""

    inner: FeatureDao

    def upsert(self, rows: Iterable[tuple[Key, Mapping[str, FeatureValue]]]) -> int:
        """Sequence views take events: see ``append``."""
        return self.inner.upsert(rows)

    def append(self, events: Iterable[tuple[Key, Mapping[str, FeatureValue]]]) -> int:
        """Events go to this view's own store."""
        return self.inner.append(events)

    def ping(self) -> None:
        """Ping this view's store."""
        self.inner.ping()

    def lane(self) -> tuple[str, int] | None:
        """This view's lane."""
        return self.inner.lane()

    def invalidate(self, keys: Iterable[Key]) -> None:
        """Forget cached sequences."""
        self.inner.invalidate(keys)


class MergedSequences(_Wrapper):
    """A sequence view with others merged in (e.g. older events offline): read at once, merged newest
    first, deduplicated across them, capped; a merged view that fails leaves the others' events."""

    def __init__(self, inner: FeatureDao, others: Sequence[FeatureDao]) -> None:
        self.inner = inner
        self.view = inner.view
        self.others = list(others)
        self._sequencer = Sequencer(self.view)

    def read_partial(self, keys: Sequence[Key], features: Sequence[str] | None = None, *,
                     timeout_s: float | None = None, as_of: float | None = None,
                     deadline: Deadline | None = None) -> BatchResult:
        """Every view's events of the keys, merged per key."""
        started = time.perf_counter()
        deadline = Deadline.of(deadline, timeout_s)
        try:
            futures = [_merges.submit(o.read_partial, keys, None, as_of=as_of, deadline=deadline)
                       for o in self.others]
        except RuntimeError:  # the interpreter is shutting down
            futures = []
        result = self.inner.read_partial(keys, None, as_of=as_of, deadline=deadline)
        merged = [list(map(self._events, result.rows))]
        # A little grace lets a merged view that honours the deadline report why it stopped.
        grace = Deadline(None if deadline.at is None else deadline.at + 0.002)
        for other, fut in zip(self.others, futures, strict=True):
            try:
                part = fut.result(timeout=grace.remaining())
            except FutureTimeout:
                fut.cancel()
                result.degraded.append(Degraded(other.view.name, Reason.TIMEOUT, "merged view: no answer "
                                                f"within {(time.perf_counter() - started) * 1000:.0f} ms"))
                continue
            except Exception as exc:
                result.degraded.append(Degraded(other.view.name, reason_of(exc), f"merged view: {exc}"))
                continue
            result.degraded.extend(part.degraded)
            if part.error is not None:
                result.degraded.append(Degraded(other.view.name, reason_of(part.error),
                                                f"merged view: {part.error}", tuple(part.failed[:20])))
            merged.append(list(map(self._events, part.rows)))
        if len(merged) > 1:
            rows: list[Any] = []
            for per_view in zip(*merged, strict=True):
                events = [e for evs in per_view for e in evs]
                rows.append(self._sequencer.row(self._sequencer.arrange(events)) if events else None)
            # A key the primary could not serve but a merged view could is served, not failed.
            served = {k for k, r in zip(result.keys, rows, strict=True) if r is not None}
            still = [k for k in result.failed if k not in served]
            if result.error is not None and not still:
                # Reported here, as the service would have: the error no longer travels with the result.
                result.degraded.append(Degraded(self.view.name, reason_of(result.error), str(result.error),
                                                tuple(result.failed[:20])))
                result.error = None
            result.failed = still
            result.rows = rows
        return _projected(result, features)

    def _events(self, row: Mapping[str, FeatureValue] | None) -> list[Event]:
        return [] if row is None else self._sequencer.events_of(row)

    def invalidate(self, keys: Iterable[Key]) -> None:
        """Forget cached sequences of every merged view."""
        keys = list(keys)
        for dao in (self.inner, *self.others):
            dao.invalidate(keys)


class JoinedSequences(_Wrapper):
    """A sequence view with features of each event's item: one batch read for every distinct item."""

    def __init__(self, inner: FeatureDao, items: FeatureDao) -> None:
        self.inner = inner
        self.view = inner.view
        self.items = items
        spec = self.view.sequence
        assert spec is not None and spec.join is not None and spec.item_field is not None
        self._item_field = spec.item_field
        self._features = list(spec.join.features)
        defaults = items.view.defaults
        self._defaults = [defaults.get(f) if defaults.get(f) is not None
                          else ZERO[items.view.features[f].value] for f in self._features]

    def read_partial(self, keys: Sequence[Key], features: Sequence[str] | None = None, *,
                     timeout_s: float | None = None, as_of: float | None = None,
                     deadline: Deadline | None = None) -> BatchResult:
        """The sequences, then the joined features of their items (defaults where the join failed)."""
        deadline = Deadline.of(deadline, timeout_s)
        result = self.inner.read_partial(keys, None, as_of=as_of, deadline=deadline)
        distinct: dict[Any, None] = {}
        for seq in result.rows:
            if seq is not None:
                items: Any = seq.get(self._item_field) or ()
                distinct.update(dict.fromkeys(items))
        # Per joined feature, item -> value (items it lacks, or holds null for, are absent): each row's
        # list is then one C-level map of dict.get with the default.
        columns: list[dict[Any, Any]] = [{} for _ in self._features]
        if distinct:
            try:
                if deadline.expired:
                    raise TimeoutError("no time left for the join")
                joined = self.items.read_partial(list(distinct), self._features, deadline=deadline)
                present = [(k, r) for k, r in zip(distinct, joined.rows, strict=True) if r is not None]
                if present:
                    served, found = zip(*present, strict=True)
                    for column, name in zip(columns, self._features, strict=True):
                        column.update(zip(served, map(methodcaller("get", name), found), strict=True))
                        if None in column.values():  # a null feature takes the default, like a missing item
                            for k in [k for k, v in column.items() if v is None]:
                                del column[k]
                if joined.error is not None:
                    result.degraded.append(Degraded(self.items.view.name, reason_of(joined.error),
                                                    f"joined into {self.view.name}: {joined.error}"))
            except Exception as exc:
                result.degraded.append(Degraded(self.items.view.name, reason_of(exc),
                                                f"joined into {self.view.name}: {exc}; defaults used"))
        lookups = [(name, column.get, default)
                   for name, column, default in zip(self._features, columns, self._defaults, strict=True)]
        rows: list[Any] = []
        for read in result.rows:
            if read is None:
                rows.append(None)
                continue
            # A new row: the one read may be held by a cache.
            row: dict[str, Any] = dict(read)
            ids: Any = row.get(self._item_field) or ()
            for name, get, default in lookups:
                row[name] = list(map(get, ids, repeat(default, len(ids))))
            rows.append(row)
        result.rows = rows
        return _projected(result, features)


def _projected(result: BatchResult, features: Sequence[str] | None) -> BatchResult:
    if features is None:
        return result
    names = list(features)
    result.rows = [None if r is None else {f: r.get(f) for f in names} for r in result.rows]
    return result
