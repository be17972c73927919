"""Serve-time derived features: small, vectorised operations on whole columns of fetched values.

A spec (``DerivedConfig``) names one operation and its inputs; ``compile`` picks the operation's loop once
per spec, and ``compute`` runs it on one column per input. Bad data never raises: a value that cannot be
derived (a None or NaN input, a wrong type, a log of x <= -1...) becomes the spec's ``default`` and its
index is reported as failed.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import math
import re
import time
import weakref
from bisect import bisect_right
from collections.abc import Callable, Iterable
from functools import cache, lru_cache, partial
from operator import truediv
from typing import Annotated, Any, Literal, TypeAlias, get_args

from pydantic import Field, FiniteFloat, StringConstraints, model_validator
from pydantic_core import PydanticCustomError

from featuredao.errors import UsageError
from featuredao.types import FeatureType, FeatureValue
from featuredao.validation import Identifier, StrictModel

Op: TypeAlias = Literal["log1p", "clip", "bucketize", "hash_bucket", "cross", "ratio", "hour_of_day",
                        "day_of_week", "days_since", "in", "python"]
OPS: tuple[str, ...] = get_args(Op)
"""The operation names, in documentation order."""

Compiled: TypeAlias = Callable[[list[list[Any]], float], tuple[list[FeatureValue], list[int]]]
"""A compiled spec: (one column per input, now in epoch seconds) -> (output column, failed indices)."""

# The output type of every op but python (whose type the config must declare).
_OUTPUT: dict[str, FeatureType] = {
    "log1p": FeatureType.FLOAT, "clip": FeatureType.FLOAT, "ratio": FeatureType.FLOAT,
    "cross": FeatureType.STR, "in": FeatureType.BOOL,
    **dict.fromkeys(("bucketize", "hash_bucket", "hour_of_day", "day_of_week", "days_since"),
                    FeatureType.INT),
}
# Ops on ``inputs``: (at least, at most) names and what they are; python takes ``input`` or ``inputs``.
_MANY: dict[str, tuple[int, int | None, str]] = {
    "cross": (2, None, ""), "python": (1, None, ""),
    "ratio": (2, 2, " [numerator, denominator]"), "in": (2, 2, " [value, list_feature]"),
}
_PARAMS = {"min": "clip", "max": "clip", "boundaries": "bucketize", "buckets": "hash_bucket", "fn": "python"}
_FN = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_NUMBERS = {int, float}
# What a per-value function raises for a value it cannot derive (UnicodeError is a ValueError).
_BAD = (TypeError, ValueError, ArithmeticError)
# datetime's range (years 1..9999): beyond it "epoch seconds" are garbage (often milliseconds).
_EPOCH_MIN, _EPOCH_MAX = -62_135_596_800, 253_402_300_800

InputName = Annotated[str, StringConstraints(min_length=1)]
"""A column of the request: ``price``, ``user.city``, ``context.hour`` (resolved by the caller)."""


class DerivedConfig(StrictModel):
    """One derived feature: an operation on named inputs, computed on the rows of ``entity``."""

    name: Identifier
    entity: Identifier
    """The rows it is computed on: ``item``, ``user`` or another entity's name."""
    op: Op
    input: InputName | None = None
    inputs: list[InputName] | None = None
    default: Any = None
    """The value of a row that cannot be derived (and of ``ratio`` by zero)."""
    min: FiniteFloat | None = None
    max: FiniteFloat | None = None
    boundaries: list[FiniteFloat] | None = None
    """bucketize: strictly increasing; x < b[0] is bucket 0, b[i-1] <= x < b[i] is bucket i."""
    buckets: int | None = Field(default=None, gt=0)
    fn: str | None = None
    """python: ``module:function``, called with one list per input; returns a list as long."""
    type: FeatureType | None = None
    """The output type; inferred for every op but python."""

    @model_validator(mode="before")
    @classmethod
    def _infer_type(cls, data: Any) -> Any:
        # Filled in before validation so that the model (and its dump) always states its output type.
        if isinstance(data, dict) and data.get("type") is None and isinstance(data.get("op"), str):
            inferred = _OUTPUT.get(data["op"])
            if inferred is not None:
                return {**data, "type": inferred}
        return data

    @model_validator(mode="after")
    def _check_op(self) -> DerivedConfig:
        # Every problem at once, in one message: the caller shows it at the spec's JSON path.
        op, problems = self.op, self._input_problems()
        problems += [f"{p!r} is not a parameter of op {op!r}" for p, owner in _PARAMS.items()
                     if owner != op and getattr(self, p) is not None]
        problems += [f"op {op!r} needs {p!r}" for p, owner in _PARAMS.items()
                     if owner == op != "clip" and getattr(self, p) is None]
        if op == "clip" and self.min is None and self.max is None:
            problems.append("op 'clip' needs 'min' and/or 'max'")
        if self.min is not None and self.max is not None and self.min > self.max:
            problems.append(f"'min' ({self.min}) is greater than 'max' ({self.max})")
        if self.boundaries is not None and not self.boundaries:
            problems.append("'boundaries' needs at least one value")
        if self.boundaries and any(a >= b for a, b in itertools.pairwise(self.boundaries)):
            problems.append("'boundaries' must be strictly increasing")
        if self.fn is not None and not _FN.match(self.fn):
            problems.append(f"'fn' must be 'module:function' (got {self.fn!r})")
        out = _OUTPUT.get(op)
        if self.type is None:
            problems.append(f"op {op!r} needs 'type' (the output type)")
        elif out is not None and self.type is not out:
            problems.append(f"op {op!r} produces {out.value}, not {self.type.value}: "
                            f"leave 'type' out or set it to {out.value!r}")
        elif self.default is not None and not _fits(self.default, self.type):
            problems.append(f"'default' {self.default!r} is not of type {self.type.value}")
        if problems:  # a custom error: its message is the problems alone, without "Value error, "
            raise PydanticCustomError("derived_feature", "{problems}", {"problems": "; ".join(problems)})
        return self

    def _input_problems(self) -> list[str]:
        op, many = self.op, _MANY.get(self.op)
        if self.input is not None and self.inputs is not None:
            return [f"op {op!r} takes 'input' or 'inputs', not both"]
        if many is None:
            if self.inputs is not None:
                return [f"op {op!r} takes one 'input', not 'inputs'"]
            return [] if self.input is not None else [f"op {op!r} needs 'input'"]
        low, high, what = many
        n = len(self.inputs or ())
        if (op == "python" and self.input is not None) or (low <= n and (high is None or n <= high)):
            return []
        count = f"exactly {low}" if low == high else f"at least {low}"
        got = "'input'" if self.input is not None else n
        return [f"op {op!r} needs 'inputs' with {count} name{'s' if low > 1 else ''}{what} (got {got})"]

    @property
    def output_type(self) -> FeatureType:
        """The type of the values this spec produces (declared or inferred)."""
        return self.type or _OUTPUT[self.op]

    @property
    def input_names(self) -> list[str]:
        """The inputs in column order (``compute`` takes one column per name)."""
        return [self.input] if self.input is not None else list(self.inputs or ())


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


