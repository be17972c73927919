"""Sequence views on HBase: a row per event under a key that sorts newest first, read by pipelined scans.

Layout (plan chosen for issue 16): the row key of an event is ``key + 0x00 + order``, ``order`` being the
complement of the event's order key (``adapters._sequence_order``: time, then the item field, then the
other fields), so a key's events are contiguous and sort newest first, equal times by item then the other
fields, highest first: the core's documented tie order, which therefore also decides which of equal-time
events a limit keeps. Every field is also a cell ``<column_family>:<field>`` in the view's ``encoding``, so
rows read plainly in the HBase shell and are decoded like a table view's cells. Equal times never collide
(the order key holds every field); an identical event appended twice is one row (appends are
idempotent). Keys holding a NUL character cannot be stored (the separator) and read as no events.

Why not one wide row per key with a column per event: a Thrift1 ``getRows`` of several keys cannot bound
the columns of each row, so it would carry every stored event of every key (1,000 to use 100), and a
filter (``ColumnPaginationFilter``) needs a scanner per row anyway. Tall rows bound each read by the
window and the limit: one scan per key from ``key + 0x00 + complement(until)`` (inclusive) to the first
row older than ``since`` (exclusive), ``scannerGetList(limit)`` rows.

One round trip per phase for a whole chunk of keys: the Thrift1 scanner calls of every key are pipelined
on one pooled connection (every ``scannerOpenWithScan`` sent, then their answers read; the same for
``scannerGetList`` and ``scannerClose``), in windows of at most ``_WINDOW`` calls so neither side's socket
buffer fills. A Thrift server answers one connection's calls in order, so pipelining needs nothing of it.

Filters are not pushed (``sequence_filters`` False): the filter language compares bytes only, so a
threshold on a number cannot be expressed; the core filters ``scan_len`` events per key. ``retain`` is
not applied on write (trimming a key's old rows would need a scan and deletes per append).
"""

from __future__ import annotations

import importlib
import math
import struct
from collections.abc import Callable, Sequence
from typing import Any

import happybase  # noqa: F401 - loads its IDL as the module "Hbase_thrift"

from featuredao.sequence import Event, SequenceQuery
from featuredao.types import CoercionError, FeatureType, Key

from ._sequence_order import INT_MIN, encode_float, encode_int, encoder, invert, time_bounds

_thrift: Any = importlib.import_module("Hbase_thrift")
_SEPARATOR = b"\x00"
_WINDOW = 128
"""Most Thrift calls in flight on one connection."""
_MAX_CACHING = 10_000
_PUTS_PER_CALL = 1000


def pipelined(client: Any, api: str, calls: Sequence[dict[str, Any]],
              answered: tuple[type[BaseException], ...]) -> list[Any]:
    """Each call's result, or the exception the server answered it with; sent ``_WINDOW`` at a time."""
    out: list[Any] = []
    for i in range(0, len(calls), _WINDOW):
        part = calls[i:i + _WINDOW]
        for kwargs in part:
            client._send(api, **kwargs)
        for _ in part:
            try:
                out.append(client._recv(api))
            except answered as exc:  # read to its end: the next answer is still in sync
                out.append(exc)
    return out


def scan_all(client: Any, table: bytes, scans: list[Any], limit: int,
             answered: tuple[type[BaseException], ...]) -> list[list[Any]]:
    """The rows of each scan (at most ``limit``), opened, read and closed in three pipelined phases.

    A call the server answered with an error fails the read after every opened scanner is closed; any
    other exception means a broken connection (the pool replaces it): nothing more is sent on it.
    """
    opened = pipelined(client, "scannerOpenWithScan",
                       [{"tableName": table, "scan": s, "attributes": {}} for s in scans], answered)
    ids = [i for i in opened if not isinstance(i, BaseException)]
    got = []
    if len(ids) == len(scans):
        got = pipelined(client, "scannerGetList", [{"id": i, "nbRows": limit} for i in ids], answered)
    if ids:
        pipelined(client, "scannerClose", [{"id": i} for i in ids], answered)
    failed = [r for r in (*opened, *got) if isinstance(r, BaseException)]
    if failed:
        raise failed[0]
    return got


