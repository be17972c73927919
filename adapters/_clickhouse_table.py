"""A ClickHouse view's table as it is: its options, and what its statements may use of it (``Layout``).

Inspected once per DAO (engine and columns, one query), as the ``clickhouse`` module docstring describes.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

from pydantic import model_validator

from featuredao.config import Identifier, View, quote_identifier
from featuredao.errors import BackendQueryError

from ._sql_dialect import SqlViewOptions

# Engines whose FINAL collapses rows (Replicated*, Shared* variants included): wide reads use it by default.
_COLLAPSING = re.compile(r"(Replacing|Collapsing|Summing|Aggregating|Graphite|Coalescing)MergeTree$")
# Engines known to refuse FINAL (code 181). Others (View, Distributed, Merge, Buffer...) may pass it on.
_NO_FINAL = re.compile(r"MergeTree$|^(Memory|Log|TinyLog|StripeLog|Null|Set|Join)$")

Query = Callable[[str, dict[str, Any], float | None], list[Any]]
"""``ClickHouseSource.query``: statement, parameters, time limit; rows."""


def q(name: str) -> str:
    """A ClickHouse identifier, quoted."""
    return quote_identifier(name, "`")


class ClickHouseViewOptions(SqlViewOptions):
    """View options of the clickhouse adapter: the SQL layouts plus the ReplacingMergeTree settings."""

    final: bool | None = None
    """Read with FINAL; left out: for wide tables whose engine collapses rows (ReplacingMergeTree...)."""
    version_column: Identifier = "version"
    """The ReplacingMergeTree version (UInt64) that upserts write; left out: used if the table has it."""
    nulls_column: Identifier | None = "_nulls"
    """Wide only: Array(String) naming the list features that are null; None if the table has none (left
    out: used only if the table has it)."""

    @model_validator(mode="after")
    def _merge_tree_columns(self) -> Self:
        if self.layout == "tall" and "nulls_column" in self.model_fields_set:
            raise ValueError("nulls_column only applies to layout 'wide'")
        cols = [self.version_column, self.nulls_column] if self.layout == "wide" else \
            [self.version_column, self.feature_column, self.value_column, self.event_time_column]
        named = [c for c in cols if c is not None]
        if len(set(named)) != len(named):
            raise ValueError("the layout's column names must differ")
        return self


@dataclass
class Layout:
    """What one view's statements use of its table: found by inspecting it, or as configured."""

    final: str
    """`` FINAL`` or nothing."""
    nulls: str | None
    """The quoted nulls column (wide, views with list features), if used."""
    version: str | None
    """The quoted version column, if the table has one."""
    order: str | None
    """Tall: what ``argMax`` orders by (event time, version); None: any row of a (key, feature)."""
    sql: dict[tuple[str, ...], tuple[str, bool]] = field(default_factory=dict)
    """Read statements per projection (see ``ClickHouseDao._select``)."""


class TableLayout:
    """One view's table layout: inspected once (thread-safe) and cached; as configured while it is missing."""

    def __init__(self, view: View, options: ClickHouseViewOptions, source: str) -> None:
        self.view = view
        self.options = options
        self._source = source
        self._tall = options.layout == "tall"
        lists = any(t.is_list for t in view.features.values())
        # What prepare creates, and what a statement uses while the table cannot be inspected (missing).
        self._final_conf = options.final if options.final is not None else not self._tall
        self.nulls_conf = q(options.nulls_column) if options.nulls_column is not None and lists else None
        self.version_conf = q(options.version_column)
        db, _, name = view.table.rpartition(".")
        where_db = "%(db)s" if db else "currentDatabase()"
        self._describe_sql = (
            f"SELECT 'engine', engine FROM system.tables WHERE database = {where_db} AND name = %(table)s "
            f"UNION ALL SELECT 'column', name FROM system.columns "
            f"WHERE database = {where_db} AND table = %(table)s")
        self._describe_params = {"db": db, "table": name} if db else {"table": name}
        self.known: Layout | None = None
        self._known_lock = threading.Lock()

    def forget(self) -> None:
        """Look again on the next use (the table may have been (re)made just now)."""
        with self._known_lock:
            self.known = None

    def get(self, query: Query, timeout_s: float | None) -> Layout:
        """The table's layout, inspected with ``query`` on first use."""
        known = self.known
        if known is not None:
            return known
        with self._known_lock:
            if self.known is not None:
                return self.known
            rows = query(self._describe_sql, self._describe_params, timeout_s)
            engines = [r[1] for r in rows if r[0] == "engine"]
            if not engines:
                # Missing (or not yet created): the statement fails as it always did, and the next use
                # looks again.
                return self._configured()
            self.known = self._inspected(engines[0], {r[1] for r in rows if r[0] == "column"})
            return self.known

    def _configured(self) -> Layout:
        o = self.options
        order = self.version_conf if o.event_time_column is None else \
            f"({q(o.event_time_column)}, {self.version_conf})"
        return Layout(" FINAL" if self._final_conf else "", self.nulls_conf, self.version_conf,
                       order if self._tall else None)

    def _missing(self, column: str, option: str, fix: str) -> BackendQueryError:
        return BackendQueryError(f"table {self.view.table!r} has no column {column!r} (options.{option}): "
                                 f"set options.{option} to {fix}", source=self._source,
                                 view=self.view.name)

    def _inspected(self, engine: str, columns: set[str]) -> Layout:
        o = self.options
        explicit = o.model_fields_set
        if o.final is None:
            final = not self._tall and _COLLAPSING.search(engine) is not None
        elif o.final and _COLLAPSING.search(engine) is None and _NO_FINAL.search(engine) is not None:
            raise BackendQueryError(f"table {self.view.table!r} (engine {engine}) does not support FINAL: "
                                    "set options.final to false, or leave it out",
                                    source=self._source, view=self.view.name)
        else:
            final = o.final
        nulls = None
        if self.nulls_conf is not None and o.nulls_column is not None:
            if o.nulls_column in columns:
                nulls = self.nulls_conf
            elif "nulls_column" in explicit:
                raise self._missing(o.nulls_column, "nulls_column",
                                    "null, or to the Array(String) column naming the null lists")
        version = None
        if o.version_column in columns:
            version = self.version_conf
        elif "version_column" in explicit:
            raise self._missing(o.version_column, "version_column",
                                "the table's version column, or leave it out")
        order = None
        if self._tall:
            for option in ("feature_column", "value_column"):
                name = getattr(o, option)
                if name not in columns:
                    what = "feature names" if option == "feature_column" else "feature values"
                    raise self._missing(name, option, f"the column holding the {what}")
            parts = []
            if o.event_time_column is not None:
                if o.event_time_column not in columns:
                    raise self._missing(o.event_time_column, "event_time_column",
                                        "the table's event-time column, or to null")
                parts.append(q(o.event_time_column))
            if version is not None:
                parts.append(version)
            order = f"({', '.join(parts)})" if len(parts) > 1 else parts[0] if parts else None
        return Layout(" FINAL" if final else "", nulls, version, order)