_ELEMENT: dict[FeatureType, Callable[[Any], bool]] = {
    FeatureType.INT: lambda v: isinstance(v, int) and not isinstance(v, bool), FeatureType.FLOAT: _is_num,
    FeatureType.STR: lambda v: isinstance(v, str), FeatureType.BOOL: lambda v: isinstance(v, bool),
}


def _fits(v: Any, ftype: FeatureType) -> bool:
    check = _ELEMENT[ftype.element]
    return isinstance(v, list) and all(map(check, v)) if ftype.is_list else check(v)


def _num(v: Any) -> Any:
    # bool is an int to Python but never a number here; NaN is "no value", not a number to derive from.
    if not _is_num(v):
        raise TypeError(f"{type(v).__name__} is not a number")
    if v != v:
        raise ValueError("NaN")
    return v


def _epoch(v: Any) -> Any:
    t = _num(v)
    if not _EPOCH_MIN <= t < _EPOCH_MAX:
        raise ValueError(f"{t!r} is not epoch seconds")
    return t


def _text(v: Any) -> str:
    """The canonical text of a scalar (digits, float repr, true/false): the same on every machine."""
    if isinstance(v, str):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return int.__repr__(v)  # not str(): an IntEnum's str is its name
    if isinstance(v, float) and v == v:
        return float.__repr__(v)
    raise TypeError(f"{type(v).__name__} has no canonical text")


_MEMO = 65_536  # values memoised per hash_bucket spec (ids and categories come back request after request)


@lru_cache(maxsize=_MEMO)  # the per-value path: hash each text once
def _hash(text: str, buckets: int) -> int:
    # A fixed digest, not hash(): Python salts str hashes per process (PYTHONHASHSEED).
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") % buckets


def _member(v: Any, values: Any) -> bool:
    _text(v)  # a scalar that is not None or NaN
    if not isinstance(values, list | tuple):
        raise TypeError(f"{type(values).__name__} is not a list")
    if isinstance(v, bool):
        return any(x is v for x in values)  # else True would be found in [1]
    return v in values


