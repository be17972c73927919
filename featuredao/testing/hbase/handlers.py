"""The ``Hbase`` Thrift1 service of the local HBase server: one method per call of happybase's IDL
(admin, reads, writes, scanners), each validating its arguments and running on the store under its
lock."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from featuredao.testing.hbase.idl import _already_exists, _illegal_argument, _io_error, _text, hbase_thrift
from featuredao.testing.hbase.model import (
    _INT32_MAX,
    LATEST_TIMESTAMP,
    _Family,
    _make_row_result,
    _now_ms,
    _parse_column,
    _Table,
)
from featuredao.testing.hbase.store import _Store


class _HBaseHandler(_Store):
    """Implements the ``Hbase`` service of happybase's IDL over in-memory tables.

    thriftpy2 calls the methods with positional arguments in IDL order; ``Text``
    and ``Bytes`` values (``binary`` in the IDL) arrive as ``bytes``.
    """

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
            ordered = table.sorted_keys()
            for key in reversed(ordered[: bisect.bisect_right(ordered, row)]):
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
