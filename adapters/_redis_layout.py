"""The Redis adapter's table layouts: keys, rows decoded from hash and string replies, write commands."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import chain, compress, repeat
from operator import call, itemgetter
from typing import Any
from urllib.parse import unquote

import msgpack  # type: ignore[import-untyped, unused-ignore]
import orjson
import redis.exceptions as rexc

from featuredao.config import View
from featuredao.dao import BaseDao, Source
from featuredao.errors import BackendQueryError, ConfigError
from featuredao.types import FeatureType, FeatureValue, FinalRow, Key, RawRows, Row, RowFailure

from ._redis_codecs import (
    _DECODE_ERRORS,
    _DECODERS,
    PackedRows,
    _convert_column,
    _csv_escape,
    _decode,
    _elements_are,
    _text,
    _text_converter,
    _TextStep,
)
from ._redis_options import RedisViewOptions


class RedisLayout(BaseDao):
    """One view's keys and layout (a hash, or a msgpack, json or csv string): decoding and write commands."""

    options: RedisViewOptions

    def __init__(self, source: Source, view: View) -> None:
        super().__init__(source, view)
        opts: RedisViewOptions = view.options if view.options is not None else RedisViewOptions()
        if view.sequence is not None and opts.model_fields_set & {"layout", "encoding", "delimiter"}:
            raise ConfigError(f"view {view.name!r}: a sequence view's events are a sorted set per key; "
                              "layout, encoding and delimiter do not apply (key_template and ttl_s do)")
        self.options = opts
        self._format = opts.format
        template = opts.key_template.replace("{table}", view.table)
        self._key_head, self._key_tail = template.split("{key}")
        self._fields_b = {f: f.encode() for f in view.features}
        # Per field list: converters of the text layouts, and the exact types of a typed row.
        self._converters: dict[tuple[str, ...], list[_TextStep]] = {}
        self._expected: dict[tuple[str, ...], tuple[list[type[Any]], list[tuple[str, type[Any]]]]] = {}
        self._packed: dict[tuple[str, ...], PackedRows] = {}
        self._dense: dict[tuple[str, ...], tuple[list[Callable[[Any], Any]], list[bool], bool]] = {}

    # -- keys ------------------------------------------------------------------------------------------
    def _redis_keys(self, keys: Iterable[Key]) -> list[str]:
        head, tail = self._key_head, self._key_tail
        return [f"{head}{k}{tail}" for k in keys]

    # -- rows ------------------------------------------------------------------------------------------
    def _hash_rows(self, keys: list[Key], replies: list[list[bytes | None]], fields: list[str],
                   exists: Callable[[list[str]], list[int]]) -> RawRows:
        """Rows from the HMGET replies of ``keys``; ``exists`` answers EXISTS for the keys that need it."""
        found_keys, found, unsure = self._hash_found(keys, replies, fields)
        answers = exists(self._redis_keys(found_keys[i] for i in unsure)) if unsure else []
        return self._hash_decode(found_keys, found, unsure, answers, fields)

    def _hash_found(self, keys: list[Key], replies: list[list[bytes | None]],
                    fields: list[str]) -> tuple[list[Key], list[list[bytes | None]], list[int]]:
        """The keys with HMGET replies worth decoding, their replies, and the positions (in them) of the
        keys whose requested features are all null: only EXISTS tells those rows from missing keys."""
        width = len(fields)
        found_keys: list[Key] = []
        found: list[list[bytes | None]] = []
        unsure: list[int] = []
        for key, values in zip(keys, replies, strict=True):
            if values.count(None) != width:
                found_keys.append(key)
                found.append(values)
            elif width < len(self._all_fields):
                unsure.append(len(found_keys))
                found_keys.append(key)
                found.append(values)
        return found_keys, found, unsure

    def _hash_decode(self, found_keys: list[Key], found: list[list[bytes | None]], unsure: list[int],
                     answers: list[int], fields: list[str]) -> RawRows:
        """Rows from ``_hash_found``'s replies, the unsure keys that EXISTS ``answers`` 0 for left out."""
        if unsure:
            # One more round trip (EXISTS), for projections of sparse features only.
            gone = {i for i, n in zip(unsure, answers, strict=True) if not n}
            if gone:
                found_keys = [k for i, k in enumerate(found_keys) if i not in gone]
                found = [v for i, v in enumerate(found) if i not in gone]
        if not found:
            return {}
        dense = self._dense_rows(found_keys, found, fields)
        if dense is not None:
            return dense
        columns = list(zip(*found, strict=True))
        converted = [_convert_column(list(col), conv, ftype)
                     for col, (_, conv, ftype) in zip(columns, self._text_plan(fields, True), strict=True)]
        rows = [dict(zip(fields, row, strict=True)) for row in zip(*converted, strict=True)]
        return self._typed(found_keys, rows, fields)

    def _dense_rows(self, found_keys: list[Key], found: list[list[bytes | None]],
                    fields: list[str]) -> RawRows | None:
        """Rows whose every requested feature is present and converts, every value in one C loop (the
        column-by-column path costs a few calls per feature, more than the values at small batches);
        None when a value is null or does not convert."""
        plan = self._dense.get(tuple(fields))
        if plan is None:
            steps = self._text_plan(fields, True)
            plan = self._dense[tuple(fields)] = (
                [conv or _same for _, conv, _ in steps], [t is FeatureType.FLOAT for _, _, t in steps],
                any(t.is_list for _, _, t in steps))
        converters, floats, lists = plan
        n = len(found)
        try:
            values = list(map(call, converters * n, chain.from_iterable(found)))
        except (TypeError, ValueError, KeyError, UnicodeDecodeError, OverflowError):
            return None
        # The core refuses NaN spelled as text: a float sum is NaN when any value is (or inf - inf).
        if any(floats) and math.isnan(sum(compress(values, floats * n))):
            return None
        rows = map(zip, repeat(fields), zip(*[iter(values)] * len(fields), strict=True))
        if lists:  # list elements are checked by _typed
            return self._typed(found_keys, list(map(dict, rows)), fields)
        return dict(zip(found_keys, map(FinalRow, rows), strict=True))

    def _decode_strings(self, keys: list[Key], values: list[bytes | None], fields: list[str]) -> RawRows:
        fmt = self._format
        found_keys = [k for k, v in zip(keys, values, strict=True) if v is not None]
        if not found_keys:
            return {}
        blobs = [v for v in values if v is not None]
        if fmt != "csv":
            typed = self._packed_rows(fields).rows(blobs)
            if typed is not None:
                return dict(zip(found_keys, typed, strict=True))
        decode = _DECODERS[fmt] if fmt != "csv" else self._csv_row
        try:
            decoded = list(map(decode, blobs))  # one C loop for msgpack and json
        except _DECODE_ERRORS:
            decoded = [self._decode_one(decode, blob) for blob in blobs]
        failures: dict[Key, Any] = {}
        if not all(type(row) is dict for row in decoded):
            for key, row in zip(found_keys, decoded, strict=True):
                if type(row) is not dict:
                    failures[key] = row if isinstance(row, RowFailure) else \
                        RowFailure(f"stored {fmt} value is not a map")
            found_keys = [k for k in found_keys if k not in failures]
            decoded = [row for row in decoded if type(row) is dict]
        if fmt == "csv" and decoded:
            converted = [_convert_column(list(map(dict.get, decoded, repeat(f))), conv, ftype)
                         for f, conv, ftype in self._text_plan(fields, False)]
            decoded = [dict(zip(fields, row, strict=True)) for row in zip(*converted, strict=True)]
        out = self._typed(found_keys, decoded, fields)
        if failures:
            out.update(failures)
        return out

    def _packed_rows(self, fields: list[str]) -> PackedRows:
        key = tuple(fields)
        packed = self._packed.get(key)
        if packed is None:
            packed = self._packed[key] = PackedRows(self._format, fields,
                                                    [self.view.features[f] for f in fields])
        return packed

    def _decode_one(self, decode: Callable[[bytes], Any], blob: bytes) -> Any:
        try:
            return decode(blob)
        except _DECODE_ERRORS as exc:
            return RowFailure(f"stored value is not {self._format}: {type(exc).__name__}")

    def _csv_row(self, value: bytes) -> dict[str, str]:
        text = value.decode()
        if not text:
            return {}
        pairs = text.split(self.options.delimiter)
        row: dict[str, str] = dict(map(str.split, pairs, repeat(":"), repeat(1)))
        if "%" in text:
            row = {k: unquote(v) if "%" in v else v for k, v in row.items()}
        return row

    def _text_plan(self, fields: list[str], raw_bytes: bool) -> list[_TextStep]:
        key = (str(raw_bytes), *fields)
        plan = self._converters.get(key)
        if plan is None:
            plan = [(f, _text_converter(self.view.features[f], raw_bytes), self.view.features[f])
                    for f in fields]
            self._converters[key] = plan
        return plan

    def _typed(self, keys: list[Key], rows: list[dict[str, Any]], fields: list[str]) -> dict[Key, Any]:
        """Mark the rows whose values all have their declared types, checked with C loops, as final.

        The core's per-value loop would cost about as much as decoding a msgpack value; rows that fail
        the check (nulls, ints stored for floats, text) go through it as usual.
        """
        expected = self._expected.get(tuple(fields))
        if expected is None:
            types = [self.view.features[f].python for f in fields]
            lists = [(f, self.view.features[f].element.python) for f in fields
                     if self.view.features[f].is_list]
            expected = self._expected[tuple(fields)] = (types, lists)
        types, lists = expected
        n = len(rows)
        first = list(rows[0]) if n else []
        # msgpack interns map keys and orjson caches them, so rows share key objects: comparing every row's
        # keys with the first row's is an identity check per key.
        if (n and first == fields and list(chain.from_iterable(rows)) == first * n
                and list(map(type, chain.from_iterable(map(dict.values, rows)))) == types * n
                and all(_elements_are(etype, map(itemgetter(f), rows)) for f, etype in lists)):
            return dict(zip(keys, map(FinalRow, rows), strict=True))
        out: dict[Key, Any] = {}
        for key, row in zip(keys, rows, strict=True):
            values = list(map(row.get, fields))
            if list(map(type, values)) == types and \
                    all(_elements_are(etype, [row[f]]) for f, etype in lists):
                out[key] = FinalRow(zip(fields, values, strict=True))
            else:
                out[key] = row
        return out

    def _raise_wrongtype(self, exc: rexc.ResponseError) -> None:
        """Name the view and layout, never the key: redis-py's message quotes the whole command."""
        if "WRONGTYPE" in str(exc):
            expects = "a sorted set (sequence view)" if self.view.sequence is not None else \
                f"the {self._format!r} layout expects"
            raise BackendQueryError(
                f"WRONGTYPE: keys of view {self.view.name!r} ({self.options.key_template!r}) hold another "
                f"Redis type than {expects}",
                source=self.source.name, view=self.view.name) from exc

    # -- writes ----------------------------------------------------------------------------------------
    def _commands(self, key: Key, row: Row) -> list[tuple[Any, ...]]:
        """The commands that write one whole row (all of one key, so one slot)."""
        rk = f"{self._key_head}{key}{self._key_tail}"
        ttl = self.options.ttl_s
        present = {f: v for f, v in row.items() if v is not None}
        if self._format == "hash":
            if not present:
                return [("DEL", rk)]
            commands: list[tuple[Any, ...]] = [
                ("HSET", rk, *chain.from_iterable((f, _text(v)) for f, v in present.items()))]
            nulls = [f for f, v in row.items() if v is None]
            if nulls:
                commands.append(("HDEL", rk, *nulls))
            if ttl:
                commands.append(("EXPIRE", rk, ttl))
            return commands
        if self._format == "msgpack":
            payload: bytes | str = msgpack.packb(present)
        elif self._format == "json":
            payload = orjson.dumps(present)
        else:
            delim = self.options.delimiter
            payload = delim.join(f"{f}:{_csv_escape(_decode(self._csv_text(v)), delim)}"
                                 for f, v in present.items())
        return [("SET", rk, payload, "EX", ttl)] if ttl else [("SET", rk, payload)]

    @staticmethod
    def _csv_text(value: FeatureValue) -> str | bytes:
        text = _text(value)
        return text if isinstance(text, str | bytes) else str(text)


def _same(value: Any) -> Any:
    """A text feature's value as it came (the converter of a feature stored as it is read)."""
    return value
