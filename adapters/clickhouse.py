"""The ClickHouse adapter: clickhouse-driver over the native TCP protocol, ReplacingMergeTree tables.

Two table layouts, chosen per view in ``options``:

* ``wide``: one row per key, one column per feature (``Nullable(T)`` scalars, ``Array(T)`` lists).
  Re-upserts add rows that ReplacingMergeTree collapses on merge; reads use ``FINAL`` so exactly one
  row per key (the highest ``version``) is visible before merges too. ClickHouse has no
  ``Nullable(Array)``, so a null list is recorded by name in the ``nulls_column`` array.
* ``tall``: rows of (key, feature, value text[, event time], version). Reads pick per (key, feature)
  ``argMax(tuple(value), (event_time, version))``: the newest event time wins, the highest version
  breaks ties (re-writes of one event time before a merge). ``prepare`` orders the table by
  (key, feature, event_time), so merges only collapse re-writes of the same event time and a
  late-arriving older event never replaces a newer one; ``FINAL`` is therefore unnecessary.

Written for Debian's ClickHouse 18.16 and correct on current servers; the differences handled:

* 18.16 receives settings as typed binary, and ``max_execution_time`` as whole seconds: 0.5 would
  become 0 (= unlimited). We always send ``ceil(time left)`` (at least 1) as the server-side
  backstop and cancel sooner from the client (below). Current servers take settings as strings;
  the same integer works there.
* 18.16 keeps running a query whose client disconnected, so on a deadline we send the protocol's
  Cancel packet and drain the stream (the connection stays usable); if that fails the Client is
  dropped. ``interactive_delay`` is lowered so progress packets let us notice the deadline.
* No server-side query parameters before 19.x: keys are bound client-side by the driver
  (``%(keys)s``, escaped by it), never formatted by us; ``IN`` takes a tuple, never an empty one.
* ``argMax`` skips NULL values, which would resurrect an older value over a newer null: we take
  ``argMax(tuple(value), ...).1`` instead.
* No Map, Bool, JSON or DateTime64 in 18.16: booleans are ``UInt8``, event times ``DateTime`` (whole
  seconds, the version orders writes within a second). ``FINAL`` only works on the collapsing
  *MergeTree engines (code 181 on plain MergeTree, Memory, Log...).

Existing tables are read as they are. On its first use (read, upsert, scan) a DAO reads the table's engine
and columns from ``system.tables`` and ``system.columns`` in one query, then caches what it found for the
life of the DAO (no further round trips; a table altered later is seen after a restart):

* ``FINAL`` (option ``final`` left out): used for a wide table whose engine collapses rows
  (Replacing/Collapsing/VersionedCollapsing/Summing/Aggregating/Graphite/Coalescing MergeTree, replicated or
  not), never for a plain MergeTree, Memory or Log table, nor for views and Distributed tables (set
  ``final: true`` to push it to the table behind them). ``final: true`` on an engine known not to support
  it is an error that says to set ``final`` to false.
* ``nulls_column`` (wide, views with list features) and ``version_column``: used only where the table
  has them. Without a nulls column a null list is written as ``[]`` and reads as ``[]``; without a version
  column upserts write none (a ReplacingMergeTree keeps the last inserted row, a plain MergeTree keeps
  every row and reads see any one of them), and tall reads order by the event time alone, or take any
  row of a (key, feature) when there is no event time either.
* A column named by an option that was set explicitly (``nulls_column``, ``version_column``,
  ``event_time_column``, and the tall ``feature_column`` and ``value_column`` even by default) but is
  missing from the table is a :class:`BackendQueryError` naming the option to set.
* A missing table is not cached: the statement runs and fails as it always did (``BackendQueryError``,
  ServerException 60), and the next use looks again (after ``prepare`` created it, say). ``prepare``
  creates the full layout above and forgets what was cached.

The first use spends one extra round trip inside its own deadline.

The views of one source that a request reads together share one Client of the pool (``read_group``, in
``_clickhouse_group``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from clickhouse_driver import Client
from clickhouse_driver import errors as ch_errors
from pydantic import Field, SecretStr

from featuredao.config import Identifier, StrictModel, View
from featuredao.dao import BaseDao, Capabilities, Chunks, Fetch, Source
from featuredao.errors import (
    BackendAuthError,
    BackendError,
    BackendQueryError,
    BackendTimeout,
    BackendUnavailable,
    Overloaded,
)
from featuredao.types import FeatureType, Key, RawRows, Row

from ._clickhouse_group import read_on_one_client
from ._clickhouse_sequence import ClickHouseSequenceDao
from ._clickhouse_sync import ClickHouseSyncDao
from ._clickhouse_table import ClickHouseViewOptions, Layout, Query, TableLayout, q

__all__ = ["ClickHouseDao", "ClickHouseOptions", "ClickHouseSource", "ClickHouseViewOptions"]

_CANCEL_GRACE_S = 0.5  # how long a cancelled query may take to end its stream before we drop the Client


class ClickHouseOptions(StrictModel):
    """Source options of the clickhouse adapter."""

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=9000, ge=1, le=65535)
    """The native TCP protocol port (not HTTP)."""
    user: str = Field(default="default", min_length=1)
    password: SecretStr = SecretStr("")
    database: Identifier = "default"
    pool_size: int = Field(default=4, ge=1, le=64)
    """Clients in the pool (one connection each), and chunks of one read in flight at once."""
    batch_size: int = Field(default=1000, ge=1, le=100000)
    """Most keys sent in one query."""
    connect_timeout_ms: int = Field(default=1000, gt=0)
    send_receive_timeout_ms: int = Field(default=10000, gt=0)
    """Longest wait for the server to accept or send one packet (capped by a read's time left)."""
    read_timeout_ms: int = Field(default=5000, gt=0)
    """Deadline of a read whose caller gives none (enforced on the server, cancelled from the client)."""
    settings: dict[Identifier, bool | int | float | str] = Field(default_factory=dict)
    """Extra ClickHouse settings sent with every query."""


_WIDE_TYPES = {
    FeatureType.INT: "Nullable(Int64)", FeatureType.FLOAT: "Nullable(Float64)",
    FeatureType.STR: "Nullable(String)", FeatureType.BOOL: "Nullable(UInt8)",
    FeatureType.LIST_INT: "Array(Int64)", FeatureType.LIST_FLOAT: "Array(Float64)",
    FeatureType.LIST_STR: "Array(String)",
}

# ServerException codes (see clickhouse_driver.errors.ErrorCodes); anything else is a query error.
_TIMEOUT_CODES = frozenset({159, 160, 209, 394})  # TIMEOUT_EXCEEDED, TOO_SLOW, SOCKET_TIMEOUT, CANCELLED
_AUTH_CODES = frozenset({192, 193, 194, 195, 291, 497, 516})  # unknown user, wrong password, ..., denied
_UNAVAILABLE_CODES = frozenset({202, 203, 210, 241, 242, 252, 279})  # overloaded, network, read-only


class _Pool:
    """At most ``size`` Clients (not thread-safe, so one per borrower), created lazily, LIFO reuse."""

    def __init__(self, make: Callable[[], Any], size: int) -> None:
        self._make = make
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)
        self._closed = False

    @contextmanager
    def client(self, wait_s: float | None) -> Iterator[Any]:
        """Borrow a Client; one that raised is disconnected and dropped, never handed out again."""
        if not self._slots.acquire(timeout=wait_s):
            raise Overloaded("no free ClickHouse connection of the pool in time")
        client: Any = None
        try:
            with self._lock:
                client = self._idle.pop() if self._idle else None
            if client is None:
                client = self._make()
            yield client
        except BaseException:
            if client is not None:
                _disconnect(client)
                client = None
            raise
        finally:
            if client is not None:
                with self._lock:
                    keep = not self._closed
                    if keep:
                        self._idle.append(client)
                if not keep:
                    _disconnect(client)
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for client in idle:
            _disconnect(client)


