"""The in-memory data model of the local TableStore server: tables with their primary-key schema and
multi-version rows kept in primary-key order, primary-key normalisation and ordering (with
``INF_MIN``/``INF_MAX``), and the records of faults injected by tests."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from featuredao.testing.tablestore.plainbuffer import INF_MAX, INF_MIN, ColumnValue


def _now_ms() -> int:
    return int(time.time() * 1000)


PK = tuple[Any, ...]
Versions = list[tuple[int, ColumnValue]]  # newest first


@dataclass
class _PKColumn:
    name: str
    type: str
    auto_increment: bool = False


@dataclass
class _Table:
    name: str
    primary_key: list[_PKColumn]
    defined_columns: list[tuple[str, int]]
    time_to_live: int
    max_versions: int
    deviation: int
    allow_update: bool | None
    read_cu: int
    write_cu: int
    created: int
    rows: dict[PK, dict[str, Versions]] = field(default_factory=dict)
    keys: list[PK] = field(default_factory=list)
    last_auto_increment: int = 0


@dataclass
class _InjectedFailure:
    api: str
    status: int
    code: str
    message: str
    remaining: int


@dataclass
class _InjectedRowError:
    table: str
    pk: PK
    code: str
    message: str
    remaining: int


def _ext_key(values: Sequence[Any]) -> tuple[tuple[int, Any], ...]:
    """Sort key that orders INF_MIN < any value < INF_MAX column by column."""
    out = []
    for value in values:
        if value is INF_MIN:
            out.append((0, 0))
        elif value is INF_MAX:
            out.append((2, 0))
        else:
            out.append((1, value))
    return tuple(out)


def _pk_values(pk: Any) -> PK:
    """Normalise a user-supplied primary key (pairs, dict or bare values) to a value tuple."""
    if isinstance(pk, dict):
        items: list[Any] = list(pk.values())
    else:
        items = [item[1] if isinstance(item, tuple) and len(item) == 2 else item for item in pk]
    return tuple(bytes(v) if isinstance(v, bytearray) else v for v in items)
