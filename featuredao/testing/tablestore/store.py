"""The tables of the local TableStore server and the service's rules for them: primary-key
validation and auto-increment, version visibility (max versions, TTL, time ranges), projection of
reads, row-existence and column conditions, put/update/delete of rows and range scans."""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import tablestore.protobuf.table_store_pb2 as pb

from featuredao.testing.tablestore import plainbuffer as pbuf
from featuredao.testing.tablestore.conditions import _eval_filter, _pagination
from featuredao.testing.tablestore.errors import _condition_failed, _param_invalid, _table_not_exist
from featuredao.testing.tablestore.model import PK, Versions, _ext_key, _now_ms, _Table
from featuredao.testing.tablestore.plainbuffer import AUTO_INCREMENT, ColumnValue, PKValue, Sentinel


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
