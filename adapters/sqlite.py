"""The embedded SQLite adapter: wide tables (one row per key, one column per feature), lists as JSON text.

The views of one source that a request reads together (``read_group``) share one pooled connection: each
chunk's statement runs on it in turn, interrupted when the group's time is up.
"""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from featuredao.config import StrictModel, View, quote_identifier
from featuredao.dao import BaseDao, Capabilities, Change, Chunks, Fetch, Source, StateStore, chunks_in_turn
from featuredao.errors import (
    BackendError,
    BackendQueryError,
    BackendTimeout,
    BackendUnavailable,
    Overloaded,
)
from featuredao.types import FeatureType, FinalRow, Key, RawRows, Row

from ._sql_sequence import SqliteSequenceDao

# Benchmarks' hand-written baseline keeps one plain connection per database file.
_raw_connections: dict[str, sqlite3.Connection] = {}


class SqliteOptions(StrictModel):
    """Source options of the sqlite adapter."""

    path: str
    pool_size: int = Field(default=4, ge=1, le=64)
    batch_size: int = Field(default=500, ge=1, le=30000)
    busy_timeout_ms: int = Field(default=5000, ge=0)

    @field_validator("path")
    @classmethod
    def _relative_to_config(cls, v: str, info: ValidationInfo) -> str:
        base = (info.context or {}).get("base_dir")
        if v == ":memory:" or base is None or Path(v).is_absolute():
            return v
        return str(Path(base) / v)


_SQL_TYPES = {
    FeatureType.INT: "INTEGER", FeatureType.FLOAT: "REAL", FeatureType.STR: "TEXT",
    FeatureType.BOOL: "INTEGER",
}


