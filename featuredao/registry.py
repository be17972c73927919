"""Adapter lookup through the ``featuredao.adapters`` entry-point group, loaded on first use."""

from __future__ import annotations

import difflib
import threading
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from featuredao.dao import Source

GROUP = "featuredao.adapters"

_lock = threading.Lock()
_loaded: dict[str, type[Source]] = {}
_registered: dict[str, type[Source]] = {}


def available() -> list[str]:
    """Names of every adapter installed or registered (nothing is imported)."""
    return sorted({ep.name for ep in entry_points(group=GROUP)} | set(_registered))


def register(name: str, source_cls: type[Source]) -> None:
    """Register an adapter class in code (tests, plugins not installed as packages)."""
    with _lock:
        _registered[name] = source_cls
        _loaded.pop(name, None)


def get_adapter(name: str) -> type[Source]:
    """Return the Source class of adapter ``name``, importing its module on first use."""
    with _lock:
        if name in _registered:
            return _registered[name]
        if name in _loaded:
            return _loaded[name]
    found = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not found:
        hint = difflib.get_close_matches(name, available(), n=1)
        msg = f"unknown adapter type; known: {', '.join(available())}"
        raise LookupError(msg + (f"; did you mean {hint[0]!r}?" if hint else ""))
    try:
        cls: type[Source] = found[0].load()
    except ImportError as exc:
        raise LookupError(f"adapter {name!r} cannot be loaded ({exc}); "
                          f"install it with: pip install 'featuredao[{name}]'") from exc
    with _lock:
        _loaded[name] = cls
    return cls