def _clip(v: Any, lo: float | None, hi: float | None) -> float:
    x = _num(v)  # compared before float(): a huge int above max clips rather than overflows
    return hi if hi is not None and x > hi else lo if lo is not None and x < lo else float(x)


def _ratio(a: Any, b: Any, default: FeatureValue) -> FeatureValue:
    x, y = _num(a), _num(b)
    if y == 0:
        if default is None:
            raise ZeroDivisionError("division by zero and no default")
        return default
    r: float = x / y
    if r != r:  # inf / inf
        raise ValueError("NaN")
    return r


def _check(v: Any, ftype: FeatureType) -> FeatureValue:
    """A python op's value as ``ftype`` (ints widen to float), else TypeError."""
    if v is None or not _fits(v, ftype):
        raise TypeError(f"{v!r:.40} is not a {ftype.value}")
    if ftype is FeatureType.FLOAT:
        return float(_num(v))
    return [float(x) for x in v] if ftype is FeatureType.LIST_FLOAT else v


def _each(fn: Callable[[Any], FeatureValue], values: Iterable[Any], default: FeatureValue
          ) -> tuple[list[FeatureValue], list[int]]:
    """The one loop of every op: ``fn`` per value, ``default`` and a failed index where it raises."""
    out: list[FeatureValue] = []
    failed: list[int] = []
    append = out.append
    for i, v in enumerate(values):
        try:
            append(fn(v))
        except _BAD:
            append(default)
            failed.append(i)
    return out, failed


@cache
def load(fn: str) -> Callable[..., Any]:
    """The function ``module:function`` names, imported once (raises UsageError)."""
    module, _, attr = fn.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # a module that fails while importing is as unusable as a missing one
        raise UsageError(f"cannot load derived-feature function {fn!r}: "
                         f"{type(exc).__name__}: {exc}") from exc
    if not callable(obj):
        raise UsageError(f"derived-feature function {fn!r} is not callable")
    return obj  # type: ignore[no-any-return]


def _python(fn: Callable[..., Any], ftype: FeatureType, default: FeatureValue) -> Compiled:
    def run(columns: list[list[Any]], now: float) -> tuple[list[FeatureValue], list[int]]:
        n = len(columns[0])
        try:
            result = fn(*columns)
            ok = isinstance(result, list | tuple) and len(result) == n
        except Exception:  # user code: whatever it raises fails the column, never the request
            ok = False
        return _each(lambda v: _check(v, ftype), result, default) if ok else ([default] * n, list(range(n)))

    return run


def _clean(column: list[Any]) -> bool:
    """Every value an int or a float and none NaN: the C-level paths below may run."""
    kinds = set(map(type, column))
    return kinds <= _NUMBERS and not (float in kinds and any(map(math.isnan, column)))


def _texts(column: list[Any]) -> list[str] | None:
    """The canonical texts of a column of only str or only int (C-level maps), else None."""
    kinds = set(map(type, column))
    if kinds <= {str}:
        return column
    if kinds == {int}:
        return list(map(int.__repr__, column))
    return None


def _fast(c_path: Callable[[list[list[Any]]], list[FeatureValue] | None], slow: Compiled) -> Compiled:
    """Try the whole column in C first (the usual clean batch); any doubt falls back to the per-value loop."""
    def run(cols: list[list[Any]], now: float) -> tuple[list[FeatureValue], list[int]]:
        try:
            out = c_path(cols)
        except _BAD:
            out = None
        return (out, []) if out is not None else slow(cols, now)

    return run


def _hashed(buckets: int) -> Callable[[list[list[Any]]], list[FeatureValue] | None]:
    """hash_bucket's C-level path: a column of only str or only int looked up in the spec's own memo.

    Keyed by the value itself, not its text: a warm request is one ``map`` over a dict (an lru_cache hit
    per value, with its key tuple and recency list, cost ~20 times as much). An int and a str of the same
    text share a bucket either way.
    """
    known: dict[Any, int] = {}

    def run(cols: list[list[Any]]) -> list[FeatureValue] | None:
        column = cols[0]
        kinds = set(map(type, column))
        if not (kinds <= {str} or kinds == {int}):
            return None
        try:
            return list(map(known.__getitem__, column))
        except KeyError:
            pass
        text: Callable[[Any], str] = str if kinds <= {str} else int.__repr__
        # A local table for this column: another thread may clear the memo meanwhile.
        table = {v: _hash(text(v), buckets) if (h := known.get(v)) is None else h
                 for v in dict.fromkeys(column)}
        if len(known) + len(table) > _MEMO:
            known.clear()
        known.update(table)
        return list(map(table.__getitem__, column))

    return run


