"""The per-row work of a sync job: typing source rows, transforms, dead letters.

Nothing here touches a store; :mod:`featuredao.sync.engine` moves the rows.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

from featuredao import derive
from featuredao.sync import functions
from featuredao.sync.config import FilterSpec, Step
from featuredao.types import COERCION_ERRORS, Coercion, CoercionError, Key, coerce


class StageError(Exception):
    """A record that cannot go on: it goes to the dead-letter file with its stage and reason."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


@dataclass(slots=True)
class Record:
    """One source row on its way: position in the source, key, typed row (None: deleted), change time."""

    position: Any
    key: Key
    row: dict[str, Any] | None
    ts: float | None = None


def typed(row: Mapping[str, Any], steps: Sequence[Coercion]) -> dict[str, Any]:
    """The row with every feature of the plan in its declared type; nulls stay null (no defaults).

    Raises StageError naming the feature that cannot be converted.
    """
    out: dict[str, Any] = {}
    for name, exact, convert, element, _ in steps:
        value = row.get(name)
        if value is None:
            out[name] = None
        elif (type(value) is exact if exact is not None
              else type(value) is list and all(type(x) is element for x in value)):
            out[name] = value
        else:
            try:
                out[name] = convert(value)
            except COERCION_ERRORS as exc:
                raise StageError("coerce", f"feature {name!r}: {exc}") from None
    return out


_NONE = type(None)


def _loads(value: Any) -> Any:
    return json.loads(value) if type(value) is str and value else value


def typed_many(rows: Sequence[Mapping[str, Any]],
               steps: Sequence[Coercion]) -> tuple[list[dict[str, Any] | None], dict[int, str]]:
    """``typed`` for a whole chunk, column by column: a column whose values already have their declared
    type is checked with C loops only. Returns the rows (None where a value cannot be converted) and the
    reason per failed row index."""
    errors: dict[int, str] = {}
    columns: list[list[Any]] = []
    for name, exact, convert, element, _ in steps:
        col = [r.get(name) for r in rows]
        kinds = set(map(type, col))
        kinds.discard(_NONE)
        if exact is not None:
            if kinds <= {exact}:
                columns.append(col)
                continue
        else:
            if kinds == {str}:  # lists stored as JSON text
                try:
                    col = list(map(_loads, col))
                    kinds = set(map(type, col))
                    kinds.discard(_NONE)
                except ValueError:
                    pass
            if kinds <= {list} and set(map(type, chain.from_iterable(v for v in col if v))) <= {element}:
                columns.append(col)
                continue
        out = []
        for i, value in enumerate(col):
            if value is None or (exact is not None and type(value) is exact):
                out.append(value)
                continue
            try:
                out.append(convert(value))
            except COERCION_ERRORS as exc:
                errors.setdefault(i, f"feature {name!r}: {exc}")
                out.append(None)
        columns.append(out)
    names = [step[0] for step in steps]
    typed_rows: list[dict[str, Any] | None] = [dict(zip(names, values, strict=True))
                                               for values in zip(*columns, strict=True)] if names else \
        [{} for _ in rows]
    for i in errors:
        typed_rows[i] = None
    return typed_rows, errors


class Transformer:
    """A job's transform steps, applied in order to one row."""

    def __init__(self, steps: Iterable[Step]) -> None:
        self.steps = list(steps)
        self._fns = {s.args.fn: functions.transform(s.args.fn) for s in self.steps if s.kind == "compute"}

    def __call__(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """The transformed row, or None when a step drops it; StageError when it cannot be transformed."""
        for step in self.steps:
            kind, args = step.kind, step.args
            if kind == "rename":
                for old, new in args.items():
                    if old in row:
                        row[new] = row.pop(old)
            elif kind == "cast":
                for name, ftype in args.items():
                    try:
                        row[name] = coerce(row.get(name), ftype)
                    except CoercionError as exc:
                        raise StageError("transform", f"cast {name!r} to {ftype.value}: {exc}") from None
            elif kind == "default":
                for name, value in args.items():
                    if row.get(name) is None:
                        row[name] = value
            elif kind == "drop_if_null":
                if any(row.get(name) is None for name in args):
                    return None
            elif kind == "filter":
                if not _keep(row, args):
                    return None
            elif kind == "derive":
                # One row: the serving side's op on columns of one value; what cannot be derived takes
                # the spec's default, as it does when serving.
                values, _ = derive.compute(args, [[row.get(name)] for name in args.input_names])
                row[args.name] = values[0]
            elif kind == "compute":
                fn = self._fns.get(args.fn) or functions.transform(args.fn)
                if fn is None:
                    raise StageError("transform", f"compute {args.field!r}: function {args.fn!r} is not "
                                                  "registered")
                try:
                    row[args.field] = fn(row)
                except Exception as exc:
                    raise StageError("transform", f"compute {args.field!r} with {args.fn!r}: "
                                                  f"{type(exc).__name__}: {exc}") from None
        return row


def _keep(row: Mapping[str, Any], spec: FilterSpec) -> bool:
    value = row.get(spec.field)
    op = spec.op
    if op == "is_null":
        return value is None
    if op == "not_null":
        return value is not None
    if op == "eq":
        return bool(value == spec.value)
    if op == "ne":
        return bool(value != spec.value)
    if op in ("in", "not_in"):
        try:
            inside = value in spec.value
        except TypeError:
            inside = False
        return inside if op == "in" else not inside
    try:
        if value is None or spec.value is None:
            raise TypeError("null is not ordered")
        return bool({"lt": value < spec.value, "le": value <= spec.value, "gt": value > spec.value,
                     "ge": value >= spec.value}[op])
    except TypeError as exc:
        if spec.strict:
            raise StageError("filter", f"{spec.field} {op} {spec.value!r}: cannot compare {value!r}: "
                                       f"{exc}") from None
        return False


def _plain(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            return bytes(value).hex()
    return str(value)


class DeadLetters:
    """An append-only JSON-lines file of records that could not be synced (at least once per failure)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def add(self, entries: list[dict[str, Any]]) -> None:
        """Append entries and flush them to disk."""
        if not entries:
            return
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        lines = "".join(json.dumps({"ts": stamp, **e}, ensure_ascii=False, default=_plain) + "\n"
                        for e in entries)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(lines)
                fh.flush()
                os.fsync(fh.fileno())

    def read(self) -> list[dict[str, Any]]:
        """Every entry (unparseable lines are kept as ``{"unparsed": line}``)."""
        if not self.path.exists():
            return []
        out = []
        with self.path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        out.append({"unparsed": line.rstrip("\n")})
        return out

    def count(self, job: str) -> int:
        """Entries of one job."""
        return sum(1 for e in self.read() if e.get("job") == job)

    def replace(self, entries: list[dict[str, Any]]) -> None:
        """Rewrite the file atomically with these entries (timestamps kept)."""
        with self._lock:
            tmp = self.path.with_name(self.path.name + ".tmp")
            with tmp.open("w", encoding="utf-8") as fh:
                for e in entries:
                    fh.write(json.dumps(e, ensure_ascii=False, default=_plain) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
