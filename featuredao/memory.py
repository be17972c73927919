"""The in-memory adapter (``type: "memory"``): no server, no driver; for tests, examples, the contract suite.

Each table is a dict of rows by key, behind one lock per store. Rows are kept as written (raw values:
``MemorySource.put`` stores text for an int feature as text), so reads run the core's coercion as on any
store. Tables exist only once ``prepare()`` (or ``put``) created them: reading a missing one is a
``BackendQueryError``, as on a SQL store. Knobs for tests: ``latency_ms`` (per round trip, cut at the
deadline with ``BackendTimeout``), ``down`` and ``fail_next`` (injected failures).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from featuredao.config import StrictModel, View
from featuredao.dao import BaseDao, Capabilities, Change, Source, StateStore
from featuredao.errors import BackendError, BackendQueryError, BackendTimeout, BackendUnavailable
from featuredao.sequence import Event, SequenceQuery, order_key
from featuredao.steps import Chunks, Fetch
from featuredao.types import Key, RawRows, Row

if TYPE_CHECKING:  # asyncio is imported where a loop runs: at import it costs start-up ~10%
    pass

_ERRORS: dict[str, type[BackendError]] = {
    "unavailable": BackendUnavailable, "timeout": BackendTimeout, "query": BackendQueryError}


class MemoryOptions(StrictModel):
    """Source options of the memory adapter."""

    pool_size: int = Field(default=4, ge=1, le=64)
    batch_size: int = Field(default=500, ge=1, le=100_000)
    latency_ms: float = Field(default=0.0, ge=0)
    """Sleep this long on every round trip (a read whose time left is shorter times out instead)."""
    down: bool = False
    """Start down: every round trip raises BackendUnavailable until ``source.down = False``."""
    shared: str | None = Field(default=None, min_length=1)
    """Sources naming the same ``shared`` store in one process see the same data."""


class MemoryStoreError(Exception):
    """What the store itself raises (the driver's exception); ``kind`` is the featuredao error it maps to."""

    def __init__(self, kind: type[BackendError], message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class MemoryStore:
    """Tables, change feeds and synchronization state, guarded by one lock."""

    lock: threading.RLock = field(default_factory=threading.RLock)
    tables: dict[str, dict[Key, dict[str, Any]]] = field(default_factory=dict)
    feeds: dict[str, list[tuple[int, Key, float]]] = field(default_factory=dict)
    positions: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    state: dict[str, dict[str, str]] = field(default_factory=dict)
    seen: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)
    events: dict[str, dict[Key, list[Event]]] = field(default_factory=dict)
    """Sequence tables: per key, events in the order they were appended."""

    def table(self, name: str) -> dict[Key, dict[str, Any]]:
        """The rows of an existing table (callers hold the lock)."""
        rows = self.tables.get(name)
        if rows is None:
            raise MemoryStoreError(BackendQueryError, f"no such table: {name}")
        return rows

    def apply(self, name: str, key: Key, row: Mapping[str, Any] | None) -> None:
        """Write (or delete, ``row=None``) one row and record the change in the table's feed, if any."""
        rows = self.table(name)
        if row is None and rows.pop(key, None) is None:
            return  # deleting an absent key changes nothing
        if row is not None:
            rows[key] = dict(row)
        feed = self.feeds.get(name)
        if feed is not None:
            feed.append((next(self.positions), key, time.time()))


_shared: dict[str, MemoryStore] = {}
_shared_lock = threading.Lock()


class MemorySource(Source):
    """A store in this process: its own data, or the ``shared`` store of that name (see MemoryOptions)."""

    type_name = "memory"
    options_model = MemoryOptions
    capabilities = Capabilities(server_timeout=True, scan=True, changes=True, delete=True, change_feed=True,
                                state=True, sequences=True, sequence_filters=True, async_reads=True,
                                grouped_reads=True)
    default_batch_size = 500

    def __init__(self, name: str, options: MemoryOptions) -> None:
        super().__init__(name, options)
        if options.shared is None:
            self.store = MemoryStore()
        else:
            with _shared_lock:
                self.store = _shared.setdefault(options.shared, MemoryStore())
        self.latency_s = options.latency_ms / 1000
        self.down = options.down
        self.round_trips = 0
        self._failures: list[type[BackendError]] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()

    @classmethod
    def clear_shared(cls) -> None:
        """Forget every shared store (sources already built keep theirs)."""
        with _shared_lock:
            _shared.clear()

    def fail_next(self, n: int = 1,
                  error: Literal["unavailable", "timeout", "query"] = "unavailable") -> None:
        """Make the next ``n`` round trips (reads, writes, pings, state) fail with that error."""
        with self._lock:
            self._failures.extend([_ERRORS[error]] * n)

    def round_trip(self, timeout_s: float | None = None) -> None:
        """Count one round trip; fail it as injected; wait ``latency_s`` (time out past ``timeout_s``)."""
        self._count()
        latency = self.latency_s
        if latency > 0:
            wait = latency if timeout_s is None else min(latency, max(0.0, timeout_s))
            if self._closing.wait(wait):
                raise MemoryStoreError(BackendUnavailable, "interrupted: the source is closing")
            if wait < latency:
                raise MemoryStoreError(BackendTimeout, f"no answer within {wait:.3f}s")

    async def around_trip(self, timeout_s: float | None = None) -> None:
        """``round_trip`` on the loop: the latency awaited, not slept."""
        import asyncio
        self._count()
        latency = self.latency_s
        if latency > 0:
            wait = latency if timeout_s is None else min(latency, max(0.0, timeout_s))
            await asyncio.sleep(wait)
            if self._closing.is_set():
                raise MemoryStoreError(BackendUnavailable, "interrupted: the source is closing")
            if wait < latency:
                raise MemoryStoreError(BackendTimeout, f"no answer within {wait:.3f}s")

    def _count(self) -> None:
        """Count one round trip; fail it as injected."""
        with self._lock:
            self.round_trips += 1
            if self.down:
                raise MemoryStoreError(BackendUnavailable, "the memory store is down")
            if self._failures:
                raise MemoryStoreError(self._failures.pop(0), "injected failure")

    def _interrupt(self) -> None:
        self._closing.set()  # wakes round trips waiting out their latency

    def put(self, table: str, rows: Mapping[Key, Mapping[str, Any]]) -> None:
        """Store rows exactly as given (no coercion; keys as the view normalises them), creating the table."""
        with self.store.lock:
            self.store.tables.setdefault(table, {})
            for key, row in rows.items():
                self.store.apply(table, key, row)

    def dao(self, view: View) -> MemoryDao:
        return MemoryDao(self, view)

    def ping(self) -> None:
        with self.operation():
            self.round_trip(5.0)

    def read_group(self, fetches: Sequence[Fetch], timeout_s: float | None) -> list[Chunks | Exception]:
        """Every fetch's chunks in one round trip; a view whose table is missing fails alone."""
        self.round_trip(timeout_s)
        return self._group_rows(fetches)

    async def aread_group(self, fetches: Sequence[Fetch],
                          timeout_s: float | None) -> list[Chunks | Exception]:
        """``read_group`` with the round trip awaited."""
        await self.around_trip(timeout_s)
        return self._group_rows(fetches)

    def _group_rows(self, fetches: Sequence[Fetch]) -> list[Chunks | Exception]:
        out: list[Chunks | Exception] = []
        for f in fetches:
            try:
                out.append([f.dao._rows_of(chunk, f.fields) for chunk in f.chunks])
            except MemoryStoreError as exc:
                out.append(self.translate(exc, f.view))  # type: ignore[arg-type]
        return out

    def map_error(self, exc: BaseException) -> type[BackendError] | None:
        return exc.kind if isinstance(exc, MemoryStoreError) else None

    def state_store(self) -> MemoryStateStore:
        """Checkpoints and seen keys in the store (shared stores share them too)."""
        return MemoryStateStore(self)


class MemoryDao(BaseDao):
    """Reads and writes one view's table in the store."""

    source: MemorySource

    def __init__(self, source: MemorySource, view: View) -> None:
        super().__init__(source, view)
        self._store = source.store
        self._name = view.table

    def _fetch_batch(self, keys: list[Key], fields: list[str], timeout_s: float | None) -> RawRows:
        self.source.round_trip(timeout_s)
        return self._rows_of(keys, fields)

    async def _afetch_batch(self, keys: list[Key], fields: list[str], timeout_s: float | None) -> RawRows:
        await self.source.around_trip(timeout_s)
        return self._rows_of(keys, fields)

    def _rows_of(self, keys: list[Key], fields: list[str]) -> RawRows:
        with self._store.lock:
            rows = self._store.table(self._name)
            return {k: {f: row.get(f) for f in fields} for k in keys if (row := rows.get(k)) is not None}

    def _write_batch(self, rows: list[tuple[Key, Row]]) -> None:
        self.source.round_trip()
        with self._store.lock:
            self._store.table(self._name)  # the whole chunk fails on a missing table, before any write
            for key, row in rows:
                self._store.apply(self._name, key, row)

    def _prepare(self) -> None:
        self.source.round_trip()
        with self._store.lock:
            if self.view.sequence is not None:
                self._store.events.setdefault(self._name, {})
            else:
                self._store.tables.setdefault(self._name, {})

    def _fetch_events(self, keys: list[Key], query: SequenceQuery,
                      timeout_s: float | None) -> dict[Key, list[Event]]:
        self.source.round_trip(timeout_s)
        t = query.index(query.time_field)
        e = query.index(query.event_field) if query.events and query.event_field else None
        minimum = [(query.index(f), low) for f, low in query.minimum]
        assert self.view.sequence is not None
        order = order_key(self.view.sequence)
        with self._store.lock:
            table = self._events()
            out = {}
            for key in keys:
                kept = [ev for ev in table.get(key, ())
                        if (query.since is None or ev[t] >= query.since)
                        and (query.until is None or ev[t] <= query.until)
                        and (e is None or ev[e] in query.events)  # type: ignore[operator]
                        and all(ev[i] >= low for i, low in minimum)]
                kept.sort(key=order, reverse=True)  # the documented order, ties included
                if kept:
                    out[key] = kept[:query.limit]
            return out

    def _append_batch(self, events: list[tuple[Key, list[Event]]]) -> None:
        self.source.round_trip()
        with self._store.lock:
            table = self._events()
            for key, added in events:
                table.setdefault(key, []).extend(added)

    def _events(self) -> dict[Key, list[Event]]:
        table = self._store.events.get(self._name)
        if table is None:
            raise MemoryStoreError(BackendQueryError, f"no such sequence table: {self._name}")
        return table

    # -- synchronization hooks -----------------------------------------------------------------------
    def _rows(self) -> list[tuple[Any, Mapping[str, Any]]]:
        """Every row of the table in key order (copies)."""
        self.source.round_trip()
        with self._store.lock:
            rows = self._store.table(self._name)
            return [(k, dict(rows[k])) for k in sorted(rows)]

    def _scan_batch(self, after: Key | None, limit: int) -> list[tuple[Key, Mapping[str, Any]]]:
        return [(k, r) for k, r in self._rows() if after is None or k > after][:limit]

    def _changes_batch(self, column: str, after: tuple[Any, Key] | None,
                       limit: int) -> list[tuple[Any, Key, Mapping[str, Any]]]:
        if column not in self.view.features:
            raise MemoryStoreError(BackendQueryError, f"no such column: {column}")
        found = sorted(((r[column], k, r) for k, r in self._rows() if r.get(column) is not None),
                       key=lambda c: (c[0], c[1]))
        return [c for c in found if after is None or (c[0], c[1]) > after][:limit]

    def _delete_batch(self, keys: list[Key]) -> None:
        self.source.round_trip()
        with self._store.lock:
            for key in keys:
                self._store.apply(self._name, key, None)

    def _install_feed(self) -> None:
        self.source.round_trip()
        with self._store.lock:
            self._store.table(self._name)
            self._store.feeds.setdefault(self._name, [])

    def _feed(self) -> list[tuple[int, Key, float]]:
        feed = self._store.feeds.get(self._name)
        if feed is None:
            raise MemoryStoreError(BackendQueryError, f"no change feed on table {self._name}")
        return feed

    def _feed_batch(self, after: Any, limit: int) -> list[Change]:
        self.source.round_trip()
        with self._store.lock:
            rows = self._store.tables.get(self._name, {})
            # Each change comes with the key's row as it is now (None: deleted), like an outbox joined back.
            return [Change(pos, key, None if (row := rows.get(key)) is None else dict(row), ts)
                    for pos, key, ts in self._feed() if after is None or pos > after][:limit]

    def _feed_position(self) -> Any:
        self.source.round_trip()
        with self._store.lock:
            feed = self._feed()
            return feed[-1][0] if feed else None

    def _ack_feed(self, position: Any) -> None:
        self.source.round_trip()
        with self._store.lock:
            feed = self._feed()
            feed[:] = [c for c in feed if c[0] > position]


class MemoryStateStore(StateStore):
    """Checkpoints (kept as JSON text) and seen keys in the source's store; every commit is atomic."""

    def __init__(self, source: MemorySource) -> None:
        self._source = source
        self._store = source.store

    def load(self, scope: str) -> dict[str, Any]:
        with self._source.operation():
            self._source.round_trip()
            with self._store.lock:
                return {name: json.loads(text) for name, text in self._store.state.get(scope, {}).items()}

    def commit(self, scope: str, values: Mapping[str, Any],
               seen: tuple[str, Sequence[str], int] | None = None,
               forget: tuple[str, Sequence[str]] | None = None) -> None:
        encoded = {name: json.dumps(v) for name, v in values.items()}  # fails before anything changes
        with self._source.operation():
            self._source.round_trip()
            with self._store.lock:
                self._store.state.setdefault(scope, {}).update(encoded)
                if seen is not None:
                    group, keys, generation = seen
                    self._store.seen.setdefault((scope, group), {}).update(dict.fromkeys(keys, generation))
                if forget is not None:
                    group, gone = forget
                    marks = self._store.seen.get((scope, group), {})
                    for k in gone:
                        marks.pop(k, None)

    def unseen(self, scope: str, group: str, generation: int, limit: int) -> list[str]:
        with self._source.operation():
            self._source.round_trip()
            with self._store.lock:
                marks = self._store.seen.get((scope, group), {})
                return sorted(k for k, g in marks.items() if g < generation)[:limit]
