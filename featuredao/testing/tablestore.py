"""Local TableStore-compatible server for development and tests.

Alibaba Cloud TableStore (OTS) is a managed service with no installable server.  This module
provides an in-memory stand-in that the *unmodified* ``tablestore`` SDK (``tablestore.OTSClient``)
talks to over a real HTTP/1.1 socket, so adapters can be exercised end to end: request signing,
protobuf bodies, PlainBuffer rows, error codes and retry behaviour all go through the SDK's own
code paths.

What it implements
------------------
* Wire protocol: ``POST /<ApiName>`` with the SDK's ``table_store_pb2`` (proto2) bodies; rows in
  PlainBuffer with per-cell and per-row CRC-8 (own codec in :mod:`featuredao.testing._plainbuffer`).
* Request authentication: ``x-ots-contentmd5``, ``x-ots-date`` skew (15 minutes), access key id,
  instance name, and both signature schemes (v2 HMAC-SHA1 ``x-ots-signature`` and v4
  HMAC-SHA256 ``x-ots-signaturev4`` with the derived key).  Failures are 403 ``OTSAuthFailed``.
* Response signing: ``x-ots-contentmd5``/``x-ots-requestid``/``x-ots-date``/``x-ots-contenttype``
  and ``Authorization: OTS <ak>:<sig>`` exactly as the SDK verifies them.
* APIs: CreateTable, DeleteTable, ListTable, DescribeTable, UpdateTable, PutRow, UpdateRow (put,
  delete one version, delete all versions, increment), DeleteRow, GetRow (columns_to_get,
  max_versions, time_range, column filter), BatchGetRow, BatchWriteRow (per-row results),
  GetRange (FORWARD/BACKWARD, INF_MIN/INF_MAX, limit, next_start_primary_key).
* Row existence conditions (IGNORE/EXPECT_EXIST/EXPECT_NOT_EXIST) and column conditions
  (single/composite, EXIST/NOT_EXIST, regex value transfer rules) for writes and read filters.
* Multi-version cells with millisecond timestamps, per-table ``max_versions``, TTL (read side),
  ``max_time_deviation`` for explicit timestamps, multi-column primary keys of INTEGER, STRING,
  BINARY (and BOOLEAN) kept in primary-key order, AUTO_INCREMENT primary-key columns.
* Service-shaped errors: an ``Error`` protobuf with code/message and the matching HTTP status
  (``OTSObjectNotExist`` 404, ``OTSObjectAlreadyExist`` 409, ``OTSConditionCheckFail`` 403,
  ``OTSAuthFailed`` 403, ``OTSParameterInvalid`` 400, ...).  As documented for the service, a
  missing table or an invalid/duplicated primary key fails a whole BatchGetRow/BatchWriteRow
  request; ``missing_table_in_batch="row"`` reports missing tables per row instead.
* Fault injection for tests: :meth:`TableStoreServer.inject_failure` (request-level errors such
  as 5xx) and :meth:`TableStoreServer.inject_row_error` (per-row errors inside batch responses).

What it is not
--------------
It is **not a replacement for TableStore** and must not be used to store real data: everything
lives in process memory and is lost on stop; there are no partitions, capacity-unit accounting
or throttling, no search/secondary indexes, streams, transactions, SQL or timeseries APIs, no
TLS, no STS token validation, and size/count limits are only partly enforced.  Behaviour was
modelled on the public documentation and the SDK's expectations, not on the service's code.

Run standalone::

    python -m featuredao.testing.tablestore --port 8080 --instance featuredao \\
        --access-key-id my-ak   # secret from --access-key-secret or $FEATUREDAO_TABLESTORE_ACCESS_KEY_SECRET
"""

from __future__ import annotations

import argparse
import base64
import bisect
import contextlib
import datetime as _dt
import hashlib
import hmac
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

import tablestore.protobuf.table_store_filter_pb2 as filter_pb
import tablestore.protobuf.table_store_pb2 as pb

from featuredao.testing import _plainbuffer as pbuf
from featuredao.testing._lifecycle import StartStop
from featuredao.testing._plainbuffer import AUTO_INCREMENT, INF_MAX, INF_MIN, ColumnValue, PKValue, Sentinel

__all__ = ["DEFAULT_ACCESS_KEY_ID", "DEFAULT_ACCESS_KEY_SECRET", "OTSError", "TableStoreServer", "main"]

DEFAULT_ACCESS_KEY_ID = "featuredao-local-ak"
DEFAULT_ACCESS_KEY_SECRET = "featuredao-local-secret"
SECRET_ENV_VAR = "FEATUREDAO_TABLESTORE_ACCESS_KEY_SECRET"
ACCESS_KEY_ENV_VAR = "FEATUREDAO_TABLESTORE_ACCESS_KEY_ID"

API_VERSION = "2015-12-31"
MAX_DATE_SKEW_SECONDS = 15 * 60
MAX_BODY_BYTES = 64 * 1024 * 1024
BATCH_GET_MAX_ROWS = 100
BATCH_WRITE_MAX_ROWS = 200
GET_RANGE_MAX_ROWS = 5000
_TABLE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
_PK_TYPES = {pb.INTEGER: "INTEGER", pb.STRING: "STRING", pb.BINARY: "BINARY", pb.PK_BOOLEAN: "BOOLEAN"}
_PK_TYPE_ENUM = {v: k for k, v in _PK_TYPES.items()}

_STATUS_FOR_CODE = {
    "OTSAuthFailed": 403,
    "OTSConditionCheckFail": 403,
    "OTSNotEnoughCapacityUnit": 403,
    "OTSQuotaExhausted": 403,
    "OTSParameterInvalid": 400,
    "OTSUnsupportOperation": 400,
    "OTSObjectNotExist": 404,
    "OTSObjectAlreadyExist": 409,
    "OTSRowOperationConflict": 409,
    "OTSInternalServerError": 500,
    "OTSServerBusy": 503,
    "OTSServerUnavailable": 503,
    "OTSPartitionUnavailable": 503,
    "OTSTimeout": 503,
}

SUPPORTED_APIS = (
    "CreateTable",
    "DeleteTable",
    "ListTable",
    "DescribeTable",
    "UpdateTable",
    "GetRow",
    "PutRow",
    "UpdateRow",
    "DeleteRow",
    "BatchGetRow",
    "BatchWriteRow",
    "GetRange",
)