def _disconnect(client: Any) -> None:
    with contextlib.suppress(Exception):  # a broken socket is being thrown away anyway
        client.disconnect()


class ClickHouseSource(Source):
    """One ClickHouse server (native protocol) with a pool of clickhouse-driver Clients."""

    type_name = "clickhouse"
    driver_modules = {"clickhouse_driver": "clickhouse-driver"}
    options_model = ClickHouseOptions
    view_options_model = ClickHouseViewOptions
    capabilities = Capabilities(server_timeout=True, scan=True, changes=True, sequences=True,
                                sequence_filters=True, grouped_reads=True)
    default_batch_size = 1000

    def __init__(self, name: str, options: ClickHouseOptions) -> None:
        super().__init__(name, options)
        self._pool = _Pool(self._client, options.pool_size)
        self._settings = dict(options.settings)
        self._max_execution_time = math.ceil(float(self._settings.get("max_execution_time") or 0))
        self._connect_s = options.connect_timeout_ms / 1000
        self._io_s = options.send_receive_timeout_ms / 1000
        self._version_lock = threading.Lock()
        self._last_version = 0

    def _client(self) -> Any:
        opts: ClickHouseOptions = self.options
        # Constructing a Client does not connect; it connects on its first query.
        return Client(opts.host, port=opts.port, user=opts.user, password=opts.password.get_secret_value(),
                      database=opts.database, client_name="featuredao", connect_timeout=self._connect_s,
                      send_receive_timeout=self._io_s, sync_request_timeout=self._io_s)

    def _arm(self, client: Any, left: float | None) -> None:
        """Cap every socket wait of the next query (connect, ping, packets) by the time left."""
        conn = client.connection
        io = self._io_s if left is None else max(0.001, min(self._io_s, left))
        conn.connect_timeout = min(self._connect_s, io)
        conn.send_receive_timeout = io
        conn.sync_request_timeout = io  # the driver pings a reused connection before each query
        if conn.connected and conn.socket is not None:
            conn.socket.settimeout(io)

    def query(self, sql: str, params: dict[str, Any] | None, timeout_s: float | None) -> list[Any]:
        """Run one SELECT within ``timeout_s`` (cancelled on the server when it runs out)."""
        if timeout_s is None:
            timeout_s = self.options.read_timeout_ms / 1000
        deadline = time.perf_counter() + timeout_s
        with self._pool.client(timeout_s) as client:
            rows = self._select_on(client, sql, params, deadline)
        if rows is None:  # raised outside the borrow: a cleanly cancelled Client goes back to the pool
            raise BackendTimeout(f"query cancelled after {timeout_s:.3f}s", source=self.name)
        return rows

    def _select_on(self, client: Any, sql: str, params: dict[str, Any] | None,
                   deadline: float) -> list[Any] | None:
        """One SELECT on a borrowed Client, ended by ``deadline`` (``time.perf_counter``): its rows, or None
        when it was cancelled then (the Client stays usable: drained, or disconnected to reconnect)."""
        left = deadline - time.perf_counter()
        if left <= 0:
            raise BackendTimeout("deadline passed before the query was sent", source=self.name)
        self._arm(client, left)
        limit = max(1, math.ceil(left))
        if self._max_execution_time:  # a configured limit still caps long deadlines
            limit = min(limit, self._max_execution_time)
        settings = {
            **self._settings,
            "max_execution_time": limit,
            # Progress packets at this interval let the loop below notice the deadline.
            "interactive_delay": int(min(100_000, max(5_000, left * 250_000))),
        }
        if len(sql) > 200_000 or (params and _rough_size(params) > 200_000):
            settings["max_query_size"] = 64 * 1024 * 1024  # the default 256 KiB fits ~5000 keys
        progress = client.execute_with_progress(sql, params, settings=settings, query_id=uuid.uuid4().hex)
        for _ in progress:
            if time.perf_counter() >= deadline:
                self._cancel(client)
                return None
        rows: list[Any] = progress.get_result()
        return rows

    def _cancel(self, client: Any) -> None:
        """Stop the running query on the server and drain its stream so the Client stays usable."""
        try:
            client.connection.socket.settimeout(_CANCEL_GRACE_S)
            client.cancel()
        except Exception:  # the server answered the cancel with an error, or not at all
            _disconnect(client)
            return
        if getattr(client.connection, "is_query_executing", False):
            _disconnect(client)  # a disconnected Client reconnects on its next query

    def execute(self, sql: str, data: list[tuple[Any, ...]] | None = None) -> None:
        """Run one statement (DDL, or an INSERT with its rows) with the configured socket timeouts."""
        with self._pool.client(self._io_s) as client:
            self._arm(client, None)
            if data is None:
                client.execute(sql, settings=self._settings or None)
            else:
                client.execute(sql, data, settings=self._settings or None)

    def read_group(self, fetches: Sequence[Fetch], timeout_s: float | None) -> list[Chunks | Exception]:
        """Every fetch's chunks on one borrowed Client, each statement limited by the time the group has
        left (``_clickhouse_group``)."""
        return read_on_one_client(self, self._pool.client, self._select_on, fetches, timeout_s)

    def next_version(self) -> int:
        """A version larger than every one this process handed out (nanoseconds since the epoch)."""
        with self._version_lock:
            self._last_version = max(time.time_ns(), self._last_version + 1)
            return self._last_version

    def dao(self, view: View) -> ClickHouseDao:
        return ClickHouseDao(self, view)

    def ping(self) -> None:
        self.query("SELECT 1", None, min(5.0, self._connect_s + self._io_s))

    def map_error(self, exc: BaseException) -> type[BackendError] | None:
        if isinstance(exc, ch_errors.ServerException):
            code = exc.code or 0
            if code in _TIMEOUT_CODES:
                return BackendTimeout
            if code in _AUTH_CODES:
                return BackendAuthError
            if code in _UNAVAILABLE_CODES:
                return BackendUnavailable
            return BackendQueryError
        if isinstance(exc, ch_errors.SocketTimeoutError | TimeoutError):
            return BackendTimeout
        if isinstance(exc, ch_errors.NetworkError | ch_errors.UnexpectedPacketFromServerError |
                      ch_errors.UnknownPacketFromServerError | EOFError | OSError):
            return BackendUnavailable
        if isinstance(exc, ch_errors.Error):
            return BackendQueryError  # type mismatches and the like, found by the driver
        return None

    def error_detail(self, exc: BaseException, kind: type[BackendError], view: str | None) -> str:
        if isinstance(exc, ch_errors.ServerException):
            # str() of a ServerException starts with a bare "Code: 60."; the message says what failed.
            text = (exc.message or "").strip().splitlines()
            return f"ServerException {exc.code}: {text[0] if text else 'no message'}"
        return super().error_detail(exc, kind, view)

    def _release(self) -> None:
        self._pool.close()


