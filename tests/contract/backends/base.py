"""What a backend module hands the contract suite."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from featuredao.dao import BaseDao
from featuredao.testing.servers import free_port


@dataclass
class ContractBackend:
    """A source config reaching a live server, the view options to use, and an unreachable twin."""

    source: dict[str, Any]
    """The source's JSON config (``type`` included), e.g. pointing at a throwaway server."""
    view_options: dict[str, Any] = field(default_factory=dict)
    """The view's ``options`` (layout settings) for this variant."""
    unreachable: dict[str, Any] | None = None
    """The same source pointing at a closed port (None for embedded stores)."""
    table_prefix: str = "t"
    """Prefix of the per-test table names."""
    slow: Callable[[BaseDao], None] | None = None
    """Make every read of a DAO's view take seconds, called instead of ``prepare`` (the module's ``slow``
    function, where the store has a natural slow path; None elsewhere: deadline tests are deselected)."""


_LAYOUT_OPTIONS: dict[str, dict[str, Any]] = {
    "wide": {"layout": "wide"},
    "tall": {"layout": "tall", "event_time_column": "event_time"},
}


def layout_variants(adapter: str) -> list[tuple[str, str]]:
    """``VARIANTS`` of an adapter with a wide and a tall layout, both under the adapter's marker."""
    return [(f"{adapter}_{layout}", adapter) for layout in _LAYOUT_OPTIONS]


# What a tall table cannot do: it has no row per key to scan, order by watermark, delete or feed.
TALL_LACKS = frozenset({"scan", "changes", "delete", "change_feed"})


def layout_lacks(adapter: str) -> dict[str, frozenset[str]]:
    """``LACKS`` of an adapter with ``layout_variants``: the flags its tall variant switches off."""
    return {f"{adapter}_tall": TALL_LACKS}


def layout_backend(variant: str, source: dict[str, Any]) -> ContractBackend:
    """The backend of a ``layout_variants`` variant: its layout options and the source on a closed port."""
    options = dict(_LAYOUT_OPTIONS[variant.rsplit("_", 1)[1]])
    # Nothing listens on a port handed out by free_port and never bound.
    unreachable = {**source, "port": free_port(), "connect_timeout_ms": 1000}
    return ContractBackend(source=source, view_options=options, unreachable=unreachable,
                           table_prefix=f"c_{variant}_")
