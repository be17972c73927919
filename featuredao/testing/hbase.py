"""A local, in-memory HBase Thrift (Thrift1) server for development and tests.

What it is
----------
This module serves the ``Hbase`` Thrift1 service (the API spoken by the HBase
"thrift" server, ``hbase thrift start``) from a plain Python process, so that
the **unmodified** `happybase` client can talk to it over a real TCP socket.
It loads the ``Hbase.thrift`` IDL bundled with happybase through
``thriftpy2.load`` (under the same module name, ``Hbase_thrift``, that
happybase uses, so both share the very same generated classes) and serves it
with thriftpy2's processor, transports and protocols:

* buffered transport + binary protocol by default (happybase's defaults, and
  the default ``-threadpool`` mode of the HBase Thrift server);
* ``transport="framed"`` and ``protocol="compact"`` as options (happybase's
  ``Connection(transport="framed", protocol="compact")``).

Every client connection is served on its own daemon thread; there is no idle
timeout, so pooled happybase connections stay usable.  All data lives in
memory, guarded by one lock.

**This is a local development/test server, not a replacement for HBase.**  It
has no persistence, no WAL, no regions/splits, no replication, no security.

What it implements
------------------
Tables with column families (``ColumnDescriptor`` incl. ``maxVersions`` and a
best-effort ``timeToLive``), cells with millisecond timestamps, several
versions per cell kept up to ``maxVersions`` (newest first), and these Thrift
calls (all calls in the bundled IDL have a handler):

* admin: ``getTableNames``, ``createTable``, ``deleteTable``, ``enableTable``,
  ``disableTable``, ``isTableEnabled``, ``getColumnDescriptors``,
  ``getTableRegions`` (one region per table), ``getRegionInfo``,
  ``compact`` / ``majorCompact`` (no-ops);
* reads: ``get``, ``getVer``, ``getVerTs``, ``getRow``, ``getRowTs``,
  ``getRowWithColumns``, ``getRowWithColumnsTs``, ``getRows``, ``getRowsTs``,
  ``getRowsWithColumns``, ``getRowsWithColumnsTs``, ``getRowOrBefore``;
* writes: ``mutateRow``, ``mutateRowTs``, ``mutateRows``, ``mutateRowsTs``,
  ``deleteAll``, ``deleteAllTs``, ``deleteAllRow``, ``deleteAllRowTs``,
  ``atomicIncrement``, ``increment``, ``incrementRows``, ``append``,
  ``checkAndPut``;
* scanners: ``scannerOpenWithScan`` (``TScan`` startRow, stopRow, timestamp,
  columns, caching, filterString, batchSize, sortColumns, reversed),
  ``scannerOpen``, ``scannerOpenWithStop``, ``scannerOpenWithPrefix``,
  ``scannerOpenTs``, ``scannerOpenWithStopTs``, ``scannerGet``,
  ``scannerGetList``, ``scannerClose``.

Semantics follow the HBase Thrift1 server (``ThriftHBaseServiceHandler``):

* A write without timestamp gets the server's current time in milliseconds;
  all cells of one call share that time.  Writing the same cell twice with the
  same timestamp overwrites the value (as in HBase).
* Timestamps passed to reads (``getRowTs``/``getVerTs``/``TScan.timestamp``...)
  are an **exclusive** upper bound: HBase uses ``setTimeRange(0, ts)``.
* ``getRows*`` omit rows that do not exist and keep the requested order.
* Column names: ``b"cf"`` means the whole family, ``b"cf:q"`` one column and
  ``b"cf:"`` the column with the empty qualifier (modern HBase's
  ``CellUtil.parseColumn``).  A put to ``b"cf"`` writes the empty qualifier.
* A ``mutateRows*`` call applies all puts first and then all deletes (as the
  HBase handler does), so a delete wins over a put of the same cell in the
  same batch.  ``mutateRow*`` applies deletes first, then puts.
* Deletes without timestamp remove all versions up to "now"; with a timestamp
  ``T`` they remove versions ``<= T``.
* Counters are 8-byte big-endian signed integers; incrementing a cell of a
  different width is an ``IOError`` (HBase: "Field is not a long").
* Unknown tables and families, disabled tables, etc. raise the IDL-declared
  ``IOError`` with HBase-like messages (e.g. ``TableNotFoundException: t``);
  a duplicate ``createTable`` raises ``AlreadyExists``; bad arguments of
  calls that declare it raise ``IllegalArgument``.  Any other failure inside a
  handler is converted to the call's declared ``IOError`` so the client's
  connection is never dropped.

Filter strings (``TScan.filterString``) support a subset of the HBase filter
language: ``PrefixFilter``, ``RowFilter``, ``FamilyFilter``,
``QualifierFilter``, ``ValueFilter``, ``ColumnPrefixFilter``,
``MultipleColumnPrefixFilter``, ``KeyOnlyFilter``, ``FirstKeyOnlyFilter``,
``ColumnCountGetFilter``, ``PageFilter``, ``InclusiveStopFilter`` and
``SingleColumnValueFilter``, with comparators ``binary:``, ``binaryprefix:``,
``substring:`` and ``regexstring:``, combined with ``AND``.  Anything else
(``OR``, ``SKIP``, ``WHILE``, parentheses, other filters) is rejected when the
scanner is opened.  ``scannerOpenWithScan`` only declares ``IOError`` in the
IDL, so the rejection is an ``IOError`` whose message starts with
``IllegalArgumentException:`` (an ``IllegalArgument`` would be undeclared
there and would close the client's connection).

Known differences from HBase
----------------------------
* No delete markers (tombstones): a delete removes versions immediately, so a
  later put with an older timestamp becomes visible (HBase would mask it
  until a major compaction).
* ``timeToLive`` hides expired cells on read; compression,
  bloom filters, block cache and in-memory settings are stored and echoed only.
  ``getColumnDescriptors`` returns exactly what the client sent (HBase
  normalises some values, e.g. ``timeToLive`` ``-1`` is reported as
  ``2147483647``).
* One region per table; ``caching`` is ignored; scanners are a snapshot of
  the row keys at open time (values are read at ``scannerGetList`` time) and
  are never expired by the server.
* ``getRowsWithColumnsTs`` applies the timestamp even without columns (HBase
  ignores it then; happybase works around that bug).
* Increments and appends write their new cell at ``max(now, latest version's
  timestamp)``, replacing that version when it is in the same millisecond.
* Attributes maps, ``writeToWAL`` and durability settings are ignored.
* Errors carry short messages, not Java stack traces.

Usage::

    from featuredao.testing.hbase import HBaseThriftServer
    import happybase

    with HBaseThriftServer() as server:          # port 0: a free port
        conn = happybase.Connection("127.0.0.1", server.port)
        conn.create_table("t", {"cf": {"max_versions": 3}})

or from a shell (runs in the foreground until Ctrl-C)::

    python -m featuredao.testing.hbase --port 9090 [--host H]
        [--transport framed] [--protocol compact]
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import importlib.util
import logging
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any, cast

import thriftpy2
from thriftpy2.protocol import TBinaryProtocolFactory, TCompactProtocolFactory
from thriftpy2.thrift import TException, TPayload, TProcessor
from thriftpy2.transport import (
    TBufferedTransportFactory,
    TFramedTransportFactory,
    TSocket,
    TTransportException,
)

from featuredao.testing._lifecycle import StartStop

__all__ = [
    "LATEST_TIMESTAMP",
    "PROTOCOLS",
    "TRANSPORTS",
    "HBaseThriftServer",
    "hbase_thrift",
    "main",
]

logger = logging.getLogger(__name__)

#: HConstants.LATEST_TIMESTAMP (Long.MAX_VALUE).
LATEST_TIMESTAMP = 2**63 - 1
TRANSPORTS = ("buffered", "framed")
PROTOCOLS = ("binary", "compact")

_I64 = struct.Struct(">q")
_INT32_MAX = 2**31 - 1


def _find_idl() -> Path:
    """Locate the ``Hbase.thrift`` IDL shipped inside the happybase package."""
    spec = importlib.util.find_spec("happybase")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "Hbase.thrift"
        if candidate.is_file():
            return candidate
    raise RuntimeError(
        "Hbase.thrift not found: the local HBase server needs happybase installed "
        "(pip install 'featuredao[hbase]')"
    )


#: The Thrift module generated from happybase's IDL.  It is loaded under the
#: module name happybase itself uses (``Hbase_thrift``); thriftpy2 caches
#: modules by that name, so happybase and this server share the same classes.
hbase_thrift: ModuleType = thriftpy2.load(str(_find_idl()), module_name="Hbase_thrift")

# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------


def _text(value: bytes | str) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    return value


def _io_error(message: str) -> Exception:
    exc: Exception = hbase_thrift.IOError(message=message)
    return exc


def _illegal_argument(message: str) -> Exception:
    exc: Exception = hbase_thrift.IllegalArgument(message=message)
    return exc


def _already_exists(message: str) -> Exception:
    exc: Exception = hbase_thrift.AlreadyExists(message=message)
    return exc


class _GuardedProcessor(TProcessor):
    """A TProcessor that never lets an undeclared exception escape.

    thriftpy2 re-raises exceptions a method does not declare, which ends the
    client's connection.  Every call of the Hbase service declares ``IOError``
    (field ``io``), so anything undeclared is reported as such an ``IOError``.
    """

    def handle_exception(self, e: Exception, result: TPayload) -> bool:
        if super().handle_exception(e, result):
            return True
        fields = {spec[1] for key, spec in result.thrift_spec.items() if key != 0}
        if "io" not in fields:
            return False
        if isinstance(e, TException) and hasattr(e, "message"):
            message = f"{type(e).__name__}: {e.message}"
        else:
            logger.exception("unexpected error in HBase Thrift handler")
            message = f"{type(e).__name__}: {e}"
        result.io = _io_error(message)  # type: ignore[attr-defined]
        return True


# --------------------------------------------------------------------------
# storage model
# --------------------------------------------------------------------------

# versions of one cell, newest first
_Versions = list[tuple[int, bytes]]
# family -> qualifier -> versions
_RowData = dict[bytes, dict[bytes, _Versions]]
# (family, qualifier, timestamp, value)
_Cell = tuple[bytes, bytes, int, bytes]
# family -> None (whole family) | set of qualifiers; None = every family
_Selection = dict[bytes, set[bytes] | None] | None


@dataclass
class _Family:
    name: bytes
    descriptor: Any
    max_versions: int
    ttl_ms: int | None


@dataclass
class _Table:
    name: bytes
    families: dict[bytes, _Family]
    region_id: int
    enabled: bool = True
    rows: dict[bytes, _RowData] = field(default_factory=dict)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _parse_column(column: bytes) -> tuple[bytes, bytes | None]:
    """``b"cf"`` -> (cf, None); ``b"cf:q"`` -> (cf, q); ``b"cf:"`` -> (cf, b"")."""
    family, sep, qualifier = column.partition(b":")
    return (family, qualifier) if sep else (family, None)


def _wrap_i64(value: int) -> int:
    value &= 2**64 - 1
    return value - 2**64 if value >= 2**63 else value


def _make_row_result(row: bytes, cells: Sequence[_Cell], sort_columns: bool = False) -> Any:
    if sort_columns:
        return hbase_thrift.TRowResult(
            row=row,
            sortedColumns=[
                hbase_thrift.TColumn(columnName=f + b":" + q, cell=hbase_thrift.TCell(value=v, timestamp=ts))
                for f, q, ts, v in cells
            ],
        )
    return hbase_thrift.TRowResult(
        row=row,
        columns={f + b":" + q: hbase_thrift.TCell(value=v, timestamp=ts) for f, q, ts, v in cells},
    )


# --------------------------------------------------------------------------
# filter language (subset)
# --------------------------------------------------------------------------

_TOKEN_RE = re.compile(
    r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<op><=|>=|!=|=|<|>)|(?P<punct>[(),])|(?P<word>[A-Za-z_][A-Za-z0-9_]*|-?\d+))"
)
_OPS: dict[str, Callable[[int], bool]] = {
    "<": lambda c: c < 0,
    "<=": lambda c: c <= 0,
    "=": lambda c: c == 0,
    "!=": lambda c: c != 0,
    ">": lambda c: c > 0,
    ">=": lambda c: c >= 0,
}


def _unsupported_filter(message: str) -> Exception:
    return _io_error(f"IllegalArgumentException: {message}")


def _cmp(a: bytes, b: bytes) -> int:
    return (a > b) - (a < b)


def _make_comparator(op: str, spec: bytes) -> Callable[[bytes], bool]:
    """Return ``predicate(cell_bytes)`` for ``cell_bytes OP comparator``."""
    if op not in _OPS:
        raise _unsupported_filter(f"unknown compare operator {op!r}")
    test = _OPS[op]
    kind, sep, operand = spec.partition(b":")
    if not sep:
        raise _unsupported_filter(f"comparator {_text(spec)!r} needs a 'type:value' form")
    kind = kind.lower()
    if kind == b"binary":
        return lambda value: test(_cmp(value, operand))
    if kind == b"binaryprefix":
        return lambda value: test(_cmp(value[: len(operand)], operand))
    if kind in (b"substring", b"regexstring"):
        if op not in ("=", "!="):
            raise _unsupported_filter(f"{_text(kind)} comparator only supports = and !=")
        if kind == b"substring":
            needle = operand.lower()

            def matches(value: bytes) -> bool:
                return needle in value.lower()
        else:
            pattern = re.compile(operand)

            def matches(value: bytes) -> bool:
                return pattern.search(value) is not None

        return (lambda value: matches(value)) if op == "=" else (lambda value: not matches(value))
    raise _unsupported_filter(f"unsupported comparator type {_text(kind)!r}")


class _FilterChain:
    """A parsed filter string: row/cell transforms applied in order, plus paging."""

    def __init__(self, filter_string: bytes | str | None) -> None:
        # each step: (row, cells) -> cells, or None to drop the row
        self.steps: list[Callable[[bytes, list[_Cell]], list[_Cell] | None]] = []
        self.page_size: int | None = None
        # rows after which the scan ends (InclusiveStopFilter)
        self.stop_after: bytes | None = None
        if filter_string:
            raw = filter_string.encode("latin-1") if isinstance(filter_string, str) else filter_string
            self._parse(raw.decode("latin-1"))

    # -- parsing
    def _parse(self, text: str) -> None:
        tokens: list[tuple[str, str]] = []
        pos = 0
        stripped_len = len(text.rstrip())
        while pos < stripped_len:
            m = _TOKEN_RE.match(text, pos)
            if m is None or m.end() == pos:
                raise _unsupported_filter(f"cannot parse filter string at {text[pos:]!r}")
            kind = m.lastgroup or ""
            tokens.append((kind, m.group(kind)))
            pos = m.end()
        i = 0
        while True:
            if i >= len(tokens) or tokens[i][0] != "word":
                raise _unsupported_filter(f"expected a filter name in {text!r}")
            name = tokens[i][1]
            if i + 1 >= len(tokens) or tokens[i + 1] != ("punct", "("):
                raise _unsupported_filter(f"expected '(' after {name} in {text!r}")
            i += 2
            args: list[tuple[str, str]] = []
            while i < len(tokens) and tokens[i] != ("punct", ")"):
                if tokens[i] != ("punct", ","):
                    args.append(tokens[i])
                i += 1
            if i >= len(tokens):
                raise _unsupported_filter(f"missing ')' in {text!r}")
            i += 1
            self._add(name, args)
            if i == len(tokens):
                return
            if tokens[i] == ("word", "AND"):
                i += 1
                continue
            raise _unsupported_filter(
                f"only 'AND' combinations are supported by the local server, got {tokens[i][1]!r}"
            )

    @staticmethod
    def _bytes_arg(arg: tuple[str, str], name: str) -> bytes:
        kind, value = arg
        if kind != "str":
            raise _unsupported_filter(f"{name} expects quoted string arguments")
        return value[1:-1].replace("''", "'").encode("latin-1")

    @staticmethod
    def _int_arg(arg: tuple[str, str], name: str) -> int:
        kind, value = arg
        if kind != "word" or not value.lstrip("-").isdigit():
            raise _unsupported_filter(f"{name} expects an integer argument")
        return int(value)

    @staticmethod
    def _bool_arg(arg: tuple[str, str], name: str) -> bool:
        kind, value = arg
        if kind != "word" or value.lower() not in ("true", "false"):
            raise _unsupported_filter(f"{name} expects a boolean argument")
        return value.lower() == "true"

    def _add(self, name: str, args: list[tuple[str, str]]) -> None:
        def arity(*counts: int) -> None:
            if len(args) not in counts:
                raise _unsupported_filter(f"{name} takes {' or '.join(map(str, counts))} arguments")

        def op_arg(arg: tuple[str, str]) -> str:
            if arg[0] != "op":
                raise _unsupported_filter(f"{name} expects a compare operator")
            return arg[1]

        if name == "PrefixFilter":
            arity(1)
            prefix = self._bytes_arg(args[0], name)
            self.steps.append(lambda row, cells: cells if row.startswith(prefix) else None)
        elif name == "InclusiveStopFilter":
            arity(1)
            stop = self._bytes_arg(args[0], name)
            self.stop_after = stop
            self.steps.append(lambda row, cells: cells if row <= stop else None)
        elif name in ("RowFilter", "FamilyFilter", "QualifierFilter", "ValueFilter"):
            arity(2)
            pred = _make_comparator(op_arg(args[0]), self._bytes_arg(args[1], name))
            if name == "RowFilter":
                self.steps.append(lambda row, cells: cells if pred(row) else None)
            else:
                part: Callable[[_Cell], bytes] = {
                    "FamilyFilter": lambda c: c[0],
                    "QualifierFilter": lambda c: c[1],
                    "ValueFilter": lambda c: c[3],
                }[name]
                self.steps.append(lambda row, cells: [c for c in cells if pred(part(c))])
        elif name == "ColumnPrefixFilter":
            arity(1)
            prefix = self._bytes_arg(args[0], name)
            self.steps.append(lambda row, cells: [c for c in cells if c[1].startswith(prefix)])
        elif name == "MultipleColumnPrefixFilter":
            if not args:
                raise _unsupported_filter(f"{name} needs at least one prefix")
            prefixes = tuple(self._bytes_arg(a, name) for a in args)
            self.steps.append(lambda row, cells: [c for c in cells if c[1].startswith(prefixes)])
        elif name == "KeyOnlyFilter":
            arity(0, 1)
            len_as_value = self._bool_arg(args[0], name) if args else False

            def key_only(row: bytes, cells: list[_Cell]) -> list[_Cell]:
                return [
                    (f, q, ts, struct.pack(">i", len(v)) if len_as_value else b"") for f, q, ts, v in cells
                ]

            self.steps.append(key_only)
        elif name == "FirstKeyOnlyFilter":
            arity(0)
            self.steps.append(lambda row, cells: cells[:1])
        elif name == "ColumnCountGetFilter":
            arity(1)
            limit = self._int_arg(args[0], name)
            self.steps.append(lambda row, cells: cells[:limit])
        elif name == "PageFilter":
            arity(1)
            size = self._int_arg(args[0], name)
            self.page_size = size if self.page_size is None else min(size, self.page_size)
        elif name == "SingleColumnValueFilter":
            arity(4, 6)
            family = self._bytes_arg(args[0], name)
            qualifier = self._bytes_arg(args[1], name)
            pred = _make_comparator(op_arg(args[2]), self._bytes_arg(args[3], name))
            filter_if_missing = self._bool_arg(args[4], name) if len(args) == 6 else False

            def single_column_value(row: bytes, cells: list[_Cell]) -> list[_Cell] | None:
                for f, q, _ts, v in cells:
                    if f == family and q == qualifier:
                        return cells if pred(v) else None
                return None if filter_if_missing else cells

            self.steps.append(single_column_value)
        else:
            raise _unsupported_filter(f"filter {name!r} is not supported by the local HBase server")

    def apply(self, row: bytes, cells: list[_Cell]) -> list[_Cell] | None:
        current: list[_Cell] | None = cells
        for step in self.steps:
            if not current:
                return None
            current = step(row, current)
        return current or None


@dataclass
class _Scanner:
    table: _Table
    keys: list[bytes]
    selection: _Selection
    max_ts: int
    filters: _FilterChain
    batch: int | None
    sort_columns: bool
    pos: int = 0
    rows_emitted: int = 0
    pending: list[Any] = field(default_factory=list)
    done: bool = False


# --------------------------------------------------------------------------
# the Hbase service handler
# --------------------------------------------------------------------------


class _HBaseHandler:
    """Implements the ``Hbase`` service of happybase's IDL over in-memory tables.

    thriftpy2 calls the methods with positional arguments in IDL order; ``Text``
    and ``Bytes`` values (``binary`` in the IDL) arrive as ``bytes``.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._tables: dict[bytes, _Table] = {}
        self._scanners: dict[int, _Scanner] = {}
        self._next_scanner_id = 1
        self.server_host = "127.0.0.1"
        self.server_port = 0

    # ---------------------------------------------------------------- helpers
    def _table(self, name: bytes, *, require_enabled: bool = False) -> _Table:
        table = self._tables.get(name)
        if table is None:
            raise _io_error(f"TableNotFoundException: {_text(name)}")
        if require_enabled and not table.enabled:
            raise _io_error(f"TableNotEnabledException: {_text(name)} is disabled.")
        return table

    def _family(self, table: _Table, family: bytes) -> _Family:
        fam = table.families.get(family)
        if fam is None:
            raise _io_error(
                f"NoSuchColumnFamilyException: Column family {_text(family)} does not exist in "
                f"table {_text(table.name)}"
            )
        return fam

    def _selection(self, table: _Table, columns: Iterable[bytes] | None) -> _Selection:
        if not columns:
            return None
        selection: dict[bytes, set[bytes] | None] = {}
        for column in columns:
            family, qualifier = _parse_column(column)
            self._family(table, family)
            if qualifier is None:
                selection[family] = None
            elif family not in selection:
                selection[family] = {qualifier}
            else:
                qualifiers = selection[family]
                if qualifiers is not None:
                    qualifiers.add(qualifier)
        return selection

    @staticmethod
    def _check_row(row: bytes | None) -> bytes:
        if not row:
            raise _io_error("IllegalArgumentException: Row length is 0")
        return row

    def _read(
        self,
        table: _Table,
        row: bytes,
        selection: _Selection,
        max_ts: int = LATEST_TIMESTAMP,
        versions: int = 1,
    ) -> list[_Cell]:
        """Visible cells of ``row``: sorted by family/qualifier, newest first.

        ``max_ts`` is exclusive (HBase ``setTimeRange(0, max_ts)``), except that
        ``LATEST_TIMESTAMP`` means "no upper bound".
        """
        data = table.rows.get(row)
        if not data:
            return []
        now = _now_ms()
        out: list[_Cell] = []
        for family in sorted(data):
            if selection is not None and family not in selection:
                continue
            wanted = selection.get(family) if selection is not None else None
            fam = table.families.get(family)
            min_ts = now - fam.ttl_ms if fam is not None and fam.ttl_ms is not None else None
            qualifiers = data[family]
            for qualifier in sorted(qualifiers):
                if wanted is not None and qualifier not in wanted:
                    continue
                taken = 0
                for ts, value in qualifiers[qualifier]:
                    if max_ts != LATEST_TIMESTAMP and ts >= max_ts:
                        continue
                    if min_ts is not None and ts < min_ts:
                        break
                    out.append((family, qualifier, ts, value))
                    taken += 1
                    if taken >= versions:
                        break
        return out

    @staticmethod
    def _put(table: _Table, row: bytes, family: _Family, qualifier: bytes, ts: int, value: bytes) -> None:
        versions = table.rows.setdefault(row, {}).setdefault(family.name, {}).setdefault(qualifier, [])
        # versions are newest first; find the insertion point by negated ts
        keys = [-t for t, _ in versions]
        index = bisect.bisect_left(keys, -ts)
        if index < len(versions) and versions[index][0] == ts:
            versions[index] = (ts, value)
        else:
            versions.insert(index, (ts, value))
        del versions[family.max_versions :]

    @staticmethod
    def _delete(
        table: _Table, row: bytes, family: bytes | None, qualifier: bytes | None, max_ts: int
    ) -> None:
        """Remove versions with ``ts <= max_ts`` of a column, a family or (family None) the row."""
        data = table.rows.get(row)
        if not data:
            return
        families = list(data) if family is None else [family]
        for fam in families:
            qualifiers = data.get(fam)
            if not qualifiers:
                continue
            for qual in list(qualifiers) if qualifier is None else [qualifier]:
                versions = qualifiers.get(qual)
                if versions is None:
                    continue
                kept = [(ts, v) for ts, v in versions if ts > max_ts]
                if kept:
                    qualifiers[qual] = kept
                else:
                    del qualifiers[qual]
            if not qualifiers:
                del data[fam]
        if not data:
            del table.rows[row]

    def _apply_mutations(
        self, table: _Table, batches: Sequence[tuple[bytes, Sequence[Any]]], ts: int | None, puts_first: bool
    ) -> None:
        now = _now_ms()
        put_ts = now if ts is None else ts
        delete_ts = now if ts is None else ts
        puts: list[tuple[bytes, _Family, bytes, bytes]] = []
        deletes: list[tuple[bytes, bytes, bytes | None]] = []
        for row, mutations in batches:
            if not row:
                raise _illegal_argument("IllegalArgumentException: Row length is 0")
            for mutation in mutations or []:
                if mutation.column is None:
                    raise _illegal_argument("IllegalArgumentException: mutation without a column")
                family_name, qualifier = _parse_column(mutation.column)
                family = self._family(table, family_name)
                if mutation.isDelete:
                    deletes.append((row, family_name, qualifier))
                else:
                    value = mutation.value if mutation.value is not None else b""
                    puts.append((row, family, qualifier or b"", value))

        def do_puts() -> None:
            for row, family, qualifier, value in puts:
                self._put(table, row, family, qualifier, put_ts, value)

        def do_deletes() -> None:
            for row, family_name, qualifier in deletes:
                self._delete(table, row, family_name, qualifier, delete_ts)

        if puts_first:
            do_puts()
            do_deletes()
        else:
            do_deletes()
            do_puts()

    def _region(self, table: _Table) -> Any:
        digest = hashlib.md5(table.name + str(table.region_id).encode(), usedforsecurity=False).hexdigest()
        return hbase_thrift.TRegionInfo(
            startKey=b"",
            endKey=b"",
            id=table.region_id,
            name=table.name + b",," + str(table.region_id).encode() + b"." + digest.encode() + b".",
            version=1,
            serverName=self.server_host.encode(),
            port=self.server_port,
        )

    def _increment(self, table_name: bytes, row: bytes, column: bytes, amount: int) -> int:
        table = self._table(table_name, require_enabled=True)
        row = self._check_row(row)
        family_name, qualifier = _parse_column(column)
        family = self._family(table, family_name)
        qualifier = qualifier or b""
        current = self._read(table, row, {family_name: {qualifier}})
        now = _now_ms()
        if current:
            _f, _q, old_ts, old_value = current[0]
            if len(old_value) != 8:
                raise _io_error(
                    f"DoNotRetryIOException: Field is not a long, it's {len(old_value)} bytes wide"
                )
            value = _wrap_i64(_I64.unpack(old_value)[0] + amount)
            # same millisecond (or a future-dated cell): replace that version
            ts = max(now, old_ts)
        else:
            value = _wrap_i64(amount)
            ts = now
        self._put(table, row, family, qualifier, ts, _I64.pack(value))
        return value

    def _open_scanner(
        self,
        table_name: bytes,
        start: bytes | None,
        stop: bytes | None,
        columns: Sequence[bytes] | None,
        timestamp: int | None = None,
        filter_string: bytes | None = None,
        batch: int | None = None,
        sort_columns: bool = False,
        reverse: bool = False,
        prefix: bytes | None = None,
    ) -> int:
        with self._lock:
            table = self._table(table_name, require_enabled=True)
            selection = self._selection(table, columns)
            filters = _FilterChain(filter_string)
            if batch is not None and batch < 1:
                batch = None
            if reverse:
                keys = sorted(
                    (k for k in table.rows if (not start or k <= start) and (not stop or k > stop)),
                    reverse=True,
                )
            else:
                keys = sorted(k for k in table.rows if (not start or k >= start) and (not stop or k < stop))
            if prefix:
                keys = [k for k in keys if k.startswith(prefix)]
            scanner_id = self._next_scanner_id
            self._next_scanner_id = self._next_scanner_id + 1 if self._next_scanner_id < _INT32_MAX else 1
            self._scanners[scanner_id] = _Scanner(
                table=table,
                keys=keys,
                selection=selection,
                max_ts=LATEST_TIMESTAMP if timestamp is None else timestamp,
                filters=filters,
                batch=batch,
                sort_columns=bool(sort_columns),
            )
            return scanner_id

    def _scanner(self, scanner_id: int) -> _Scanner:
        scanner = self._scanners.get(scanner_id)
        if scanner is None:
            raise _illegal_argument("scanner ID is invalid")
        return scanner

    def _scan_next(self, scanner: _Scanner, count: int) -> list[Any]:
        out: list[Any] = []
        while len(out) < count:
            if scanner.pending:
                out.append(scanner.pending.pop(0))
                continue
            if scanner.done or scanner.pos >= len(scanner.keys):
                break
            page = scanner.filters.page_size
            if page is not None and scanner.rows_emitted >= page:
                scanner.done = True
                break
            row = scanner.keys[scanner.pos]
            scanner.pos += 1
            stop_after = scanner.filters.stop_after
            if stop_after is not None and row > stop_after:
                scanner.done = True
                break
            found = self._read(scanner.table, row, scanner.selection, scanner.max_ts)
            cells = scanner.filters.apply(row, found) if found else None
            if not cells:
                continue
            scanner.rows_emitted += 1
            size = scanner.batch or len(cells)
            for i in range(0, len(cells), size):
                scanner.pending.append(_make_row_result(row, cells[i : i + size], scanner.sort_columns))
        return out

    # ----------------------------------------------------------------- admin
    def enableTable(self, tableName: bytes) -> None:
        with self._lock:
            table = self._table(tableName)
            if table.enabled:
                raise _io_error(f"TableNotDisabledException: {_text(tableName)}")
            table.enabled = True

    def disableTable(self, tableName: bytes) -> None:
        with self._lock:
            table = self._table(tableName)
            if not table.enabled:
                raise _io_error(f"TableNotEnabledException: {_text(tableName)}")
            table.enabled = False

    def isTableEnabled(self, tableName: bytes) -> bool:
        with self._lock:
            return self._table(tableName).enabled

    def _compact(self, name: bytes) -> None:
        with self._lock:
            if name in self._tables:
                return
            for table in self._tables.values():
                if self._region(table).name == name:
                    return
            raise _io_error(f"TableNotFoundException: {_text(name)}")

    def compact(self, tableNameOrRegionName: bytes) -> None:
        self._compact(tableNameOrRegionName)

    def majorCompact(self, tableNameOrRegionName: bytes) -> None:
        self._compact(tableNameOrRegionName)

    def getTableNames(self) -> list[bytes]:
        with self._lock:
            return sorted(self._tables)

    def getColumnDescriptors(self, tableName: bytes) -> dict[bytes, Any]:
        with self._lock:
            table = self._table(tableName)
            return {name + b":": fam.descriptor for name, fam in sorted(table.families.items())}

    def getTableRegions(self, tableName: bytes) -> list[Any]:
        with self._lock:
            table = self._tables.get(tableName)
            # HBase's Thrift1 handler returns an empty list for unknown tables
            return [self._region(table)] if table is not None else []

    def getRegionInfo(self, row: bytes) -> Any:
        with self._lock:
            table_name = (row or b"").split(b",", 1)[0]
            return self._region(self._table(table_name))

    def createTable(self, tableName: bytes, columnFamilies: Sequence[Any]) -> None:
        if not tableName:
            raise _illegal_argument("IllegalArgumentException: Table name must not be empty")
        if not columnFamilies:
            raise _illegal_argument("IllegalArgumentException: Table should have at least one column family")
        families: dict[bytes, _Family] = {}
        for descriptor in columnFamilies:
            name = _parse_column(descriptor.name or b"")[0]
            if not name:
                raise _illegal_argument("IllegalArgumentException: Column family name must not be empty")
            if name in families:
                raise _illegal_argument(f"IllegalArgumentException: duplicate column family {_text(name)}")
            max_versions = 3 if descriptor.maxVersions is None else int(descriptor.maxVersions)
            if max_versions < 1:
                raise _illegal_argument(
                    f"IllegalArgumentException: Maximum versions must be positive, got {max_versions}"
                )
            ttl = descriptor.timeToLive
            ttl_ms = ttl * 1000 if ttl is not None and 0 < ttl < _INT32_MAX else None
            stored = hbase_thrift.ColumnDescriptor(
                name=name + b":",
                maxVersions=max_versions,
                compression=descriptor.compression,
                inMemory=descriptor.inMemory,
                bloomFilterType=descriptor.bloomFilterType,
                bloomFilterVectorSize=descriptor.bloomFilterVectorSize,
                bloomFilterNbHashes=descriptor.bloomFilterNbHashes,
                blockCacheEnabled=descriptor.blockCacheEnabled,
                timeToLive=ttl,
            )
            families[name] = _Family(name=name, descriptor=stored, max_versions=max_versions, ttl_ms=ttl_ms)
        with self._lock:
            if tableName in self._tables:
                raise _already_exists(f"TableExistsException: {_text(tableName)}")
            self._tables[tableName] = _Table(name=tableName, families=families, region_id=_now_ms())

    def deleteTable(self, tableName: bytes) -> None:
        with self._lock:
            table = self._table(tableName)
            if table.enabled:
                raise _io_error(f"TableNotDisabledException: {_text(tableName)}")
            del self._tables[tableName]
            for scanner_id in [i for i, s in self._scanners.items() if s.table is table]:
                del self._scanners[scanner_id]

    # ----------------------------------------------------------------- reads
    def _cells(self, tableName: bytes, row: bytes, column: bytes, max_ts: int, versions: int) -> list[Any]:
        if versions < 1:
            raise _io_error(f"IllegalArgumentException: Maximum versions must be positive, got {versions}")
        with self._lock:
            table = self._table(tableName, require_enabled=True)
            cells = self._read(
                table, self._check_row(row), self._selection(table, [column]), max_ts, versions
            )
            return [hbase_thrift.TCell(value=v, timestamp=ts) for _f, _q, ts, v in cells]

    def get(self, tableName: bytes, row: bytes, column: bytes, attributes: Any) -> list[Any]:
        return self._cells(tableName, row, column, LATEST_TIMESTAMP, 1)

    def getVer(
        self, tableName: bytes, row: bytes, column: bytes, numVersions: int, attributes: Any
    ) -> list[Any]:
        return self._cells(tableName, row, column, LATEST_TIMESTAMP, numVersions)

    def getVerTs(
        self, tableName: bytes, row: bytes, column: bytes, timestamp: int, numVersions: int, attributes: Any
    ) -> list[Any]:
        return self._cells(tableName, row, column, timestamp, numVersions)

    def _rows(
        self, tableName: bytes, rows: Sequence[bytes] | None, columns: Sequence[bytes] | None, max_ts: int
    ) -> list[Any]:
        with self._lock:
            table = self._table(tableName, require_enabled=True)
            selection = self._selection(table, columns)
            results = []
            for row in rows or []:
                cells = self._read(table, self._check_row(row), selection, max_ts)
                if cells:  # missing rows are omitted, as HBase does
                    results.append(_make_row_result(row, cells))
            return results

    def getRow(self, tableName: bytes, row: bytes, attributes: Any) -> list[Any]:
        return self._rows(tableName, [row], None, LATEST_TIMESTAMP)

    def getRowWithColumns(
        self, tableName: bytes, row: bytes, columns: Sequence[bytes] | None, attributes: Any
    ) -> list[Any]:
        return self._rows(tableName, [row], columns, LATEST_TIMESTAMP)

    def getRowTs(self, tableName: bytes, row: bytes, timestamp: int, attributes: Any) -> list[Any]:
        return self._rows(tableName, [row], None, timestamp)

    def getRowWithColumnsTs(
        self, tableName: bytes, row: bytes, columns: Sequence[bytes] | None, timestamp: int, attributes: Any
    ) -> list[Any]:
        return self._rows(tableName, [row], columns, timestamp)

    def getRows(self, tableName: bytes, rows: Sequence[bytes], attributes: Any) -> list[Any]:
        return self._rows(tableName, rows, None, LATEST_TIMESTAMP)

    def getRowsWithColumns(
        self, tableName: bytes, rows: Sequence[bytes], columns: Sequence[bytes] | None, attributes: Any
    ) -> list[Any]:
        return self._rows(tableName, rows, columns, LATEST_TIMESTAMP)

    def getRowsTs(
        self, tableName: bytes, rows: Sequence[bytes], timestamp: int, attributes: Any
    ) -> list[Any]:
        return self._rows(tableName, rows, None, timestamp)

    def getRowsWithColumnsTs(
        self,
        tableName: bytes,
        rows: Sequence[bytes],
        columns: Sequence[bytes] | None,
        timestamp: int,
        attributes: Any,
    ) -> list[Any]:
        return self._rows(tableName, rows, columns, timestamp)

    def getRowOrBefore(self, tableName: bytes, row: bytes, family: bytes) -> list[Any]:
        with self._lock:
            table = self._table(tableName, require_enabled=True)
            family_name = _parse_column(family)[0]
            selection = self._selection(table, [family_name])
            for key in sorted((k for k in table.rows if k <= row), reverse=True):
                cells = self._read(table, key, selection)
                if cells:
                    return [hbase_thrift.TCell(value=v, timestamp=ts) for _f, _q, ts, v in cells]
            return []

    # ---------------------------------------------------------------- writes
    def mutateRow(self, tableName: bytes, row: bytes, mutations: Sequence[Any], attributes: Any) -> None:
        with self._lock:
            table = self._table(tableName, require_enabled=True)
            self._apply_mutations(table, [(row, mutations)], None, puts_first=False)

    def mutateRowTs(
        self, tableName: bytes, row: bytes, mutations: Sequence[Any], timestamp: int, attributes: Any
    ) -> None:
        with self._lock:
            table = self._table(tableName, require_enabled=True)
            self._apply_mutations(table, [(row, mutations)], timestamp, puts_first=False)

    def mutateRows(self, tableName: bytes, rowBatches: Sequence[Any], attributes: Any) -> None:
        with self._lock:
            table = self._table(tableName, require_enabled=True)
            batches = [(b.row, b.mutations) for b in rowBatches or []]
            self._apply_mutations(table, batches, None, puts_first=True)

    def mutateRowsTs(
        self, tableName: bytes, rowBatches: Sequence[Any], timestamp: int, attributes: Any
    ) -> None:
        with self._lock:
            table = self._table(tableName, require_enabled=True)
            batches = [(b.row, b.mutations) for b in rowBatches or []]
            self._apply_mutations(table, batches, timestamp, puts_first=True)

    def atomicIncrement(self, tableName: bytes, row: bytes, column: bytes, value: int) -> int:
        with self._lock:
            return self._increment(tableName, row, column, value)

    def increment(self, increment: Any) -> None:
        with self._lock:
            self._increment(increment.table, increment.row, increment.column, increment.ammount or 0)

    def incrementRows(self, increments: Sequence[Any]) -> None:
        with self._lock:
            for inc in increments or []:
                self._increment(inc.table, inc.row, inc.column, inc.ammount or 0)

    def _delete_all(self, tableName: bytes, row: bytes, column: bytes | None, timestamp: int | None) -> None:
        with self._lock:
            table = self._table(tableName, require_enabled=True)
            row = self._check_row(row)
            max_ts = _now_ms() if timestamp is None else timestamp
            if column is None:
                self._delete(table, row, None, None, max_ts)
                return
            family, qualifier = _parse_column(column)
            self._family(table, family)
            self._delete(table, row, family, qualifier, max_ts)

    def deleteAll(self, tableName: bytes, row: bytes, column: bytes, attributes: Any) -> None:
        self._delete_all(tableName, row, column, None)

    def deleteAllTs(
        self, tableName: bytes, row: bytes, column: bytes, timestamp: int, attributes: Any
    ) -> None:
        self._delete_all(tableName, row, column, timestamp)

    def deleteAllRow(self, tableName: bytes, row: bytes, attributes: Any) -> None:
        self._delete_all(tableName, row, None, None)

    def deleteAllRowTs(self, tableName: bytes, row: bytes, timestamp: int, attributes: Any) -> None:
        self._delete_all(tableName, row, None, timestamp)

    def append(self, append: Any) -> list[Any]:
        with self._lock:
            table = self._table(append.table, require_enabled=True)
            row = self._check_row(append.row)
            columns = list(append.columns or [])
            values = list(append.values or [])
            if len(columns) != len(values):
                raise _io_error("IllegalArgumentException: columns and values differ in length")
            now = _now_ms()
            out = []
            for column, suffix in zip(columns, values, strict=True):
                family_name, qualifier = _parse_column(column)
                family = self._family(table, family_name)
                qualifier = qualifier or b""
                current = self._read(table, row, {family_name: {qualifier}})
                old_value = current[0][3] if current else b""
                ts = max(now, current[0][2]) if current else now
                new_value = old_value + (suffix or b"")
                self._put(table, row, family, qualifier, ts, new_value)
                out.append(hbase_thrift.TCell(value=new_value, timestamp=ts))
            return out

    def checkAndPut(
        self,
        tableName: bytes,
        row: bytes,
        column: bytes,
        value: bytes | None,
        mput: Any,
        attributes: Any,
    ) -> bool:
        with self._lock:
            table = self._table(tableName, require_enabled=True)
            row = self._check_row(row)
            family_name, qualifier = _parse_column(column)
            self._family(table, family_name)
            current = self._read(table, row, {family_name: {qualifier or b""}})
            matches = not current if value is None else bool(current) and current[0][3] == value
            if not matches:
                return False
            if mput is None or mput.column is None:
                raise _illegal_argument("IllegalArgumentException: checkAndPut needs a put mutation")
            self._apply_mutations(table, [(row, [mput])], None, puts_first=False)
            return True

    # -------------------------------------------------------------- scanners
    def scannerOpenWithScan(self, tableName: bytes, scan: Any, attributes: Any) -> int:
        return self._open_scanner(
            tableName,
            scan.startRow,
            scan.stopRow,
            scan.columns,
            timestamp=scan.timestamp,
            filter_string=scan.filterString,
            batch=scan.batchSize,
            sort_columns=bool(scan.sortColumns),
            reverse=bool(scan.reversed),
        )

    def scannerOpen(
        self, tableName: bytes, startRow: bytes, columns: Sequence[bytes] | None, attributes: Any
    ) -> int:
        return self._open_scanner(tableName, startRow, None, columns)

    def scannerOpenWithStop(
        self,
        tableName: bytes,
        startRow: bytes,
        stopRow: bytes,
        columns: Sequence[bytes] | None,
        attributes: Any,
    ) -> int:
        return self._open_scanner(tableName, startRow, stopRow, columns)

    def scannerOpenWithPrefix(
        self, tableName: bytes, startAndPrefix: bytes, columns: Sequence[bytes] | None, attributes: Any
    ) -> int:
        return self._open_scanner(tableName, startAndPrefix, None, columns, prefix=startAndPrefix)

    def scannerOpenTs(
        self,
        tableName: bytes,
        startRow: bytes,
        columns: Sequence[bytes] | None,
        timestamp: int,
        attributes: Any,
    ) -> int:
        return self._open_scanner(tableName, startRow, None, columns, timestamp=timestamp)

    def scannerOpenWithStopTs(
        self,
        tableName: bytes,
        startRow: bytes,
        stopRow: bytes,
        columns: Sequence[bytes] | None,
        timestamp: int,
        attributes: Any,
    ) -> int:
        return self._open_scanner(tableName, startRow, stopRow, columns, timestamp=timestamp)

    def scannerGet(self, id: int) -> list[Any]:
        with self._lock:
            return self._scan_next(self._scanner(id), 1)

    def scannerGetList(self, id: int, nbRows: int) -> list[Any]:
        with self._lock:
            return self._scan_next(self._scanner(id), max(nbRows, 0))

    def scannerClose(self, id: int) -> None:
        with self._lock:
            self._scanner(id)
            del self._scanners[id]


