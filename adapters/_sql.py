"""Shared logic of the SQL adapters (mysql, hologres): layouts, statements per dialect, the tall pivot.

A SQL adapter supplies a :class:`Dialect` (quoting, how a list of keys is bound, column types, the
upsert clause) and a :class:`SqlSource` that runs statements on its pool; :class:`SqlDao` does the
rest. Two table layouts, chosen per view in ``options``:

* ``wide``: one row per key, one column per feature.
* ``tall``: rows of (key, feature name, value text[, event time]); with an event-time column the
  newest value per (key, feature) wins, as in PaiRec's Hologres/ClickHouse feature tables. A key is
  found when at least one of the requested features has a row.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import threading
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Self

from pydantic import Field, SecretStr, model_validator

from featuredao.config import Identifier, StrictModel, View, quote_identifier
from featuredao.dao import BaseDao, Source, StateStore
from featuredao.errors import Unsupported
from featuredao.types import FeatureType, FinalRow, Key, RawRows, Row

from ._sql_sequence import SqlSequenceDao

_TALL_ONLY = ("feature_column", "value_column", "event_time_column")


class SqlViewOptions(StrictModel):
    """View options of the SQL adapters: the table layout."""

    layout: Literal["wide", "tall"] = "wide"
    feature_column: Identifier = "feature"
    value_column: Identifier = "value"
    event_time_column: Identifier | None = None
    """Tall layout only: with several rows per (key, feature), the one with the newest time wins."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.layout == "wide":
            misplaced = sorted(self.model_fields_set & set(_TALL_ONLY))
            if misplaced:
                raise ValueError(f"{', '.join(misplaced)} only apply to layout 'tall'")
        else:
            cols = [self.feature_column, self.value_column, self.event_time_column]
            named = [c for c in cols if c is not None]
            if len(set(named)) != len(named):
                raise ValueError("feature_column, value_column and event_time_column must differ")
        return self


class SqlSourceOptions(StrictModel):
    """Source options shared by the SQL adapters (each adapter sets its own defaults)."""

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(ge=1, le=65535)
    user: str = Field(min_length=1)
    password: SecretStr = SecretStr("")
    database: Identifier
    pool_size: int = Field(default=4, ge=1, le=64)
    """Connections in the pool, and chunks of one read in flight at once."""
    batch_size: int = Field(default=1000, ge=1, le=10000)
    """Most keys sent in one statement."""
    connect_timeout_ms: int = Field(default=2000, gt=0)
    read_timeout_ms: int = Field(default=5000, gt=0)
    """Longest a statement may run when the caller gives no deadline (enforced on the server)."""


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between SQL stores in the statements featuredao sends."""

    name: str
    quote: str
    """Identifier quote character."""
    in_keys: Callable[[str], str]
    """The condition "column is one of the bound list", e.g. ``c IN %s`` or ``c = ANY(%s)``."""
    bind_list: Callable[[Sequence[Any]], Any]
    """How a Python list of keys (or feature names) is passed as one parameter."""
    key_types: Mapping[str, str]
    """Column type of the key per view key type (``str``, ``int``)."""
    types: Mapping[FeatureType, str]
    """Column type per feature type in a wide table."""
    name_type: str
    """Column type of the feature-name column in a tall table."""
    text_type: str
    """Column type of the value column in a tall table."""
    time_type: str
    """Column type (with its default: the time of the write) of a tall table's event-time column."""
    upsert: Callable[[str, Sequence[str]], str]
    """(quoted conflict columns, quoted update columns) -> the tail of an idempotent INSERT."""
    lists_as_json: bool
    """Lists are stored as JSON text (no array type)."""
    bools_as_int: bool
    """Booleans come back as integers (MySQL's BOOLEAN is TINYINT(1))."""
    table_suffix: str = ""


def _mysql_upsert(conflict: str, update: Sequence[str]) -> str:
    # VALUES(col) is what MariaDB understands; MySQL 8 deprecates it (still accepted) for row aliases.
    return "ON DUPLICATE KEY UPDATE " + ", ".join(f"{c} = VALUES({c})" for c in update)


def _pg_upsert(conflict: str, update: Sequence[str]) -> str:
    return f"ON CONFLICT ({conflict}) DO UPDATE SET " + ", ".join(f"{c} = EXCLUDED.{c}" for c in update)


