"""The tables and scanners of the local HBase server and the HBase rules for them: which versions a
read sees, how puts, deletes, mutation batches and increments change a row, and how scanners walk
the row keys."""

from __future__ import annotations

import bisect
import hashlib
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from featuredao.testing.hbase.filters import _FilterChain
from featuredao.testing.hbase.idl import _illegal_argument, _io_error, _text, hbase_thrift
from featuredao.testing.hbase.model import (
    _I64,
    _INT32_MAX,
    LATEST_TIMESTAMP,
    _Cell,
    _Family,
    _make_row_result,
    _now_ms,
    _parse_column,
    _Selection,
    _Table,
    _wrap_i64,
)


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


class _Store:
    """In-memory tables and open scanners; :class:`_HBaseHandler` maps the Thrift calls onto them.

    Callers hold :attr:`_lock` (a re-entrant lock) around every use.
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
        data = table.rows.get(row)
        if data is None:
            data = table.rows[row] = {}
            table.row_created(row)
        versions = data.setdefault(family.name, {}).setdefault(qualifier, [])
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
            table.row_removed(row)

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
            ordered = table.sorted_keys()
            if reverse:  # from start (inclusive) down to stop (exclusive)
                hi = bisect.bisect_right(ordered, start) if start else len(ordered)
                lo = bisect.bisect_right(ordered, stop) if stop else 0
                keys = ordered[lo:hi][::-1]
            else:
                lo = bisect.bisect_left(ordered, start) if start else 0
                hi = bisect.bisect_left(ordered, stop) if stop else len(ordered)
                keys = ordered[lo:hi]
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
