"""Deterministic synthetic feature rows for any view: the demo, benchmark seeding and tests use them."""

from __future__ import annotations

import math
import random
import time
import zlib
from collections.abc import Iterator

from featuredao.config import View
from featuredao.types import FeatureType, FeatureValue, Key

_WORDS = ("sports", "music", "news", "games", "travel", "food", "tech", "fashion", "books", "movies",
          "beauty", "home", "auto", "health", "kids", "pets", "garden", "art", "finance", "outdoor")
LIST_LENGTH = 8
EMBEDDING_DIM = 16


def key_for(view: View, index: int) -> Key:
    """The key of the ``index``-th synthetic row of a view."""
    return index if view.key_type == "int" else f"{view.entity[0]}{index}"


def _value(ftype: FeatureType, rng: random.Random, name: str) -> FeatureValue:
    if ftype is FeatureType.INT:
        return rng.randint(0, 1000)
    if ftype is FeatureType.FLOAT:
        return round(rng.random(), 6)
    if ftype is FeatureType.STR:
        return rng.choice(_WORDS)
    if ftype is FeatureType.BOOL:
        return rng.random() < 0.5
    if ftype is FeatureType.LIST_INT:
        return [rng.randint(0, 1000) for _ in range(LIST_LENGTH)]
    if ftype is FeatureType.LIST_FLOAT:
        dim = EMBEDDING_DIM if "emb" in name else LIST_LENGTH
        return [round(rng.uniform(-1, 1), 6) for _ in range(dim)]
    return rng.sample(_WORDS, LIST_LENGTH)


def row(view: View, index: int, seed: int = 0) -> dict[str, FeatureValue]:
    """One row, the same for the same view features, index and seed whatever the store."""
    rng = random.Random(seed * 1_000_003 + index * 7919 + zlib.crc32(view.entity.encode()))
    return {name: _value(ftype, rng, name) for name, ftype in sorted(view.features.items())}


def rows(view: View, count: int, seed: int = 0,
         start: int = 0) -> Iterator[tuple[Key, dict[str, FeatureValue]]]:
    """``count`` (key, row) pairs starting at ``start``."""
    for i in range(start, start + count):
        yield key_for(view, i), row(view, i, seed)


_EVENT_TYPES = ("click", "buy", "view", "like", "share")
SEQUENCE_MEDIAN = 100
"""Median events per key of a synthetic sequence (lengths are log-normal: a few very active users)."""
SEQUENCE_MAX = 5000
ITEMS = 100_000
"""Distinct item ids synthetic events refer to (0 .. ITEMS-1)."""


def events(view: View, index: int, seed: int = 0, now: float | None = None) -> list[dict[str, FeatureValue]]:
    """The ``index``-th key's synthetic events: a log-normal count (at least one), times over the last 30
    days before ``now``, the view's event types (or a few common ones), item ids below ``ITEMS``."""
    spec = view.sequence
    assert spec is not None, "a sequence view"
    rng = random.Random(seed * 1_000_003 + index * 7919 + zlib.crc32(view.name.encode()))
    count = max(1, min(SEQUENCE_MAX, int(rng.lognormvariate(math.log(SEQUENCE_MEDIAN), 0.8))))
    end = time.time() if now is None else now
    scale = 1000 if spec.time_unit == "ms" else 1
    kinds = spec.events or list(_EVENT_TYPES)
    out: list[dict[str, FeatureValue]] = []
    for _ in range(count):
        event: dict[str, FeatureValue] = {}
        for name, kind in spec.fields.items():
            if name == spec.time_field:
                at = end - rng.uniform(0, 30 * 86400)
                event[name] = int(at * scale) if kind == "int" else at * scale
            elif name == spec.item_field:
                event[name] = rng.randrange(ITEMS) if kind == "int" else f"i{rng.randrange(ITEMS)}"
            elif name == spec.event_field:
                event[name] = rng.choice(kinds)
            else:
                event[name] = _value(FeatureType(kind), rng, name)
        out.append(event)
    return out


def event_rows(view: View, count: int, seed: int = 0, start: int = 0,
               now: float | None = None) -> Iterator[tuple[Key, dict[str, FeatureValue]]]:
    """The events of ``count`` keys starting at ``start``, as ``(key, event)`` pairs for ``append``."""
    for i in range(start, start + count):
        key = key_for(view, i)
        for event in events(view, i, seed, now):
            yield key, event