class OTSError(Exception):
    """A service-shaped error: HTTP status, OTS error code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def _param_invalid(message: str) -> OTSError:
    return OTSError(400, "OTSParameterInvalid", message)


def _table_not_exist() -> OTSError:
    return OTSError(404, "OTSObjectNotExist", "Requested table does not exist.")


def _condition_failed() -> OTSError:
    return OTSError(403, "OTSConditionCheckFail", "Condition check failed.")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _hmac_b64(key: bytes, message: str, digest: Any) -> str:
    return base64.b64encode(hmac.new(key, message.encode("utf-8"), digest).digest()).decode("ascii")


def _v4_signing_key(secret: str, sign_date: str, region: str) -> bytes:
    key = hmac.new(("aliyun_v4" + secret).encode("utf-8"), sign_date.encode("utf-8"), hashlib.sha256).digest()
    key = hmac.new(key, region.encode("utf-8"), hashlib.sha256).digest()
    key = hmac.new(key, b"ots", hashlib.sha256).digest()
    key = hmac.new(key, b"aliyun_v4_request", hashlib.sha256).digest()
    return base64.b64encode(key)


def _canonical_ots_headers(headers: dict[str, str], exclude: Sequence[str] = ()) -> str:
    items = [f"{k}:{v.strip()}" for k, v in headers.items() if k.startswith("x-ots-") and k not in exclude]
    return "\n".join(sorted(items))


# --------------------------------------------------------------------------- data model

PK = tuple[Any, ...]
Versions = list[tuple[int, ColumnValue]]  # newest first


@dataclass
class _PKColumn:
    name: str
    type: str
    auto_increment: bool = False


@dataclass
class _Table:
    name: str
    primary_key: list[_PKColumn]
    defined_columns: list[tuple[str, int]]
    time_to_live: int
    max_versions: int
    deviation: int
    allow_update: bool | None
    read_cu: int
    write_cu: int
    created: int
    rows: dict[PK, dict[str, Versions]] = field(default_factory=dict)
    keys: list[PK] = field(default_factory=list)
    last_auto_increment: int = 0


@dataclass
class _InjectedFailure:
    api: str
    status: int
    code: str
    message: str
    remaining: int


@dataclass
class _InjectedRowError:
    table: str
    pk: PK
    code: str
    message: str
    remaining: int


def _ext_key(values: Sequence[Any]) -> tuple[tuple[int, Any], ...]:
    """Sort key that orders INF_MIN < any value < INF_MAX column by column."""
    out = []
    for value in values:
        if value is INF_MIN:
            out.append((0, 0))
        elif value is INF_MAX:
            out.append((2, 0))
        else:
            out.append((1, value))
    return tuple(out)


def _pk_values(pk: Any) -> PK:
    """Normalise a user-supplied primary key (pairs, dict or bare values) to a value tuple."""
    if isinstance(pk, dict):
        items: list[Any] = list(pk.values())
    else:
        items = [item[1] if isinstance(item, tuple) and len(item) == 2 else item for item in pk]
    return tuple(bytes(v) if isinstance(v, bytearray) else v for v in items)


# --------------------------------------------------------------------------- filters


def _compare(comparator: int, actual: ColumnValue, expected: ColumnValue) -> bool:
    def kind(v: ColumnValue) -> str:
        if isinstance(v, bool):
            return "bool"
        if isinstance(v, int | float):
            return "num"
        return "str" if isinstance(v, str) else "bytes"

    if kind(actual) != kind(expected):
        return bool(comparator == filter_pb.CT_NOT_EQUAL)
    a: Any = actual
    e: Any = expected
    if comparator == filter_pb.CT_EQUAL:
        return bool(a == e)
    if comparator == filter_pb.CT_NOT_EQUAL:
        return bool(a != e)
    if comparator == filter_pb.CT_GREATER_THAN:
        return bool(a > e)
    if comparator == filter_pb.CT_GREATER_EQUAL:
        return bool(a >= e)
    if comparator == filter_pb.CT_LESS_THAN:
        return bool(a < e)
    if comparator == filter_pb.CT_LESS_EQUAL:
        return bool(a <= e)
    raise _param_invalid(f"Unsupported comparator: {comparator}")


def _transfer(value: ColumnValue, rule: Any) -> ColumnValue | None:
    if not isinstance(value, str):
        return None
    try:
        match = re.search(rule.regex, value)
    except re.error as exc:
        raise _param_invalid(f"Invalid regex in column condition: {exc}") from exc
    if match is None:
        return None
    text = match.group(1) if match.groups() else match.group(0)
    cast = rule.cast_type if rule.HasField("cast_type") else filter_pb.VT_STRING
    try:
        if cast == filter_pb.VT_INTEGER:
            return int(text)
        if cast == filter_pb.VT_DOUBLE:
            return float(text)
    except ValueError:
        return None
    return text


def _eval_filter(raw: bytes, columns: dict[str, Versions]) -> bool:
    flt = filter_pb.Filter()
    try:
        flt.ParseFromString(raw)
    except Exception as exc:
        raise _param_invalid(f"Invalid filter: {exc}") from exc
    if flt.type == filter_pb.FT_SINGLE_COLUMN_VALUE:
        single = filter_pb.SingleColumnValueFilter()
        single.ParseFromString(flt.filter)
        versions = columns.get(single.column_name, [])
        if single.latest_version_only:
            versions = versions[:1]
        if single.comparator == filter_pb.CT_EXIST:
            return bool(versions)
        if single.comparator == filter_pb.CT_NOT_EXIST:
            return not versions
        try:
            expected = pbuf.decode_column_value(single.column_value)
        except pbuf.PlainBufferError as exc:
            raise _param_invalid(f"Invalid column condition value: {exc}") from exc
        values: list[ColumnValue] = []
        for _, value in versions:
            if single.HasField("value_trans_rule"):
                transferred = _transfer(value, single.value_trans_rule)
                if transferred is not None:
                    values.append(transferred)
            else:
                values.append(value)
        if not values:
            return not single.filter_if_missing
        return any(_compare(single.comparator, v, expected) for v in values)
    if flt.type == filter_pb.FT_COMPOSITE_COLUMN_VALUE:
        comp = filter_pb.CompositeColumnValueFilter()
        comp.ParseFromString(flt.filter)
        results = [_eval_filter(sub.SerializeToString(), columns) for sub in comp.sub_filters]
        if comp.combinator == filter_pb.LO_NOT:
            if len(results) != 1:
                raise _param_invalid("NOT condition must have exactly one sub condition.")
            return not results[0]
        if comp.combinator == filter_pb.LO_AND:
            return all(results)
        return any(results)
    if flt.type == filter_pb.FT_COLUMN_PAGINATION:
        return True
    raise _param_invalid(f"Unsupported filter type: {flt.type}")


def _pagination(raw: bytes) -> tuple[int, int] | None:
    flt = filter_pb.Filter()
    flt.ParseFromString(raw)
    if flt.type != filter_pb.FT_COLUMN_PAGINATION:
        return None
    page = filter_pb.ColumnPaginationFilter()
    page.ParseFromString(flt.filter)
    return page.offset, page.limit


# --------------------------------------------------------------------------- the store


@dataclass
class _ReadSpec:
    columns_to_get: list[str]
    max_versions: int | None
    time_range: tuple[int, int] | None  # [start, end)
    filter: bytes | None


class _Store:
    """In-memory tables; every public method runs under the server's lock."""

    def __init__(self, enforce_time_deviation: bool) -> None:
        self.tables: dict[str, _Table] = {}
        self.enforce_time_deviation = enforce_time_deviation

    # ----------------------------------------------------------------- helpers

    def table(self, name: str) -> _Table:
        table = self.tables.get(name)
        if table is None:
            raise _table_not_exist()
        return table

    @staticmethod
    def check_pk(
        table: _Table,
        primary_key: list[tuple[str, PKValue]],
        *,
        allow_inf: bool = False,
        allow_auto: bool = False,
    ) -> list[PKValue]:
        if len(primary_key) != len(table.primary_key):
            raise _param_invalid(
                f"Validate PK size fail. Input: {len(primary_key)}, Meta: {len(table.primary_key)}."
            )
        values: list[PKValue] = []
        for (name, value), col in zip(primary_key, table.primary_key, strict=True):
            if name != col.name:
                raise _param_invalid(f"Validate PK name fail. Input: {name}, Meta: {col.name}.")
            if isinstance(value, Sentinel):
                ok = (allow_inf and value is not AUTO_INCREMENT) or (
                    allow_auto and value is AUTO_INCREMENT and col.auto_increment
                )
                if not ok:
                    raise _param_invalid(f"Invalid primary key value {value!r} for column {name}.")
            else:
                actual = (
                    "BOOLEAN"
                    if isinstance(value, bool)
                    else "INTEGER"
                    if isinstance(value, int)
                    else "STRING"
                    if isinstance(value, str)
                    else "BINARY"
                )
                if actual != col.type:
                    raise _param_invalid(
                        f"Validate PK type fail. Input: {actual}, Meta: {col.type} (column {name})."
                    )
            values.append(value)
        return values

    def visible(self, table: _Table, versions: Versions, now: int) -> Versions:
        out = versions[: table.max_versions]
        if table.time_to_live > 0:
            cutoff = now - table.time_to_live * 1000
            out = [(ts, v) for ts, v in out if ts > cutoff]
        return out

    def visible_row(self, table: _Table, pk: PK) -> dict[str, Versions] | None:
        row = table.rows.get(pk)
        if row is None:
            return None
        now = _now_ms()
        return {name: vs for name, vs in ((n, self.visible(table, v, now)) for n, v in row.items()) if vs}

    def read(
        self, table: _Table, pk: PK, spec: _ReadSpec
    ) -> list[tuple[str, ColumnValue, int | None]] | None:
        """Projected cells of a row, or None when nothing should be returned."""
        if pk not in table.rows:
            return None
        columns = self.visible_row(table, pk) or {}
        had_columns = bool(table.rows[pk])
        if spec.time_range is not None:
            start, end = spec.time_range
            columns = {n: [(ts, v) for ts, v in vs if start <= ts < end] for n, vs in columns.items()}
            columns = {n: vs for n, vs in columns.items() if vs}
        if spec.max_versions is not None:
            columns = {n: vs[: spec.max_versions] for n, vs in columns.items()}
        if spec.filter is not None and not _eval_filter(spec.filter, columns):
            return None
        pk_names = {c.name for c in table.primary_key}
        wanted = [c for c in spec.columns_to_get if c not in pk_names]
        if spec.columns_to_get:
            columns = {n: vs for n, vs in columns.items() if n in wanted}
        names = sorted(columns)
        if spec.filter is not None:
            page = _pagination(spec.filter)
            if page is not None:
                names = names[page[0] : page[0] + page[1]]
        cells: list[tuple[str, ColumnValue, int | None]] = [(n, v, ts) for n in names for ts, v in columns[n]]
        if not cells:
            asked_pk_only = bool(spec.columns_to_get) and any(c in pk_names for c in spec.columns_to_get)
            if spec.columns_to_get and not asked_pk_only:
                return None
            if not spec.columns_to_get and had_columns:
                return None
        return cells

    def pk_pairs(self, table: _Table, pk: PK) -> list[tuple[str, PKValue]]:
        return [(col.name, value) for col, value in zip(table.primary_key, pk, strict=True)]

    def check_condition(self, table: _Table, pk: PK, condition: Any) -> None:
        exists = pk in table.rows
        expectation = condition.row_existence
        if expectation == pb.EXPECT_EXIST and not exists:
            raise _condition_failed()
        if expectation == pb.EXPECT_NOT_EXIST and exists:
            raise _condition_failed()
        if condition.HasField("column_condition") and condition.column_condition:
            columns = self.visible_row(table, pk) or {}
            if not _eval_filter(condition.column_condition, columns):
                raise _condition_failed()

    def _timestamp(self, table: _Table, cell: pbuf.Cell, now: int) -> int:
        if cell.timestamp is None:
            return now
        if cell.timestamp < 0:
            raise _param_invalid(f"Invalid timestamp for column {cell.name}.")
        if self.enforce_time_deviation and abs(cell.timestamp - now) > table.deviation * 1000:
            raise _param_invalid(
                f"The timestamp of column {cell.name} exceeds the max time deviation "
                f"({table.deviation}s) of the table."
            )
        return cell.timestamp

    def _resolve_pk(self, table: _Table, primary_key: list[tuple[str, PKValue]]) -> PK:
        values = self.check_pk(table, primary_key, allow_auto=True)
        resolved: list[PKValue] = []
        for value in values:
            if value is AUTO_INCREMENT:
                table.last_auto_increment = max(table.last_auto_increment + 1, _now_ms() * 1000)
                resolved.append(table.last_auto_increment)
            else:
                resolved.append(value)
        return tuple(resolved)

    def _validate_columns(self, table: _Table, cells: list[pbuf.Cell]) -> None:
        pk_names = {c.name for c in table.primary_key}
        for cell in cells:
            if not cell.name or cell.name in pk_names:
                raise _param_invalid(f"Invalid attribute column name: {cell.name!r}.")

    def _store_row(self, table: _Table, pk: PK, row: dict[str, Versions] | None) -> None:
        if row is None:
            if pk in table.rows:
                del table.rows[pk]
                index = bisect.bisect_left(table.keys, pk)
                del table.keys[index]
            return
        if pk not in table.rows:
            bisect.insort(table.keys, pk)
        table.rows[pk] = row

    @staticmethod
    def _add_version(table: _Table, row: dict[str, Versions], name: str, ts: int, value: ColumnValue) -> None:
        versions = [(t, v) for t, v in row.get(name, []) if t != ts]
        versions.append((ts, value))
        versions.sort(key=lambda item: item[0], reverse=True)
        row[name] = versions[: table.max_versions]

    # ----------------------------------------------------------------- writes

    def put_row(self, table: _Table, raw: pbuf.PlainBufferRow, condition: Any) -> tuple[PK, dict[str, Any]]:
        if raw.delete_marker:
            raise _param_invalid("PutRow must not carry a delete marker.")
        self._validate_columns(table, raw.cells)
        pk = self._resolve_pk(table, raw.primary_key)
        self.check_condition(table, pk, condition)
        now = _now_ms()
        row: dict[str, Versions] = {}
        for cell in raw.cells:
            if cell.op is not None or cell.value is None:
                raise _param_invalid(f"PutRow column {cell.name} must carry a value and no operation.")
            self._add_version(table, row, cell.name, self._timestamp(table, cell, now), cell.value)
        self._store_row(table, pk, row)
        return pk, {}

    def update_row(
        self, table: _Table, raw: pbuf.PlainBufferRow, condition: Any
    ) -> tuple[PK, dict[str, Any]]:
        if raw.delete_marker:
            raise _param_invalid("UpdateRow must not carry a delete marker.")
        if not raw.cells:
            raise _param_invalid("UpdateRow must update at least one column.")
        self._validate_columns(table, raw.cells)
        pk = tuple(self.check_pk(table, raw.primary_key))
        self.check_condition(table, pk, condition)
        now = _now_ms()
        existed = pk in table.rows
        row = {name: list(vs) for name, vs in table.rows.get(pk, {}).items()}
        modified: dict[str, Any] = {}
        for cell in raw.cells:
            if cell.op is None:
                if cell.value is None:
                    raise _param_invalid(f"Column {cell.name} to put has no value.")
                self._add_version(table, row, cell.name, self._timestamp(table, cell, now), cell.value)
            elif cell.op == pbuf.DELETE_ONE_VERSION:
                if cell.timestamp is None:
                    raise _param_invalid(f"Deleting one version of column {cell.name} requires a timestamp.")
                remaining = [(t, v) for t, v in row.get(cell.name, []) if t != cell.timestamp]
                if remaining:
                    row[cell.name] = remaining
                else:
                    row.pop(cell.name, None)
            elif cell.op == pbuf.DELETE_ALL_VERSION:
                row.pop(cell.name, None)
            elif cell.op == pbuf.INCREMENT:
                if not isinstance(cell.value, int) or isinstance(cell.value, bool):
                    raise _param_invalid(f"Increment of column {cell.name} requires an integer delta.")
                if cell.timestamp is not None:
                    raise _param_invalid(f"Increment of column {cell.name} must not specify a timestamp.")
                current = self.visible(table, row.get(cell.name, []), now)
                base = current[0][1] if current else 0
                if not isinstance(base, int) or isinstance(base, bool):
                    raise _param_invalid(f"Column {cell.name} to increment is not an integer.")
                self._add_version(table, row, cell.name, now, base + cell.value)
                modified[cell.name] = (base + cell.value, now)
            else:
                raise _param_invalid(f"Unsupported cell operation type {cell.op}.")
        if row or existed:
            # A row whose attribute columns were all deleted no longer exists.
            self._store_row(table, pk, row or None)
        return pk, modified

    def delete_row(
        self, table: _Table, raw: pbuf.PlainBufferRow, condition: Any
    ) -> tuple[PK, dict[str, Any]]:
        if raw.cells:
            raise _param_invalid("DeleteRow must not carry attribute columns.")
        pk = tuple(self.check_pk(table, raw.primary_key))
        self.check_condition(table, pk, condition)
        self._store_row(table, pk, None)
        return pk, {}

    # ----------------------------------------------------------------- range

    def scan(
        self, table: _Table, start: Sequence[PKValue], end: Sequence[PKValue], forward: bool
    ) -> Iterator[PK]:
        lo_key = _ext_key(start)
        hi_key = _ext_key(end)
        if forward:
            lo = bisect.bisect_left(table.keys, lo_key, key=_ext_key)
            hi = bisect.bisect_left(table.keys, hi_key, key=_ext_key)
            for index in range(lo, hi):
                yield table.keys[index]
        else:
            hi = bisect.bisect_right(table.keys, lo_key, key=_ext_key)
            lo = bisect.bisect_right(table.keys, hi_key, key=_ext_key)
            for index in range(hi - 1, lo - 1, -1):
                yield table.keys[index]