class HBaseSequenceMixin:
    """The sequence part of ``HBaseDao``: tall rows keyed by key and the event's order, pipelined scans."""

    view: Any
    source: Any
    _family: str
    _seq: Any

    def _sequence_layout(self, encoders: dict[FeatureType, Callable[[Any], Any]],
                         decoders: dict[FeatureType, Callable[[Any], Any]]) -> None:
        """Columns, codecs and the order key of the view's events."""
        spec = self.view.sequence
        family = self._family.encode() + b":"
        fields = list(spec.fields)
        types = [spec.fields[f] for f in fields]
        first = [spec.time_field, *([spec.item_field] if spec.item_field else [])]
        ordered = [*first, *(f for f in fields if f not in first)]
        positions = [fields.index(f) for f in ordered]
        self._seq = _Layout(
            columns={f: family + f.encode() for f in fields},
            encode=[encoders[FeatureType(t)] for t in types],
            decode={f: _column_decoder(self.view.options.encoding, t, decoders[FeatureType(t)])
                    for f, t in zip(fields, types, strict=True)},
            order=encoder([spec.fields[f] for f in ordered]), positions=positions,
            time_kind=spec.fields[spec.time_field])

    def _event_row(self, key: Key, event: Event) -> tuple[bytes, dict[bytes, bytes]]:
        layout = self._seq
        prefix = _prefix(key)
        if prefix is None:
            raise CoercionError(f"view {self.view.name!r} key {key!r}: HBase sequence keys cannot hold NUL")
        try:
            order = layout.order([event[i] for i in layout.positions])
            cells = {c: enc(v) for c, enc, v in zip(layout.columns.values(), layout.encode, event,
                                                      strict=True)}
        except CoercionError as exc:
            raise CoercionError(f"view {self.view.name!r} key {key!r}: {exc}") from None
        return prefix + invert(order), cells

    def _append_batch(self, events: list[tuple[Key, list[Event]]]) -> None:
        rows = dict(self._event_row(key, e) for key, added in events for e in added)

        def send(conn: Any) -> None:
            # mutateRows of at most _PUTS_PER_CALL rows, each call well within the socket timeout; rows
            # are idempotent, so a chunk that fails part-way can simply be appended again.
            # happybase counts a batch in cells, one per field of a row.
            per_call = _PUTS_PER_CALL * len(self._seq.columns)
            with conn.table(self.view.table).batch(batch_size=per_call) as batch:
                for row_key, cells in rows.items():
                    batch.put(row_key, cells)

        self.source.run(send)

    def _scan_range(self, key: Key, bounds: tuple[Any, Any]) -> tuple[bytes, bytes] | None:
        """Start (inclusive) and stop (exclusive) rows of a key's events in the window."""
        prefix = _prefix(key)
        if prefix is None:
            return None
        low, high = bounds
        kind = self._seq.time_kind
        start = prefix if high is None else prefix + invert(_time_key(kind, high))
        below = None if low is None else low - 1 if kind == "int" else math.nextafter(low, -math.inf)
        if below is None or (kind == "int" and below < INT_MIN) or below == -math.inf:
            return start, prefix[:-1] + b"\x01"  # every older event of the key
        return start, prefix + invert(_time_key(kind, below))

    def _fetch_events(self, keys: list[Key], query: SequenceQuery,
                      timeout_s: float | None) -> dict[Key, list[Event]]:
        bounds = time_bounds(self._seq.time_kind, query.since, query.until)
        if bounds is None:
            return {}
        layout = self._seq
        read = [(f, layout.columns[f], layout.decode[f]) for f in query]
        columns = [c for _, c, _ in read]
        ranges = {k: r for k in keys if (r := self._scan_range(k, bounds)) is not None}
        if not ranges:
            return {}
        scans = [_thrift.TScan(startRow=start, stopRow=stop, columns=columns,
                              caching=min(query.limit, _MAX_CACHING)) for start, stop in ranges.values()]
        table = self.view.table
        answered = self.source._answered

        def work(conn: Any) -> list[list[Any]]:
            return scan_all(conn.client, conn.table(table).name, scans, query.limit, answered)

        found = self.source.run(work, timeout_s)
        out: dict[Key, list[Event]] = {}
        for key, rows in zip(ranges, found, strict=True):
            if rows:
                # Column by column: a whole column decodes in one C-level call when its cells are sound.
                cells = [r.columns for r in rows]
                out[key] = list(zip(*[dec(_values(cells, c)) for _, c, dec in read], strict=True))
        return out

    def raw_sequence_reader(self) -> Callable[[list[Key], SequenceQuery], object]:
        """happybase's Thrift client by hand: the same pipelined scans, cells decoded, one list per field."""
        pool = self._raw_pool()  # type: ignore[attr-defined]
        spec = self.view.sequence
        thrift = _thrift
        family = self._family.encode() + b":"
        binary = self.view.options.encoding == "binary"
        int64, double = struct.Struct(">q"), struct.Struct(">d")
        plain: dict[str, Callable[[bytes], Any]] = {
            "int": (lambda r: int64.unpack(r)[0]) if binary else int,
            "float": (lambda r: double.unpack(r)[0]) if binary else float, "str": bytes.decode}
        flip = bytes(255 - i for i in range(256))
        is_int = spec.fields[spec.time_field] == "int"
        table_name = self.view.table

        def when(t: float) -> bytes:
            if is_int:
                return struct.pack(">Q", int(t) + 2 ** 63).translate(flip)
            bits = struct.unpack(">Q", double.pack(t))[0]
            return struct.pack(">Q", bits ^ (2 ** 64 - 1) if bits >> 63 else bits | 1 << 63).translate(flip)

        def read(keys: list[Key], query: SequenceQuery) -> object:
            cols = [(f, family + f.encode(), plain[spec.fields[f]]) for f in query]
            high = query.until if query.until is None or not is_int else math.floor(query.until)
            low = query.since if query.since is None or not is_int else math.ceil(query.since)
            scans = []
            for k in keys:
                prefix = str(k).encode() + b"\x00"
                below = None if low is None else low - 1 if is_int else math.nextafter(low, -math.inf)
                scans.append(thrift.TScan(
                    startRow=prefix if high is None else prefix + when(high),
                    stopRow=str(k).encode() + b"\x01" if below is None else prefix + when(below),
                    columns=[c for _, c, _ in cols], caching=min(query.limit, 10_000)))
            with pool.connection() as conn:
                client, name = conn.client, conn.table(table_name).name
                ids = []
                for s in scans:
                    client._send("scannerOpenWithScan", tableName=name, scan=s, attributes={})
                for _ in scans:
                    ids.append(client._recv("scannerOpenWithScan"))
                for i in ids:
                    client._send("scannerGetList", id=i, nbRows=query.limit)
                found = [client._recv("scannerGetList") for _ in ids]
                for i in ids:
                    client._send("scannerClose", id=i)
                for _ in ids:
                    client._recv("scannerClose")
            out = {}
            for k, rows in zip(keys, found, strict=True):
                if rows:
                    out[k] = {f: [dec(r.columns[c].value) for r in rows] for f, c, dec in cols}
            return [out.get(k) for k in keys]

        return read