class SqliteSource(Source):
    """One SQLite database file, with a small pool of connections shared by threads."""

    type_name = "sqlite"
    options_model = SqliteOptions
    capabilities = Capabilities(server_timeout=True, scan=True, changes=True, delete=True, change_feed=True,
                                state=True, sequences=True, sequence_filters=True, grouped_reads=True)
    default_batch_size = 500

    def __init__(self, name: str, options: SqliteOptions) -> None:
        super().__init__(name, options)
        self._idle: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._busy: set[sqlite3.Connection] = set()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(options.pool_size)
        self._wal_lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        opts: SqliteOptions = self.options
        conn = sqlite3.connect(opts.path, timeout=opts.busy_timeout_ms / 1000, check_same_thread=False,
                               isolation_level=None, cached_statements=256)
        # Switching a database to WAL takes an exclusive lock and may answer "locked" without waiting for
        # the busy timeout: connections opened at once (concurrent chunks on a fresh file) take turns, and
        # one locked by another process tries again until the busy timeout.
        give_up = time.monotonic() + opts.busy_timeout_ms / 1000
        with self._wal_lock:
            while True:
                try:
                    conn.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > give_up:
                        conn.close()
                        raise
                    time.sleep(0.01)
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    @contextmanager
    def connection(self, timeout_s: float | None = None) -> Iterator[sqlite3.Connection]:
        """Borrow a connection; with a timeout, work still running when it passes is interrupted."""
        # Admitted like any store work (state stores borrow directly), so close() waits for it.
        with self._gate.admit():
            if not self._slots.acquire(timeout=None if timeout_s is None else max(timeout_s, 0.0)):
                raise Overloaded("no free connection of the pool in time", source=self.name)
            try:
                conn = self._checkout()
                if timeout_s is not None:
                    deadline = time.perf_counter() + timeout_s
                    # Returning non-zero from the progress handler aborts the statement inside SQLite.
                    conn.set_progress_handler(lambda: int(time.perf_counter() > deadline), 1000)
                try:
                    yield conn
                finally:
                    conn.set_progress_handler(None, 0)
                    self._checkin(conn)
            finally:
                self._slots.release()

    def _checkout(self) -> sqlite3.Connection:
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            conn = self._connect()
        with self._lock:
            self._busy.add(conn)
        return conn

    def _checkin(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            self._busy.discard(conn)
            keep = not self.closed
        if keep:
            self._idle.put(conn)
        else:
            conn.close()  # by the thread that ran on it: no statement is running any more

    def read_group(self, fetches: Sequence[Fetch], timeout_s: float | None) -> list[Chunks | Exception]:
        """Every fetch's chunks on one pooled connection, a statement each, interrupted when the group's
        time is up (the borrow's progress handler). A statement SQLite refuses (one view's missing table)
        fails its fetch alone and the next runs on the same connection; a file that cannot be read fails
        the group."""
        until = None if timeout_s is None else time.perf_counter() + timeout_s
        try:
            with self.connection(timeout_s) as conn:
                return [self._read_chunks(conn, fetch, until) for fetch in fetches]
        except Overloaded:
            # No connection of our own pool in time: each read fails as this process's load (not as the
            # store's timeout, which a late answer of chunks would become), as when it waits alone.
            return [Overloaded("no free connection of the pool in time", source=self.name, view=f.view)
                    for f in fetches]

    def _read_chunks(self, conn: sqlite3.Connection, fetch: Fetch, until: float | None) -> Chunks | Exception:
        """One fetch's chunks on ``conn``, as its DAO's ``_fetch_batch`` reads each (``chunks_in_turn``)."""
        dao: SqliteDao = fetch.dao

        def read_chunk(keys: list[Key], left: float | None) -> RawRows:
            return dao._decode(dao._statement(conn, keys, fetch.fields), fetch.fields)

        def refused(exc: Exception) -> bool:
            # Not the file itself failing (BackendUnavailable), which fails the group; a timeout here is
            # the group's deadline interrupting the statement (the borrow's progress handler).
            return isinstance(exc, sqlite3.Error) and self.map_error(exc) not in (None, BackendUnavailable)

        return chunks_in_turn(self, fetch, until, read_chunk, refused)

    def dao(self, view: View) -> SqliteDao:
        return SqliteDao(self, view)

    def ping(self) -> None:
        with self.connection(5.0) as conn:
            conn.execute("SELECT 1").fetchone()

    def state_store(self) -> SqliteStateStore:
        """Synchronization checkpoints and seen keys in two tables of this database."""
        return SqliteStateStore(self)

    def map_error(self, exc: BaseException) -> type[BackendError] | None:
        if not isinstance(exc, sqlite3.Error):
            return None
        text = str(exc).lower()
        if "interrupted" in text or "locked" in text or "busy" in text:
            return BackendTimeout
        if "unable to open" in text or "disk i/o" in text or "readonly" in text:
            return BackendUnavailable
        return BackendQueryError

    def _interrupt(self) -> None:
        with self._lock:
            busy = list(self._busy)
        for conn in busy:
            conn.interrupt()  # thread-safe: the statement ends with "interrupted" at its next step

    def _release(self) -> None:
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return
            conn.close()


class SqliteDao(SqliteSequenceDao, BaseDao):
    """Reads and writes one view's wide table (a sequence view's events: ``_sql_sequence``)."""

    source: SqliteSource

    def __init__(self, source: SqliteSource, view: View) -> None:
        super().__init__(source, view)
        self._table = quote_identifier(view.table)
        self._key = quote_identifier(view.key)
        self._json = {f for f, t in view.features.items() if t.is_list}
        self._exact: dict[tuple[str, ...], tuple[type[Any], ...]] = {}

    def _fetch_batch(self, keys: list[Key], fields: list[str], timeout_s: float | None) -> RawRows:
        with self.source.connection(timeout_s) as conn:
            rows = self._statement(conn, keys, fields)
        return self._decode(rows, fields)

    def _statement(self, conn: sqlite3.Connection, keys: list[Key], fields: list[str]) -> list[Any]:
        """One chunk's read statement on ``conn``: its rows as stored (``_decode`` makes them RawRows)."""
        cols = ", ".join([self._key, *(quote_identifier(f) for f in fields)])
        sql = f"SELECT {cols} FROM {self._table} WHERE {self._key} IN ({', '.join('?' * len(keys))})"
        return conn.execute(sql, keys).fetchall()

    def _decode(self, rows: list[Any], fields: list[str]) -> RawRows:
        exact = self._exact.get(tuple(fields))
        if exact is None:
            # Rows whose every value has its feature's exact type need no coercion: compared in C per row
            # (a NULL is NoneType, so it never matches). Booleans and lists come back as ints and JSON text.
            kinds = [self.view.features[f] for f in fields]
            plain = all(k.python in (int, float, str) for k in kinds)
            exact = self._exact[tuple(fields)] = (self._key_type, *(k.python for k in kinds)) if plain else ()
        if not exact:
            return {r[0]: dict(zip(fields, r[1:], strict=True)) for r in rows}
        return {r[0]: (FinalRow if tuple(map(type, r)) == exact else dict)(zip(fields, r[1:], strict=True))
                for r in rows}

    def raw_reader(self) -> Callable[[list[Key], list[str]], object]:
        """sqlite3 by hand: one IN query, JSON lists decoded, rows as dicts by key."""
        table, key = self._table, self._key
        path = self.source.options.path

        def read(keys: list[Key], fields: list[str]) -> object:
            conn = _raw_connections.get(path)
            if conn is None:
                conn = _raw_connections[path] = sqlite3.connect(path, check_same_thread=False)
            cols = ", ".join([key, *(f'"{f}"' for f in fields)])
            sql = f"SELECT {cols} FROM {table} WHERE {key} IN ({', '.join('?' * len(keys))})"
            lists = [i for i, f in enumerate(fields) if f in self._json]
            out = {}
            for r in conn.execute(sql, keys).fetchall():
                values = list(r[1:])
                for i in lists:
                    if values[i] is not None:
                        values[i] = json.loads(values[i])
                out[r[0]] = dict(zip(fields, values, strict=True))
            return [out.get(k) for k in keys]

        return read

    def _write_batch(self, rows: list[tuple[Key, Row]]) -> None:
        fields = list(self.view.features)
        cols = ", ".join([self._key, *(quote_identifier(f) for f in fields)])
        updates = ", ".join(f"{quote_identifier(f)} = excluded.{quote_identifier(f)}" for f in fields)
        sql = (f"INSERT INTO {self._table} ({cols}) VALUES ({', '.join('?' * (len(fields) + 1))}) "
               f"ON CONFLICT({self._key}) DO UPDATE SET {updates}")
        params = [[key, *(self._encode(f, row[f]) for f in fields)] for key, row in rows]
        with self.source.connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(sql, params)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _encode(self, field: str, value: Any) -> Any:
        if value is not None and field in self._json:
            return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        return value

    def _prepare(self) -> None:
        if self.view.sequence is not None:
            self._prepare_sequence()
            return
        key_type = "INTEGER" if self.view.key_type == "int" else "TEXT"
        cols = ", ".join(f"{quote_identifier(f)} {_SQL_TYPES.get(t, 'TEXT')}"
                         for f, t in self.view.features.items())
        with self.source.connection() as conn:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {self._table} "
                         f"({self._key} {key_type} PRIMARY KEY, {cols})")

    # -- synchronization hooks -----------------------------------------------------------------------
    def _select(self) -> str:
        return ", ".join([self._key, *(quote_identifier(f) for f in self.view.features)])

    def _scan_batch(self, after: Key | None, limit: int) -> list[tuple[Key, Mapping[str, Any]]]:
        fields = list(self.view.features)
        where = "" if after is None else f"WHERE {self._key} > ? "
        sql = f"SELECT {self._select()} FROM {self._table} {where}ORDER BY {self._key} LIMIT ?"
        params: list[Any] = [limit] if after is None else [after, limit]
        with self.source.connection() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [(r[0], dict(zip(fields, r[1:], strict=True))) for r in rows]

    def _split_points(self, n: int) -> list[Key] | None:
        # Quantiles of the primary key: each OFFSET walks the key index only.
        with self.source.connection() as conn:
            count = conn.execute(f"SELECT COUNT(*) FROM {self._table}").fetchone()[0]
            sql = f"SELECT {self._key} FROM {self._table} ORDER BY {self._key} LIMIT 1 OFFSET ?"
            points: list[Key] = []
            for i in range(1, n):
                at = (i * count) // n - 1
                if at >= 0:
                    points.extend(r[0] for r in conn.execute(sql, [at]).fetchall())
        return points

    def _scan_range_batch(self, after: Key | None, upper: Key,
                          limit: int) -> list[tuple[Key, Mapping[str, Any]]] | None:
        fields = list(self.view.features)
        where = f"WHERE {self._key} <= ?" + ("" if after is None else f" AND {self._key} > ?")
        sql = f"SELECT {self._select()} FROM {self._table} {where} ORDER BY {self._key} LIMIT ?"
        params: list[Any] = [upper, limit] if after is None else [upper, after, limit]
        with self.source.connection() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [(r[0], dict(zip(fields, r[1:], strict=True))) for r in rows]

    def _changes_range_batch(self, column: str, after: tuple[Any, Key] | None, lower: Key | None,
                             upper: Key | None,
                             limit: int) -> list[tuple[Any, Key, Mapping[str, Any]]] | None:
        return self._changes_batch(column, after, limit, lower, upper)

    def _changes_batch(self, column: str, after: tuple[Any, Key] | None, limit: int,
                       lower: Key | None = None,
                       upper: Key | None = None) -> list[tuple[Any, Key, Mapping[str, Any]]]:
        fields = list(self.view.features)
        wm = quote_identifier(column)
        params: list[Any]
        if after is None:
            where, params = f"WHERE {wm} IS NOT NULL", []
        else:
            # Row values: strictly after (watermark, key), so rows sharing the last watermark are not lost.
            where, params = f"WHERE ({wm}, {self._key}) > (?, ?)", [after[0], after[1]]
        if lower is not None:
            where, params = f"{where} AND {self._key} > ?", [*params, lower]
        if upper is not None:
            where, params = f"{where} AND {self._key} <= ?", [*params, upper]
        params.append(limit)
        sql = (f"SELECT {wm}, {self._select()} FROM {self._table} {where} "
               f"ORDER BY {wm}, {self._key} LIMIT ?")
        with self.source.connection() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [(r[0], r[1], dict(zip(fields, r[2:], strict=True))) for r in rows]

    def _delete_batch(self, keys: list[Key]) -> None:
        sql = f"DELETE FROM {self._table} WHERE {self._key} IN ({', '.join('?' * len(keys))})"
        with self.source.connection() as conn:
            conn.execute(sql, keys)

    @property
    def _outbox(self) -> str:
        return quote_identifier("featuredao_outbox_" + self.view.table.replace(".", "_"))

    def _install_feed(self) -> None:
        """An outbox table filled by triggers: (id, key, op, ts); the reader joins the row as it is now."""
        outbox, table, key = self._outbox, self._table, self._key
        name = self.view.table.replace(".", "_")
        now = "(julianday('now') - 2440587.5) * 86400.0"
        with self.source.connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(f"CREATE TABLE IF NOT EXISTS {outbox} (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                             f"k, op TEXT NOT NULL, ts REAL NOT NULL)")
                for op, ref in (("INSERT", "NEW"), ("DELETE", "OLD")):
                    conn.execute(f'CREATE TRIGGER IF NOT EXISTS "featuredao_{op.lower()}_{name}" AFTER {op} '
                                 f"ON {table} BEGIN INSERT INTO {outbox} (k, op, ts) "
                                 f"VALUES ({ref}.{key}, '{op[0]}', {now}); END")
                # An update that changes the key removes the old key and writes the new one.
                conn.execute(f'CREATE TRIGGER IF NOT EXISTS "featuredao_update_{name}" AFTER UPDATE '
                             f"ON {table} BEGIN "
                             f"INSERT INTO {outbox} (k, op, ts) SELECT OLD.{key}, 'D', {now} "
                             f"WHERE OLD.{key} IS NOT NEW.{key}; "
                             f"INSERT INTO {outbox} (k, op, ts) VALUES (NEW.{key}, 'U', {now}); END")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _feed_batch(self, after: Any, limit: int) -> list[Change]:
        fields = list(self.view.features)
        cols = ", ".join(f"t.{quote_identifier(f)}" for f in fields)
        sql = (f"SELECT o.id, o.k, o.ts, t.{self._key} IS NOT NULL, {cols} FROM {self._outbox} o "
               f"LEFT JOIN {self._table} t ON t.{self._key} = o.k WHERE o.id > ? ORDER BY o.id LIMIT ?")
        with self.source.connection() as conn:
            rows = conn.execute(sql, [after or 0, limit]).fetchall()
        return [Change(r[0], r[1], dict(zip(fields, r[4:], strict=True)) if r[3] else None, r[2])
                for r in rows]

    def _feed_position(self) -> Any:
        with self.source.connection() as conn:
            row = conn.execute(f"SELECT max(id) FROM {self._outbox}").fetchone()
        return row[0]

    def _ack_feed(self, position: Any) -> None:
        with self.source.connection() as conn:
            conn.execute(f"DELETE FROM {self._outbox} WHERE id <= ?", [position])


