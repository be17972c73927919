"""Behaviour sequences: each key's newest events, filtered, deduplicated, capped, one list per field.

An adapter reads, per key, the newest events of the time window, at most ``limit`` of them
(``BaseDao._fetch_events`` given a :class:`SequenceQuery`). What a store did not do (event and threshold
filters where it cannot apply them, dedupe, the cap, the order of ties) happens here, once, in
:class:`Sequencer`. Merged views (an offline table of older events) and joined item features are
wrappers that compose any sequence view's DAO (``featuredao.sequence_merge``), like the cache.

Order: newest first; events with the same time are ordered by the item field, highest first (then by
the other fields), so every store answers alike.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Any

from featuredao.config import View
from featuredao.errors import CoercionError
from featuredao.schema import SequenceConfig
from featuredao.types import COERCION_ERRORS, FeatureType, FeatureValue, FinalRow, Key, coercer

Event = tuple[Any, ...]
ZERO: dict[str, Any] = {"int": 0, "float": 0.0, "str": ""}
"""What a null event field becomes, by type: the lists stay aligned and typed."""
_EXACT: dict[str, type[Any]] = {"int": int, "float": float, "str": str}


class SequenceQuery(list[str]):
    """The fields a sequence read returns (it is that list), with the window, limit and filters of the read.

    An adapter returns, per key, at most ``limit`` events newest first as tuples in this list's order,
    each with ``since <= time`` (and ``time <= until`` when set). ``events`` and ``minimum`` are set only
    for adapters with ``capabilities.sequence_filters``: then only events passing them count.
    """

    def __init__(self, fields: Iterable[str], *, time_field: str, since: float | None, until: float | None,
                 limit: int, event_field: str | None = None, events: tuple[str, ...] | None = None,
                 minimum: tuple[tuple[str, float], ...] = ()) -> None:
        super().__init__(fields)
        self.time_field = time_field
        self.since = since
        self.until = until
        self.limit = limit
        self.event_field = event_field
        self.events = events
        self.minimum = minimum

    def __repr__(self) -> str:
        return (f"SequenceQuery({list(self)!r}, since={self.since!r}, until={self.until!r}, "
                f"limit={self.limit}, events={self.events!r}, minimum={self.minimum!r})")


def order_key(spec: SequenceConfig) -> Callable[[Event], Any]:
    """The sort key of events (tuples in ``spec.fields`` order): sorted by it, highest first, they are in
    the documented order: time, then item, then every other field (a total order)."""
    fields = list(spec.fields)
    t = fields.index(spec.time_field)
    item = fields.index(spec.item_field) if spec.item_field else None
    rest = [i for i in range(len(fields)) if i not in (t, item)]
    return itemgetter(t, *([] if item is None else [item]), *rest)


class Sequencer:
    """One sequence view's reading rules: the query it sends and how it finishes what comes back."""

    def __init__(self, view: View) -> None:
        assert view.sequence is not None
        self.spec: SequenceConfig = view.sequence
        self.view = view
        spec = self.spec
        self.fields = tuple(spec.fields)
        self._types = tuple(spec.fields.values())
        self._scale = 1000.0 if spec.time_unit == "ms" else 1.0
        position = {f: i for i, f in enumerate(self.fields)}
        self._time = position[spec.time_field]
        self._order = order_key(spec)
        self._dedupe = position[spec.dedupe] if spec.dedupe else None
        self._event = position[spec.event_field] if spec.event_field else None
        self._events = frozenset(spec.events) if spec.events is not None else None
        self._minimum = tuple((position[f], v) for f, v in spec.min.items())
        self._converters = tuple(coercer(FeatureType(t)) for t in self._types)
        self._exact = tuple(_EXACT[t] for t in self._types)

    def query(self, as_of: float | None, filters_in_store: bool) -> SequenceQuery:
        """What to ask the store for a request at ``as_of`` (epoch seconds; None: now, no upper bound)."""
        spec = self.spec
        at = time.time() if as_of is None else as_of
        since = None if spec.window_s is None else (at - spec.window_s) * self._scale
        until = None if as_of is None else as_of * self._scale
        filtered_after = bool(spec.events or spec.min) and not filters_in_store
        limit = spec.max_len
        if filtered_after or spec.dedupe:
            limit = spec.scan_len or 4 * spec.max_len
        pushed = filters_in_store and bool(spec.events or spec.min)
        return SequenceQuery(self.fields, time_field=spec.time_field, since=since, until=until, limit=limit,
                             event_field=spec.event_field,
                             events=tuple(spec.events) if pushed and spec.events else None,
                             minimum=tuple(spec.min.items()) if pushed else ())

    def finish(self, raw: Mapping[Key, Sequence[Event]], query: SequenceQuery) -> dict[Key, Any]:
        """Each key's events as one list per field; keys with no event left are absent (missing).

        The store answered in the documented order within the window (the adapter contract): unless
        filters or dedupe are left to the core, a key's typed columns are cut at ``max_len`` as they are.
        """
        out: dict[Key, Any] = {}
        rework = self._dedupe is not None or (query.events is None and self._events is not None) or \
            (not query.minimum and bool(self._minimum))
        cap, fields, exact = self.spec.max_len, self.fields, self._exact
        for key, events in raw.items():
            if not events:
                continue
            columns = list(zip(*events, strict=True))
            # One C-level pass per column: a store's typed answer needs no per-value Python work.
            if rework or not all(set(map(type, c)) <= {t} for c, t in zip(columns, exact, strict=True)):
                kept = self.arrange(self._filter(self._typed(events), query))
                if kept:
                    out[key] = self.row(kept)
                continue
            out[key] = FinalRow(zip(fields, [list(c[:cap]) for c in columns], strict=True))
        return out

    def arrange(self, events: list[Event]) -> list[Event]:
        """Newest first (ties by item, then the other fields), one per dedupe value, capped."""
        events.sort(key=self._order, reverse=True)
        if self._dedupe is not None:
            seen: set[Any] = set()
            at = self._dedupe
            unique = []
            for event in events:
                value = event[at]
                if value not in seen:
                    seen.add(value)
                    unique.append(event)
                    if len(unique) == self.spec.max_len:
                        break
            return unique
        return events[:self.spec.max_len]

    def row(self, events: Sequence[Event]) -> FinalRow:
        """Events as aligned lists, one per field."""
        return FinalRow(zip(self.fields, map(list, zip(*events, strict=True)), strict=True))

    def events_of(self, row: Mapping[str, FeatureValue]) -> list[Event]:
        """A row's lists back as events (to merge them with another view's)."""
        columns: list[Any] = [row.get(f) or [] for f in self.fields]
        return list(zip(*columns, strict=True))

    def event(self, values: Mapping[str, Any]) -> Event:
        """One event to append, typed (a null field becomes its type's zero, a null time is refused)."""
        unknown = set(values) - set(self.fields)
        if unknown:
            raise CoercionError(f"view {self.view.name!r}: unknown event fields {sorted(unknown)}")
        if values.get(self.spec.time_field) is None:
            raise CoercionError(f"view {self.view.name!r}: an event needs its time "
                                f"({self.spec.time_field!r})")
        out = []
        for name, kind, convert in zip(self.fields, self._types, self._converters, strict=True):
            value = values.get(name)
            try:
                out.append(ZERO[kind] if value is None else convert(value))
            except COERCION_ERRORS as exc:
                raise CoercionError(f"view {self.view.name!r} event field {name!r}: {exc}") from exc
        return tuple(out)

    def _typed(self, events: Sequence[Event]) -> list[Event]:
        """Events whose every value has its field's type; a null becomes the type's zero, a null time
        or a value that cannot be converted drops the event."""
        if not events:
            return []
        columns = list(zip(*events, strict=True))
        changed = False
        for i, (column, kind) in enumerate(zip(columns, self._types, strict=True)):
            if set(map(type, column)) <= {_EXACT[kind]}:
                continue
            changed = True
            convert, zero = self._converters[i], ZERO[kind]
            fixed: list[Any] = []
            for v in column:
                try:
                    fixed.append(zero if v is None and i != self._time else convert(v))
                except (*COERCION_ERRORS, TypeError):
                    fixed.append(None)  # dropped below
            columns[i] = tuple(fixed)
        if not changed:
            return list(events)
        return [e for e in zip(*columns, strict=True) if None not in e]

    def _filter(self, events: list[Event], query: SequenceQuery) -> list[Event]:
        """The window, event types and thresholds, applied again (a store may have applied some)."""
        since, until = query.since, query.until
        t, ev, allowed, minimum = self._time, self._event, self._events, self._minimum
        if since is not None or until is not None:
            low, high = -math.inf if since is None else since, math.inf if until is None else until
            events = [e for e in events if low <= e[t] <= high]
        if allowed is not None and ev is not None:
            events = [e for e in events if e[ev] in allowed]
        for i, floor in minimum:
            events = [e for e in events if e[i] >= floor]
        return events
