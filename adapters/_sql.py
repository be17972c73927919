"""Shared logic of the SQL adapters (mysql, hologres): the source, the DAO and the sync state tables.

A SQL adapter supplies a :class:`Dialect` (quoting, how a list of keys is bound, column types, the
upsert clause: ``_sql_dialect``) and a :class:`SqlSource` that runs statements on its pool;
:class:`SqlDao` does the rest with the view's statements (``_sql_statements``). Two table layouts,
chosen per view in ``options``:

* ``wide``: one row per key, one column per feature.
* ``tall``: rows of (key, feature name, value text[, event time]); with an event-time column the
  newest value per (key, feature) wins, as in PaiRec's Hologres/ClickHouse feature tables. A key is
  found when at least one of the requested features has a row.

The views of one source that a request reads together (``read_group``) share one pool checkout: each
chunk's statement runs on that connection in turn, limited by the time the group has left.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from featuredao.config import View, quote_identifier
from featuredao.dao import BaseDao, Chunks, Fetch, Source, StateStore, chunks_in_turn
from featuredao.errors import Overloaded, Unsupported
from featuredao.types import FeatureType, Key, RawRows, Row

from ._sql_dialect import POSTGRES, Dialect, SqlViewOptions
from ._sql_sequence import SqlSequenceDao
from ._sql_statements import SqlStatements, decode_key

_T = TypeVar("_T")


class SqlSource(Source):
    """A SQL source: a pool plus the three ways featuredao uses it."""

    dialect: Dialect = POSTGRES
    view_options_model = SqlViewOptions

    @abstractmethod
    def fetch(self, sql: str, params: Sequence[Any], timeout_s: float | None) -> Sequence[Sequence[Any]]:
        """Run one read statement (cancelled on the server when ``timeout_s`` runs out); return its rows."""

    @abstractmethod
    def _on_connection(self, work: Callable[[Any], _T], timeout_s: float | None) -> _T:
        """Run ``work`` on one pooled connection within ``timeout_s`` (the checkout ``fetch`` makes)."""

    @abstractmethod
    def _select(self, conn: Any, sql: str, params: Sequence[Any],
                timeout_s: float | None) -> Sequence[Sequence[Any]]:
        """One read statement on ``conn``, cancelled on the server after ``timeout_s`` (``fetch``'s body)."""

    @abstractmethod
    def _statement_failed(self, exc: BaseException, conn: Any) -> bool:
        """Whether the server refused one statement (a missing table...) and ``conn`` can run the next."""

    def read_group(self, fetches: Sequence[Fetch], timeout_s: float | None) -> list[Chunks | Exception]:
        """Every fetch's chunks on one pooled connection, a statement each, each limited by the time the
        group has left. A statement the server refuses fails its fetch alone (the next runs on the same
        connection); a connection-level error fails the group, as one round trip would."""
        until = None if timeout_s is None else time.perf_counter() + timeout_s

        def work(conn: Any) -> list[Chunks | Exception]:
            return [self._read_chunks(conn, fetch, until) for fetch in fetches]

        try:
            answers: list[Chunks | Exception] = self._on_connection(work, timeout_s)
        except Overloaded:
            # No connection of our own pool in time: each read fails as this process's load, by name.
            return [Overloaded("no free connection of the pool in time", source=self.name, view=f.view)
                    for f in fetches]
        return answers

    def _read_chunks(self, conn: Any, fetch: Fetch, until: float | None) -> Chunks | Exception:
        """One fetch's chunks on ``conn``, as its DAO's ``_fetch_batch`` reads each (``chunks_in_turn``)."""
        st: SqlStatements = fetch.dao.statements
        sql = st.select(fetch.fields)

        def read_chunk(keys: list[Key], left: float | None) -> RawRows:
            return st.decode(self._select(conn, sql, st.params(keys, fetch.fields), left), fetch.fields)

        return chunks_in_turn(self, fetch, until, read_chunk, lambda exc: self._statement_failed(exc, conn))

    async def afetch(self, sql: str, params: Sequence[Any],
                     timeout_s: float | None) -> Sequence[Sequence[Any]]:
        """``fetch`` with the driver's asyncio client (adapters with ``capabilities.async_reads``)."""
        raise Unsupported(f"adapter {self.type_name!r} has no asyncio reads")

    @abstractmethod
    def write(self, sql: str, params: list[tuple[Any, ...]]) -> None:
        """Run one statement for many parameter rows, atomically."""

    @abstractmethod
    def execute(self, sql: str) -> None:
        """Run one statement without parameters (DDL)."""

    def transaction(self, statements: Sequence[tuple[str, list[tuple[Any, ...]]]]) -> None:
        """Run several statements (each for many parameter rows) in one transaction."""
        raise Unsupported(f"adapter {self.type_name!r} has no multi-statement transactions")

    def state_store(self) -> SqlStateStore:
        """Synchronization checkpoints and seen keys in two tables of this database."""
        return SqlStateStore(self)

    @abstractmethod
    def raw_connect(self) -> Any:
        """A plain driver connection outside the pool (the benchmark baseline's own)."""

    @abstractmethod
    def raw_rows(self, conn: Any, sql: str, params: Sequence[Any]) -> Sequence[Sequence[Any]]:
        """Run a read on a :meth:`raw_connect` connection as :meth:`fetch` sends it (no deadline)."""

    def dao(self, view: View) -> SqlDao:
        return SqlDao(self, view)


class SqlDao(SqlSequenceDao, BaseDao):
    """Reads and writes one view's table, wide or tall (a sequence view's events: ``_sql_sequence``)."""

    source: SqlSource

    def __init__(self, source: SqlSource, view: View) -> None:
        super().__init__(source, view)
        self.statements = SqlStatements(view, source.dialect)
        self._raw_lock = threading.Lock()
        self._raw_conns: list[Any] = []

    def _fetch_batch(self, keys: list[Key], fields: list[str], timeout_s: float | None) -> RawRows:
        st = self.statements
        rows = self.source.fetch(st.select(fields), st.params(keys, fields), timeout_s)
        return st.decode(rows, fields)

    async def _afetch_batch(self, keys: list[Key], fields: list[str], timeout_s: float | None) -> RawRows:
        st = self.statements
        rows = await self.source.afetch(st.select(fields), st.params(keys, fields), timeout_s)
        return st.decode(rows, fields)

    def _write_batch(self, rows: list[tuple[Key, Row]]) -> None:
        st = self.statements
        self.source.write(st.upsert_sql, st.upsert_params(rows))

    def raw_reader(self) -> Callable[[list[Key], list[str]], object] | None:
        """The same statement by hand on the raw driver (a connection per thread), decoded alike."""
        st = self.statements
        if st.tall:
            return None
        local = threading.local()
        features, defaults, dialect = self.view.features, self.view.defaults, st.dialect

        def read(keys: list[Key], fields: list[str]) -> object:
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = self.source.raw_connect()
                with self._raw_lock:
                    self._raw_conns.append(conn)
            unique = dialect.bind_list(list(dict.fromkeys(keys)))
            rows = self.source.raw_rows(conn, st.select(fields), (unique,))
            lists = [(i, f) for i, f in enumerate(fields) if dialect.lists_as_json and features[f].is_list]
            bools = [(i, f) for i, f in enumerate(fields)
                     if dialect.bools_as_int and features[f] is FeatureType.BOOL]
            fill = [(f, defaults[f]) for f in fields if defaults.get(f) is not None]
            found: dict[Any, dict[str, Any]] = {}
            for r in rows:
                row = dict(zip(fields, r, strict=False))
                for i, f in lists:
                    if r[i] is not None:
                        row[f] = json.loads(r[i])
                for i, f in bools:
                    if r[i] is not None:
                        row[f] = bool(r[i])
                if None in r:
                    for f, default in fill:
                        if row[f] is None:
                            row[f] = default
                found[r[-1]] = row
            return [found.get(k) for k in keys]

        return read

    def close(self) -> None:
        with self._raw_lock:
            conns, self._raw_conns = self._raw_conns, []
        for conn in conns:
            conn.close()

    def _prepare(self) -> None:
        if self.view.sequence is not None:
            self._prepare_sequence()
            return
        self.source.execute(self.statements.create_table())

    # -- synchronization hooks (wide layout; a tall table has no row per key to scan) ----------------
    def _wide_only(self, what: str) -> None:
        if self.statements.tall:
            raise self._unsupported(f"{what} (layout 'tall')")

    def _scan_batch(self, after: Key | None, limit: int) -> list[tuple[Key, Mapping[str, Any]]]:
        self._wide_only("scan")
        st = self.statements
        params: tuple[Any, ...] = (limit,) if after is None else (after, limit)
        rows = self.source.fetch(st.scan_sql(after is None), params, None)
        return [(decode_key(r[0]), st.raw_row(r[1:])) for r in rows]

    def _changes_batch(self, column: str, after: tuple[Any, Key] | None,
                       limit: int) -> list[tuple[Any, Key, Mapping[str, Any]]]:
        self._wide_only("changes")
        st = self.statements
        params: tuple[Any, ...] = (limit,) if after is None else (after[0], after[0], after[1], limit)
        rows = self.source.fetch(st.changes_sql(column, after is None), params, None)
        return [(_watermark(r[0]), decode_key(r[1]), st.raw_row(r[2:])) for r in rows]

    # Key ranges of parallel sync: bounds in SQL, so the server's collation orders keys as the scan does.
    def _split_points(self, n: int) -> list[Key] | None:
        self._wide_only("scan")
        st = self.statements
        count = self.source.fetch(f"SELECT COUNT(*) FROM {st.table}", (), None)[0][0]
        sql = f"SELECT {st.key} FROM {st.table} ORDER BY {st.key} LIMIT 1 OFFSET %s"
        points: list[Key] = []
        for i in range(1, n):
            at = (i * int(count)) // n - 1
            if at >= 0:
                points.extend(decode_key(r[0]) for r in self.source.fetch(sql, (at,), None))
        return points

    def _scan_range_batch(self, after: Key | None, upper: Key,
                          limit: int) -> list[tuple[Key, Mapping[str, Any]]] | None:
        self._wide_only("scan")
        st = self.statements
        cols = ", ".join([st.key, *(st.quote(f) for f in self.view.features)])
        where = f"WHERE {st.key} <= %s" + ("" if after is None else f" AND {st.key} > %s")
        params: tuple[Any, ...] = (upper, limit) if after is None else (upper, after, limit)
        rows = self.source.fetch(f"SELECT {cols} FROM {st.table} {where} ORDER BY {st.key} LIMIT %s",
                                 params, None)
        return [(decode_key(r[0]), st.raw_row(r[1:])) for r in rows]

    def _changes_range_batch(self, column: str, after: tuple[Any, Key] | None, lower: Key | None,
                             upper: Key | None,
                             limit: int) -> list[tuple[Any, Key, Mapping[str, Any]]] | None:
        self._wide_only("changes")
        st = self.statements
        sql = st.changes_sql(column, after is None)
        head, _, tail = sql.rpartition(" ORDER BY ")
        params: list[Any] = [] if after is None else [after[0], after[0], after[1]]
        if lower is not None:
            head, params = f"{head} AND {st.key} > %s", [*params, lower]
        if upper is not None:
            head, params = f"{head} AND {st.key} <= %s", [*params, upper]
        rows = self.source.fetch(f"{head} ORDER BY {tail}", (*params, limit), None)
        return [(_watermark(r[0]), decode_key(r[1]), st.raw_row(r[2:])) for r in rows]

    def _delete_batch(self, keys: list[Key]) -> None:
        self._wide_only("delete")
        st = self.statements
        self.source.write(st.delete_sql(), [(st.dialect.bind_list(keys),)])

    def current_rows(self, keys: Sequence[Key]) -> dict[Key, Mapping[str, Any]]:
        """The rows of distinct keys as they are now (absent keys left out): what a change feed applies."""
        st = self.statements
        fields = list(self.view.features)
        if not keys:
            return {}
        rows = self.source.fetch(st.select(fields), st.params(list(keys), fields), None)
        return {k: v for k, v in st.decode(rows, fields).items() if isinstance(v, Mapping)}


def _watermark(value: Any) -> Any:
    """A watermark as a JSON value for the checkpoint (times as ISO text, decimals as numbers)."""
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


class SqlStateStore(StateStore):
    """Checkpoints and seen keys in two tables of a SQL source, every commit one transaction."""

    def __init__(self, source: SqlSource) -> None:
        self._source = source
        self._ready = False
        d = source.dialect
        self._state = quote_identifier("featuredao_sync_state", d.quote)
        self._seen = quote_identifier("featuredao_sync_seen", d.quote)
        short = "VARCHAR(64)" if d.name == "mysql" else "text"
        key = "VARCHAR(500)" if d.name == "mysql" else "text"
        suffix = d.table_suffix
        self._create = [
            f"CREATE TABLE IF NOT EXISTS {self._state} (scope {short} NOT NULL, name {short} NOT NULL, "
            f"value {d.text_type} NOT NULL, PRIMARY KEY (scope, name)){suffix}",
            f"CREATE TABLE IF NOT EXISTS {self._seen} (scope {short} NOT NULL, grp {short} NOT NULL, "
            f"k {key} NOT NULL, gen BIGINT NOT NULL, PRIMARY KEY (scope, grp, k)){suffix}",
        ]
        self._put_state = (f"INSERT INTO {self._state} (scope, name, value) VALUES (%s, %s, %s) "
                           + d.upsert("scope, name", ["value"]))
        self._put_seen = (f"INSERT INTO {self._seen} (scope, grp, k, gen) VALUES (%s, %s, %s, %s) "
                          + d.upsert("scope, grp, k", ["gen"]))
        self._forget = f"DELETE FROM {self._seen} WHERE scope = %s AND grp = %s AND k = %s"

    def _prepare(self) -> None:
        if not self._ready:
            for sql in self._create:
                self._source.execute(sql)
            self._ready = True

    def load(self, scope: str) -> dict[str, Any]:
        self._prepare()
        rows = self._source.fetch(f"SELECT name, value FROM {self._state} WHERE scope = %s", (scope,), None)
        return {str(name): json.loads(value) for name, value in rows}

    def commit(self, scope: str, values: Mapping[str, Any],
               seen: tuple[str, Sequence[str], int] | None = None,
               forget: tuple[str, Sequence[str]] | None = None) -> None:
        self._prepare()
        work: list[tuple[str, list[tuple[Any, ...]]]] = []
        if values:
            work.append((self._put_state, [(scope, name, json.dumps(v)) for name, v in values.items()]))
        if seen is not None and seen[1]:
            group, keys, gen = seen
            work.append((self._put_seen, [(scope, group, k, gen) for k in keys]))
        if forget is not None and forget[1]:
            group, gone = forget
            work.append((self._forget, [(scope, group, k) for k in gone]))
        if work:
            self._source.transaction(work)

    def unseen(self, scope: str, group: str, generation: int, limit: int) -> list[str]:
        self._prepare()
        rows = self._source.fetch(f"SELECT k FROM {self._seen} WHERE scope = %s AND grp = %s AND gen < %s "
                                  "ORDER BY k LIMIT %s", (scope, group, generation, limit), None)
        return [str(r[0]) for r in rows]