MYSQL = Dialect(
    name="mysql", quote="`",
    in_keys=lambda col: f"{col} IN %s",
    bind_list=tuple,  # pymysql renders a tuple as an escaped "(v1, v2, ...)" list
    # Binary collation: keys match exactly (case, accents, emoji), as in every other store.
    key_types={"str": "VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin", "int": "BIGINT"},
    types={
        FeatureType.INT: "BIGINT", FeatureType.FLOAT: "DOUBLE", FeatureType.STR: "LONGTEXT",
        FeatureType.BOOL: "BOOLEAN", FeatureType.LIST_INT: "JSON", FeatureType.LIST_FLOAT: "JSON",
        FeatureType.LIST_STR: "JSON",
    },
    name_type="VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
    text_type="LONGTEXT",
    time_type="DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)",
    upsert=_mysql_upsert,
    lists_as_json=True,
    bools_as_int=True,
    table_suffix=" ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
)

POSTGRES = Dialect(
    name="postgres", quote='"',
    in_keys=lambda col: f"{col} = ANY(%s)",  # one array parameter: the statement text never changes
    bind_list=list,
    key_types={"str": "text", "int": "bigint"},
    types={
        FeatureType.INT: "bigint", FeatureType.FLOAT: "double precision", FeatureType.STR: "text",
        FeatureType.BOOL: "boolean", FeatureType.LIST_INT: "bigint[]",
        FeatureType.LIST_FLOAT: "double precision[]", FeatureType.LIST_STR: "text[]",
    },
    name_type="text",
    text_type="text",
    time_type="timestamptz NOT NULL DEFAULT now()",
    upsert=_pg_upsert,
    lists_as_json=False,
    bools_as_int=False,
)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def encode_text(value: Any) -> str | None:
    """A feature value as the text a tall table stores (the core's coercers read it back)."""
    if value is None or type(value) is str:
        return value
    if type(value) is bool:
        return "true" if value else "false"
    if type(value) is float:
        return repr(value)  # shortest text that reads back to the same float
    if isinstance(value, list):
        return _json(value)
    return str(value)


def pivot_tall(rows: Sequence[Sequence[Any]], with_time: bool) -> dict[Any, dict[str, Any]]:
    """Rows of (key, feature, value[, event time]) as {key: {feature: value}}; the newest time wins."""
    out: dict[Any, dict[str, Any]] = {}
    if not with_time:
        for key, feature, value in rows:
            found = out.get(key)
            if found is None:
                out[key] = {feature: value}
            else:
                found[feature] = value
        return out
    newest: dict[tuple[Any, str], Any] = {}
    for key, feature, value, at in rows:
        slot = (key, feature)
        if slot in newest:
            seen = newest[slot]
            # A row without a time never beats one with a time; ties keep the first row read.
            if at is None or (seen is not None and at <= seen):
                continue
        newest[slot] = at
        found = out.get(key)
        if found is None:
            out[key] = {feature: value}
        else:
            found[feature] = value
    return out




# Per projection: the exact Python type of each column (the key last), and (index, element types) of lists.
_Exact = tuple[tuple[type[Any], ...], list[tuple[int, set[type[Any]]]]]


def _int_to_bool(value: Any) -> Any:
    # Only 0 and 1 are booleans; anything else is left for the core to reject (and report).
    return _BOOLS.get(value, value) if type(value) is int else value


_BOOLS = {0: False, 1: True}


def _json_list(value: Any) -> Any:
    # Text that is not JSON stays as it is: the core's coercion reports it.
    try:
        return json.loads(value)
    except (ValueError, TypeError):
        return value


def _decode_key(key: Any) -> Any:
    return bytes(key).decode() if isinstance(key, bytes | bytearray | memoryview) else key


