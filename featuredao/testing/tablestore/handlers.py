"""The APIs of the local TableStore server (CreateTable ... GetRange): each parses its protobuf request,
runs it on the store under the server's lock and builds the protobuf response, with PlainBuffer rows
and consumed capacity units."""

from __future__ import annotations

import math
import re
import threading
import time
from typing import Any, Literal

import tablestore.protobuf.table_store_pb2 as pb

from featuredao.testing.tablestore import plainbuffer as pbuf
from featuredao.testing.tablestore.errors import OTSError, _param_invalid, _table_not_exist
from featuredao.testing.tablestore.model import PK, _ext_key, _InjectedRowError, _PKColumn, _Table
from featuredao.testing.tablestore.plainbuffer import AUTO_INCREMENT, ColumnValue, PKValue
from featuredao.testing.tablestore.store import _ReadSpec, _Store

BATCH_GET_MAX_ROWS = 100
BATCH_WRITE_MAX_ROWS = 200
GET_RANGE_MAX_ROWS = 5000
GET_RANGE_MAX_BYTES = 4 * 1024 * 1024
_TABLE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
_PK_TYPES = {pb.INTEGER: "INTEGER", pb.STRING: "STRING", pb.BINARY: "BINARY", pb.PK_BOOLEAN: "BOOLEAN"}
_PK_TYPE_ENUM = {v: k for k, v in _PK_TYPES.items()}

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


class _ApiHandlers:
    """The API methods of :class:`TableStoreServer`, which supplies the lock, the store, the batch
    setting and the injected row errors declared here."""

    _lock: threading.RLock
    _store: _Store
    missing_table_in_batch: Literal["request", "row"]

    def _take_row_error(self, table: str, pk: PK) -> _InjectedRowError | None:
        raise NotImplementedError

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
            scanned_bytes = 0
            for scanned, pk in enumerate(self._store.scan(table, start, end, forward)):
                # As the service: a response ends at ``limit`` rows, or once 5,000 rows or 4 MB were
                # scanned, rows a filter dropped included (then possibly with no row at all); either way
                # ``next_start_primary_key`` says where to go on.
                full = scanned >= GET_RANGE_MAX_ROWS or scanned_bytes >= GET_RANGE_MAX_BYTES
                if len(rows) >= limit or full:
                    next_pk = pk
                    break
                scanned_bytes += _row_size(pk, table.rows[pk])
                cells = self._store.read(table, pk, spec)
                if cells is not None:
                    rows.append((self._store.pk_pairs(table, pk), cells))
            resp.rows = pbuf.encode_rows(rows)
            if next_pk is not None:
                resp.next_start_primary_key = pbuf.encode_primary_key(self._store.pk_pairs(table, next_pk))
        self._consumed(resp.consumed, read=max(1, math.ceil(len(resp.rows) / 4096)))
        return resp


def _size(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode())
    return len(value) if isinstance(value, bytes | bytearray) else 8


def _row_size(pk: PK, row: dict[str, Any]) -> int:
    """A stored row's data size as the service counts it (near enough): key values, names and cells."""
    return sum(_size(v) for v in pk) + sum(len(name) + sum(_size(v) for _, v in versions)
                                           for name, versions in row.items())