def _build(spec: DerivedConfig) -> Compiled:
    slow = _build_slow(spec)
    lo, hi, bounds, n = spec.min, spec.max, tuple(spec.boundaries or ()), spec.buckets or 1
    op = spec.op
    if op == "log1p":
        return _fast(lambda cols: list(map(math.log1p, cols[0])) if _clean(cols[0]) else None, slow)
    if op == "bucketize":
        return _fast(lambda cols: list(map(partial(bisect_right, bounds), cols[0])) if _clean(cols[0])
                     else None, slow)
    if op == "clip" and lo is not None and hi is not None:
        return _fast(lambda cols: [float(min(max(x, lo), hi)) for x in cols[0]] if _clean(cols[0])
                     else None, slow)
    if op == "ratio":
        def ratio(cols: list[list[Any]]) -> list[FeatureValue] | None:
            a, b = cols
            if not (_clean(a) and _clean(b)) or 0 in b:
                return None
            out: list[FeatureValue] = list(map(truediv, a, b))
            return None if any(map(math.isnan, out)) else out  # type: ignore[arg-type]
        return _fast(ratio, slow)
    if op == "cross":
        def cross(cols: list[list[Any]]) -> list[FeatureValue] | None:
            texts = [_texts(c) for c in cols]
            if any(t is None for t in texts):
                return None
            return list(map("_".join, zip(*texts, strict=True)))
        return _fast(cross, slow)
    if op == "hash_bucket":
        return _fast(_hashed(n), slow)
    return slow


def _build_slow(spec: DerivedConfig) -> Compiled:
    # One closure per op, chosen here once: the per-value work never looks at the op's name.
    d: FeatureValue = float(spec.default) if spec.output_type is FeatureType.FLOAT and _is_num(spec.default) \
        else spec.default
    op, lo, hi, bounds, n = spec.op, spec.min, spec.max, tuple(spec.boundaries or ()), spec.buckets or 1
    if op == "log1p":
        return lambda cols, now: _each(lambda v: math.log1p(_num(v)), cols[0], d)
    if op == "clip":
        return lambda cols, now: _each(lambda v: _clip(v, lo, hi), cols[0], d)
    if op == "bucketize":
        return lambda cols, now: _each(lambda v: bisect_right(bounds, _num(v)), cols[0], d)
    if op == "hash_bucket":
        return lambda cols, now: _each(lambda v: _hash(_text(v), n), cols[0], d)
    if op == "cross":
        return lambda cols, now: _each(lambda vs: "_".join(map(_text, vs)), zip(*cols, strict=True), d)
    if op == "ratio":
        return lambda cols, now: _each(lambda ab: _ratio(ab[0], ab[1], d), zip(*cols, strict=True), d)
    if op == "hour_of_day":
        return lambda cols, now: _each(lambda v: int(_epoch(v) // 3600 % 24), cols[0], d)
    if op == "day_of_week":  # 1970-01-01 was a Thursday (3)
        return lambda cols, now: _each(lambda v: int((_epoch(v) // 86400 + 3) % 7), cols[0], d)
    if op == "days_since":  # whole days elapsed, floored: negative for a time after now
        return lambda cols, now: _each(lambda v: int((now - _epoch(v)) // 86400), cols[0], d)
    if op == "in":
        return lambda cols, now: _each(lambda vl: _member(*vl), zip(*cols, strict=True), d)
    return _python(load(spec.fn or ""), spec.output_type, d)


_COMPILED: dict[int, Compiled] = {}


def compile(spec: DerivedConfig) -> Compiled:
    """The spec's vectorised function, built once per spec object (python: imports ``fn``)."""
    # By identity: specs are unhashable (list fields); an entry leaves with its spec, before its id is reused.
    compiled = _COMPILED.get(id(spec))
    if compiled is None:
        compiled = _COMPILED[id(spec)] = _build(spec)
        weakref.finalize(spec, _COMPILED.pop, id(spec), None)
    return compiled


def compute(spec: DerivedConfig, columns: list[list[Any]], now: float | None = None
            ) -> tuple[list[FeatureValue], list[int]]:
    """The output column and the failed indices (which hold ``spec.default``); one column per input."""
    names = spec.input_names
    if len(columns) != len(names):
        raise UsageError(f"derived feature {spec.name!r} takes {len(names)} column(s) ({', '.join(names)}), "
                         f"got {len(columns)}")
    if len({len(c) for c in columns}) > 1:
        raise UsageError(f"derived feature {spec.name!r}: columns of different lengths "
                         f"{[len(c) for c in columns]}")
    return compile(spec)(columns, time.time() if now is None else now)