# --------------------------------------------------------------------------- the server


class TableStoreServer(StartStop):
    """In-memory TableStore-compatible HTTP server (see the module docstring).

    ``start()`` serves from a daemon thread; ``endpoint`` is the URL to hand to ``OTSClient``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        instance_name: str = "featuredao",
        access_key_id: str = DEFAULT_ACCESS_KEY_ID,
        access_key_secret: str = DEFAULT_ACCESS_KEY_SECRET,
        *,
        region: str | None = None,
        enforce_time_deviation: bool = True,
        missing_table_in_batch: Literal["request", "row"] = "request",
    ) -> None:
        if not access_key_id or not access_key_secret:
            raise ValueError("access_key_id and access_key_secret must be non-empty")
        self.host = host
        self._requested_port = port
        self.instance_name = instance_name
        self.access_key_id = access_key_id
        self._secret = access_key_secret
        self.region = region
        self.missing_table_in_batch = missing_table_in_batch
        self._lock = threading.RLock()
        self._store = _Store(enforce_time_deviation)
        self._failures: list[_InjectedFailure] = []
        self._row_errors: list[_InjectedRowError] = []
        self._calls: list[str] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._bound_port = 0
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._api_handlers: dict[str, Callable[[bytes], Any]] = {
            "CreateTable": self._create_table,
            "DeleteTable": self._delete_table,
            "ListTable": self._list_table,
            "DescribeTable": self._describe_table,
            "UpdateTable": self._update_table,
            "GetRow": self._get_row,
            "PutRow": self._put_row,
            "UpdateRow": self._update_row,
            "DeleteRow": self._delete_row,
            "BatchGetRow": self._batch_get_row,
            "BatchWriteRow": self._batch_write_row,
            "GetRange": self._get_range,
        }

    def __repr__(self) -> str:  # never show the secret
        return f"TableStoreServer(endpoint={self.endpoint!r}, instance_name={self.instance_name!r})"

    # ----------------------------------------------------------------- lifecycle

    @property
    def port(self) -> int:
        if self._httpd is None:
            return self._bound_port or self._requested_port
        return int(self._httpd.server_address[1])

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> TableStoreServer:
        if self._httpd is not None:
            return self
        httpd = ThreadingHTTPServer((self.host, self._requested_port), _make_handler(self))
        httpd.daemon_threads = True
        self._httpd = httpd
        self._bound_port = int(httpd.server_address[1])
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="tablestore-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        with self._lock:
            connections = list(self._connections)
            self._connections.clear()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # ----------------------------------------------------------------- test hooks

    def inject_failure(
        self, api: str, status: int, code: str, count: int = 1, message: str | None = None
    ) -> None:
        """Fail the next ``count`` authenticated requests to ``api`` ("*" = any API).

        The response is a properly signed error (``Error`` protobuf, given HTTP status), so the
        SDK raises ``OTSServiceError(status, code, message)`` and applies its retry policy.
        """
        if count < 1:
            raise ValueError("count must be >= 1")
        with self._lock:
            self._failures.append(
                _InjectedFailure(api, status, code, message or f"Injected failure ({code}).", count)
            )

    def inject_row_error(
        self, table: str, pk: Any, code: str, count: int = 1, message: str | None = None
    ) -> None:
        """Fail the row ``pk`` of ``table`` in the next ``count`` BatchGetRow/BatchWriteRow rows.

        ``pk`` may be ``[("name", value), ...]`` (as the SDK takes it), a dict, or bare values in
        primary-key order.  The row comes back with ``is_ok=False`` and the given code/message;
        for BatchWriteRow the row is not applied.  Single-row APIs are unaffected (use
        :meth:`inject_failure` for them).
        """
        if count < 1:
            raise ValueError("count must be >= 1")
        with self._lock:
            self._row_errors.append(
                _InjectedRowError(
                    table, _pk_values(pk), code, message or f"Injected row error ({code}).", count
                )
            )

    def clear_injections(self) -> None:
        with self._lock:
            self._failures.clear()
            self._row_errors.clear()

    def call_count(self, api: str | None = None) -> int:
        """Number of authenticated requests received (for ``api``, or all)."""
        with self._lock:
            return len(self._calls) if api is None else self._calls.count(api)

    @property
    def calls(self) -> list[str]:
        with self._lock:
            return list(self._calls)

    def reset(self) -> None:
        """Drop all tables, injections and call counters."""
        with self._lock:
            self._store.tables.clear()
            self._failures.clear()
            self._row_errors.clear()
            self._calls.clear()

    def _take_failure(self, api: str) -> _InjectedFailure | None:
        for failure in self._failures:
            if failure.api in (api, "*"):
                failure.remaining -= 1
                if failure.remaining <= 0:
                    self._failures.remove(failure)
                return failure
        return None

    def _take_row_error(self, table: str, pk: PK) -> _InjectedRowError | None:
        for err in self._row_errors:
            if err.table == table and err.pk == pk:
                err.remaining -= 1
                if err.remaining <= 0:
                    self._row_errors.remove(err)
                return err
        return None

    # ----------------------------------------------------------------- HTTP plumbing

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _authenticate(self, api: str, headers: dict[str, str], body: bytes) -> bytes:
        """Verify the request; return the key the response must be signed with."""

        def fail(message: str) -> OTSError:
            return OTSError(403, "OTSAuthFailed", message)

        for name in (
            "x-ots-date",
            "x-ots-apiversion",
            "x-ots-accesskeyid",
            "x-ots-instancename",
            "x-ots-contentmd5",
        ):
            if name not in headers:
                raise fail(f"Missing header: {name}.")
        if headers["x-ots-accesskeyid"] != self.access_key_id:
            raise fail("The AccessKeyID does not exist.")
        if headers["x-ots-instancename"] != self.instance_name:
            raise fail(f"The instance '{headers['x-ots-instancename']}' is not found.")
        md5 = base64.b64encode(hashlib.md5(body).digest()).decode("ascii")
        if headers["x-ots-contentmd5"] != md5:
            raise fail("Mismatch between MD5 value of request body and x-ots-contentmd5 in header.")
        try:
            sent = _dt.datetime.strptime(headers["x-ots-date"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                tzinfo=_dt.UTC
            )
        except ValueError:
            raise fail("Invalid date format: x-ots-date.") from None
        skew = abs((_dt.datetime.now(_dt.UTC) - sent).total_seconds())
        if skew > MAX_DATE_SKEW_SECONDS:
            raise fail("Mismatch between system time and x-ots-date.")
        signed = f"/{api}\nPOST\n\n"
        if "x-ots-signaturev4" in headers:
            sign_date = headers.get("x-ots-signdate", "")
            region = headers.get("x-ots-signregion", "")
            if not sign_date or not region:
                raise fail("Missing header: x-ots-signdate/x-ots-signregion.")
            if self.region is not None and region != self.region:
                raise fail(f"Invalid sign region: {region}.")
            try:
                date = _dt.datetime.strptime(sign_date, "%Y%m%d").date()
            except ValueError:
                raise fail("Invalid x-ots-signdate.") from None
            if abs((date - _dt.datetime.now(_dt.UTC).date()).days) > 1:
                raise fail("Mismatch between system time and x-ots-signdate.")
            key = _v4_signing_key(self._secret, sign_date, region)
            canonical = (
                signed + _canonical_ots_headers(headers, ("x-ots-signaturev4", "x-ots-signature")) + "\n"
            )
            expected = _hmac_b64(key, canonical + "ots", hashlib.sha256)
            if not hmac.compare_digest(expected, headers["x-ots-signaturev4"]):
                raise fail("Signature mismatch.")
            return key
        if "x-ots-signature" not in headers:
            raise fail("Missing header: x-ots-signature.")
        key = self._secret.encode("utf-8")
        canonical = signed + _canonical_ots_headers(headers, ("x-ots-signature", "x-ots-signaturev4")) + "\n"
        expected = _hmac_b64(key, canonical, hashlib.sha1)
        if not hmac.compare_digest(expected, headers["x-ots-signature"]):
            raise fail("Signature mismatch.")
        return key

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        """Process one request; returns (status, headers, body).  Used by the HTTP handler."""
        api = path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        signing_key: bytes | None = None
        try:
            signing_key = self._authenticate(api, headers, body)
            if api not in self._api_handlers:
                raise OTSError(400, "OTSUnsupportOperation", f"Unsupported operation: '{api}'.")
            with self._lock:
                self._calls.append(api)
                failure = self._take_failure(api)
            if failure is not None:
                raise OTSError(failure.status, failure.code, failure.message)
            response = self._api_handlers[api](body)
            return self._respond(api, 200, response.SerializeToString(), signing_key)
        except OTSError as err:
            error = pb.Error(code=err.code, message=err.message)
            # Auth failures cannot be signed with the caller's key: the SDK does not expect it.
            key = None if err.code == "OTSAuthFailed" else signing_key
            return self._respond(api, err.status, error.SerializeToString(), key)
        except Exception as exc:  # pragma: no cover - defensive: never kill the handler thread
            error = pb.Error(code="OTSInternalServerError", message=f"Internal error: {exc}")
            return self._respond(api, 500, error.SerializeToString(), signing_key)

    def _respond(
        self, api: str, status: int, body: bytes, signing_key: bytes | None
    ) -> tuple[int, dict[str, str], bytes]:
        headers = {
            "x-ots-contentmd5": base64.b64encode(hashlib.md5(body).digest()).decode("ascii"),
            "x-ots-requestid": str(uuid.uuid4()),
            "x-ots-date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "x-ots-contenttype": "protocol buffer",
        }
        if signing_key is not None:
            signature = _hmac_b64(signing_key, _canonical_ots_headers(headers) + "\n/" + api, hashlib.sha1)
            headers["Authorization"] = f"OTS {self.access_key_id}:{signature}"
        headers["Content-Type"] = "application/x-protobuf"
        return status, headers, body

    # ----------------------------------------------------------------- parsing helpers

    @staticmethod
    def _parse(message: Any, body: bytes) -> Any:
        try:
            message.ParseFromString(body)
        except Exception as exc:
            raise _param_invalid(f"Failed to parse the request body: {exc}") from exc
        return message

    @staticmethod
    def _decode_row(raw: bytes) -> pbuf.PlainBufferRow:
        try:
            return pbuf.decode_row(raw)
        except pbuf.PlainBufferError as exc:
            raise _param_invalid(f"Invalid PlainBuffer: {exc}") from exc

    @staticmethod
    def _read_spec(request: Any, *, has_filter: bool = True) -> _ReadSpec:
        max_versions = request.max_versions if request.HasField("max_versions") else None
        time_range: tuple[int, int] | None = None
        if request.HasField("time_range"):
            tr = request.time_range
            if tr.HasField("specific_time"):
                if max_versions is not None:
                    raise _param_invalid(
                        "Specific timestamp and max versions cannot be given at the same time."
                    )
                time_range = (tr.specific_time, tr.specific_time + 1)
            elif tr.HasField("start_time") and tr.HasField("end_time"):
                if tr.start_time >= tr.end_time:
                    raise _param_invalid("Invalid time range: start_time must be less than end_time.")
                time_range = (tr.start_time, tr.end_time)
            else:
                raise _param_invalid("Invalid time range.")
        if max_versions is None and time_range is None:
            raise _param_invalid("Neither max_versions nor time_range is set.")
        if max_versions is not None and max_versions <= 0:
            raise _param_invalid(f"Invalid max_versions: {max_versions}.")
        flt = request.filter if has_filter and request.HasField("filter") and request.filter else None
        return _ReadSpec(list(request.columns_to_get), max_versions, time_range, flt)

    def _return_row(self, table: _Table, pk: PK, modified: dict[str, Any], return_content: Any) -> bytes:
        rtype = return_content.return_type if return_content.HasField("return_type") else pb.RT_NONE
        pairs = self._store.pk_pairs(table, pk)
        if rtype == pb.RT_PK:
            return pbuf.encode_primary_key(pairs)
        if rtype == pb.RT_AFTER_MODIFY:
            names = list(return_content.return_column_names) or sorted(modified)
            cells = [(n, modified[n][0], modified[n][1]) for n in names if n in modified]
            return pbuf.encode_row(pairs, cells)
        return b""

    @staticmethod
    def _consumed(target: Any, read: int = 0, write: int = 0) -> None:
        target.capacity_unit.read = read
        target.capacity_unit.write = write

    # ----------------------------------------------------------------- table APIs

    def _create_table(self, body: bytes) -> Any:
        req = self._parse(pb.CreateTableRequest(), body)
        meta = req.table_meta
        name = meta.table_name
        if not _TABLE_NAME_RE.match(name):
            raise _param_invalid(f"Invalid table name: '{name}'.")
        if not 1 <= len(meta.primary_key) <= 4:
            raise _param_invalid("The number of primary key columns must be in range: [1, 4].")
        if len(req.index_metas):
            raise OTSError(400, "OTSUnsupportOperation", "Secondary indexes are not supported locally.")
        columns: list[_PKColumn] = []
        for i, schema in enumerate(meta.primary_key):
            if schema.type not in _PK_TYPES:
                raise _param_invalid(f"Invalid primary key type for column {schema.name}.")
            auto = schema.HasField("option") and schema.option == pb.AUTO_INCREMENT
            if auto and (i == 0 or schema.type != pb.INTEGER):
                raise _param_invalid("Only a non-partition INTEGER primary key column may auto-increment.")
            if any(c.name == schema.name for c in columns) or not schema.name:
                raise _param_invalid(f"Invalid or duplicated primary key name: '{schema.name}'.")
            columns.append(_PKColumn(schema.name, _PK_TYPES[schema.type], auto))
        opts = req.table_options
        ttl = opts.time_to_live if opts.HasField("time_to_live") else -1
        max_versions = opts.max_versions if opts.HasField("max_versions") else 1
        deviation = (
            opts.deviation_cell_version_in_sec if opts.HasField("deviation_cell_version_in_sec") else 86400
        )
        self._check_options(ttl, max_versions, deviation)
        cu = req.reserved_throughput.capacity_unit
        with self._lock:
            if name in self._store.tables:
                raise OTSError(409, "OTSObjectAlreadyExist", "Requested table already exists.")
            self._store.tables[name] = _Table(
                name=name,
                primary_key=columns,
                defined_columns=[(d.name, d.type) for d in meta.defined_column],
                time_to_live=ttl,
                max_versions=max_versions,
                deviation=deviation,
                allow_update=opts.allow_update if opts.HasField("allow_update") else None,
                read_cu=cu.read if cu.HasField("read") else 0,
                write_cu=cu.write if cu.HasField("write") else 0,
                created=int(time.time()),
            )
        return pb.CreateTableResponse()

    @staticmethod
    def _check_options(ttl: int, max_versions: int, deviation: int) -> None:
        if ttl == 0 or ttl < -1:
            raise _param_invalid(f"Invalid time_to_live: {ttl}.")
        if max_versions < 1:
            raise _param_invalid(f"Invalid max_versions: {max_versions}.")
        if deviation < 1:
            raise _param_invalid(f"Invalid deviation_cell_version_in_sec: {deviation}.")

    def _delete_table(self, body: bytes) -> Any:
        req = self._parse(pb.DeleteTableRequest(), body)
        with self._lock:
            if self._store.tables.pop(req.table_name, None) is None:
                raise _table_not_exist()
        return pb.DeleteTableResponse()

    def _list_table(self, body: bytes) -> Any:
        self._parse(pb.ListTableRequest(), body)
        resp = pb.ListTableResponse()
        with self._lock:
            resp.table_names.extend(sorted(self._store.tables))
        return resp

    def _fill_options(self, table: _Table, options: Any, throughput: Any) -> None:
        options.time_to_live = table.time_to_live
        options.max_versions = table.max_versions
        options.deviation_cell_version_in_sec = table.deviation
        if table.allow_update is not None:
            options.allow_update = table.allow_update
        throughput.capacity_unit.read = table.read_cu
        throughput.capacity_unit.write = table.write_cu
        throughput.last_increase_time = table.created

    def _describe_table(self, body: bytes) -> Any:
        req = self._parse(pb.DescribeTableRequest(), body)
        resp = pb.DescribeTableResponse()
        with self._lock:
            table = self._store.table(req.table_name)
            resp.table_meta.table_name = table.name
            for col in table.primary_key:
                schema = resp.table_meta.primary_key.add(name=col.name, type=_PK_TYPE_ENUM[col.type])
                if col.auto_increment:
                    schema.option = pb.AUTO_INCREMENT
            for name, dtype in table.defined_columns:
                resp.table_meta.defined_column.add(name=name, type=dtype)
            self._fill_options(table, resp.table_options, resp.reserved_throughput_details)
        resp.sse_details.enable = False
        return resp

    def _update_table(self, body: bytes) -> Any:
        req = self._parse(pb.UpdateTableRequest(), body)
        resp = pb.UpdateTableResponse()
        with self._lock:
            table = self._store.table(req.table_name)
            if req.HasField("table_options"):
                opts = req.table_options
                ttl = opts.time_to_live if opts.HasField("time_to_live") else table.time_to_live
                mv = opts.max_versions if opts.HasField("max_versions") else table.max_versions
                dev = (
                    opts.deviation_cell_version_in_sec
                    if opts.HasField("deviation_cell_version_in_sec")
                    else table.deviation
                )
                self._check_options(ttl, mv, dev)
                table.time_to_live, table.max_versions, table.deviation = ttl, mv, dev
                if opts.HasField("allow_update"):
                    table.allow_update = opts.allow_update
            if req.HasField("reserved_throughput"):
                cu = req.reserved_throughput.capacity_unit
                if cu.HasField("read"):
                    table.read_cu = cu.read
                if cu.HasField("write"):
                    table.write_cu = cu.write
            self._fill_options(table, resp.table_options, resp.reserved_throughput_details)
        return resp

    # ----------------------------------------------------------------- single-row APIs

    def _get_row(self, body: bytes) -> Any:
        req = self._parse(pb.GetRowRequest(), body)
        spec = self._read_spec(req)
        raw = self._decode_row(req.primary_key)
        resp = pb.GetRowResponse()
        with self._lock:
            table = self._store.table(req.table_name)
            pk = tuple(self._store.check_pk(table, raw.primary_key))
            cells = self._store.read(table, pk, spec)
            resp.row = b"" if cells is None else pbuf.encode_row(self._store.pk_pairs(table, pk), cells)
        self._consumed(resp.consumed, read=1)
        return resp

    def _write(
        self, kind: str, table_name: str, row_bytes: bytes, condition: Any, return_content: Any
    ) -> bytes:
        raw = self._decode_row(row_bytes)
        with self._lock:
            table = self._store.table(table_name)
            op = {
                "put": self._store.put_row,
                "update": self._store.update_row,
                "delete": self._store.delete_row,
            }
            if kind == "delete" and not raw.delete_marker:
                raise _param_invalid("DeleteRow requires a delete marker.")
            pk, modified = op[kind](table, raw, condition)
            return self._return_row(table, pk, modified, return_content)

    def _single_write(self, kind: str, request: Any, response: Any, row_field: str, body: bytes) -> Any:
        """PutRow, UpdateRow and DeleteRow: one conditional write, the row returned if asked for."""
        req = self._parse(request, body)
        row = self._write(kind, req.table_name, getattr(req, row_field), req.condition, req.return_content)
        if row:
            response.row = row
        self._consumed(response.consumed, write=1)
        return response

    def _put_row(self, body: bytes) -> Any:
        return self._single_write("put", pb.PutRowRequest(), pb.PutRowResponse(), "row", body)

    def _update_row(self, body: bytes) -> Any:
        return self._single_write("update", pb.UpdateRowRequest(), pb.UpdateRowResponse(), "row_change", body)

    def _delete_row(self, body: bytes) -> Any:
        return self._single_write("delete", pb.DeleteRowRequest(), pb.DeleteRowResponse(), "primary_key",
                                  body)

    # ----------------------------------------------------------------- batch APIs

    def _check_batch_tables(self, names: list[str], counts: list[int], limit: int) -> None:
        if not names:
            raise _param_invalid("No table is specified.")
        if len(set(names)) != len(names):
            raise _param_invalid("Duplicated table name in the request.")
        if any(count == 0 for count in counts):
            raise _param_invalid("No row specified in table.")
        if sum(counts) > limit:
            raise _param_invalid(f"Rows count exceeds the upper limit: {limit}.")
        if self.missing_table_in_batch == "request":
            for name in names:
                self._store.table(name)

    def _batch_get_row(self, body: bytes) -> Any:
        req = self._parse(pb.BatchGetRowRequest(), body)
        resp = pb.BatchGetRowResponse()
        with self._lock:
            self._check_batch_tables(
                [t.table_name for t in req.tables],
                [len(t.primary_key) for t in req.tables],
                BATCH_GET_MAX_ROWS,
            )
            for treq in req.tables:
                tresp = resp.tables.add(table_name=treq.table_name)
                table = self._store.tables.get(treq.table_name)
                if table is None:
                    for _ in treq.primary_key:
                        row = tresp.rows.add(is_ok=False)
                        row.error.code, row.error.message = (
                            "OTSObjectNotExist",
                            "Requested table does not exist.",
                        )
                    continue
                spec = self._read_spec(treq)
                pks = [
                    tuple(self._store.check_pk(table, self._decode_row(raw).primary_key))
                    for raw in treq.primary_key
                ]
                if len(set(pks)) != len(pks):
                    raise _param_invalid("Duplicated primary key in the same table.")
                for pk in pks:
                    row = tresp.rows.add()
                    injected = self._take_row_error(table.name, pk)
                    if injected is not None:
                        row.is_ok = False
                        row.error.code, row.error.message = injected.code, injected.message
                        continue
                    row.is_ok = True
                    try:
                        cells = self._store.read(table, pk, spec)
                    except OTSError as err:
                        row.is_ok = False
                        row.error.code, row.error.message = err.code, err.message
                        continue
                    self._consumed(row.consumed, read=1)
                    row.row = (
                        b"" if cells is None else pbuf.encode_row(self._store.pk_pairs(table, pk), cells)
                    )
        return resp

    def _batch_write_row(self, body: bytes) -> Any:
        req = self._parse(pb.BatchWriteRowRequest(), body)
        if req.HasField("transaction_id"):
            raise OTSError(400, "OTSUnsupportOperation", "Transactions are not supported locally.")
        kinds = {pb.PUT: "put", pb.UPDATE: "update", pb.DELETE: "delete"}
        resp = pb.BatchWriteRowResponse()
        with self._lock:
            self._check_batch_tables(
                [t.table_name for t in req.tables], [len(t.rows) for t in req.tables], BATCH_WRITE_MAX_ROWS
            )
            # Validate every row first: invalid or duplicated primary keys fail the whole request.
            decoded: list[list[tuple[pbuf.PlainBufferRow, PK | None]]] = []
            for treq in req.tables:
                table = self._store.tables.get(treq.table_name)
                rows: list[tuple[pbuf.PlainBufferRow, PK | None]] = []
                seen: set[PK] = set()
                for rreq in treq.rows:
                    raw = self._decode_row(rreq.row_change)
                    pk: PK | None = None
                    if table is not None:
                        values = self._store.check_pk(table, raw.primary_key, allow_auto=rreq.type == pb.PUT)
                        if not any(v is AUTO_INCREMENT for v in values):
                            pk = tuple(values)
                            if pk in seen:
                                raise _param_invalid("Duplicated primary key in the same table.")
                            seen.add(pk)
                    rows.append((raw, pk))
                decoded.append(rows)
            for treq, rows in zip(req.tables, decoded, strict=True):
                tresp = resp.tables.add(table_name=treq.table_name)
                table = self._store.tables.get(treq.table_name)
                for rreq, (raw, pk) in zip(treq.rows, rows, strict=True):
                    row = tresp.rows.add(is_ok=True)
                    try:
                        if table is None:
                            raise _table_not_exist()
                        injected = self._take_row_error(table.name, pk) if pk is not None else None
                        if injected is not None:
                            raise OTSError(0, injected.code, injected.message)
                        kind = kinds.get(rreq.type)
                        if kind is None:
                            raise _param_invalid(f"Invalid operation type: {rreq.type}.")
                        if kind == "delete" and not raw.delete_marker:
                            raise _param_invalid("Delete operation requires a delete marker.")
                        op = {
                            "put": self._store.put_row,
                            "update": self._store.update_row,
                            "delete": self._store.delete_row,
                        }[kind]
                        done_pk, modified = op(table, raw, rreq.condition)
                        returned = self._return_row(table, done_pk, modified, rreq.return_content)
                        if returned:
                            row.row = returned
                        self._consumed(row.consumed, write=1)
                    except OTSError as err:
                        row.is_ok = False
                        row.error.code, row.error.message = err.code, err.message
        return resp

    # ----------------------------------------------------------------- GetRange

    def _get_range(self, body: bytes) -> Any:
        req = self._parse(pb.GetRangeRequest(), body)
        spec = self._read_spec(req)
        if req.HasField("token") and req.token:
            raise OTSError(400, "OTSUnsupportOperation", "Wide-row tokens are not supported locally.")
        limit = req.limit if req.HasField("limit") else GET_RANGE_MAX_ROWS
        if limit <= 0:
            raise _param_invalid(f"Invalid limit: {limit}.")
        limit = min(limit, GET_RANGE_MAX_ROWS)
        start_raw = self._decode_row(req.inclusive_start_primary_key)
        end_raw = self._decode_row(req.exclusive_end_primary_key)
        forward = req.direction == pb.FORWARD
        resp = pb.GetRangeResponse()
        with self._lock:
            table = self._store.table(req.table_name)
            start = self._store.check_pk(table, start_raw.primary_key, allow_inf=True)
            end = self._store.check_pk(table, end_raw.primary_key, allow_inf=True)
            if forward and _ext_key(start) > _ext_key(end):
                raise _param_invalid("Begin key must less than end key in FORWARD.")
            if not forward and _ext_key(start) < _ext_key(end):
                raise _param_invalid("Begin key must more than end key in BACKWARD.")
            rows: list[tuple[list[tuple[str, PKValue]], list[tuple[str, ColumnValue, int | None]]]] = []
            next_pk: PK | None = None
            for pk in self._store.scan(table, start, end, forward):
                if len(rows) >= limit:
                    next_pk = pk
                    break
                cells = self._store.read(table, pk, spec)
                if cells is not None:
                    rows.append((self._store.pk_pairs(table, pk), cells))
            resp.rows = pbuf.encode_rows(rows)
            if next_pk is not None:
                resp.next_start_primary_key = pbuf.encode_primary_key(self._store.pk_pairs(table, next_pk))
        self._consumed(resp.consumed, read=max(1, math.ceil(len(resp.rows) / 4096)))
        return resp


def _make_handler(server: TableStoreServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "featuredao-tablestore-local"
        # Headers and body go out in two writes; with Nagle on, the body waits for the client's delayed ACK
        # (~40 ms per request).
        disable_nagle_algorithm = True
        timeout = 120  # idle keep-alive connections are closed after this many seconds

        def setup(self) -> None:
            super().setup()
            server._track(self.connection, True)

        def finish(self) -> None:
            server._track(self.connection, False)
            with contextlib.suppress(OSError):
                super().finish()

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0 or length > MAX_BODY_BYTES:
                body = pb.Error(
                    code="OTSParameterInvalid", message="Invalid Content-Length."
                ).SerializeToString()
                self.close_connection = True
                self._send(400, {"Content-Type": "application/x-protobuf"}, body)
                return
            payload = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, out_headers, body = server.handle(self.path, headers, payload)
            self._send(status, out_headers, body)

        def _not_allowed(self) -> None:
            body = pb.Error(code="OTSMethodNotAllowed", message="Only POST is allowed.").SerializeToString()
            self._send(405, {"Content-Type": "application/x-protobuf", "Allow": "POST"}, body)

        do_GET = do_PUT = do_DELETE = do_HEAD = do_PATCH = _not_allowed

    return Handler


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m featuredao.testing.tablestore",
        description="Local, in-memory TableStore-compatible server for development and tests "
        "(not a replacement for TableStore).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on start)")
    parser.add_argument("--instance", default="featuredao", help="instance name clients must send")
    parser.add_argument("--access-key-id", default=os.environ.get(ACCESS_KEY_ENV_VAR, DEFAULT_ACCESS_KEY_ID))
    parser.add_argument(
        "--access-key-secret",
        default=None,
        help=f"secret used to verify and sign requests (default: ${SECRET_ENV_VAR}, else the dev default)",
    )
    parser.add_argument("--region", default=None, help="if set, v4-signed requests must use this region")
    args = parser.parse_args(argv)
    secret = args.access_key_secret or os.environ.get(SECRET_ENV_VAR) or DEFAULT_ACCESS_KEY_SECRET
    server = TableStoreServer(
        args.host, args.port, args.instance, args.access_key_id, secret, region=args.region
    )
    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    server.start()
    print(
        f"TableStore local server listening on {server.endpoint} "
        f"(instance={server.instance_name}, access_key_id={server.access_key_id})",
        flush=True,
    )
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
