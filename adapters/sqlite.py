"""The embedded SQLite adapter: wide tables (one row per key, one column per feature), lists as JSON text."""

from __future__ import annotations

import json
import queue
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from featuredao.config import StrictModel, View, quote_identifier
from featuredao.dao import BaseDao, Capabilities, Source
from featuredao.errors import BackendError, BackendQueryError, BackendTimeout, BackendUnavailable
from featuredao.types import FeatureType, Key, RawRows, Row

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
    capabilities = Capabilities(server_timeout=True)
    default_batch_size = 500

    def __init__(self, name: str, options: SqliteOptions) -> None:
        super().__init__(name, options)
        self._idle: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._all: list[sqlite3.Connection] = []
        self._slots = queue.Queue[None]()
        for _ in range(options.pool_size):
            self._slots.put(None)

    def _connect(self) -> sqlite3.Connection:
        opts: SqliteOptions = self.options
        conn = sqlite3.connect(opts.path, timeout=opts.busy_timeout_ms / 1000, check_same_thread=False,
                               isolation_level=None, cached_statements=256)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        self._all.append(conn)
        return conn

    @contextmanager
    def connection(self, timeout_s: float | None = None) -> Iterator[sqlite3.Connection]:
        """Borrow a connection; with a timeout, work still running when it passes is interrupted."""
        try:
            self._slots.get(timeout=timeout_s)
        except queue.Empty:
            raise BackendTimeout("no free connection in time", source=self.name) from None
        try:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self._connect()
            if timeout_s is not None:
                deadline = time.perf_counter() + timeout_s
                # Returning non-zero from the progress handler aborts the statement inside SQLite.
                conn.set_progress_handler(lambda: int(time.perf_counter() > deadline), 1000)
            try:
                yield conn
            finally:
                conn.set_progress_handler(None, 0)
                self._idle.put(conn)
        finally:
            self._slots.put(None)

    def dao(self, view: View) -> SqliteDao:
        return SqliteDao(self, view)

    def ping(self) -> None:
        with self.connection(5.0) as conn:
            conn.execute("SELECT 1").fetchone()

    def map_error(self, exc: BaseException) -> type[BackendError] | None:
        if not isinstance(exc, sqlite3.Error):
            return None
        text = str(exc).lower()
        if "interrupted" in text or "locked" in text or "busy" in text:
            return BackendTimeout
        if "unable to open" in text or "disk i/o" in text or "readonly" in text:
            return BackendUnavailable
        return BackendQueryError

    def close(self) -> None:
        super().close()
        for conn in self._all:
            conn.close()
        self._all.clear()


class SqliteDao(BaseDao):
    """Reads and writes one view's wide table."""

    source: SqliteSource

    def __init__(self, source: SqliteSource, view: View) -> None:
        super().__init__(source, view)
        self._table = quote_identifier(view.table)
        self._key = quote_identifier(view.key)
        self._json = {f for f, t in view.features.items() if t.is_list}

    def _fetch_batch(self, keys: list[Key], fields: list[str], timeout_s: float | None) -> RawRows:
        cols = ", ".join([self._key, *(quote_identifier(f) for f in fields)])
        sql = f"SELECT {cols} FROM {self._table} WHERE {self._key} IN ({', '.join('?' * len(keys))})"
        with self.source.connection(timeout_s) as conn:
            rows = conn.execute(sql, keys).fetchall()
        return {r[0]: dict(zip(fields, r[1:], strict=True)) for r in rows}

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

    def prepare(self) -> None:
        key_type = "INTEGER" if self.view.key_type == "int" else "TEXT"
        cols = ", ".join(f"{quote_identifier(f)} {_SQL_TYPES.get(t, 'TEXT')}"
                         for f, t in self.view.features.items())
        with self.source.connection() as conn:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {self._table} "
                         f"({self._key} {key_type} PRIMARY KEY, {cols})")
