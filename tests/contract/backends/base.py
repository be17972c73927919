"""What a backend module hands the contract suite."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
