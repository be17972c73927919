"""Value types, rows and batch results shared by every part of featuredao."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple, TypeAlias

# Born here, now in errors (the leaf); still importable from here.
from featuredao.errors import CoercionError as CoercionError
from featuredao.errors import Degraded as Degraded
from featuredao.errors import Reason as Reason

Key: TypeAlias = str | int
"""An entity key (user id, item id) after normalisation to the view's key type."""

FeatureValue: TypeAlias = int | float | str | bool | list[int] | list[float] | list[str] | None
Row: TypeAlias = dict[str, FeatureValue]
"""One entity's features, by store field name."""


class FeatureType(StrEnum):
    """The value types a feature can declare."""

    INT = "int"
    FLOAT = "float"
    STR = "str"
    BOOL = "bool"
    LIST_INT = "list[int]"
    LIST_FLOAT = "list[float]"
    LIST_STR = "list[str]"

    @property
    def is_list(self) -> bool:
        """True for the list types."""
        return self.value.startswith("list[")

    @property
    def element(self) -> FeatureType:
        """The element type of a list type (the type itself for scalars)."""
        return FeatureType(self.value[5:-1]) if self.is_list else self

    @property
    def python(self) -> type[Any]:
        """The exact Python type of a value (``list`` for the list types)."""
        return list if self.is_list else _PYTHON[self.value]


_PYTHON: dict[str, type[Any]] = {"int": int, "float": float, "str": str, "bool": bool}


def _to_int(v: Any) -> int:
    if type(v) is int:
        return v
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float):
        if not v.is_integer():
            raise CoercionError(f"{v!r} is not an integer")
        return int(v)
    if isinstance(v, bytes | bytearray | memoryview):
        v = bytes(v).decode()
    if isinstance(v, str):
        return int(v.strip())
    # Decimal and numpy scalars land here.
    f = float(v)
    if not f.is_integer():
        raise CoercionError(f"{v!r} is not an integer")
    return int(f)


def _to_float(v: Any) -> float:
    if type(v) is float:
        return v
    if isinstance(v, bytes | bytearray | memoryview):
        v = bytes(v).decode()
    return float(v)


def _to_str(v: Any) -> str:
    if type(v) is str:
        return v
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v).decode()
    if isinstance(v, bool | int | float):
        return str(v)
    raise CoercionError(f"{type(v).__name__} is not text")


_TRUE = frozenset({"1", "true", "t", "yes", "y"})
_FALSE = frozenset({"0", "false", "f", "no", "n", ""})


def _to_bool(v: Any) -> bool:
    if type(v) is bool:
        return v
    if isinstance(v, int | float):
        if v in (0, 1):
            return bool(v)
        raise CoercionError(f"{v!r} is not a boolean")
    if isinstance(v, bytes | bytearray | memoryview):
        v = bytes(v).decode()
    if isinstance(v, str):
        s = v.strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
    raise CoercionError(f"{v!r} is not a boolean")


_SCALAR: dict[FeatureType, Callable[[Any], Any]] = {
    FeatureType.INT: _to_int,
    FeatureType.FLOAT: _to_float,
    FeatureType.STR: _to_str,
    FeatureType.BOOL: _to_bool,
}


def _list_coercer(element: Callable[[Any], Any]) -> Callable[[Any], list[Any]]:
    def coerce_list(v: Any) -> list[Any]:
        if isinstance(v, bytes | bytearray | memoryview):
            v = bytes(v).decode()
        if isinstance(v, str):
            # Lists are stored as JSON text where the store has no array type.
            try:
                v = json.loads(v) if v else []
            except ValueError as exc:
                raise CoercionError(f"{v[:40]!r} is not a JSON list") from exc
        if not isinstance(v, list | tuple):
            raise CoercionError(f"{type(v).__name__} is not a list")
        return [element(x) for x in v]

    return coerce_list


def coercer(ftype: FeatureType) -> Callable[[Any], FeatureValue]:
    """Return the function that converts a stored value to ``ftype`` (raises CoercionError)."""
    if ftype.is_list:
        return _list_coercer(_SCALAR[ftype.element])
    return _SCALAR[ftype]