def _rough_size(params: dict[str, Any]) -> int:
    """About how many bytes the bound tuples add to the statement."""
    size = 0
    for p in params.values():
        if isinstance(p, tuple) and p:
            size += (sum(map(len, p)) if isinstance(p[0], str) else 20 * len(p)) + 4 * len(p)
    return size


class ClickHouseDao(ClickHouseSyncDao, ClickHouseSequenceDao, BaseDao):
    """Reads and writes one view's wide or tall table, as made by ``prepare`` or by another tool (a sequence
    view's events: ``_clickhouse_sequence``)."""

    source: ClickHouseSource

    def __init__(self, source: ClickHouseSource, view: View) -> None:
        super().__init__(source, view)
        opts: ClickHouseViewOptions = view.options or ClickHouseViewOptions()
        self.options = opts
        self._tall = opts.layout == "tall"
        self._table = q(view.table)
        self._key = q(view.key)
        self._lists = {f for f, t in view.features.items() if t.is_list}
        self._tables = TableLayout(view, opts, source.name)
    def _layout(self, timeout_s: float | None) -> Layout:
        """The table's layout (see ``TableLayout``)."""
        return self._tables.get(self.source.query, timeout_s)

    # -- reads ---------------------------------------------------------------------------------------------
    def raw_reader(self) -> Callable[[list[Key], list[str]], object] | None:
        """clickhouse-driver by hand (wide layout): the same statement, rows as dicts in key order."""
        if self._tall:
            return None
        client = self.source._client()  # a plain Client of its own, outside the pool

        def read(keys: list[Key], fields: list[str]) -> object:
            sql, with_nulls = self._select(self._layout(None), fields)
            columns = [*fields, "_nulls"] if with_nulls else fields
            rows = client.execute(sql, {"keys": tuple(keys)})
            found = {r[0]: dict(zip(columns, r[1:], strict=True)) for r in rows}
            return [found.get(k) for k in keys]

        return read

    def _select(self, layout: Layout, fields: list[str]) -> tuple[str, bool]:
        """The statement for these fields, and whether it ends with the null-lists column."""
        cached = layout.sql.get(tuple(fields))
        if cached is not None:
            return cached
        o = self.options
        with_nulls = False
        if self._tall and not fields:
            sql = f"SELECT DISTINCT {self._key} FROM {self._table} WHERE {self._key} IN %(keys)s"
        elif self._tall:
            # tuple(): argMax skips NULLs, and a newer null must hide an older value.
            pick = "anyLast(tuple({}))" if layout.order is None else f"argMax(tuple({{}}), {layout.order})"
            feature = q(o.feature_column)
            sql = (f"SELECT {self._key}, {feature}, {pick.format(q(o.value_column))}.1 "
                   f"FROM {self._table}{layout.final} WHERE {self._key} IN %(keys)s "
                   f"AND {feature} IN %(fields)s GROUP BY {self._key}, {feature}")
        else:
            cols = [self._key, *(q(f) for f in fields)]
            with_nulls = layout.nulls is not None and any(f in self._lists for f in fields)
            if with_nulls:
                cols.append(str(layout.nulls))
            sql = f"SELECT {', '.join(cols)} FROM {self._table}{layout.final} WHERE {self._key} IN %(keys)s"
        layout.sql[tuple(fields)] = (sql, with_nulls)
        return sql, with_nulls

    def _fetch_batch(self, keys: list[Key], fields: list[str], timeout_s: float | None) -> RawRows:
        return self.read_chunk(self.source.query, keys, fields, timeout_s)

    def read_chunk(self, query: Query, keys: list[Key], fields: list[str],
                   timeout_s: float | None) -> RawRows:
        """One chunk's statement sent with ``query`` (the source's own, or a group's Client), decoded."""
        layout = self._tables.known
        if layout is None:  # first use: the inspection spends part of this read's time
            started = time.perf_counter()
            layout = self._tables.get(query, timeout_s)
            if timeout_s is not None:
                timeout_s -= time.perf_counter() - started
                if timeout_s <= 0:
                    raise BackendTimeout("deadline passed while inspecting the table",
                                         source=self.source.name, view=self.view.name)
        sql, with_nulls = self._select(layout, fields)
        params: dict[str, Any] = {"keys": tuple(keys)}
        if self._tall:
            if fields:
                params["fields"] = tuple(fields)
            tall: dict[Key, dict[str, Any]] = {}
            for row in query(sql, params, timeout_s):
                found = tall.get(row[0])
                if found is None:
                    tall[row[0]] = found = {}
                if len(row) > 1:
                    found[row[1]] = row[2]
            return tall
        rows = query(sql, params, timeout_s)
        if not with_nulls:
            return {r[0]: dict(zip(fields, r[1:], strict=True)) for r in rows}
        out: dict[Key, dict[str, Any]] = {}
        for r in rows:  # the last column names the null lists
            got = dict(zip(fields, r[1:-1], strict=True))
            for name in r[-1]:
                if name in got:
                    got[name] = None
            out[r[0]] = got
        return out

    def _write_batch(self, rows: list[tuple[Key, Row]]) -> None:
        layout = self._layout(None)
        version = self.source.next_version()
        tail = [version] if layout.version is not None else []
        o = self.options
        if self._tall:
            cols = [self._key, q(o.feature_column), q(o.value_column)]
            now: list[Any] = []
            if o.event_time_column is not None:
                cols.append(q(o.event_time_column))
                now = [dt.datetime.now(dt.UTC).replace(microsecond=0)]
            if layout.version is not None:
                cols.append(layout.version)
            data = [(key, name, _encode_text(value), *now, *tail)
                    for key, row in rows for name, value in row.items()]
        else:
            fields = list(self.view.features)
            cols = [self._key, *(q(f) for f in fields)]
            if layout.nulls is not None:
                cols.append(layout.nulls)
            if layout.version is not None:
                cols.append(layout.version)
            data = []
            for key, row in rows:
                values: list[Any] = [key]
                for f in fields:
                    v = row[f]
                    if v is None and f in self._lists:
                        v = []  # no Nullable(Array): the nulls column says it is null
                    values.append(int(v) if isinstance(v, bool) else v)
                if layout.nulls is not None:
                    values.append([f for f in self._lists if row[f] is None])
                values.extend(tail)
                data.append(tuple(values))
        self.source.execute(f"INSERT INTO {self._table} ({', '.join(cols)}) VALUES", data)
    def _prepare(self) -> None:
        if self.view.sequence is not None:
            self._prepare_sequence()
            return
        o = self.options
        key_type = "Int64" if self.view.key_type == "int" else "String"
        if self._tall:
            cols = [f"{self._key} {key_type}", f"{q(o.feature_column)} String",
                    f"{q(o.value_column)} Nullable(String)"]
            order = [self._key, q(o.feature_column)]
            if o.event_time_column is not None:
                cols.append(f"{q(o.event_time_column)} DateTime")
                order.append(q(o.event_time_column))
        else:
            cols = [f"{self._key} {key_type}",
                    *(f"{q(f)} {_WIDE_TYPES[t]}" for f, t in self.view.features.items())]
            if self._tables.nulls_conf is not None:
                cols.append(f"{self._tables.nulls_conf} Array(String)")
            order = [self._key]
        cols.append(f"{self._tables.version_conf} UInt64")
        # Point lookups read whole index granules: smaller ones than the default 8192 rows read less.
        self.source.execute(f"CREATE TABLE IF NOT EXISTS {self._table} ({', '.join(cols)}) "
                            f"ENGINE = ReplacingMergeTree({self._tables.version_conf}) "
                            f"ORDER BY ({', '.join(order)}) SETTINGS index_granularity = 1024")
        self._tables.forget()  # the table may have been (re)made just now


def _encode_text(value: Any) -> str | None:
    """A feature value as the tall layout's text; lists as JSON, read back by the core's coercers."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if isinstance(value, float):
        return repr(value)
    return str(value)
