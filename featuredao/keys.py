"""Entity keys: what a view accepts as a key, normalised once, and a marker for those it cannot accept.

A key that cannot be a key of the view (None, NaN, a bool, a float with a fraction, bytes for an int
view, a container, an int outside the stores' 64-bit range, text over ``MAX_KEY_LENGTH``) is never sent
to a store: it stays in its place as an :class:`InvalidKey`, is answered as missing, and is listed in
a degraded entry with the reason ``invalid_key``. Every other key of the batch is served as usual.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Any

from featuredao.errors import ArgumentTypeError, UsageError
from featuredao.types import Key

MAX_KEY_LENGTH = 1024
"""Longest text key (characters); longer ones are invalid rather than a store error."""
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
_DIGITS = re.compile(r"-?[0-9]+")


class InvalidKey:
    """Stands in place of a key a view cannot accept: hashable, equal only to itself, never read."""

    __slots__ = ("shown",)

    def __init__(self, value: Any) -> None:
        text = repr(value)
        self.shown = text if len(text) <= 40 else text[:37] + "..."

    def __repr__(self) -> str:
        return f"<invalid key {self.shown}>"


def _to_int(k: Any) -> Key:
    kind = type(k)
    value: int
    if kind is int:
        value = k
    elif (kind is str and _DIGITS.fullmatch(k.strip())) or (kind is float and math.isfinite(k)
                                                             and k.is_integer()):
        value = int(k)
    else:
        raise UsageError(f"{k!r} is not an integer key")
    if not INT64_MIN <= value <= INT64_MAX:
        raise UsageError(f"{k!r} is outside the 64-bit range of integer keys")
    return value


def _to_str(k: Any) -> Key:
    kind = type(k)
    text: str
    if kind is str:
        text = k
    elif kind is int:
        text = str(k)
    elif kind is bytes:
        try:
            text = k.decode()
        except UnicodeDecodeError:
            raise UsageError(f"{k!r} is not UTF-8 text") from None
    else:
        raise UsageError(f"{k!r} is not a text key")
    if len(text) > MAX_KEY_LENGTH:
        raise UsageError(f"a key of {len(text)} characters is longer than {MAX_KEY_LENGTH}")
    return text


def sequence_of_keys(keys: Any, name: str = "keys") -> None:
    """A str or bytes where a sequence of keys belongs is an ArgumentTypeError, not one key per character."""
    if isinstance(keys, str | bytes | bytearray):
        raise ArgumentTypeError(f"{name} must be a sequence of keys, not one str or bytes "
                                f"(got {keys[:40]!r}; one key is [key])")


def normaliser(key_type: str) -> Callable[[Any], Key]:
    """The function that brings a caller's key to the view's key type (UsageError when it cannot)."""
    return _to_int if key_type == "int" else _to_str


def normalise(keys: Iterable[Any], norm: Callable[[Any], Key],
              exact: type[Any]) -> tuple[list[Key], list[str]]:
    """Keys in the view's type, in place; an :class:`InvalidKey` where one cannot be a key.

    Returns the keys and the shown form of those found invalid here (an ``InvalidKey`` passed in from an
    outer layer stays as it is and is not reported again). ``exact`` is the view's key type: a batch
    already of that type (the usual case) is checked with C loops only. ``keys`` given as one str or
    bytes is an ``ArgumentTypeError``.
    """
    sequence_of_keys(keys)  # every read path (read_view, a DAO's read, the caches) comes through here
    keys = list(keys)
    if set(map(type, keys)) == {exact} and (exact is not int or (
            min(keys) >= INT64_MIN and max(keys) <= INT64_MAX)) and (
            exact is not str or max(map(len, keys)) <= MAX_KEY_LENGTH):
        return keys, []
    out: list[Key] = []
    bad: list[str] = []
    for k in keys:
        if type(k) is InvalidKey:
            out.append(k)  # type: ignore[arg-type]  # reported where it was found
            continue
        try:
            out.append(norm(k))
        except UsageError:
            marker = InvalidKey(k)
            out.append(marker)  # type: ignore[arg-type]  # a placeholder: never read, answered missing
            bad.append(marker.shown)
    return out, bad


def readable(keys: Iterable[Key]) -> list[Key]:
    """Distinct keys to send to a store, in first-seen order: every ``InvalidKey`` left out."""
    items: Iterable[object] = dict.fromkeys(keys)
    return [k for k in items if type(k) is not InvalidKey]  # type: ignore[misc]


def valid(key: object) -> bool:
    """False for an ``InvalidKey`` placeholder."""
    return type(key) is not InvalidKey
