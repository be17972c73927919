"""Sequence views on TableStore: a row per event under primary key ``(key, time, _tie)``, GetRange BACKWARD.

Layout (plan of issue 16): the events table's primary key is the view's ``key`` (STRING, or INTEGER for
``key_type`` "int"), then the time field (INTEGER; a float time field is BINARY holding its order bytes,
``adapters._sequence_order``, as TableStore has no DOUBLE key), then ``_tie`` (BINARY): the order bytes of
the item field and the other fields. Read backwards, a key's rows come newest first and equal times in
the core's documented tie order (item, then the other fields, highest first), so a limit keeps the same
events the core would. Every other field is an attribute column of its own type (int INTEGER, float
DOUBLE, str STRING). Equal times never overwrite each other (``_tie`` holds every field); an identical
event appended twice is one row, so appends are idempotent.

Reads: one GetRange per key, BACKWARD from ``(key, until, INF_MAX)`` (inclusive) to ``(key, since,
INF_MIN)`` (exclusive) with ``limit``, followed through ``next_start_primary_key`` while the service
stops early (5,000 rows or 4 MB scanned). The event-type and threshold filters are pushed as a column
filter (``sequence_filters``: event types an OR of equalities, thresholds ``>=`` on the column's own
type, a missing column passing as its type's zero, as the core reads it), so the limit counts events that
pass them. A chunk's keys run concurrently on the source's pool (the OTSClient is thread-safe: each
request builds its own context and borrows a connection of its urllib3 pool; table reads already share
it); the calling thread takes keys too, so a chunk never waits on a pool that its own siblings fill.

Writes: BatchWriteRow puts of 200 rows, the same retries as table views. ``retain`` is not applied (the
service trims by a table TTL on write times, not by event time or count).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from featuredao.errors import UsageError
from featuredao.sequence import Event, SequenceQuery
from featuredao.types import Key

from ._sequence_order import decode_float, encode_float, encoder, time_bounds

TIE = "_tie"
"""The last primary-key column: the order bytes of an event's fields other than its time."""
GET_RANGE_MAX_ROWS = 5000
_DONE = object()
# Benchmarks' hand-written baseline keeps one thread pool per endpoint.
_raw_pools: dict[tuple[str, str], ThreadPoolExecutor] = {}
_raw_lock = threading.Lock()


def _ots() -> Any:
    import tablestore  # imported (quietly) by the adapter module before this one

    return tablestore


