"""The Redis adapter's value codecs: text values of hash fields and csv pairs, packed rows, messages."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]
import orjson

from featuredao.types import FeatureType, FeatureValue

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