# --------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------


class HBaseThriftServer(StartStop):
    """A local HBase Thrift1 server for happybase (see the module docstring).

    ``port=0`` picks a free port when :meth:`start` binds; the bound port is
    then available as :attr:`port` and is reused by a later ``start()``, so
    ``stop()`` + ``start()`` simulates a server restart on the same address.
    Data lives in this object and survives such a restart.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        transport: str = "buffered",
        protocol: str = "binary",
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        if not 0 <= port <= 65535:
            raise ValueError(f"invalid port {port}")
        self.host = host
        self.port = port
        self.transport = transport
        self.protocol = protocol
        self._handler = _HBaseHandler()
        self._processor = _GuardedProcessor(hbase_thrift.Hbase, self._handler)
        self._trans_factory: Any = (
            TFramedTransportFactory() if transport == "framed" else TBufferedTransportFactory()
        )
        # decode_response=True (the default) only decodes IDL ``string`` fields; ``Text``/``Bytes``
        # are ``binary`` in the IDL and always arrive as bytes.  (The compact protocol also needs
        # it to decode method names.)
        self._proto_factory: Any = (
            cast(Any, TCompactProtocolFactory)()
            if protocol == "compact"
            else cast(Any, TBinaryProtocolFactory)()
        )
        self._state_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._clients: dict[socket.socket, threading.Thread] = {}
        self._clients_lock = threading.Lock()

    # ------------------------------------------------------------- lifecycle
    @property
    def running(self) -> bool:
        return self._listener is not None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def connection_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``happybase.Connection``/``ConnectionPool``."""
        return {"host": self.host, "port": self.port, "transport": self.transport, "protocol": self.protocol}

    def start(self) -> HBaseThriftServer:
        """Bind and serve in a background daemon thread; return once accepting."""
        with self._state_lock:
            if self._listener is not None:
                return self
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((self.host, self.port))
                listener.listen(128)
                listener.settimeout(0.2)
            except OSError:
                listener.close()
                raise
            self.port = listener.getsockname()[1]
            self._handler.server_host = self.host
            self._handler.server_port = self.port
            self._listener = listener
            self._stopping = threading.Event()
            ready = threading.Event()
            self._accept_thread = threading.Thread(
                target=self._accept_loop,
                args=(listener, self._stopping, ready),
                name=f"hbase-thrift-accept-{self.port}",
                daemon=True,
            )
            self._accept_thread.start()
            ready.wait()
            logger.info(
                "local HBase Thrift server listening on %s:%d (%s/%s)",
                self.host,
                self.port,
                self.transport,
                self.protocol,
            )
            return self

    def stop(self) -> None:
        """Stop accepting, drop all client connections and join the threads."""
        with self._state_lock:
            listener, self._listener = self._listener, None
            if listener is None:
                return
            self._stopping.set()
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
            if self._accept_thread is not None:
                self._accept_thread.join(timeout=5)
                self._accept_thread = None
            with self._clients_lock:
                clients = list(self._clients.items())
            for sock, _thread in clients:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            for _sock, thread in clients:
                thread.join(timeout=5)
            logger.info("local HBase Thrift server on %s:%d stopped", self.host, self.port)


    def serve_forever(self) -> None:
        """Start (if needed) and block until Ctrl-C / SIGTERM, then stop."""
        self.start()
        done = threading.Event()
        previous: Any = None
        if threading.current_thread() is threading.main_thread():

            def on_sigterm(signum: int, frame: FrameType | None) -> None:
                done.set()

            previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            while not done.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self.stop()

    # ------------------------------------------------------------ internals
    def _accept_loop(
        self, listener: socket.socket, stopping: threading.Event, ready: threading.Event
    ) -> None:
        ready.set()
        while not stopping.is_set():
            try:
                sock, _addr = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if stopping.is_set():
                    return
                logger.exception("accept failed")
                time.sleep(0.05)
                continue
            sock.settimeout(None)  # no idle timeout: pooled connections stay open
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(
                target=self._serve_client,
                args=(sock, stopping),
                name=f"hbase-thrift-conn-{self.port}",
                daemon=True,
            )
            with self._clients_lock:
                self._clients[sock] = thread
            thread.start()

    def _serve_client(self, sock: socket.socket, stopping: threading.Event) -> None:
        trans = self._trans_factory.get_transport(cast(Any, TSocket)(sock=sock))
        prot = self._proto_factory.get_protocol(trans)
        try:
            while not stopping.is_set():
                self._processor.process(prot, prot)
        except (TTransportException, OSError, EOFError):
            pass  # client went away (or the server is stopping)
        except Exception:
            if not stopping.is_set():
                logger.warning("closing HBase Thrift connection after a protocol error", exc_info=True)
        finally:
            with contextlib.suppress(Exception):
                trans.close()
            with self._clients_lock:
                self._clients.pop(sock, None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m featuredao.testing.hbase",
        description="Local in-memory HBase Thrift1 server for development and tests (not a real HBase).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=9090, help="port to bind, 0 = any free port (default: 9090)"
    )
    parser.add_argument("--transport", choices=TRANSPORTS, default="buffered")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="binary")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    server = HBaseThriftServer(args.host, args.port, transport=args.transport, protocol=args.protocol)
    server.start()
    print(
        f"local HBase Thrift server on {server.host}:{server.port} "
        f"(transport={server.transport}, protocol={server.protocol}); Ctrl-C to stop",
        flush=True,
    )
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
