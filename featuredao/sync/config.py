"""The ``sync`` section of the config: jobs validated against the views they read and write."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from featuredao.errors import ConfigIssue

if TYPE_CHECKING:
    from featuredao.config import View
    from featuredao.dao import Source


def check_jobs(raw: Sequence[Mapping[str, Any]], views: Mapping[str, View],
               adapters: Mapping[str, type[Source]]) -> tuple[list[Any], list[ConfigIssue]]:
    """Validate every job; return the parsed jobs and the problems found (with JSON paths)."""
    issues = [ConfigIssue(f"$.sync[{i}]", "synchronization jobs are not supported yet")
              for i in range(len(raw))]
    return [], issues
