"""One request of ``FeatureService``: the keys each view reads, and the rows the answers build.

A request runs in stages (``featuredao.stages``); each stage's parts are read concurrently, then their
rows are merged into the request's rows: the user's, one per item, one per other request-level entity.
A view keyed by features (``key_from``) reads each distinct key of its stage once and its rows join the
rows they were keyed by. Planning and merging live here so that ``fetch`` and ``afetch`` share them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, cast

from featuredao.config import View
from featuredao.dao import FeatureDao
from featuredao.derive import DerivedConfig, compute
from featuredao.errors import reason_of
from featuredao.keys import valid
from featuredao.stages import reference
from featuredao.types import BatchResult, Degraded, FeatureValue, FinalRow, Key, Reason, Row

log = logging.getLogger("featuredao")

Shape = tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, FeatureValue], ...], dict[str, FeatureValue]]


@dataclass(slots=True)
class Part:
    """One view's read within one request."""

    dao: FeatureDao
    keys: list[Key]
    timeout_s: float
    rows: list[int | None] | None = None
    """With ``key_from``: per row of the view's entity, the index of its key in ``keys`` (None: no key)."""
    first: bool = True
    """Starts at once (first of its lane): the service may give up on it after its own timeout."""
    as_of: float | None = None
    """The request's time (``context.request_time``): where a sequence view's window ends."""

    @property
    def view(self) -> View:
        return self.dao.view


@dataclass
class Request:
    """The rows of one request as its views answer, and what was missing or degraded."""

    user_id: Key | None
    item_ids: list[Key]
    keys: dict[str, Key]
    """Request-level entities other than user and item: entity -> key."""
    user: dict[str, FeatureValue] = field(default_factory=dict)
    items: list[dict[str, FeatureValue]] = field(default_factory=list)
    entities: dict[str, dict[str, FeatureValue]] = field(default_factory=dict)
    missing: dict[str, list[Key]] = field(default_factory=dict)
    degraded: list[Degraded] = field(default_factory=list)
    as_of: float | None = None
    """The request's time, when it gave one (``context.request_time``, epoch seconds)."""

    def __post_init__(self) -> None:
        self.items = [{} for _ in self.item_ids]

    def rows_of(self, entity: str) -> list[dict[str, FeatureValue]]:
        """The request's rows of an entity (one for user and the other request-level entities)."""
        if entity == "item":
            return self.items
        if entity == "user":
            return [self.user]
        return [self.entities.setdefault(entity, {})]

    def own_key(self, entity: str, row: int) -> Key | None:
        """The request's key of an entity (for items, the id of row ``row``)."""
        if entity == "item":
            return self.item_ids[row]
        if entity == "user":
            return self.user_id
        return self.keys.get(entity)

    def part(self, dao: FeatureDao, timeout_s: float, own_keys: Mapping[str, set[str]]) -> Part | None:
        """What ``dao`` reads in this request (None: nothing, e.g. no user given)."""
        view = dao.view
        if not view.key_from:
            if view.entity == "item":
                return Part(dao, list(self.item_ids), timeout_s, as_of=self.as_of) if self.item_ids else None
            key = self.own_key(view.entity, 0)
            return None if key is None else Part(dao, [key], timeout_s, as_of=self.as_of)
        targets = self.rows_of(view.entity)
        if view.entity == "item" and not targets:
            return None
        columns = [self._key_column(ref, view.entity, targets, own_keys) for ref in view.key_from]
        sep = view.key_separator
        keys: list[Any] = columns[0] if len(columns) == 1 else [
            _composite(parts, sep) for parts in zip(*columns, strict=True)]
        distinct: dict[Key, int] = {}
        index: list[int | None] = []
        append = index.append
        for key in keys:
            # A missing or null key value (or a list, which cannot be a key) gives the view's defaults.
            append(None if key is None or isinstance(key, list | dict)
                   else distinct.setdefault(key, len(distinct)))
        return Part(dao, list(distinct), timeout_s, index, as_of=self.as_of)

    def _key_column(self, ref: str, entity: str, targets: list[dict[str, FeatureValue]],
                    own_keys: Mapping[str, set[str]]) -> list[Any]:
        """One part of the key, per row of ``entity``: a request key or a feature of an earlier stage."""
        owner, name = reference(ref)
        if name in own_keys.get(owner, ()):
            if owner == entity:
                return [self.own_key(owner, i) for i in range(len(targets))]
            return [self.own_key(owner, 0)] * len(targets)
        if owner == entity:
            return list(map(dict.get, targets, repeat(name)))
        return [self.rows_of(owner)[0].get(name)] * len(targets)

    def absorb(self, part: Part, outcome: BatchResult | BaseException | None, shape: Shape,
               now: float | None = None) -> None:
        """Merge one part's answer (or failure: None means late) into the request's rows."""
        view = part.view
        rows: Sequence[Row | None]
        if isinstance(outcome, BatchResult):
            rows = outcome.rows
            self.degraded.extend(outcome.degraded)
            failed = set(outcome.failed)
            rows = self._fresh(view, rows, now)
            # The answer's keys, not the part's: normalised, an InvalidKey where one could not be a key.
            lost = [k for k, r in zip(outcome.keys, rows, strict=True)
                    if r is None and valid(k) and k not in failed]
            if lost:
                self.missing.setdefault(view.name, []).extend(dict.fromkeys(lost))
        else:
            rows = [None] * len(part.keys)
            self.degraded.append(failure(part, outcome))
        built = output_rows(shape, rows)
        targets = self.rows_of(view.entity)
        if part.rows is None:
            if view.entity == "item" and not any(targets):
                self.items = built  # the first view of the items: its rows are the request's rows
                return
            for target, values in zip(targets, built, strict=True):
                target.update(values)
            return
        default = shape[3]
        for target, slot in zip(targets, part.rows, strict=True):
            target.update(default if slot is None else built[slot])

    def derive(self, specs: Sequence[DerivedConfig], context: Mapping[str, FeatureValue],
               own_keys: Mapping[str, set[str]]) -> None:
        """Compute the derived features in order, one column per input, over each entity's rows."""
        now = time.time()
        for spec in specs:
            rows = self.rows_of(spec.entity)
            if not rows or (spec.entity == "user" and self.user_id is None) or (
                    spec.entity not in ("user", "item") and spec.entity not in self.keys):
                continue  # the request has no row of that entity
            columns = [self._column(name, spec.entity, rows, context, own_keys) for name in spec.input_names]
            values, failed = compute(spec, columns, now)
            if len(values) != len(rows):
                raise ValueError(f"derived feature {spec.name!r}: {len(values)} values for {len(rows)} rows")
            list(map(dict.__setitem__, rows, repeat(spec.name), values))  # one C loop
            # A null input (a missing row, a null feature) gives the default quietly: it is not a failure
            # of the computation, and missing rows are reported where they are missing.
            failed = [i for i in failed if all(column[i] is not None for column in columns)]
            if failed:
                self.degraded.append(Degraded(spec.name, Reason.DERIVE_ERROR,
                                              f"{len(failed)} value(s) could not be derived: default used",
                                              feature=spec.name))

    def _column(self, name: str, entity: str, rows: list[dict[str, FeatureValue]],
                context: Mapping[str, FeatureValue], own_keys: Mapping[str, set[str]]) -> list[Any]:
        owner, _, feature = name.rpartition(".")
        owner = owner or entity
        if owner == "context":
            return [context.get(feature)] * len(rows)
        if feature in own_keys.get(owner, ()):
            if owner == entity:
                return [self.own_key(owner, i) for i in range(len(rows))]
            return [self.own_key(owner, 0)] * len(rows)
        if owner == entity:
            return list(map(dict.get, rows, repeat(feature)))
        return [self.rows_of(owner)[0].get(feature)] * len(rows)

    def _fresh(self, view: View, rows: Sequence[Row | None],
               now: float | None) -> Sequence[Row | None]:
        """Rows older than the view's ``freshness.max_age_s`` become missing, counted in one entry."""
        if view.freshness is None:
            return rows
        oldest = (time.time() if now is None else now) - view.freshness.max_age_s
        name = view.freshness.field
        kept: list[Row | None] = []
        stale = 0
        for row in rows:
            at = None if row is None else row.get(name)
            if isinstance(at, int | float) and at < oldest:
                stale += 1
                kept.append(None)
            else:
                kept.append(row)
        if stale:
            self.degraded.append(Degraded(view.name, Reason.STALE, f"{stale} row(s) older than "
                                          f"{view.freshness.max_age_s:g} s treated as missing"))
        return kept


