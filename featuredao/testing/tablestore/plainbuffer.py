"""PlainBuffer codec for the local TableStore server (server side of the wire format).

TableStore ships rows inside its protobuf messages in "PlainBuffer" format: a little-endian
header (0x75), tagged primary-key and attribute cells, a CRC-8 checksum per cell and one per
row.  The SDK's own pure-Python reader cannot parse the ``INF_MIN``/``INF_MAX`` range bounds
and has no notion of cell operation types on the read path, so the server carries its own
decoder (for requests) and encoder (for responses).

Value mapping used by the server:

* ``VT_INTEGER`` <-> ``int``, ``VT_DOUBLE`` <-> ``float``, ``VT_BOOLEAN`` <-> ``bool``
* ``VT_STRING`` <-> ``str`` (must be valid UTF-8)
* ``VT_BLOB`` <-> ``bytes``
* ``VT_INF_MIN``/``VT_INF_MAX``/``VT_AUTO_INCREMENT`` <-> the :data:`INF_MIN`, :data:`INF_MAX`
  and :data:`AUTO_INCREMENT` sentinels (primary keys only).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "AUTO_INCREMENT",
    "DELETE_ALL_VERSION",
    "DELETE_ONE_VERSION",
    "INCREMENT",
    "INF_MAX",
    "INF_MIN",
    "Cell",
    "ColumnValue",
    "PKValue",
    "PlainBufferError",
    "PlainBufferRow",
    "Sentinel",
    "crc8_bytes",
    "decode_column_value",
    "decode_row",
    "decode_rows",
    "encode_primary_key",
    "encode_row",
    "encode_rows",
]

HEADER: Final = 0x75

TAG_ROW_PK: Final = 0x01
TAG_ROW_DATA: Final = 0x02
TAG_CELL: Final = 0x03
TAG_CELL_NAME: Final = 0x04
TAG_CELL_VALUE: Final = 0x05
TAG_CELL_TYPE: Final = 0x06
TAG_CELL_TIMESTAMP: Final = 0x07
TAG_DELETE_ROW_MARKER: Final = 0x08
TAG_ROW_CHECKSUM: Final = 0x09
TAG_CELL_CHECKSUM: Final = 0x0A

DELETE_ALL_VERSION: Final = 0x01
DELETE_ONE_VERSION: Final = 0x03
INCREMENT: Final = 0x04

VT_INTEGER: Final = 0x00
VT_DOUBLE: Final = 0x01
VT_BOOLEAN: Final = 0x02
VT_STRING: Final = 0x03
VT_NULL: Final = 0x06
VT_BLOB: Final = 0x07
VT_INF_MIN: Final = 0x09
VT_INF_MAX: Final = 0x0A
VT_AUTO_INCREMENT: Final = 0x0B


def _make_crc8_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
        table.append(crc)
    return tuple(table)


_CRC8_TABLE: Final = _make_crc8_table()


def _crc_u8(crc: int, byte: int) -> int:
    return _CRC8_TABLE[(crc ^ byte) & 0xFF]


def crc8_bytes(crc: int, data: bytes) -> int:
    for byte in data:
        crc = _CRC8_TABLE[(crc ^ byte) & 0xFF]
    return crc


def _crc_i32(crc: int, value: int) -> int:
    return crc8_bytes(crc, struct.pack("<I", value & 0xFFFFFFFF))


def _crc_i64(crc: int, value: int) -> int:
    return crc8_bytes(crc, struct.pack("<Q", value & 0xFFFFFFFFFFFFFFFF))


class Sentinel:
    """Singleton marker for INF_MIN / INF_MAX / AUTO_INCREMENT primary-key values."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


INF_MIN: Final = Sentinel("INF_MIN")
INF_MAX: Final = Sentinel("INF_MAX")
AUTO_INCREMENT: Final = Sentinel("AUTO_INCREMENT")

ColumnValue = int | float | bool | str | bytes
PKValue = int | bool | str | bytes | Sentinel


class PlainBufferError(ValueError):
    """Malformed PlainBuffer data (bad tag, truncated buffer, checksum mismatch...)."""


@dataclass
class Cell:
    name: str
    value: ColumnValue | None = None
    op: int | None = None
    timestamp: int | None = None


@dataclass
class PlainBufferRow:
    primary_key: list[tuple[str, PKValue]] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)
    delete_marker: bool = False


# --------------------------------------------------------------------------- decoding


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def eof(self) -> bool:
        return self.pos >= len(self.data)

    def take(self, size: int) -> bytes:
        if size < 0 or self.pos + size > len(self.data):
            raise PlainBufferError("PlainBuffer truncated")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def i32(self) -> int:
        value: int = struct.unpack("<i", self.take(4))[0]
        return value

    def i64(self) -> int:
        value: int = struct.unpack("<q", self.take(8))[0]
        return value

    def peek(self) -> int | None:
        return None if self.eof() else self.data[self.pos]

    def expect(self, tag: int) -> None:
        got = self.u8()
        if got != tag:
            raise PlainBufferError(f"expected tag 0x{tag:02x}, got 0x{got:02x}")


