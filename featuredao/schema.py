"""The configuration's schema: the pydantic models of every section, before cross-checks.

``featuredao.config`` loads a document with them, adds each adapter's own option models, and checks
what spans sections (sources named by views, fallback chains, key_from stages, derived inputs, scenes).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints

from featuredao.types import FeatureType
from featuredao.validation import Identifier, QualifiedName, StrictModel

_REF = r"^[A-Za-z_][A-Za-z0-9_]{0,62}\.[A-Za-z_][A-Za-z0-9_]{0,62}$"


class NoOptions(StrictModel):
    """Options model of an adapter that takes none."""


class ServiceConfig(StrictModel):
    """Settings of FeatureService itself."""

    deadline_ms: int = Field(default=100, gt=0)
    max_workers: int = Field(default=16, gt=0, le=256)
    strict: bool = False
    max_in_flight: int | None = Field(default=None, gt=0, le=4096)
    """Requests served at once; more wait for a slot (at most ``admission_wait`` of their deadline) and
    are then shed: defaults (or what L1 holds) at once, degraded ``overloaded``. Default: 4 per core."""
    max_keys_per_request: int = Field(default=10_000, gt=0)
    """Most item ids one ``fetch`` takes (more is a ``UsageError``)."""
    admission_wait: float = Field(default=0.75, gt=0, le=1)
    """The share of a request's deadline it may wait for a slot before it is shed."""


class CircuitBreakerConfig(StrictModel):
    """Per source: open after N consecutive failures, fail fast, probe again after the reset timeout."""

    failure_threshold: int = Field(default=5, ge=1)
    reset_timeout_s: float = Field(default=10.0, gt=0)
    enabled: bool = True


class RetryConfig(StrictModel):
    """Per source: bounded, jittered retries of reads, only within the time left."""

    max: int = Field(default=0, ge=0, le=5)
    backoff_ms: float = Field(default=5.0, ge=0)


class L1Config(StrictModel):
    """The in-process tier."""

    ttl_s: float = Field(default=60.0, gt=0)
    max_entries: int = Field(default=100_000, ge=1)


class L2Config(StrictModel):
    """The shared tier: a source whose adapter offers a key-value store (Redis)."""

    source: str
    ttl_s: float = Field(default=600.0, gt=0)
    ttl_jitter: float = Field(default=0.1, ge=0, lt=1)


class CacheConfig(StrictModel):
    """Per view: L1 and/or L2, negative caching, stale serving."""

    l1: L1Config | None = None
    l2: L2Config | None = None
    negative_ttl_s: float = Field(default=0.0, ge=0)
    stale_while_revalidate_s: float = Field(default=0.0, ge=0)
    stale_if_error_s: float = Field(default=0.0, ge=0)


class FreshnessConfig(StrictModel):
    """Rows whose ``field`` (epoch seconds) is older than ``max_age_s`` are treated as missing."""

    field: Identifier
    max_age_s: float = Field(gt=0)


class ContextFeature(StrictModel):
    """One request-context feature: its type and the value it takes when the request leaves it out."""

    type: FeatureType
    default: Any = None


class SceneConfig(StrictModel):
    """A named request shape: the views it reads and, optionally, its own deadline."""

    views: list[str] = Field(min_length=1)
    deadline_ms: int | None = Field(default=None, gt=0)


ScalarType = Literal["int", "float", "str"]


class SequenceJoin(StrictModel):
    """Side information of each event's item: features of an item view, one list per feature."""

    view: Identifier
    features: list[Identifier] = Field(min_length=1)


class RetainConfig(StrictModel):
    """What ``append`` keeps per key where the store trims cheaply (Redis): newest N, none older."""

    max_len: int | None = Field(default=None, gt=0)
    max_age_s: float | None = Field(default=None, gt=0)


class SequenceConfig(StrictModel):
    """How a sequence view reads a key's events: which fields, which events, how many, newest first."""

    time_field: Identifier
    """Event time: epoch seconds (``time_unit`` "ms": milliseconds)."""
    item_field: Identifier | None = None
    event_field: Identifier | None = None
    fields: dict[Identifier, ScalarType] = Field(min_length=1)
    time_unit: Literal["s", "ms"] = "s"
    max_len: int = Field(default=50, gt=0, le=100_000)
    window_s: float | None = Field(default=None, gt=0)
    """Only events of the last ``window_s`` seconds before the request time."""
    events: list[str] | None = Field(default=None, min_length=1)
    min: dict[Identifier, float] = Field(default_factory=dict)
    dedupe: Identifier | None = None
    scan_len: int | None = Field(default=None, gt=0, le=1_000_000)
    """Events read per key when filters or dedupe run after the read (default: 4 x ``max_len``)."""
    merge: list[Identifier] = Field(default_factory=list)
    join: SequenceJoin | None = None
    retain: RetainConfig | None = None


class ViewConfig(StrictModel):
    """One feature view: a table or keyspace in one source, keyed by one entity."""

    name: Identifier
    entity: Identifier
    """``user``, ``item``, or any request-level entity given in ``fetch(keys=...)``; with ``key_from``,
    the entity whose rows this view's features join."""
    source: str
    table: QualifiedName
    key: Identifier
    key_type: Literal["str", "int"] = "str"
    kind: Literal["table", "sequence"] = "table"
    """``sequence``: the newest events of each key (``sequence``), one list per field."""
    features: dict[Identifier, FeatureType] = Field(default_factory=dict)
    """A table view's features (at least one); a sequence view's come from ``sequence.fields``."""
    sequence: SequenceConfig | None = None
    defaults: dict[str, Any] = Field(default_factory=dict)
    prefix: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_]{0,32}$")] = ""
    timeout_ms: int = Field(default=50, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)
    fallback: list[str] = Field(default_factory=list)
    fallback_on_missing: bool = False
    hedge_ms: int | None = Field(default=None, gt=0)
    """With a fallback: start the chain after this long without an answer from the primary."""
    cache: CacheConfig | None = None
    key_from: Annotated[str, StringConstraints(pattern=_REF)] | \
        list[Annotated[str, StringConstraints(pattern=_REF)]] | None = None
    """Per row of ``entity``, this view's key is that output feature (or request key) of an earlier stage;
    a list makes a composite key joined by ``key_separator``."""
    key_separator: str = Field(default="_", max_length=8)
    freshness: FreshnessConfig | None = None


class RawConfig(StrictModel):
    """The top-level document before adapter-specific validation."""

    sources: dict[Identifier, dict[str, Any]] = Field(min_length=1)
    # Views are validated one by one so that one broken view does not hide the others' problems.
    views: list[dict[str, Any]] = Field(min_length=1)
    service: ServiceConfig = ServiceConfig()
    # Synchronization jobs: validated by the section's own validator (featuredao.sync registers it).
    sync: list[dict[str, Any]] = Field(default_factory=list)
    context: dict[Identifier, ContextFeature] = Field(default_factory=dict)
    """Request-context features ``fetch(context=...)`` takes: name -> type and default."""
    scenes: dict[Identifier, SceneConfig] = Field(default_factory=dict)
    """Per scene (home feed, detail page...): the views a request of that scene reads."""
    # Derived features are validated one by one, like views, so one broken spec hides no other problem.
    derived: list[dict[str, Any]] = Field(default_factory=list)