class Coercion(NamedTuple):
    """How one feature reaches its declared type (a tuple: plans are unpacked in per-row loops)."""

    name: str
    exact: type[Any] | None
    """The scalar type a value needs no conversion in (None for lists: their elements need checking)."""
    convert: Callable[[Any], FeatureValue]
    """The coercer (raises CoercionError, TypeError, ValueError...)."""
    element: type[Any] | None
    """The exact element type of a list feature (None for scalars)."""
    default: FeatureValue
    """What a null or unconvertible value becomes where defaults apply."""


COERCION_ERRORS = (CoercionError, TypeError, ValueError, UnicodeDecodeError, OverflowError)
"""What a coercer may raise for a value it cannot convert."""


def coercion_plan(features: Mapping[str, FeatureType],
                  defaults: Mapping[str, FeatureValue] | None = None) -> tuple[Coercion, ...]:
    """The one plan every part uses to bring stored values to the declared types, in feature order."""
    defaults = defaults or {}
    return tuple(Coercion(name, None if t.is_list else t.python, coercer(t),
                      t.element.python if t.is_list else None, defaults.get(name))
                 for name, t in features.items())


def coerce(value: Any, ftype: FeatureType) -> FeatureValue:
    """Convert one stored value to ``ftype``; ``None`` stays ``None``."""
    if value is None:
        return None
    try:
        return coercer(ftype)(value)
    except CoercionError:
        raise
    except (TypeError, ValueError, UnicodeDecodeError, OverflowError) as exc:
        raise CoercionError(str(exc)) from exc


def fits(value: Any, ftype: FeatureType) -> bool:
    """True when ``value`` (a config default) is already of type ``ftype``."""
    scalar: dict[FeatureType, Callable[[Any], bool]] = {
        FeatureType.INT: lambda v: isinstance(v, int) and not isinstance(v, bool),
        FeatureType.FLOAT: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        FeatureType.STR: lambda v: isinstance(v, str),
        FeatureType.BOOL: lambda v: isinstance(v, bool),
    }
    if value is None:
        return True
    if ftype.is_list:
        check = scalar[ftype.element]
        return isinstance(value, list) and all(check(x) for x in value)
    return scalar[ftype](value)


@dataclass(slots=True)
class BatchResult(Sequence[Row | None]):
    """Rows aligned with the requested keys (``None`` = missing) plus what was degraded."""

    keys: list[Key]
    rows: list[Row | None]
    degraded: list[Degraded] = field(default_factory=list)
    elapsed_s: float = 0.0
    failed: list[Key] = field(default_factory=list)
    """Keys the store could not serve (``read_partial`` only); their rows are None."""
    error: BaseException | None = None
    """The first failure behind ``failed``."""

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Any) -> Any:
        return self.rows[index]

    def __iter__(self) -> Iterator[Row | None]:
        return iter(self.rows)

    def as_dict(self) -> dict[Key, Row | None]:
        """Rows by key (duplicates collapse)."""
        return dict(zip(self.keys, self.rows, strict=True))

    @property
    def found(self) -> int:
        """How many requested positions hold a row."""
        return sum(r is not None for r in self.rows)


class FinalRow(dict[str, "FeatureValue"]):
    """A backend's row of exactly the requested features, in order, each of its declared type, no None.

    The shared coercion would return it unchanged, so BaseDao passes it through: a typed store then costs
    no per-value Python work (the backend checks whole columns or rows in C instead).
    """

    __slots__ = ()


class RowFailure:
    """Returned by a backend in place of a row that failed on its own (per-row errors)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"RowFailure({self.reason!r})"


RawRows: TypeAlias = Mapping[Key, "Mapping[str, Any] | RowFailure"]
"""What a backend's batch method returns: raw stored values by key; absent keys are missing."""

Rows: TypeAlias = Sequence[tuple[Key, Mapping[str, FeatureValue]]]
"""What an upsert takes: (key, features) pairs."""