def _decode_utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PlainBufferError("VT_STRING value is not valid UTF-8 (send binary data as bytearray)") from exc


def _read_value(reader: _Reader, crc: int, *, primary_key: bool) -> tuple[PKValue | ColumnValue, int]:
    """Read a TAG_CELL_VALUE payload (the tag itself already consumed)."""
    length = reader.i32()
    end = reader.pos + length
    vtype = reader.u8()
    value: PKValue | ColumnValue
    if vtype == VT_INTEGER:
        value = reader.i64()
        crc = _crc_i64(_crc_u8(crc, VT_INTEGER), value)
    elif vtype == VT_DOUBLE and not primary_key:
        raw = reader.take(8)
        value = struct.unpack("<d", raw)[0]
        crc = crc8_bytes(_crc_u8(crc, VT_DOUBLE), raw)
    elif vtype == VT_BOOLEAN:
        value = reader.u8() != 0
        crc = _crc_u8(_crc_u8(crc, VT_BOOLEAN), 1 if value else 0)
    elif vtype in (VT_STRING, VT_BLOB):
        size = reader.i32()
        raw = reader.take(size)
        crc = crc8_bytes(_crc_i32(_crc_u8(crc, vtype), size), raw)
        value = _decode_utf8(raw) if vtype == VT_STRING else bytes(raw)
    elif primary_key and vtype in (VT_INF_MIN, VT_INF_MAX, VT_AUTO_INCREMENT):
        crc = _crc_u8(crc, vtype)
        value = {VT_INF_MIN: INF_MIN, VT_INF_MAX: INF_MAX, VT_AUTO_INCREMENT: AUTO_INCREMENT}[vtype]
    else:
        kind = "primary key" if primary_key else "column"
        raise PlainBufferError(f"unsupported {kind} value type 0x{vtype:02x}")
    if reader.pos != end:
        raise PlainBufferError("cell value length prefix does not match its payload")
    return value, crc


def _read_cell_name(reader: _Reader) -> tuple[str, int]:
    reader.expect(TAG_CELL_NAME)
    size = reader.i32()
    raw = reader.take(size)
    return _decode_utf8(raw), crc8_bytes(0, raw)


def _read_checksum(reader: _Reader, tag: int, computed: int, what: str) -> None:
    reader.expect(tag)
    stored = reader.u8()
    if stored != computed:
        raise PlainBufferError(f"{what} checksum mismatch (stored {stored}, computed {computed})")


def _read_row_body(reader: _Reader) -> PlainBufferRow:
    row = PlainBufferRow()
    row_crc = 0
    reader.expect(TAG_ROW_PK)
    while reader.peek() == TAG_CELL:
        reader.u8()
        name, crc = _read_cell_name(reader)
        reader.expect(TAG_CELL_VALUE)
        value, crc = _read_value(reader, crc, primary_key=True)
        _read_checksum(reader, TAG_CELL_CHECKSUM, crc, f"primary key cell {name!r}")
        row_crc = _crc_u8(row_crc, crc)
        row.primary_key.append((name, value))  # type: ignore[arg-type]
    if reader.peek() == TAG_ROW_DATA:
        reader.u8()
        while reader.peek() == TAG_CELL:
            reader.u8()
            name, crc = _read_cell_name(reader)
            cell = Cell(name)
            if reader.peek() == TAG_CELL_VALUE:
                reader.u8()
                value, crc = _read_value(reader, crc, primary_key=False)
                cell.value = value  # type: ignore[assignment]
            # The SDK writes TAG_CELL_TYPE before TAG_CELL_TIMESTAMP but folds the timestamp
            # into the checksum first; accept either order.
            while reader.peek() in (TAG_CELL_TYPE, TAG_CELL_TIMESTAMP):
                tag = reader.u8()
                if tag == TAG_CELL_TYPE:
                    cell.op = reader.u8()
                else:
                    cell.timestamp = reader.i64()
            if cell.timestamp is not None:
                crc = _crc_i64(crc, cell.timestamp)
            if cell.op is not None:
                crc = _crc_u8(crc, cell.op)
            _read_checksum(reader, TAG_CELL_CHECKSUM, crc, f"cell {name!r}")
            row_crc = _crc_u8(row_crc, crc)
            row.cells.append(cell)
    if reader.peek() == TAG_DELETE_ROW_MARKER:
        reader.u8()
        row.delete_marker = True
    row_crc = _crc_u8(row_crc, 1 if row.delete_marker else 0)
    _read_checksum(reader, TAG_ROW_CHECKSUM, row_crc, "row")
    return row


def _read_header(reader: _Reader) -> None:
    if reader.i32() != HEADER:
        raise PlainBufferError("invalid PlainBuffer header")


def decode_row(data: bytes) -> PlainBufferRow:
    """Decode exactly one row (header included)."""
    reader = _Reader(bytes(data))
    _read_header(reader)
    row = _read_row_body(reader)
    if not reader.eof():
        raise PlainBufferError("trailing bytes after PlainBuffer row")
    return row


