"""The JSON configuration: schema, ``${ENV}`` resolution and validation that reports every problem at once."""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from featuredao import registry, stages
from featuredao.derive import DerivedConfig
from featuredao.derive import load as load_function
from featuredao.errors import ConfigError, ConfigIssue, UnknownAdapter, UsageError
from featuredao.registry import Adapter

# The schema's models, importable from here as they always were.
from featuredao.schema import CacheConfig as CacheConfig
from featuredao.schema import CircuitBreakerConfig as CircuitBreakerConfig
from featuredao.schema import ContextFeature as ContextFeature
from featuredao.schema import FreshnessConfig as FreshnessConfig
from featuredao.schema import L1Config as L1Config
from featuredao.schema import L2Config as L2Config
from featuredao.schema import NoOptions as NoOptions
from featuredao.schema import RawConfig as RawConfig
from featuredao.schema import RetryConfig as RetryConfig
from featuredao.schema import SceneConfig as SceneConfig
from featuredao.schema import SequenceConfig as SequenceConfig
from featuredao.schema import ServiceConfig as ServiceConfig
from featuredao.schema import ViewConfig as ViewConfig
from featuredao.sequence_check import check_references, view_shape
from featuredao.types import FeatureType, FeatureValue, fits

# Defined in the validation leaf (derived features and sync validate with them too); the adapters'
# options models import them from here.
from featuredao.validation import IDENTIFIER as IDENTIFIER
from featuredao.validation import QUALIFIED as QUALIFIED
from featuredao.validation import Identifier as Identifier
from featuredao.validation import QualifiedName as QualifiedName
from featuredao.validation import StrictModel as StrictModel
from featuredao.validation import json_path, pydantic_issues, resolve_env, shown

# Keys every source accepts, handled by the core rather than by the adapter's options model.
COMMON_SOURCE_KEYS = ("type", "circuit_breaker", "retries")


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """A validated source: its name, adapter type and the adapter's own options model."""

    name: str
    type: str
    options: Any
    circuit_breaker: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    retries: RetryConfig = field(default_factory=RetryConfig)

    def __repr__(self) -> str:
        # Options models hold SecretStr for credentials, so their repr is safe.
        return f"SourceSpec(name={self.name!r}, type={self.type!r}, options={self.options!r})"


@dataclass(frozen=True, slots=True)
class View:
    """A validated view, with its adapter-specific options parsed."""

    name: str
    entity: str
    source: str
    table: str
    key: str
    key_type: str
    features: dict[str, FeatureType]
    defaults: dict[str, FeatureValue]
    prefix: str
    timeout_ms: int
    options: Any = None
    config: ViewConfig | None = field(default=None, repr=False, compare=False)
    fallback: tuple[str, ...] = ()
    fallback_on_missing: bool = False
    cache: CacheConfig | None = None
    hedge_ms: int | None = None
    key_from: tuple[str, ...] = ()
    key_separator: str = "_"
    freshness: FreshnessConfig | None = None
    kind: str = "table"
    sequence: SequenceConfig | None = None
    """How a sequence view reads its events (None for a table view)."""

    def output_name(self, feature: str) -> str:
        """The name a feature has in a service result."""
        return self.prefix + feature

    def default_row(self) -> dict[str, FeatureValue]:
        """Every feature at its default (None where no default is declared)."""
        return {f: self.defaults.get(f) for f in self.features}


@dataclass(frozen=True, slots=True)
class Config:
    """A fully validated configuration."""

    sources: dict[str, SourceSpec]
    views: dict[str, View]
    service: ServiceConfig
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)
    sync: list[Any] = field(default_factory=list)
    """Validated synchronization jobs (featuredao.sync.config.SyncJob), once featuredao.sync is imported."""
    context: dict[str, ContextFeature] = field(default_factory=dict)
    """Request-context features, by name."""
    derived: list[DerivedConfig] = field(default_factory=list)
    """Serve-time derived features, in the order they are computed."""
    scenes: dict[str, SceneConfig] = field(default_factory=dict)
    """Named request shapes: views read and deadline, by scene."""

    @property
    def fallback_only(self) -> set[str]:
        """Views named in another view's fallback chain: served only as fallbacks, never merged."""
        return {name for view in self.views.values() for name in view.fallback}

    @property
    def merge_only(self) -> set[str]:
        """Sequence views named in another's ``merge``: read only as part of it, never served alone."""
        return {name for view in self.views.values() if view.sequence is not None
                for name in view.sequence.merge}


def _unknown_source(loc: tuple[int | str, ...], name: str, known: Mapping[str, Any]) -> ConfigIssue:
    hint = difflib.get_close_matches(name, list(known), n=1)
    msg = "unknown source" + (f"; did you mean {hint[0]!r}?" if hint else f"; known: {', '.join(known)}")
    return ConfigIssue(json_path((*loc, "source")), msg, repr(name))