def _composite(parts: tuple[Any, ...], separator: str) -> str | None:
    """A composite key (``u1_10``); None when a part is missing or cannot be part of a key."""
    if any(p is None or isinstance(p, list | dict) for p in parts):
        return None
    return separator.join(map(_text, parts))


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def shape(view: View) -> Shape:
    """A view's fields, their output names, the defaults to fill in and the all-default row."""
    fields = tuple(view.features)
    names = tuple(map(view.output_name, fields))
    defaults = tuple((view.output_name(f), d) for f, d in view.defaults.items() if d is not None)
    default_row = dict(zip(names, view.default_row().values(), strict=True))
    return fields, names, defaults, default_row


def output_rows(shape: Shape, rows: Sequence[Row | None]) -> list[dict[str, FeatureValue]]:
    """Rows under their output names, defaults in place of nulls and missing rows.

    One dict per row, built in C (zip over precomputed names); defaults are looked at only for rows that
    hold a null.
    """
    fields, names, defaults, default_row = shape
    renamed = names != fields
    if rows and list(map(type, rows)).count(FinalRow) == len(rows):
        # Every row typed by its store: exactly the fields, in their order, no null (one C pass each).
        final = cast(list[FinalRow], rows)
        if not renamed:
            return list(map(dict, final))
        return list(map(dict, map(zip, repeat(names), map(dict.values, final))))
    out: list[dict[str, FeatureValue]] = []
    append = out.append
    for row in rows:
        if row is None:
            append(default_row.copy())
            continue
        if type(row) is FinalRow:  # the requested fields in their order, no null
            append(dict(zip(names, row.values(), strict=True)) if renamed else dict(row))
            continue
        values = dict(zip(names, map(row.get, fields), strict=True)) \
            if renamed or len(row) != len(fields) else dict(row)
        if defaults and None in values.values():
            for name, default in defaults:
                if values[name] is None:
                    values[name] = default
        append(values)
    return out


def failure(part: Part, exc: BaseException | None) -> Degraded:
    """The degraded entry of a part that failed (``None``: no answer in time), logged by its kind."""
    if exc is None:
        return Degraded(part.view.name, Reason.TIMEOUT, f"no answer within {part.timeout_s * 1000:.0f} ms")
    reason = reason_of(exc)
    if reason in (Reason.CLOSED, Reason.OVERLOADED):
        # Counted in metrics; a log line per shed view would add load exactly when there is too much.
        log.debug("view %s degraded (%s): %s", part.view.name, reason.value, exc)
    elif reason is Reason.QUERY_ERROR:
        log.error("view %s: the store rejected the query: %s", part.view.name, exc)
    elif reason is Reason.ERROR:
        log.error("view %s: unexpected error", part.view.name, exc_info=exc)
    else:
        log.warning("view %s degraded (%s): %s", part.view.name, reason.value, exc)
    return Degraded(part.view.name, reason, str(exc))