class SqliteStateStore(StateStore):
    """Checkpoints and seen keys in two tables, every commit one transaction."""

    def __init__(self, source: SqliteSource) -> None:
        self._source = source
        self._ready = False

    def _prepare(self, conn: sqlite3.Connection) -> None:
        if not self._ready:
            conn.execute("CREATE TABLE IF NOT EXISTS featuredao_sync_state "
                         "(scope TEXT NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL, "
                         "PRIMARY KEY (scope, name))")
            conn.execute("CREATE TABLE IF NOT EXISTS featuredao_sync_seen "
                         "(scope TEXT NOT NULL, grp TEXT NOT NULL, k TEXT NOT NULL, gen INTEGER NOT NULL, "
                         "PRIMARY KEY (scope, grp, k)) WITHOUT ROWID")
            self._ready = True

    def load(self, scope: str) -> dict[str, Any]:
        with self._source.connection() as conn:
            self._prepare(conn)
            rows = conn.execute("SELECT name, value FROM featuredao_sync_state WHERE scope = ?",
                                [scope]).fetchall()
        return {name: json.loads(value) for name, value in rows}

    def commit(self, scope: str, values: Mapping[str, Any],
               seen: tuple[str, Sequence[str], int] | None = None,
               forget: tuple[str, Sequence[str]] | None = None) -> None:
        with self._source.connection() as conn:
            self._prepare(conn)
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("INSERT INTO featuredao_sync_state (scope, name, value) VALUES (?, ?, ?) "
                                 "ON CONFLICT (scope, name) DO UPDATE SET value = excluded.value",
                                 [(scope, name, json.dumps(v)) for name, v in values.items()])
                if seen is not None:
                    group, keys, gen = seen
                    conn.executemany("INSERT INTO featuredao_sync_seen (scope, grp, k, gen) "
                                     "VALUES (?, ?, ?, ?) ON CONFLICT (scope, grp, k) "
                                     "DO UPDATE SET gen = excluded.gen",
                                     [(scope, group, k, gen) for k in keys])
                if forget is not None:
                    group, gone = forget
                    conn.executemany("DELETE FROM featuredao_sync_seen WHERE scope = ? AND grp = ? AND k = ?",
                                     [(scope, group, k) for k in gone])
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def unseen(self, scope: str, group: str, generation: int, limit: int) -> list[str]:
        with self._source.connection() as conn:
            self._prepare(conn)
            rows = conn.execute("SELECT k FROM featuredao_sync_seen WHERE scope = ? AND grp = ? AND gen < ? "
                                "ORDER BY k LIMIT ?", [scope, group, generation, limit]).fetchall()
        return [r[0] for r in rows]