class _Layout:
    """The columns, codecs and order key of one sequence view."""

    __slots__ = ("columns", "decode", "encode", "order", "positions", "time_kind")

    def __init__(self, columns: dict[str, bytes], encode: list[Callable[[Any], Any]],
                 decode: dict[str, Callable[[list[bytes | None]], list[Any]]],
                 order: Callable[[Sequence[Any]], bytes], positions: list[int], time_kind: str) -> None:
        self.columns = columns
        self.encode = encode
        self.decode = decode
        self.order = order
        self.positions = positions
        self.time_kind = time_kind


def _values(cells: list[dict[bytes, Any]], column: bytes) -> list[bytes | None]:
    """One column's raw values across rows (None where a row lacks the cell)."""
    try:
        return [row[column].value for row in cells]
    except KeyError:
        return [None if (cell := row.get(column)) is None else cell.value for row in cells]


def _column_decoder(encoding: str, kind: str,
                    one: Callable[[bytes], Any]) -> Callable[[list[bytes | None]], list[Any]]:
    """A column's decoder: the whole column at once, or cell by cell with ``one`` (the table view's
    decoder: an odd cell stays bytes, a missing one None) when a cell is odd or missing."""
    def by_cell(raws: list[bytes | None]) -> list[Any]:
        return [None if r is None else one(r) for r in raws]

    if encoding == "binary" and kind != "str":
        code = "q" if kind == "int" else "d"

        def packed(raws: list[bytes | None]) -> list[Any]:
            if None in raws or set(map(len, raws)) != {8}:  # type: ignore[arg-type]
                return by_cell(raws)
            return list(struct.unpack(f">{len(raws)}{code}", b"".join(raws)))  # type: ignore[arg-type]

        return packed
    plain: dict[str, Callable[[Any], Any]] = {"int": int, "float": float, "str": bytes.decode}
    fast = plain[kind]

    def text(raws: list[bytes | None]) -> list[Any]:
        try:
            return list(map(fast, raws))
        except (ValueError, TypeError):  # UnicodeDecodeError is a ValueError
            return by_cell(raws)

    return text


def _prefix(key: Key) -> bytes | None:
    """``key + 0x00``: the first bytes of every row of the key (None: a key the layout cannot hold)."""
    raw = str(key).encode()
    return None if _SEPARATOR in raw else raw + _SEPARATOR


def _time_key(kind: str, value: Any) -> bytes:
    return encode_int(int(value)) if kind == "int" else encode_float(float(value))