def decode_rows(data: bytes) -> list[PlainBufferRow]:
    """Decode a header followed by any number of rows."""
    if not data:
        return []
    reader = _Reader(bytes(data))
    _read_header(reader)
    rows = []
    while not reader.eof():
        rows.append(_read_row_body(reader))
    return rows


def decode_column_value(data: bytes) -> ColumnValue:
    """Decode a bare column value (type byte + payload), as used in column filters."""
    reader = _Reader(bytes(data))
    vtype = reader.u8()
    value: ColumnValue
    if vtype == VT_INTEGER:
        value = reader.i64()
    elif vtype == VT_DOUBLE:
        value = struct.unpack("<d", reader.take(8))[0]
    elif vtype == VT_BOOLEAN:
        value = reader.u8() != 0
    elif vtype in (VT_STRING, VT_BLOB):
        raw = reader.take(reader.i32())
        value = _decode_utf8(raw) if vtype == VT_STRING else bytes(raw)
    else:
        raise PlainBufferError(f"unsupported filter value type 0x{vtype:02x}")
    if not reader.eof():
        raise PlainBufferError("trailing bytes after filter value")
    return value


# --------------------------------------------------------------------------- encoding


def _encode_value(out: bytearray, value: PKValue | ColumnValue, crc: int) -> int:
    out.append(TAG_CELL_VALUE)
    if isinstance(value, Sentinel):
        vtype = {"INF_MIN": VT_INF_MIN, "INF_MAX": VT_INF_MAX, "AUTO_INCREMENT": VT_AUTO_INCREMENT}[
            value.name
        ]
        out += struct.pack("<iB", 1, vtype)
        return _crc_u8(crc, vtype)
    if isinstance(value, bool):
        out += struct.pack("<iBB", 2, VT_BOOLEAN, 1 if value else 0)
        return _crc_u8(_crc_u8(crc, VT_BOOLEAN), 1 if value else 0)
    if isinstance(value, int):
        out += struct.pack("<iBq", 9, VT_INTEGER, value)
        return _crc_i64(_crc_u8(crc, VT_INTEGER), value)
    if isinstance(value, float):
        raw = struct.pack("<d", value)
        out += struct.pack("<iB", 9, VT_DOUBLE) + raw
        return crc8_bytes(_crc_u8(crc, VT_DOUBLE), raw)
    if isinstance(value, str | bytes):
        vtype = VT_STRING if isinstance(value, str) else VT_BLOB
        raw = value.encode("utf-8") if isinstance(value, str) else value
        out += struct.pack("<iBi", 5 + len(raw), vtype, len(raw)) + raw
        return crc8_bytes(_crc_i32(_crc_u8(crc, vtype), len(raw)), raw)
    raise TypeError(f"cannot encode value of type {type(value).__name__}")


def _encode_cell(
    out: bytearray, name: str, value: PKValue | ColumnValue, timestamp: int | None, row_crc: int
) -> int:
    raw_name = name.encode("utf-8")
    out.append(TAG_CELL)
    out.append(TAG_CELL_NAME)
    out += struct.pack("<i", len(raw_name)) + raw_name
    crc = _encode_value(out, value, crc8_bytes(0, raw_name))
    if timestamp is not None:
        out.append(TAG_CELL_TIMESTAMP)
        out += struct.pack("<q", timestamp)
        crc = _crc_i64(crc, timestamp)
    out.append(TAG_CELL_CHECKSUM)
    out.append(crc)
    return _crc_u8(row_crc, crc)


def _encode_row_body(
    out: bytearray,
    primary_key: list[tuple[str, PKValue]],
    columns: list[tuple[str, ColumnValue, int | None]],
) -> None:
    row_crc = 0
    out.append(TAG_ROW_PK)
    for name, value in primary_key:
        row_crc = _encode_cell(out, name, value, None, row_crc)
    if columns:
        out.append(TAG_ROW_DATA)
        for name, cvalue, timestamp in columns:
            row_crc = _encode_cell(out, name, cvalue, timestamp, row_crc)
    row_crc = _crc_u8(row_crc, 0)
    out.append(TAG_ROW_CHECKSUM)
    out.append(row_crc)


def encode_row(
    primary_key: list[tuple[str, PKValue]],
    columns: list[tuple[str, ColumnValue, int | None]] | None = None,
) -> bytes:
    """Encode one row (header included), as GetRow/PutRow/... responses carry it."""
    out = bytearray(struct.pack("<i", HEADER))
    _encode_row_body(out, primary_key, columns or [])
    return bytes(out)


def encode_rows(
    rows: list[tuple[list[tuple[str, PKValue]], list[tuple[str, ColumnValue, int | None]]]],
) -> bytes:
    """Encode a GetRange ``rows`` payload: one header then every row; empty when no rows."""
    if not rows:
        return b""
    out = bytearray(struct.pack("<i", HEADER))
    for primary_key, columns in rows:
        _encode_row_body(out, primary_key, columns)
    return bytes(out)


def encode_primary_key(primary_key: list[tuple[str, PKValue]]) -> bytes:
    return encode_row(primary_key, None)
