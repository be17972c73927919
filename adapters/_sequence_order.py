"""Byte strings that sort like sequence events: the order key HBase row keys and TableStore ties share.

``encoder(types)`` turns values of those types into bytes whose unsigned byte order is the values' order,
and no encoding is a prefix of another, so encodings of several values concatenate into a key that sorts
like the tuple. int: 8 bytes big-endian of ``v + 2**63``; float: the IEEE bits with the sign bit flipped
(every bit for negatives); str: UTF-8 with each NUL written ``00 FF`` and ``00 01`` at the end. An event
encoded as (time, item, other fields) sorts as the core's tie order, read backwards; ``invert`` turns it
into a key that sorts newest first.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from typing import Any

from featuredao.errors import CoercionError

_U64 = struct.Struct(">Q")
_BITS = struct.Struct(">d")
_SIGN = 1 << 63
_MASK = (1 << 64) - 1
_INVERT = bytes(255 - i for i in range(256))
INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1


def encode_int(value: int) -> bytes:
    """An int64 as 8 bytes that sort like the numbers."""
    if not INT_MIN <= value <= INT_MAX:
        raise CoercionError(f"{value} does not fit 8 bytes")
    return _U64.pack(value + _SIGN)


def encode_float(value: float) -> bytes:
    """A double as 8 bytes that sort like the numbers (-0.0 just below 0.0)."""
    bits = _U64.unpack(_BITS.pack(value))[0]
    return _U64.pack(bits ^ _MASK if bits & _SIGN else bits | _SIGN)


def decode_float(raw: bytes) -> float:
    """The double ``encode_float`` wrote."""
    bits = _U64.unpack(raw)[0]
    value: float = _BITS.unpack(_U64.pack(bits ^ _SIGN if bits & _SIGN else bits ^ _MASK))[0]
    return value


def encode_str(value: str) -> bytes:
    """UTF-8, NULs escaped, terminated: sorts like the strings' code points and is never a prefix."""
    return value.encode().replace(b"\x00", b"\x00\xff") + b"\x00\x01"


_ENCODERS: dict[str, Callable[[Any], bytes]] = {"int": encode_int, "float": encode_float, "str": encode_str}


def encoder(types: Sequence[str]) -> Callable[[Sequence[Any]], bytes]:
    """The order key of a tuple of values of these types (``int``, ``float``, ``str``)."""
    parts = tuple(_ENCODERS[t] for t in types)

    def encode(values: Sequence[Any]) -> bytes:
        return b"".join([f(v) for f, v in zip(parts, values, strict=True)])

    return encode


def invert(raw: bytes) -> bytes:
    """Every byte complemented: the same keys in the opposite order (still prefix-free)."""
    return raw.translate(_INVERT)


def time_bounds(kind: str, since: float | None, until: float | None) -> tuple[Any, Any] | None:
    """The window as the lowest and highest stored time of the time field's type (None: open end);
    None when no value of that type lies in it."""
    low: Any = since
    high: Any = until
    if kind == "int":
        low = None if since is None else math.ceil(since)
        high = None if until is None else math.floor(until)
        if (low is not None and low > INT_MAX) or (high is not None and high < INT_MIN):
            return None
        low = None if low is not None and low <= INT_MIN else low
        high = None if high is not None and high >= INT_MAX else high
    if low is not None and high is not None and low > high:
        return None
    return low, high