def read_document(source: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Read a config file (or take a dict) as plain JSON data."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") \
            from None
    if not isinstance(doc, dict):
        raise ConfigError([ConfigIssue("$", "the configuration must be a JSON object")])
    return doc


SectionCheck = Callable[[list[dict[str, Any]], Mapping[str, View], Mapping[str, Adapter]],
                        tuple[list[Any], list[ConfigIssue]]]
"""Validates one optional top-level section against the views: (parsed items, problems)."""

_sections: dict[str, SectionCheck] = {}


def register_section(name: str, check: SectionCheck) -> None:
    """Have ``load`` validate the top-level section ``name`` (``sync``) with ``check``."""
    _sections[name] = check


def load(source: str | os.PathLike[str] | Mapping[str, Any]) -> Config:
    """Load and validate a configuration; raise ConfigError listing every problem found."""
    doc = read_document(source)
    # Relative file paths in adapter options are relative to the config file, not to the cwd.
    context = {"base_dir": Path.cwd() if isinstance(source, Mapping) else Path(source).resolve().parent}
    issues: list[ConfigIssue] = []
    secrets: dict[str, str] = {}
    resolved = resolve_env(doc, (), issues, secrets)
    try:
        raw = RawConfig.model_validate(resolved)
    except ValidationError as exc:
        raise ConfigError(issues + pydantic_issues(exc, (), secrets)) from None

    sources: dict[str, SourceSpec] = {}
    adapters: dict[str, Adapter] = {}
    for name, body in raw.sources.items():
        loc: tuple[int | str, ...] = ("sources", name)
        kind = body.get("type")
        if not isinstance(kind, str):
            issues.append(ConfigIssue(json_path((*loc, "type")), "a source needs a string 'type'",
                                      shown(json_path((*loc, "type")), kind, secrets)))
            continue
        try:
            adapter = registry.get_adapter(kind)
        except UnknownAdapter as exc:
            issues.append(ConfigIssue(json_path((*loc, "type")), str(exc), repr(kind)))
            continue
        options = {k: v for k, v in body.items() if k not in COMMON_SOURCE_KEYS}
        parts: list[Any] = []
        for model, key, value in ((adapter.options_model, None, options),
                                  (CircuitBreakerConfig, "circuit_breaker", body.get("circuit_breaker", {})),
                                  (RetryConfig, "retries", body.get("retries", {}))):
            try:
                parts.append(model.model_validate(value, context=context))
            except ValidationError as exc:
                issues.extend(pydantic_issues(exc, loc if key is None else (*loc, key), secrets))
        if len(parts) < 3:
            continue
        parsed, breaker, retries = parts
        adapters[name] = adapter
        sources[name] = SourceSpec(name, kind, parsed, breaker, retries)

    # Fallback-only views are never merged, so their output names may repeat the primary's.
    fallback_names = {n for body in raw.views if isinstance(body.get("fallback"), list)
                      for n in body["fallback"] if isinstance(n, str)}
    fallback_names |= {n for body in raw.views if isinstance(body.get("sequence"), dict)
                       and isinstance(body["sequence"].get("merge"), list)
                       for n in body["sequence"]["merge"] if isinstance(n, str)}
    bodies = {b["name"]: b for b in raw.views if isinstance(b.get("name"), str)}
    views: dict[str, View] = {}
    positions: dict[str, int] = {}
    names: set[str] = set()
    outputs: dict[tuple[str, str], str] = {}
    for i, body in enumerate(raw.views):
        loc = ("views", i)
        try:
            vc = ViewConfig.model_validate(body)
        except ValidationError as exc:
            issues.extend(pydantic_issues(exc, loc, secrets))
            source_name = body.get("source")
            if isinstance(source_name, str) and source_name not in raw.sources:
                issues.append(_unknown_source(loc, source_name, raw.sources))
            continue
        made = view_shape(vc, loc, bodies, issues)
        ok = made is not None
        features, defaults = made or ({}, {})
        if vc.name in names:
            issues.append(ConfigIssue(json_path((*loc, "name")), "duplicate view name", repr(vc.name)))
            ok = False
        names.add(vc.name)
        if vc.source not in raw.sources:
            issues.append(_unknown_source(loc, vc.source, raw.sources))
            ok = False
        for fname, value in vc.defaults.items() if vc.kind == "table" else ():
            dloc = json_path((*loc, "defaults", fname))
            if fname not in vc.features:
                issues.append(ConfigIssue(dloc, "default for an undeclared feature", repr(value)))
                ok = False
            elif not fits(value, vc.features[fname]):
                issues.append(ConfigIssue(dloc, f"default does not fit type {vc.features[fname].value}",
                                          shown(dloc, value, secrets) or json.dumps(value)[:80]))
                ok = False
            else:
                defaults[fname] = float(value) if vc.features[fname] is FeatureType.FLOAT else value
        for fname in features if vc.name not in fallback_names else ():
            out = vc.prefix + fname
            other = outputs.get((vc.entity, out))
            if other is not None and other != vc.name:
                issues.append(ConfigIssue(json_path((*loc, "features", fname)),
                                          f"output feature {out!r} of entity {vc.entity!r} "
                                          f"is also produced by view {other!r}", repr(fname)))
                ok = False
            outputs.setdefault((vc.entity, out), vc.name)
        view_options: Any = None
        adapter_cls = adapters.get(vc.source)
        if adapter_cls is not None:
            try:
                view_options = adapter_cls.view_options_model.model_validate(vc.options, context=context)
            except ValidationError as exc:
                issues.extend(pydantic_issues(exc, (*loc, "options"), secrets))
                ok = False
        elif vc.source in raw.sources:
            ok = False  # the source itself is invalid; already reported
        if adapter_cls is not None and vc.kind == "sequence" and not adapter_cls.capabilities.sequences:
            issues.append(ConfigIssue(json_path((*loc, "kind")), f"adapter {adapter_cls.type_name!r} cannot "
                                      "read sequence views", repr(vc.kind)))
            ok = False
        if ok:
            views[vc.name] = View(vc.name, vc.entity, vc.source, vc.table, vc.key, vc.key_type,
                                  features, defaults, vc.prefix, vc.timeout_ms, view_options, vc,
                                  tuple(vc.fallback), vc.fallback_on_missing, vc.cache, vc.hedge_ms,
                                  _refs(vc.key_from), vc.key_separator, vc.freshness, vc.kind,
                                  vc.sequence)
            positions[vc.name] = i
    issues.extend(_check_chains(raw, views, positions, adapters))
    issues.extend(check_references(views, positions))
    entities = sorted({"user", "item", *(v.entity for v in views.values())})
    issues.extend(stages.check(views, positions, entities))
    issues.extend(_check_semantics(raw, views, positions, secrets))
    derived = _check_derived(raw, views, secrets, issues)
    _check_scenes(raw, views, issues)
    jobs: list[Any] = []
    check_sync = _sections.get("sync")
    if check_sync is not None:
        jobs, sync_issues = check_sync(raw.sync, views, adapters)
        issues.extend(sync_issues)
    if issues:
        raise ConfigError(issues)
    request_context = {name: ContextFeature(type=c.type, default=_as_type(c.default, c.type))
                       for name, c in raw.context.items()}
    return Config(sources, views, raw.service, doc, jobs, request_context, derived, dict(raw.scenes))


