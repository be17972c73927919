"""The in-memory data model of the local HBase server: tables with column families, cells as
timestamped versions (newest first), column-name parsing and the ``TRowResult`` built from cells."""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from featuredao.testing.hbase.idl import hbase_thrift

#: HConstants.LATEST_TIMESTAMP (Long.MAX_VALUE).
LATEST_TIMESTAMP = 2**63 - 1

_I64 = struct.Struct(">q")
_INT32_MAX = 2**31 - 1

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
    # Row keys in order for scanners (bisect on open, as a region's sorted store is): kept lazily, as
    # rows created since the last scan are merged in then and a removed row forces a rebuild.
    _sorted: list[bytes] = field(default_factory=list)
    _added: list[bytes] = field(default_factory=list)
    _removed: bool = False

    def row_created(self, row: bytes) -> None:
        self._added.append(row)

    def row_removed(self, row: bytes) -> None:
        self._removed = True

    def sorted_keys(self) -> list[bytes]:
        """Every row key, in byte order."""
        if self._removed:
            self._sorted, self._added, self._removed = sorted(self.rows), [], False
        elif self._added:
            self._added.sort()
            self._sorted = sorted(self._sorted + self._added)  # two sorted runs: a linear merge
            self._added = []
        return self._sorted


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
