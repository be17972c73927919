"""Named callables that sync jobs refer to from JSON (``compute`` transforms, custom conflict resolvers).

The config only ever names a function; code registers it (no ``eval``)::

    from featuredao.sync import register_transform, register_conflict

    register_transform("ctr", lambda row: row["clicks"] / max(1, row["views"]))
    register_conflict("max_score", lambda key, source, target: source if target is None
                      or source["score"] >= target["score"] else None)

A job can list modules under ``imports``; they are imported before its names are checked, so a
module that registers its functions at import time makes them available to ``featuredao sync``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from featuredao.types import Key

TransformFn = Callable[[Mapping[str, Any]], Any]
"""Computes one field from the row so far."""
ConflictFn = Callable[[Key, Mapping[str, Any], Mapping[str, Any] | None], Mapping[str, Any] | None]
"""(key, source row, target row or None) -> the row to write, or None to keep the target as it is."""

_lock = threading.Lock()
_transforms: dict[str, TransformFn] = {}
_conflicts: dict[str, ConflictFn] = {}
BUILTIN_CONFLICTS = ("source_wins", "last_writer_wins", "target_wins")


def _check_name(name: str) -> None:
    if not name or not isinstance(name, str):
        raise ValueError("a registered function needs a non-empty name")


def register_transform(name: str, fn: TransformFn) -> None:
    """Make ``fn(row) -> value`` available to ``{"compute": {"field": ..., "fn": name}}``."""
    _check_name(name)
    if not callable(fn):
        raise TypeError(f"{name!r}: not callable")
    with _lock:
        _transforms[name] = fn


def register_conflict(name: str, fn: ConflictFn) -> None:
    """Make ``fn(key, source_row, target_row) -> row | None`` available as a conflict strategy."""
    _check_name(name)
    if name in BUILTIN_CONFLICTS:
        raise ValueError(f"{name!r} is a built-in strategy")
    if not callable(fn):
        raise TypeError(f"{name!r}: not callable")
    with _lock:
        _conflicts[name] = fn


def transform(name: str) -> TransformFn | None:
    """The registered transform, if any."""
    with _lock:
        return _transforms.get(name)


def conflict(name: str) -> ConflictFn | None:
    """The registered conflict resolver, if any."""
    with _lock:
        return _conflicts.get(name)


def transform_names() -> list[str]:
    """Every registered transform name."""
    with _lock:
        return sorted(_transforms)


def conflict_names() -> list[str]:
    """Every registered conflict resolver name."""
    with _lock:
        return sorted(_conflicts)
