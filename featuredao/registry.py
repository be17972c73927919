"""Adapter lookup through the ``featuredao.adapters`` entry-point group, loaded on first use."""

from __future__ import annotations

import difflib
import threading
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel

from featuredao.capabilities import Capabilities
from featuredao.errors import UnknownAdapter

GROUP = "featuredao.adapters"


class Adapter(Protocol):
    """What configuration and the factory need of an adapter: its ``Source`` class, seen from outside."""

    type_name: ClassVar[str]
    options_model: ClassVar[type[BaseModel]]
    view_options_model: ClassVar[type[BaseModel]]
    capabilities: ClassVar[Capabilities]
    driver_modules: ClassVar[Mapping[str, str]]

    def __call__(self, name: str, options: Any) -> Any:
        """Build the source (a ``featuredao.dao.Source``) from its validated options."""


_lock = threading.Lock()
_loaded: dict[str, Adapter] = {}
_registered: dict[str, Adapter] = {}


def available() -> list[str]:
    """Names of every adapter installed or registered (nothing is imported)."""
    return sorted({ep.name for ep in entry_points(group=GROUP)} | set(_registered))


def register(name: str, source_cls: Adapter) -> None:
    """Register an adapter class in code (tests, plugins not installed as packages)."""
    with _lock:
        _registered[name] = source_cls
        _loaded.pop(name, None)


def get_adapter(name: str) -> Adapter:
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
        raise UnknownAdapter(msg + (f"; did you mean {hint[0]!r}?" if hint else ""))
    try:
        cls: Adapter = found[0].load()
    except ImportError as exc:
        raise UnknownAdapter(f"adapter {name!r} cannot be loaded ({exc}); "
                          f"install it with: pip install 'featuredao[{name}]'") from exc
    with _lock:
        _loaded[name] = cls
    return cls
