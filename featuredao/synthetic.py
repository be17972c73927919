"""Deterministic synthetic feature rows for any view: the demo, benchmark seeding and tests use them."""

from __future__ import annotations

import random
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