class SqlStatements:
    """Every statement one view needs, built once per projection and reused."""

    def __init__(self, view: View, dialect: Dialect) -> None:
        self.view = view
        self.dialect = dialect
        opts: SqlViewOptions = view.options if isinstance(view.options, SqlViewOptions) else SqlViewOptions()
        self.options = opts
        self.tall = opts.layout == "tall"
        self.with_time = self.tall and opts.event_time_column is not None
        q = self.quote
        self.table = q(view.table)
        self.key = q(view.key)
        self._selects: dict[tuple[str, ...], str] = {}
        self._exacts: dict[tuple[str, ...], _Exact] = {}
        fields = list(view.features)
        if self.tall:
            self.feature_col = q(opts.feature_column)
            self.value_col = q(opts.value_column)
            self.time_col = q(opts.event_time_column) if opts.event_time_column else None
            cols = [self.key, self.feature_col, self.value_col]
            # With an event time every write adds a version (the time column defaults to "now").
            conflict = [self.key, self.feature_col, *([self.time_col] if self.time_col else [])]
            self.upsert_sql = self._insert(cols, conflict, [self.value_col])
        else:
            cols = [self.key, *(q(f) for f in fields)]
            self.upsert_sql = self._insert(cols, [self.key], cols[1:])
        self._json = {f for f, t in view.features.items() if t.is_list} if dialect.lists_as_json else set()

    def quote(self, name: str) -> str:
        """Quote a validated identifier for this dialect."""
        return quote_identifier(name, self.dialect.quote)

    def _insert(self, cols: list[str], conflict: list[str], update: list[str]) -> str:
        marks = ", ".join(["%s"] * len(cols))
        tail = self.dialect.upsert(", ".join(conflict), update)
        return f"INSERT INTO {self.table} ({', '.join(cols)}) VALUES ({marks}) {tail}"

    # -- reads -------------------------------------------------------------------------------
    def select(self, fields: list[str]) -> str:
        """The SELECT for one projection: parameters are (keys) for wide, (keys, features) for tall."""
        sql = self._selects.get(tuple(fields))
        if sql is None:
            d = self.dialect
            if self.tall:
                cols = [self.key, self.feature_col, self.value_col]
                if self.time_col:
                    cols.append(self.time_col)
                sql = (f"SELECT {', '.join(cols)} FROM {self.table} "
                       f"WHERE {d.in_keys(self.key)} AND {d.in_keys(self.feature_col)}")
            else:
                # The key goes last so rows zip with the feature names without slicing.
                cols = [*(self.quote(f) for f in fields), self.key]
                sql = f"SELECT {', '.join(cols)} FROM {self.table} WHERE {d.in_keys(self.key)}"
            self._selects[tuple(fields)] = sql
        return sql

    def params(self, keys: list[Key], fields: list[str]) -> tuple[Any, ...]:
        """The parameters of :meth:`select`."""
        bind = self.dialect.bind_list
        return (bind(keys), bind(fields)) if self.tall else (bind(keys),)

    def decode(self, rows: Sequence[Sequence[Any]], fields: list[str]) -> RawRows:
        """Rows as returned by :meth:`select` as {key: {feature: stored value}}."""
        if not rows:
            return {}
        if self.tall:
            out = pivot_tall(rows, self.with_time)
            if isinstance(rows[0][0], bytes | bytearray | memoryview):
                return {_decode_key(k): v for k, v in out.items()}
            return out
        exact, lists = self._exact(fields)
        converters = self._converters(fields)
        found: dict[Any, dict[str, Any]] = {}
        for r in rows:
            if converters:
                r = list(r)
                for i, convert in converters:
                    if r[i] is not None:
                        r[i] = convert(r[i])
            # Column types compared in C (a NULL is NoneType, so it never matches); list elements
            # only for list features.
            final = tuple(map(type, r)) == exact
            if final:
                for i, allowed in lists:
                    if not set(map(type, r[i])) <= allowed:
                        final = False
            found[r[-1]] = FinalRow(zip(fields, r, strict=False)) if final \
                else dict(zip(fields, r, strict=False))
        if isinstance(rows[-1][-1], bytes | bytearray | memoryview):  # a binary key column
            return {_decode_key(k): v for k, v in found.items()}
        return found

    def _converters(self, fields: list[str]) -> list[tuple[int, Callable[[Any], Any]]]:
        """Columns the store returns untyped (MySQL: booleans as 0/1, lists as JSON text)."""
        d, features = self.dialect, self.view.features
        out: list[tuple[int, Callable[[Any], Any]]] = []
        for i, f in enumerate(fields):
            if d.bools_as_int and features[f] is FeatureType.BOOL:
                out.append((i, _int_to_bool))
            elif d.lists_as_json and features[f].is_list:
                out.append((i, _json_list))
        return out

    def _exact(self, fields: list[str]) -> _Exact:
        found = self._exacts.get(tuple(fields))
        if found is None:
            types = [self.view.features[f] for f in fields]
            key_type = int if self.view.key_type == "int" else str
            found = ((*(t.python for t in types), key_type),
                     [(i, {t.element.python}) for i, t in enumerate(types) if t.is_list])
            self._exacts[tuple(fields)] = found
        return found

    # -- writes ------------------------------------------------------------------------------
    def upsert_params(self, rows: list[tuple[Key, Row]]) -> list[tuple[Any, ...]]:
        """Parameters of :attr:`upsert_sql`, one tuple per stored row."""
        fields = list(self.view.features)
        if self.tall:
            return [(key, f, encode_text(row.get(f))) for key, row in rows for f in fields]
        if not self._json:
            return [(key, *(row.get(f) for f in fields)) for key, row in rows]
        js = self._json
        out = []
        for key, row in rows:
            values = [row.get(f) for f in fields]
            out.append((key, *(_json(v) if v is not None and f in js else v
                               for f, v in zip(fields, values, strict=True))))
        return out

    # -- synchronization (wide layout) ------------------------------------------------------
    def scan_sql(self, first: bool) -> str:
        """Rows in key order after a key (parameters: [after,] limit): key first, then every feature."""
        cols = ", ".join([self.key, *(self.quote(f) for f in self.view.features)])
        where = "" if first else f"WHERE {self.key} > %s "
        return f"SELECT {cols} FROM {self.table} {where}ORDER BY {self.key} LIMIT %s"

    def changes_sql(self, watermark: str, first: bool) -> str:
        """Rows ordered by (watermark, key) strictly after a pair (parameters: [w, w, key,] limit)."""
        wm = self.quote(watermark)
        cols = ", ".join([wm, self.key, *(self.quote(f) for f in self.view.features)])
        where = f"WHERE {wm} IS NOT NULL"
        if not first:
            # Expanded rather than a row comparison: both servers use the (watermark, key) index for it.
            where += f" AND ({wm} > %s OR ({wm} = %s AND {self.key} > %s))"
        return f"SELECT {cols} FROM {self.table} {where} ORDER BY {wm}, {self.key} LIMIT %s"

    def delete_sql(self) -> str:
        """DELETE of a bound list of keys (one parameter)."""
        return f"DELETE FROM {self.table} WHERE {self.dialect.in_keys(self.key)}"

    def raw_row(self, values: Sequence[Any]) -> dict[str, Any]:
        """Feature values in view order as a dict of stored values (JSON lists and 0/1 booleans decoded)."""
        fields = list(self.view.features)
        row = dict(zip(fields, values, strict=True))
        for i, convert in self._converters(fields):
            f = fields[i]
            if row[f] is not None:
                row[f] = convert(row[f])
        return row

    def create_table(self) -> str:
        """CREATE TABLE IF NOT EXISTS for the view's layout."""
        d = self.dialect
        key = f"{self.key} {d.key_types[self.view.key_type]} NOT NULL"
        if self.tall:
            cols = [key, f"{self.feature_col} {d.name_type} NOT NULL", f"{self.value_col} {d.text_type}"]
            pk = [self.key, self.feature_col]
            if self.time_col:
                cols.append(f"{self.time_col} {d.time_type}")
                pk.append(self.time_col)
        else:
            cols = [key, *(f"{self.quote(f)} {d.types[t]}" for f, t in self.view.features.items())]
            pk = [self.key]
        body = ", ".join([*cols, f"PRIMARY KEY ({', '.join(pk)})"])
        return f"CREATE TABLE IF NOT EXISTS {self.table} ({body}){d.table_suffix}"


