"""The Redis adapter's value codecs: text values of hash fields and csv pairs, packed rows, messages."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from itertools import chain, repeat
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]
import msgspec
import orjson

from featuredao.types import FeatureType, FeatureValue, FinalRow

_ANNOTATION = re.compile(r"^Command # \d+ \(.*\) of pipeline caused error: ", re.DOTALL)


def _detail(exc: BaseException) -> str:
    """The server's or driver's message without redis-py's pipeline annotation (it quotes keys and values)."""
    text = str(exc).strip()
    text = _ANNOTATION.sub("", text)
    return text.splitlines()[0] if text else type(exc).__name__


# -- text values (hash fields, csv pairs) ------------------------------------------------------------

_BOOL_TEXT: dict[Any, bool] = {}
for _word, _flag in (("1", True), ("true", True), ("True", True), ("0", False), ("false", False),
                     ("False", False)):
    _BOOL_TEXT[_word] = _BOOL_TEXT[_word.encode()] = _flag


def _decode(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _text_converter(ftype: FeatureType, raw_bytes: bool) -> Callable[[Any], Any] | None:
    """A C-implemented function turning stored text into the declared type (None: already text)."""
    if ftype is FeatureType.FLOAT:
        return float
    if ftype is FeatureType.INT:
        return int
    if ftype is FeatureType.BOOL:
        return _BOOL_TEXT.__getitem__
    if ftype is FeatureType.STR:
        return bytes.decode if raw_bytes else None
    return orjson.loads  # lists: JSON arrays


def _convert_column(col: list[Any], convert: Callable[[Any], Any] | None, ftype: FeatureType) -> list[Any]:
    """Convert one feature's values for a whole chunk with one C loop; leave the column raw if it fails.

    A raw column goes through the core's coercer, which converts what it can value by value and reports
    the values it cannot convert as degraded (default in their place).
    """
    if convert is None:
        return col
    try:
        out = list(map(convert, col))
    except (TypeError, ValueError, KeyError, UnicodeDecodeError, OverflowError):
        if None not in col:
            return col
        try:  # sparse feature: absent values stay None
            out = [None if v is None else convert(v) for v in col]
        except (TypeError, ValueError, KeyError, UnicodeDecodeError, OverflowError):
            return col
    # The core refuses NaN spelled as text; keep its verdict by leaving such a column to it.
    if ftype is FeatureType.FLOAT and any(map(math.isnan, filter(None, out))):
        return col
    return out


_TextStep = tuple[str, Callable[[Any], Any] | None, FeatureType]
"""One feature of a text layout: its name, the converter of its column, its type."""


def _text(value: FeatureValue) -> str | bytes | int | float:
    """How one non-null value is stored as text (hash field, csv pair)."""
    if value is True:
        return b"1"
    if value is False:
        return b"0"
    if isinstance(value, list):
        return orjson.dumps(value)
    if isinstance(value, float):
        return repr(value)
    return value  # type: ignore[return-value]


def _csv_escape(text: str, delimiter: str) -> str:
    if "%" in text:
        text = text.replace("%", "%25")
    if delimiter in text:
        text = text.replace(delimiter, f"%{ord(delimiter):02X}")
    return text


def _elements_are(etype: type[Any], lists: Iterable[list[Any]]) -> bool:
    """True when every element of every list has exactly type ``etype``."""
    want = {etype}
    return all(not v or set(map(type, v)) == want for v in lists)


_DECODERS: dict[str, Callable[[bytes], Any]] = {"msgpack": msgpack.unpackb, "json": orjson.loads}
_DECODE_ERRORS = (ValueError, TypeError, UnicodeDecodeError, msgpack.ExtraData, msgpack.FormatError,
                  msgpack.StackError)


# -- packed rows, typed in C ---------------------------------------------------------------------------

_SPEC: dict[FeatureType, Any] = {
    FeatureType.INT: int, FeatureType.FLOAT: float, FeatureType.STR: str, FeatureType.BOOL: bool,
    FeatureType.LIST_INT: list[int], FeatureType.LIST_FLOAT: list[float], FeatureType.LIST_STR: list[str]}
_PACKED_ERRORS = (msgspec.ValidationError, msgspec.DecodeError)


class PackedRows:
    """Decodes packed maps (msgpack or JSON) of some features straight into their declared types.

    msgspec checks each value's type while it decodes, in C, faster than an unchecked ``msgpack.unpackb``;
    so every value is checked (whoever wrote it) and a row of the declared types costs no Python work.
    Like the core's coercion, an int stored for a float feature is read as a float; anything else of
    another type fails the decode, and the caller falls back to the value-by-value path.
    """

    __slots__ = ("_decode", "_fields")

    def __init__(self, fmt: str, fields: list[str], types: list[FeatureType]) -> None:
        # Attribute names are positional so that any feature name (a keyword, say) can be a field.
        row = msgspec.defstruct("PackedRow", [(f"f{i}", _SPEC[t] | None, None) for i, t in enumerate(types)],
                                rename={f"f{i}": name for i, name in enumerate(fields)})
        module: Any = msgspec.msgpack if fmt == "msgpack" else msgspec.json
        self._decode: Callable[[bytes], Any] = module.Decoder(row).decode
        self._fields = fields

    def rows(self, blobs: list[bytes]) -> list[dict[str, FeatureValue]] | None:
        """Per blob its row (final where no feature is absent); None when any value has another type."""
        try:
            values = list(map(msgspec.structs.astuple, map(self._decode, blobs)))
        except _PACKED_ERRORS:
            return None
        fields = self._fields
        if None not in chain.from_iterable(values):
            return list(map(FinalRow, map(zip, repeat(fields), values)))
        # Absent features are None here; the core gives them their defaults.
        return [dict(zip(fields, v, strict=True)) if None in v else FinalRow(zip(fields, v, strict=True))
                for v in values]