class TableStoreSequenceMixin:
    """The sequence part of ``TableStoreDao``."""

    view: Any
    source: Any
    _table: str
    _key: str

    def _sequence_layout(self) -> None:
        """Attribute columns, key types and the tie bytes of the view's events."""
        spec = self.view.sequence
        fields = list(spec.fields)
        if TIE in fields or self._key == TIE:
            raise UsageError(f"view {self.view.name!r}: {TIE!r} is the events table's tie column")
        rest = [*([spec.item_field] if spec.item_field else []),
                *(f for f in fields if f not in (spec.time_field, spec.item_field))]
        self._seq_time = spec.time_field
        self._seq_float_time = spec.fields[spec.time_field] == "float"
        self._seq_attrs = [f for f in fields if f != spec.time_field]
        self._seq_tie_at = [fields.index(f) for f in rest]
        self._seq_time_at = fields.index(spec.time_field)
        self._seq_tie = encoder([spec.fields[f] for f in rest])
        self._seq_types = dict(spec.fields)

    def _event_pk(self, key: Key, event: Event) -> list[tuple[str, Any]]:
        t = event[self._seq_time_at]
        # bytearray: the SDK sends bytes as STRING, a bytearray as BINARY.
        tie = bytearray(self._seq_tie([event[i] for i in self._seq_tie_at]) or b"\x00")
        when = bytearray(encode_float(t)) if self._seq_float_time else t
        return [(self._key, key), (self._seq_time, when), (TIE, tie)]

    def _append_batch(self, events: list[tuple[Key, list[Event]]]) -> None:
        attrs = [(i, f) for i, f in enumerate(self.view.sequence.fields) if f != self._seq_time]
        rows: dict[tuple[Any, ...], tuple[Key, list[tuple[str, Any]], list[tuple[str, Any]]]] = {}
        for key, added in events:
            for e in added:
                pk = self._event_pk(key, e)
                # An identical event is the same row: one request must not name a row twice.
                ident = (key, pk[1][1] if isinstance(pk[1][1], int) else bytes(pk[1][1]), bytes(pk[2][1]))
                rows[ident] = (key, pk, [(f, e[i]) for i, f in attrs])
        self._put_rows(list(rows.values()))  # type: ignore[attr-defined]

    def _prepare_sequence(self) -> None:
        """Create the events table keyed by (key, time, tie) unless it exists."""
        ots = _ots()
        key_type = "INTEGER" if self.view.key_type == "int" else "STRING"
        schema = [(self._key, key_type), (self._seq_time, "BINARY" if self._seq_float_time else "INTEGER"),
                  (TIE, "BINARY")]
        meta = ots.TableMeta(self._table, schema)
        options = ots.TableOptions(time_to_live=-1, max_version=1)
        try:
            self.source.client().create_table(meta, options, ots.ReservedThroughput(ots.CapacityUnit(0, 0)))
        except ots.OTSServiceError as exc:
            if exc.code != "OTSObjectAlreadyExist":
                raise

    def _filter(self, query: SequenceQuery) -> Any:
        """The column filter of the query's event types and thresholds (None: none)."""
        ots = _ots()
        conditions = []
        if query.events and query.event_field and query.event_field != self._seq_time:
            passes = "" in query.events  # a missing column reads as ""
            equal = [ots.SingleColumnCondition(query.event_field, e, ots.ComparatorType.EQUAL,
                                               pass_if_missing=passes) for e in query.events]
            if len(equal) == 1:
                conditions.append(equal[0])
            else:
                either = ots.CompositeColumnCondition(ots.LogicalOperator.OR)
                for c in equal:
                    either.add_sub_condition(c)
                conditions.append(either)
        for field, low in query.minimum:
            if field == self._seq_time:
                continue  # folded into the window
            # The threshold in the column's own type: an int column is compared with an int.
            value: Any = math.ceil(low) if self._seq_types[field] == "int" else float(low)
            conditions.append(ots.SingleColumnCondition(field, value, ots.ComparatorType.GREATER_EQUAL,
                                                        pass_if_missing=low <= 0))
        if len(conditions) <= 1:
            return conditions[0] if conditions else None
        both = ots.CompositeColumnCondition(ots.LogicalOperator.AND)
        for c in conditions:
            both.add_sub_condition(c)
        return both

    def _range(self, query: SequenceQuery) -> tuple[Any, Any] | None:
        """The window as (highest, lowest) time key values of the range (INF_MAX/INF_MIN: open)."""
        ots = _ots()
        since = query.since
        for field, low in query.minimum:
            if field == self._seq_time:
                since = low if since is None else max(since, low)
        bounds = time_bounds("float" if self._seq_float_time else "int", since, query.until)
        if bounds is None:
            return None
        low, high = bounds

        def value(t: Any, open_end: Any) -> Any:
            return open_end if t is None else bytearray(encode_float(t)) if self._seq_float_time else t

        return value(high, ots.INF_MAX), value(low, ots.INF_MIN)

    def _fetch_events(self, keys: list[Key], query: SequenceQuery,
                      timeout_s: float | None) -> dict[Key, list[Event]]:
        window = self._range(query)
        if window is None:
            return {}
        ots = _ots()
        high, low = window
        client = self.source.client()
        table, key_col, time_col = self._table, self._key, self._seq_time
        wanted = [f for f in query if f != time_col]
        column_filter = self._filter(query)
        float_time = self._seq_float_time
        limit = query.limit

        def one(key: Key) -> list[Event]:
            start = [(key_col, key), (time_col, high), (TIE, ots.INF_MAX)]
            end = [(key_col, key), (time_col, low), (TIE, ots.INF_MIN)]
            out: list[Event] = []
            while start is not None and len(out) < limit:
                _, start, rows, _ = client.get_range(
                    table, ots.Direction.BACKWARD, start, end, columns_to_get=wanted,
                    limit=min(limit - len(out), GET_RANGE_MAX_ROWS), column_filter=column_filter,
                    max_version=1)
                for row in rows:
                    cells = {c[0]: c[1] for c in row.attribute_columns}
                    t = row.primary_key[1][1]
                    cells[time_col] = decode_float(bytes(t)) if float_time else t
                    out.append(tuple([cells.get(f) for f in query]))
            return out

        found = self._each(keys, one)
        return {k: evs for k, evs in found.items() if evs}

    def _each(self, keys: list[Key], work: Callable[[Key], list[Event]]) -> dict[Key, list[Event]]:
        """``work`` of every key, on up to ``pool_size`` threads; the caller's thread takes keys too."""
        if len(keys) == 1 or self.source.concurrency <= 1:
            return {k: work(k) for k in keys}
        pending = iter(keys)
        lock = threading.Lock()
        results: dict[Key, Any] = {}
        finished = threading.Event()

        def drain() -> None:
            while True:
                with lock:
                    key = next(pending, _DONE)
                if key is _DONE:
                    return
                try:
                    value: Any = work(key)  # type: ignore[arg-type]
                except BaseException as exc:  # handed to the caller, who raises it
                    value = exc
                with lock:
                    results[key] = value  # type: ignore[index]
                    if len(results) == len(keys):
                        finished.set()

        try:
            pool = self.source.executor()
            for _ in range(min(len(keys), self.source.concurrency) - 1):
                pool.submit(drain)
        except RuntimeError:
            pass  # the pool is shutting down: this thread reads every key
        drain()
        finished.wait()  # keys a helper took are read by it; nothing else is left
        failed = [v for v in results.values() if isinstance(v, BaseException)]
        if failed:
            raise failed[0]
        return results

    def raw_sequence_reader(self) -> Callable[[list[Key], SequenceQuery], object]:
        """OTSClient by hand: GetRange BACKWARD per key on a thread pool of its own, the query's filter as
        a composite condition, one list per field (an int time field)."""
        ots = _ots()
        client_of = self._raw_client  # type: ignore[attr-defined]
        opts = self.source.options
        ident = (opts.endpoint, opts.instance_name)
        with _raw_lock:
            pool = _raw_pools.get(ident)
            if pool is None:
                pool = _raw_pools[ident] = ThreadPoolExecutor(opts.pool_size)
        table, key_col, time_col = self._table, self._key, self._seq_time
        types = self._seq_types

        def read(keys: list[Key], query: SequenceQuery) -> object:
            client = client_of()
            fields = list(query)
            wanted = [f for f in fields if f != time_col]
            high = ots.INF_MAX if query.until is None else math.floor(query.until)
            low = ots.INF_MIN if query.since is None else math.ceil(query.since)
            # The same filter the adapter pushes: event types OR-ed, thresholds on the column's type.
            parts: list[Any] = []
            if query.events and query.event_field:
                either = ots.CompositeColumnCondition(ots.LogicalOperator.OR)
                for e in query.events:
                    either.add_sub_condition(ots.SingleColumnCondition(
                        query.event_field, e, ots.ComparatorType.EQUAL, pass_if_missing="" in query.events))
                parts.append(either)
            for f, v in query.minimum:
                value = math.ceil(v) if types[f] == "int" else float(v)
                parts.append(ots.SingleColumnCondition(f, value, ots.ComparatorType.GREATER_EQUAL,
                                                       pass_if_missing=v <= 0))
            column_filter = None
            if parts:
                column_filter = ots.CompositeColumnCondition(ots.LogicalOperator.AND)
                for c in parts:
                    column_filter.add_sub_condition(c)

            def one(key: Key) -> dict[str, list[Any]] | None:
                start: Any = [(key_col, key), (time_col, high), (TIE, ots.INF_MAX)]
                end = [(key_col, key), (time_col, low), (TIE, ots.INF_MIN)]
                columns: dict[str, list[Any]] = {f: [] for f in fields}
                n = 0
                while start is not None and n < query.limit:
                    _, start, rows, _ = client.get_range(table, ots.Direction.BACKWARD, start, end,
                                                         columns_to_get=wanted, limit=query.limit - n,
                                                         column_filter=column_filter, max_version=1)
                    for row in rows:
                        cells = {c[0]: c[1] for c in row.attribute_columns}
                        cells[time_col] = row.primary_key[1][1]
                        for f in fields:
                            columns[f].append(cells.get(f))
                    n += len(rows)
                return columns if n else None

            return list(pool.map(one, keys))

        return read
