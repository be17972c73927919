"""A sync job's checkpoints and reports, and how its cursors compare."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

FIRST_PHASE = {"full": "idle", "incremental": "changes", "cdc": "new"}
"""The phase a target of a job in each mode starts in."""
_MAX_BACKOFF_S = 60.0


def backoff_s(base_s: float, failures: int) -> float:
    """How long a failed source or target rests after its ``failures``-th failure in a row (doubling)."""
    return float(min(_MAX_BACKOFF_S, base_s * 2 ** (failures - 1)))


@dataclass
class TargetState:
    """One target's checkpoint (persisted as JSON) and its in-process health."""

    name: str
    phase: str
    cursor: Any = None
    generation: int = 0
    """Full passes started (the seen-key registry marks keys with it)."""
    feed_start: Any = None
    """cdc: the change-feed position taken before the snapshot; streaming starts after it."""
    written: int = 0
    deleted: int = 0
    failed: int = 0
    passes: int = 0
    updated_at: float | None = None
    last_error: str | None = None
    lag_s: float | None = None
    down_until: float = field(default=0.0, compare=False)
    failures: int = field(default=0, compare=False)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["down_until"], data["failures"], data["name"]
        return data

    @classmethod
    def from_json(cls, name: str, data: Mapping[str, Any], phase: str) -> TargetState:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "name"}
        known.setdefault("phase", phase)
        return cls(name=name, **known)


@dataclass
class CycleReport:
    """What one cycle did."""

    read: int = 0
    written: int = 0
    deleted: int = 0
    filtered: int = 0
    failed: int = 0
    down: dict[str, str] = field(default_factory=dict)
    source_error: str | None = None
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        """No target down and the source readable."""
        return not self.down and self.source_error is None


@dataclass
class ReplayReport:
    """What ``replay_dlq`` did."""

    replayed: int = 0
    resolved: int = 0
    failed_again: int = 0
    kept: int = 0
    down: dict[str, str] = field(default_factory=dict)


def canon(value: Any) -> str:
    """A JSON value as canonical text (groups cursors; orders what does not compare)."""
    return json.dumps(value, sort_keys=True, default=str)


def cursor_order(value: Any) -> tuple[Any, ...]:
    """Sort key of a cursor: None first; [watermark, key] compared element by element."""
    if value is None:
        return (0,)
    if isinstance(value, list | tuple):
        return (1, *value)
    return (1, value)


def feed_from(s: TargetState) -> Any:
    """Where a cdc target reads the change feed from (None: it does not yet)."""
    if s.phase == "stream":
        return s.cursor
    if s.phase in ("snapshot", "delete"):
        return s.feed_start
    return None


def cursor_le(a: Any, b: Any) -> bool:
    """Cursor ``a`` is at or before ``b``."""
    try:
        return cursor_order(a) <= cursor_order(b)
    except TypeError:
        return canon(a) <= canon(b)


def applied_everywhere(states: Iterable[TargetState]) -> Any:
    """The lowest feed position every target (down ones included) applied; None: not every one streams."""
    positions = []
    for s in states:
        if s.phase == "stream":
            positions.append(s.cursor)
        elif s.phase == "snapshot":
            positions.append(s.feed_start)
        else:
            return None
    if not positions or any(p is None for p in positions):
        return None
    return min(positions, key=cursor_order)
