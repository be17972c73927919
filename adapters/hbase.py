"""The HBase adapter over happybase (Thrift1): one row per key, one column per feature in one family.

Sequence views (a row per event, read by pipelined scans) are described in ``adapters._hbase_sequence``.

Layout: the HBase table is ``view.table`` (with the source's optional ``table_prefix`` and
``table_prefix_separator``, happybase's own prefixing; ``"ns"`` + ``":"`` selects a namespace), the
column of feature ``x`` is ``<column_family>:x``. Row keys are the UTF-8 bytes of a str key; int keys
are stored as their decimal text (``17`` -> ``b"17"``), so they sort as text, not as numbers.

Cell values (view option ``encoding``):

* ``utf8`` (default): every type as text: ints in decimal, floats as ``repr`` (round-trips exactly),
  bools as ``true``/``false`` (``1``/``0``/``yes``... read too), strings as UTF-8, lists as JSON.
* ``binary``: HBase ``Bytes.toBytes`` conventions: int as 8-byte big-endian signed, float as 8-byte
  big-endian IEEE double, bool as one byte (written ``0xff``, any non-zero byte reads as true), strings
  as UTF-8, lists as JSON text. A cell of another width is read as text.

A value that cannot be decoded is handed to the core as raw bytes, which reports it (default +
``degraded``). Only the newest version of a cell is read.

Every upsert also writes an empty cell under the empty qualifier (``<column_family>:``), which no
feature can be named, and reads ask for it: an HBase row exists only while it has a cell, so without it
a row whose features are all null (nulls delete their column) or a projection of absent features would
read as a missing key.

Rows written by other tools (happybase, the HBase shell, a Java ``Put``) need no marker. The rule: a key
is found when its row has the marker or a cell of at least one requested feature (one ``rows()`` call,
no extra round trip); its other requested features read as null (the view's defaults). So a row without
the marker whose requested features are all absent reads as a missing key, also when it has other cells;
once featuredao upserts the row, its marker keeps it found for every projection.

Timeouts: ``timeout_ms`` is the socket timeout of each connection (connect and every read). happybase
builds its socket inside ``Connection`` and the Cython transport hides it, so the time left of a read
cannot be applied to the socket per call; it bounds the wait for a pooled connection, and the core
stops waiting for chunks at the deadline, but a request in flight keeps its connection until the answer
arrives or ``timeout_ms`` passes (a timed-out connection is replaced, never reused).
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import happybase
from pydantic import Field
from thriftpy2.thrift import TApplicationException, TException
from thriftpy2.transport import TTransportException

from featuredao.config import StrictModel, View
from featuredao.dao import BaseDao, Capabilities, Source
from featuredao.errors import (
    BackendError,
    BackendQueryError,
    BackendTimeout,
    BackendUnavailable,
    Overloaded,
)
from featuredao.types import CoercionError, FeatureType, FeatureValue, Key, RawRows, Row

from ._hbase_sequence import HBaseSequenceMixin

# happybase loads its IDL as the module "Hbase_thrift"; the service's exception classes live there.
_thrift: Any = importlib.import_module("Hbase_thrift")

T = TypeVar("T")
_Codec = Callable[[Any], Any]
_INT64 = struct.Struct(">q")
_DOUBLE = struct.Struct(">d")
_MARKER = b""  # qualifier of the row marker; feature names are identifiers, never empty
# The benchmark baseline's own pools (raw_reader), shared by the DAOs of one server.
_raw_pools: dict[tuple[Any, ...], Any] = {}
_raw_lock = threading.Lock()


class HBaseOptions(StrictModel):
    """Source options of the hbase adapter."""

    host: str = "localhost"
    port: int = Field(default=9090, ge=1, le=65535)
    transport: Literal["buffered", "framed"] = "buffered"
    protocol: Literal["binary", "compact"] = "binary"
    pool_size: int = Field(default=4, ge=1, le=64)
    batch_size: int = Field(default=100, ge=1, le=10000)
    timeout_ms: int = Field(default=1000, gt=0)
    """Socket timeout of every connection: connecting and each read."""
    pool_timeout_ms: int = Field(default=1000, ge=0)
    """Longest wait for a free pooled connection (capped by the time left of a read)."""
    table_prefix: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    table_prefix_separator: Literal["_", ":", ".", "-"] = "_"


class HBaseViewOptions(StrictModel):
    """View options (layout) of the hbase adapter."""

    column_family: str = Field(default="f", pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$")
    encoding: Literal["utf8", "binary"] = "utf8"
    max_versions: int = Field(default=1, ge=1)
    """Versions kept per cell when ``prepare`` creates the table."""


def _is_stale(exc: BaseException) -> bool:
    """True when a pooled socket had been closed by the server (the pool has reconnected since)."""
    if isinstance(exc, TTransportException):
        return bool(exc.type == TTransportException.END_OF_FILE)
    return isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE)


class HBaseSource(Source):
    """One HBase Thrift server, through a happybase ConnectionPool created on first use."""

    type_name = "hbase"
    driver_modules = {"happybase": "happybase", "thriftpy2": "thriftpy2"}
    options_model = HBaseOptions
    view_options_model = HBaseViewOptions
    capabilities = Capabilities(server_timeout=False, sequences=True)
    default_batch_size = 100
    error_map = (
        (happybase.NoConnectionsAvailable, Overloaded),  # our own pool, not the store
        (TimeoutError, BackendTimeout),
        (_thrift.IllegalArgument, BackendQueryError),
        (_thrift.AlreadyExists, BackendQueryError),
        (TApplicationException, BackendQueryError),
        (TException, BackendUnavailable),
        (OSError, BackendUnavailable),
        (EOFError, BackendUnavailable),
    )
    # The server answered these, so the connection is healthy.
    _answered: tuple[type[BaseException], ...] = (
        _thrift.IOError, _thrift.IllegalArgument, _thrift.AlreadyExists, TApplicationException,
    )

    def __init__(self, name: str, options: HBaseOptions) -> None:
        super().__init__(name, options)
        self._pool: Any = None
        self._pool_lock = threading.Lock()
        self._seen: set[Any] = set()

    def _get_pool(self) -> Any:
        with self._pool_lock:
            if self._pool is None:
                opts: HBaseOptions = self.options
                # ConnectionPool opens one connection in its constructor, hence not in __init__.
                self._pool = happybase.ConnectionPool(
                    opts.pool_size, host=opts.host, port=opts.port, timeout=opts.timeout_ms,
                    transport=opts.transport, protocol=opts.protocol, table_prefix=opts.table_prefix,
                    table_prefix_separator=opts.table_prefix_separator)
            return self._pool

    def run(self, work: Callable[[Any], T], timeout_s: float | None = None) -> T:
        """Run ``work(connection)`` on a pooled connection; once more if the pooled socket was stale."""
        opts: HBaseOptions = self.options
        deadline = None if timeout_s is None else time.perf_counter() + timeout_s
        for attempt in (1, 2):
            wait = opts.pool_timeout_ms / 1000
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - time.perf_counter()))
            try:
                # On a Thrift or socket error the pool replaces the connection's socket and reconnects
                # before re-raising, so a broken socket never goes back to the pool.
                with self._get_pool().connection(timeout=wait) as conn:
                    self._seen.add(conn)
                    try:
                        return work(conn)
                    except self._answered as exc:
                        answer = exc
                # Raised outside the pool's block: the pool would otherwise reconnect a healthy socket.
                raise answer
            except (TTransportException, OSError) as exc:
                # A server restart or idle timeout leaves closed sockets in the pool; the pool has just
                # reconnected this one, so one more try is cheap. Reads and upserts are idempotent.
                late = deadline is not None and time.perf_counter() >= deadline
                if attempt == 2 or late or not _is_stale(exc):
                    raise
        raise AssertionError("unreachable")

    def dao(self, view: View) -> HBaseDao:
        return HBaseDao(self, view)

    def ping(self) -> None:
        self.run(lambda conn: conn.tables(), self.options.timeout_ms / 1000)

    def map_error(self, exc: BaseException) -> type[BackendError] | None:
        if isinstance(exc, TTransportException):
            return BackendTimeout if exc.type == TTransportException.TIMED_OUT else BackendUnavailable
        if isinstance(exc, _thrift.IOError):
            text = _message(exc)
            if "TableNotEnabledException" in text or "RetriesExhausted" in text \
                    or "NotServingRegion" in text or "ConnectException" in text:
                return BackendUnavailable
            if "Timeout" in text:
                return BackendTimeout
            return BackendQueryError  # TableNotFoundException, NoSuchColumnFamilyException...
        return super().map_error(exc)

    def error_detail(self, exc: BaseException, kind: type[BackendError], view: str | None) -> str:
        # Thrift exceptions print as their repr; their message field is the readable part.
        message = _message(exc)
        return f"{type(exc).__name__}: {message}" if message else super().error_detail(exc, kind, view)

    def _release(self) -> None:
        with self._pool_lock:
            self._pool = None
            seen, self._seen = self._seen, set()
        # happybase's pool has no close(); every connection it ever opened has passed through run().
        for conn in seen:
            conn.close()


def _message(exc: BaseException) -> str:
    message = getattr(exc, "message", None)
    if isinstance(message, bytes):
        message = message.decode("utf-8", errors="replace")
    return message.strip().splitlines()[0] if isinstance(message, str) and message.strip() else ""


def _row_key(key: Key) -> bytes:
    """UTF-8 of a str key; an int key as its decimal text."""
    return str(key).encode()


# -- cell codecs: encoders take a coerced value, decoders return a typed value or the raw bytes --------

def _json(v: Any) -> bytes:
    return json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode()


def _pack_int(v: int) -> bytes:
    try:
        return _INT64.pack(v)
    except struct.error:
        raise CoercionError(f"{v} does not fit 8 bytes") from None


def _text_int(raw: bytes) -> Any:
    try:
        return int(raw)
    except ValueError:
        return raw


def _text_float(raw: bytes) -> Any:
    try:
        return float(raw)
    except ValueError:
        return raw


_BOOLS = {b"true": True, b"false": False, b"1": True, b"0": False}


def _text_bool(raw: bytes) -> Any:
    return _BOOLS.get(raw, raw)


def _text_str(raw: bytes) -> Any:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw


def _bin_int(raw: bytes) -> Any:
    return _INT64.unpack(raw)[0] if len(raw) == 8 else _text_int(raw)


def _bin_float(raw: bytes) -> Any:
    return _DOUBLE.unpack(raw)[0] if len(raw) == 8 else _text_float(raw)


def _bin_bool(raw: bytes) -> Any:
    return raw != b"\x00" if len(raw) == 1 else _text_bool(raw)


def _raw(raw: bytes) -> Any:
    return raw  # lists: the core parses the JSON and checks every element


_ENCODERS: dict[str, dict[FeatureType, _Codec]] = {
    "utf8": {
        FeatureType.INT: lambda v: str(v).encode(),
        FeatureType.FLOAT: lambda v: repr(v).encode(),
        FeatureType.BOOL: lambda v: b"true" if v else b"false",
        FeatureType.STR: lambda v: v.encode(),
    },
    "binary": {
        FeatureType.INT: _pack_int,
        FeatureType.FLOAT: _DOUBLE.pack,
        FeatureType.BOOL: lambda v: b"\xff" if v else b"\x00",
        FeatureType.STR: lambda v: v.encode(),
    },
}
_DECODERS: dict[str, dict[FeatureType, _Codec]] = {
    "utf8": {FeatureType.INT: _text_int, FeatureType.FLOAT: _text_float, FeatureType.BOOL: _text_bool,
             FeatureType.STR: _text_str},
    "binary": {FeatureType.INT: _bin_int, FeatureType.FLOAT: _bin_float, FeatureType.BOOL: _bin_bool,
               FeatureType.STR: _text_str},
}


class HBaseDao(HBaseSequenceMixin, BaseDao):
    """Reads and writes one view's HBase table with batched ``rows()`` and ``batch()`` calls (a sequence
    view: see ``adapters._hbase_sequence``)."""

    source: HBaseSource

    def __init__(self, source: HBaseSource, view: View) -> None:
        super().__init__(source, view)
        opts: HBaseViewOptions = view.options
        family = opts.column_family.encode()
        self._family = opts.column_family
        self._marker = family + b":" + _MARKER
        self._columns = {f: family + b":" + f.encode() for f in view.features}
        encoders, decoders = _ENCODERS[opts.encoding], _DECODERS[opts.encoding]
        self._encode: dict[str, _Codec] = {f: encoders.get(t, _json) for f, t in view.features.items()}
        self._decode: dict[str, _Codec] = {f: decoders.get(t, _raw) for f, t in view.features.items()}
        self._read_plans: dict[tuple[str, ...], tuple[list[bytes], list[tuple[str, bytes, _Codec]]]] = {}
        if view.sequence is not None:
            self._sequence_layout(encoders, decoders)

    def _read_plan(self, fields: list[str]) -> tuple[list[bytes], list[tuple[str, bytes, _Codec]]]:
        plan = self._read_plans.get(tuple(fields))
        if plan is None:
            decode = [(f, self._columns[f], self._decode[f]) for f in fields]
            plan = ([self._marker, *(c for _, c, _ in decode)], decode)
            self._read_plans[tuple(fields)] = plan
        return plan

    def _fetch_batch(self, keys: list[Key], fields: list[str], timeout_s: float | None) -> RawRows:
        columns, decode = self._read_plan(fields)
        by_row = {_row_key(k): k for k in keys}
        table = self.view.table
        found = self.source.run(lambda conn: conn.table(table).rows(list(by_row), columns=columns),
                                timeout_s)
        out: dict[Key, dict[str, Any]] = {}
        # rows() leaves out rows that do not exist: match by row key, never by position.
        for row_key, cells in found:
            key = by_row.get(row_key)
            if key is None:
                continue
            values: dict[str, Any] = {}
            for name, column, dec in decode:
                raw = cells.get(column)
                if raw is not None:
                    values[name] = dec(raw)
            out[key] = values
        return out

    def _raw_pool(self) -> Any:
        """The benchmark baseline's own happybase pool for this server."""
        opts: HBaseOptions = self.source.options
        ident = (opts.host, opts.port, opts.transport, opts.protocol, opts.table_prefix,
                 opts.table_prefix_separator)
        with _raw_lock:
            pool = _raw_pools.get(ident)
            if pool is None:
                pool = _raw_pools[ident] = happybase.ConnectionPool(
                    opts.pool_size, host=opts.host, port=opts.port, timeout=opts.timeout_ms,
                    transport=opts.transport, protocol=opts.protocol, table_prefix=opts.table_prefix,
                    table_prefix_separator=opts.table_prefix_separator)
            return pool

    def raw_reader(self) -> Callable[[list[Key], list[str]], object]:
        """happybase by hand: one rows() call on a pool of its own, cells decoded, rows in key order."""
        pool = self._raw_pool()
        family = self._family.encode() + b":"
        table = self.view.table
        plain: dict[FeatureType, _Codec] = {
            FeatureType.INT: int, FeatureType.FLOAT: float, FeatureType.BOOL: lambda r: r == b"true",
        }
        if self.view.options.encoding == "binary":
            plain = {FeatureType.INT: lambda r: _INT64.unpack(r)[0],
                     FeatureType.FLOAT: lambda r: _DOUBLE.unpack(r)[0],
                     FeatureType.BOOL: lambda r: r != b"\x00"}
        decoders = {f: json.loads if t.is_list else bytes.decode if t is FeatureType.STR else plain[t]
                    for f, t in self.view.features.items()}

        def read(keys: list[Key], fields: list[str]) -> object:
            columns = [(f, family + f.encode(), decoders[f]) for f in fields]
            with pool.connection() as conn:
                found = conn.table(table).rows([str(k).encode() for k in keys],
                                               columns=[c for _, c, _ in columns])
            out = {}
            for row_key, cells in found:
                row = {}
                for f, c, dec in columns:
                    raw = cells.get(c)
                    row[f] = None if raw is None else dec(raw)
                out[row_key] = row
            return [out.get(str(k).encode()) for k in keys]

        return read

    def _write_batch(self, rows: list[tuple[Key, Row]]) -> None:
        mutations: list[tuple[bytes, dict[bytes, bytes], list[bytes]]] = []
        for key, row in rows:
            puts = {self._marker: b""}
            deletes = []
            for name, value in row.items():
                if value is None:
                    deletes.append(self._columns[name])  # whole-row upsert: a null clears the column
                else:
                    puts[self._columns[name]] = self._encoded(key, name, value)
            mutations.append((_row_key(key), puts, deletes))

        def send(conn: Any) -> None:
            # transaction=True: nothing is sent if building the batch fails half-way.
            with conn.table(self.view.table).batch(transaction=True) as batch:
                for row_key, puts, deletes in mutations:
                    batch.put(row_key, puts)
                    if deletes:
                        batch.delete(row_key, deletes)

        self.source.run(send)

    def _encoded(self, key: Key, name: str, value: FeatureValue) -> bytes:
        try:
            out: bytes = self._encode[name](value)
        except CoercionError as exc:
            raise CoercionError(f"view {self.view.name!r} key {key!r} feature {name!r}: {exc}") from None
        return out

    def _prepare(self) -> None:
        """Create the table with the view's column family unless the table exists."""
        opts: HBaseViewOptions = self.view.options
        families = {self._family: {"max_versions": opts.max_versions}}
        with contextlib.suppress(_thrift.AlreadyExists):
            self.source.run(lambda conn: conn.create_table(self.view.table, families))