class SqlSource(Source):
    """A SQL source: a pool plus the three ways featuredao uses it."""

    dialect: Dialect = POSTGRES
    view_options_model = SqlViewOptions

    @abstractmethod
    def fetch(self, sql: str, params: Sequence[Any], timeout_s: float | None) -> Sequence[Sequence[Any]]:
        """Run one read statement (cancelled on the server when ``timeout_s`` runs out); return its rows."""

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
        return [(_decode_key(r[0]), st.raw_row(r[1:])) for r in rows]

    def _changes_batch(self, column: str, after: tuple[Any, Key] | None,
                       limit: int) -> list[tuple[Any, Key, Mapping[str, Any]]]:
        self._wide_only("changes")
        st = self.statements
        params: tuple[Any, ...] = (limit,) if after is None else (after[0], after[0], after[1], limit)
        rows = self.source.fetch(st.changes_sql(column, after is None), params, None)
        return [(_watermark(r[0]), _decode_key(r[1]), st.raw_row(r[2:])) for r in rows]

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
                points.extend(_decode_key(r[0]) for r in self.source.fetch(sql, (at,), None))
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
        return [(_decode_key(r[0]), st.raw_row(r[1:])) for r in rows]

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
        return [(_watermark(r[0]), _decode_key(r[1]), st.raw_row(r[2:])) for r in rows]

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
