"""The SQL adapters' options and dialects: what differs between SQL stores in the statements sent."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Self

from pydantic import Field, SecretStr, model_validator

from featuredao.config import Identifier, StrictModel
from featuredao.types import FeatureType

_TALL_ONLY = ("feature_column", "value_column", "event_time_column")


class SqlViewOptions(StrictModel):
    """View options of the SQL adapters: the table layout."""

    layout: Literal["wide", "tall"] = "wide"
    feature_column: Identifier = "feature"
    value_column: Identifier = "value"
    event_time_column: Identifier | None = None
    """Tall layout only: with several rows per (key, feature), the one with the newest time wins."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.layout == "wide":
            misplaced = sorted(self.model_fields_set & set(_TALL_ONLY))
            if misplaced:
                raise ValueError(f"{', '.join(misplaced)} only apply to layout 'tall'")
        else:
            cols = [self.feature_column, self.value_column, self.event_time_column]
            named = [c for c in cols if c is not None]
            if len(set(named)) != len(named):
                raise ValueError("feature_column, value_column and event_time_column must differ")
        return self


class SqlSourceOptions(StrictModel):
    """Source options shared by the SQL adapters (each adapter sets its own defaults)."""

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(ge=1, le=65535)
    user: str = Field(min_length=1)
    password: SecretStr = SecretStr("")
    database: Identifier
    pool_size: int = Field(default=4, ge=1, le=64)
    """Connections in the pool, and chunks of one read in flight at once."""
    batch_size: int = Field(default=1000, ge=1, le=10000)
    """Most keys sent in one statement."""
    connect_timeout_ms: int = Field(default=2000, gt=0)
    read_timeout_ms: int = Field(default=5000, gt=0)
    """Longest a statement may run when the caller gives no deadline (enforced on the server)."""


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between SQL stores in the statements featuredao sends."""

    name: str
    quote: str
    """Identifier quote character."""
    in_keys: Callable[[str], str]
    """The condition "column is one of the bound list", e.g. ``c IN %s`` or ``c = ANY(%s)``."""
    bind_list: Callable[[Sequence[Any]], Any]
    """How a Python list of keys (or feature names) is passed as one parameter."""
    key_types: Mapping[str, str]
    """Column type of the key per view key type (``str``, ``int``)."""
    types: Mapping[FeatureType, str]
    """Column type per feature type in a wide table."""
    name_type: str
    """Column type of the feature-name column in a tall table."""
    text_type: str
    """Column type of the value column in a tall table."""
    time_type: str
    """Column type (with its default: the time of the write) of a tall table's event-time column."""
    upsert: Callable[[str, Sequence[str]], str]
    """(quoted conflict columns, quoted update columns) -> the tail of an idempotent INSERT."""
    lists_as_json: bool
    """Lists are stored as JSON text (no array type)."""
    bools_as_int: bool
    """Booleans come back as integers (MySQL's BOOLEAN is TINYINT(1))."""
    table_suffix: str = ""


def _mysql_upsert(conflict: str, update: Sequence[str]) -> str:
    # VALUES(col) is what MariaDB understands; MySQL 8 deprecates it (still accepted) for row aliases.
    return "ON DUPLICATE KEY UPDATE " + ", ".join(f"{c} = VALUES({c})" for c in update)


def _pg_upsert(conflict: str, update: Sequence[str]) -> str:
    return f"ON CONFLICT ({conflict}) DO UPDATE SET " + ", ".join(f"{c} = EXCLUDED.{c}" for c in update)


MYSQL = Dialect(
    name="mysql", quote="`",
    in_keys=lambda col: f"{col} IN %s",
    bind_list=tuple,  # pymysql renders a tuple as an escaped "(v1, v2, ...)" list
    # Binary collation: keys match exactly (case, accents, emoji), as in every other store.
    key_types={"str": "VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin", "int": "BIGINT"},
    types={
        FeatureType.INT: "BIGINT", FeatureType.FLOAT: "DOUBLE", FeatureType.STR: "LONGTEXT",
        FeatureType.BOOL: "BOOLEAN", FeatureType.LIST_INT: "JSON", FeatureType.LIST_FLOAT: "JSON",
        FeatureType.LIST_STR: "JSON",
    },
    name_type="VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
    text_type="LONGTEXT",
    time_type="DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)",
    upsert=_mysql_upsert,
    lists_as_json=True,
    bools_as_int=True,
    table_suffix=" ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
)

POSTGRES = Dialect(
    name="postgres", quote='"',
    in_keys=lambda col: f"{col} = ANY(%s)",  # one array parameter: the statement text never changes
    bind_list=list,
    key_types={"str": "text", "int": "bigint"},
    types={
        FeatureType.INT: "bigint", FeatureType.FLOAT: "double precision", FeatureType.STR: "text",
        FeatureType.BOOL: "boolean", FeatureType.LIST_INT: "bigint[]",
        FeatureType.LIST_FLOAT: "double precision[]", FeatureType.LIST_STR: "text[]",
    },
    name_type="text",
    text_type="text",
    time_type="timestamptz NOT NULL DEFAULT now()",
    upsert=_pg_upsert,
    lists_as_json=False,
    bools_as_int=False,
)