def _refs(value: str | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _as_type(value: Any, ftype: FeatureType) -> Any:
    return float(value) if ftype is FeatureType.FLOAT and isinstance(value, int) else value


def _check_semantics(raw: RawConfig, views: Mapping[str, View], positions: Mapping[str, int],
                     secrets: Mapping[str, str]) -> list[ConfigIssue]:
    """Freshness fields hold epoch seconds of the view; context defaults fit their types."""
    issues = []
    for view in views.values():
        if view.freshness is not None:
            path = json_path(("views", positions[view.name], "freshness", "field"))
            ftype = view.features.get(view.freshness.field)
            if ftype is None:
                issues.append(ConfigIssue(path, "not a feature of this view", repr(view.freshness.field)))
            elif ftype not in (FeatureType.INT, FeatureType.FLOAT):
                issues.append(ConfigIssue(path, f"must be an int or float feature (epoch seconds), not "
                                                f"{ftype.value}", repr(view.freshness.field)))
    for name, feature in raw.context.items():
        if not fits(feature.default, feature.type):
            path = json_path(("context", name, "default"))
            issues.append(ConfigIssue(path, f"default does not fit type {feature.type.value}",
                                      shown(path, feature.default, secrets) or "..."))
    return issues


def _check_derived(raw: RawConfig, views: Mapping[str, View], secrets: Mapping[str, str],
                   issues: list[ConfigIssue]) -> list[DerivedConfig]:
    """Each derived feature's inputs are features of its row, of a request-level entity or the context."""
    made = {(v.entity, v.prefix + f) for v in views.values() for f in v.features}
    keys = stages.request_keys(views)
    entities = {"user", "item", *(v.entity for v in views.values())}
    out = []
    for i, body in enumerate(raw.derived):
        try:
            spec = DerivedConfig.model_validate(body)
        except ValidationError as exc:
            issues.extend(pydantic_issues(exc, ("derived", i), secrets))
            continue
        ok = True
        if spec.entity not in entities:
            issues.append(ConfigIssue(json_path(("derived", i, "entity")), "no view serves this entity",
                                      repr(spec.entity)))
            continue
        names = spec.input_names
        for j, name in enumerate(names):
            where = ("derived", i, "input") if spec.input is not None else ("derived", i, "inputs", j)
            problem = _input_problem(name, spec.entity, made, keys, raw.context)
            if problem:
                issues.append(ConfigIssue(json_path(where), problem, repr(name)))
                ok = False
        if spec.fn is not None and spec.op == "python":
            try:  # imported now, so that a wrong name is this error and not the first request's
                load_function(spec.fn)
            except UsageError as exc:
                issues.append(ConfigIssue(json_path(("derived", i, "fn")), str(exc)))
                ok = False
        if (spec.entity, spec.name) in made:
            issues.append(ConfigIssue(json_path(("derived", i, "name")),
                                      f"entity {spec.entity!r} already has a feature of that name",
                                      repr(spec.name)))
            ok = False
        made.add((spec.entity, spec.name))  # later derived features may use it
        if ok:
            out.append(spec)
    return out


def _check_scenes(raw: RawConfig, views: Mapping[str, View], issues: list[ConfigIssue]) -> None:
    """A scene names served views, and with each view keyed by features, the views it is keyed by."""
    aside = {f for v in views.values() for f in (*v.fallback, *(v.sequence.merge if v.sequence else ()))}
    served = {n for n in views if n not in aside}
    for scene, spec in raw.scenes.items():
        chosen = set(spec.views)
        for j, name in enumerate(spec.views):
            path = json_path(("scenes", scene, "views", j))
            if name not in views:
                issues.append(ConfigIssue(path, "unknown view", repr(name)))
            elif name not in served:
                issues.append(ConfigIssue(path, "a fallback-only (or merge-only) view is not read by "
                                                "itself", repr(name)))
            else:
                lacking = sorted(stages.dependencies(views[name], views) - chosen)
                if lacking:
                    issues.append(ConfigIssue(path, f"is keyed by features of {lacking}: add them to "
                                                    "the scene", repr(name)))


def _input_problem(name: str, entity: str, made: set[tuple[str, str]], keys: Mapping[str, set[str]],
                   context: Mapping[str, ContextFeature]) -> str | None:
    """Why an input name cannot be resolved for rows of ``entity`` (None: it can)."""
    owner, _, feature = name.rpartition(".")
    owner = owner or entity
    if owner == "context":
        return None if feature in context else "not a declared context feature"
    if owner == "item" and entity != "item":
        return "item features are per item: only item rows can use them"
    if (owner, feature) in made or feature in keys.get(owner, ()):
        return None
    return f"no view (or earlier derived feature) of entity {owner!r} produces {feature!r}"


def _check_chains(raw: RawConfig, views: Mapping[str, View], positions: Mapping[str, int],
                  adapters: Mapping[str, Adapter]) -> list[ConfigIssue]:
    """Fallback chains and cache tiers refer to views and sources that can serve them."""
    issues = []
    for view in views.values():
        i = positions[view.name]
        for j, name in enumerate(view.fallback):
            path = json_path(("views", i, "fallback", j))
            other = views.get(name)
            if name == view.name:
                issues.append(ConfigIssue(path, "a view cannot be its own fallback", repr(name)))
            elif other is None:
                issues.append(ConfigIssue(path, "unknown view", repr(name)))
            elif other.entity != view.entity:
                issues.append(ConfigIssue(path, f"fallback serves entity {other.entity!r}, "
                                                f"not {view.entity!r}", repr(name)))
            else:
                lacking = [f for f in view.features if f not in other.features]
                if lacking:
                    issues.append(ConfigIssue(path, f"fallback lacks features {lacking}", repr(name)))
                elif other.fallback:
                    issues.append(ConfigIssue(path, "a fallback view cannot have a fallback of its own",
                                              repr(name)))
        if view.cache is not None and view.cache.l2 is not None:
            path = json_path(("views", i, "cache", "l2", "source"))
            adapter = adapters.get(view.cache.l2.source)
            if view.cache.l2.source not in raw.sources:
                issues.append(ConfigIssue(path, "unknown source", repr(view.cache.l2.source)))
            elif adapter is not None and not adapter.capabilities.key_value:
                issues.append(ConfigIssue(path, f"adapter {adapter.type_name!r} cannot hold a shared cache "
                                                "(use a redis source)", repr(view.cache.l2.source)))
    return issues


def quote_identifier(name: str, quote: str = '"') -> str:
    """Quote a validated (optionally qualified) identifier for SQL; refuse anything else."""
    if not re.match(QUALIFIED, name):
        raise ConfigError([ConfigIssue("$", "invalid identifier", repr(name))])
    return ".".join(f"{quote}{part}{quote}" for part in name.split("."))
