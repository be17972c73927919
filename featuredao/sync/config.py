"""The ``sync`` section of the config: jobs validated against the views they read and write.

Every problem is reported at once with its JSON path (``$.sync[0].transform[2].cast.price``). What is
checked: unknown keys, unique job names, the source view and the target views exist, the source's
adapter can serve the mode (``scan`` for full, ``changes`` for incremental, ``change_feed`` and ``scan``
for cdc), targets can be written (and deleted from when the job deletes), the watermark is named for
incremental jobs, transform steps name fields that exist at that step, cast types are known, compute
functions and conflict strategies are registered, the conflict version field is produced and held by
every target, every target feature is produced, and the checkpoint source can hold state.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, model_validator

from featuredao.config import Identifier, StrictModel, View, register_section
from featuredao.derive import DerivedConfig
from featuredao.errors import ConfigIssue
from featuredao.registry import Adapter
from featuredao.sync import functions
from featuredao.types import FeatureType
from featuredao.validation import json_path, pydantic_issues

Mode = Literal["full", "incremental", "cdc"]
OnGap = Literal["fail", "resnapshot"]
FilterOp = Literal["eq", "ne", "lt", "le", "gt", "ge", "in", "not_in", "is_null", "not_null"]


class FilterSpec(StrictModel):
    """Keep rows where ``field op value``; a comparison that cannot be made drops the row, or with
    ``strict`` sends it to the dead-letter file."""

    field: Identifier
    op: FilterOp
    value: Any = None
    strict: bool = False


class ComputeSpec(StrictModel):
    """Set ``field`` to ``fn(row)``, ``fn`` registered with ``featuredao.sync.register_transform``."""

    field: Identifier
    fn: str = Field(min_length=1)


class _Rename(StrictModel):
    rename: dict[Identifier, Identifier] = Field(min_length=1)


class _Cast(StrictModel):
    cast: dict[Identifier, FeatureType] = Field(min_length=1)


class _Default(StrictModel):
    default: dict[Identifier, Any] = Field(min_length=1)


class _DropIfNull(StrictModel):
    drop_if_null: list[Identifier] = Field(min_length=1)


class _Filter(StrictModel):
    filter: FilterSpec


class _Compute(StrictModel):
    compute: ComputeSpec


class _Derive(StrictModel):
    # The serving side's derived-feature spec, the entity being the row itself: the same op code on both
    # sides, so training and serving features do not drift.
    derive: DerivedConfig

    @model_validator(mode="before")
    @classmethod
    def _row_entity(cls, data: Any) -> Any:
        spec = data.get("derive") if isinstance(data, dict) else None
        if isinstance(spec, dict) and "entity" not in spec:
            data = {**data, "derive": {**spec, "entity": "row"}}
        return data


_STEPS: dict[str, type[StrictModel]] = {
    "rename": _Rename, "cast": _Cast, "default": _Default, "drop_if_null": _DropIfNull,
    "filter": _Filter, "compute": _Compute, "derive": _Derive,
}


@dataclass(frozen=True, slots=True)
class Step:
    """One validated transform step: its kind and its arguments."""

    kind: str
    args: Any


class ConflictConfig(StrictModel):
    """How a source row meets the row a target already holds."""

    strategy: str = "source_wins"
    """``source_wins`` (always write), ``last_writer_wins`` (write when the source's ``version`` is not
    older), ``target_wins`` (only insert keys the target lacks) or a registered function's name."""
    version: Identifier | None = None
    """The field holding the version (last_writer_wins); every target must hold it too."""


class DeadLetterConfig(StrictModel):
    """Where records that cannot be synced go (JSON lines)."""

    path: str | None = None
    """Default: ``<config name>.<job>.dlq.jsonl`` next to the config file."""


class CheckpointConfig(StrictModel):
    """Where checkpoints live."""

    source: str | None = None
    """A source whose adapter holds state (sqlite); default ``<config name>.sync.db`` next to the config."""


class JobModel(StrictModel):
    """One job as written in JSON."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: Identifier
    from_: str = Field(alias="from")
    to: list[str] = Field(min_length=1)
    mode: Mode = "full"
    watermark: Identifier | None = None
    batch_size: int = Field(default=1000, ge=1, le=100_000)
    delete_missing: bool = False
    transform: list[dict[str, Any]] = Field(default_factory=list)
    conflict: ConflictConfig = ConflictConfig()
    dead_letter: DeadLetterConfig = DeadLetterConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    imports: list[str] = Field(default_factory=list)
    """Modules imported before names are checked (they register compute and conflict functions)."""
    rate_limit_rows_s: float | None = Field(default=None, gt=0)
    """Read at most this many source rows per second (protects a busy source)."""
    retry_backoff_s: float = Field(default=1.0, gt=0, le=600)
    """First wait before retrying a target that is down, or the source (doubles up to 60 s)."""
    parallelism: int = Field(default=1, ge=1, le=256)
    """full and incremental: the key space is split into this many ranges, each run by its own worker
    process with its own checkpoints (see :mod:`featuredao.sync.partitions`)."""
    on_gap: OnGap = "fail"
    """cdc: when the change feed lost changes after the checkpoint (an expired binlog, a dropped slot),
    ``fail`` (an error saying a new snapshot is needed) or ``resnapshot`` (take it, then delete from the
    targets the keys the job wrote that the new snapshot did not see)."""


@dataclass(frozen=True, slots=True)
class SyncJob:
    """A validated synchronization job."""

    name: str
    source: str
    """The source view."""
    targets: tuple[str, ...]
    """Target views, each with its own checkpoint."""
    mode: Mode
    watermark: str | None
    batch_size: int
    delete_missing: bool
    steps: tuple[Step, ...]
    conflict: ConflictConfig
    dead_letter: str | None
    checkpoint_source: str | None
    rate_limit_rows_s: float | None = None
    retry_backoff_s: float = 1.0
    on_gap: OnGap = "fail"
    parallelism: int = 1
    """Key ranges run by worker processes at once (1: the job runs in the calling process)."""
    index: int = 0
    """Position in the config's ``sync`` list."""
    model: JobModel | None = field(default=None, repr=False, compare=False)


def _issues(exc: ValidationError, loc: tuple[int | str, ...]) -> list[ConfigIssue]:
    return pydantic_issues(exc, loc)


def check_jobs(raw: Sequence[Mapping[str, Any]], views: Mapping[str, View],
               adapters: Mapping[str, Adapter]) -> tuple[list[Any], list[ConfigIssue]]:
    """Validate every job; return the parsed jobs and the problems found (with JSON paths)."""
    jobs: list[Any] = []
    issues: list[ConfigIssue] = []
    names: set[str] = set()
    for i, body in enumerate(raw):
        loc: tuple[int | str, ...] = ("sync", i)
        try:
            model = JobModel.model_validate(body)
        except ValidationError as exc:
            issues.extend(_issues(exc, loc))
            continue
        found: list[ConfigIssue] = []
        if model.name in names:
            found.append(ConfigIssue(json_path((*loc, "name")), "duplicate job name", repr(model.name)))
        names.add(model.name)
        for j, module in enumerate(model.imports):
            try:
                importlib.import_module(module)
            except Exception as exc:
                found.append(ConfigIssue(json_path((*loc, "imports", j)),
                                         f"cannot import: {type(exc).__name__}: {exc}", repr(module)))
        job = _check_job(model, loc, views, adapters, found)
        issues.extend(found)
        if job is not None and not found:
            jobs.append(job)
    return jobs, issues


def _check_job(model: JobModel, loc: tuple[int | str, ...], views: Mapping[str, View],
               adapters: Mapping[str, Adapter], issues: list[ConfigIssue]) -> SyncJob | None:
    def issue(where: tuple[int | str, ...], message: str, value: Any = None) -> None:
        issues.append(ConfigIssue(json_path((*loc, *where)), message, None if value is None else repr(value)))

    source = views.get(model.from_)
    if source is None:
        issue(("from",), "unknown view", model.from_)
    else:
        caps = _caps(adapters, source)
        need = {"full": ("scan",), "incremental": ("changes",), "cdc": ("change_feed", "scan")}[model.mode]
        for flag in need:
            if caps is not None and not getattr(caps, flag):
                issue(("from",), f"the {source.source!r} source's adapter cannot serve {model.mode} sync "
                                 f"(no {flag} capability)", model.from_)
    if model.mode == "incremental" and model.watermark is None:
        issue(("watermark",), "an incremental job needs the watermark column (a value that grows with "
                              "every change, e.g. updated_at)")
    if model.mode != "incremental" and model.watermark is not None:
        issue(("watermark",), "a watermark applies to incremental jobs only", model.watermark)
    if model.on_gap != "fail" and model.mode != "cdc":
        issue(("on_gap",), "on_gap applies to cdc jobs", model.on_gap)
    if model.parallelism > 1 and model.mode == "cdc":
        issue(("parallelism",), "parallelism applies to full and incremental jobs (a change feed is one "
                                "ordered stream)", model.parallelism)
    if model.delete_missing and model.mode != "full":
        issue(("delete_missing",), "delete_missing applies to full jobs (cdc propagates deletes itself)")
    deletes = model.delete_missing or model.mode == "cdc"
    seen: set[str] = set()
    targets: list[tuple[int, View]] = []
    for j, name in enumerate(model.to):
        target = views.get(name)
        if name in seen:
            issue(("to", j), "duplicate target", name)
            continue
        seen.add(name)
        if target is None:
            issue(("to", j), "unknown view", name)
            continue
        if name == model.from_:
            issue(("to", j), "a job cannot write into its own source view", name)
            continue
        caps = _caps(adapters, target)
        if caps is not None and not caps.write:
            issue(("to", j), f"the {target.source!r} source's adapter is read-only", name)
        if caps is not None and deletes and not caps.delete:
            why = "cdc" if model.mode == "cdc" else "delete_missing"
            issue(("to", j), f"{why} needs deletes, which the {target.source!r} source's adapter lacks", name)
        targets.append((j, target))

    steps: list[Step] = []
    fields: set[str] | None = set(source.features) if source is not None else None
    for j, body in enumerate(model.transform):
        step = _check_step(body, (*loc, "transform", j), fields, issues)
        if step is not None:
            steps.append(step)

    strategy = model.conflict.strategy
    if strategy not in functions.BUILTIN_CONFLICTS and functions.conflict(strategy) is None:
        known = [*functions.BUILTIN_CONFLICTS, *functions.conflict_names()]
        issue(("conflict", "strategy"), f"unknown strategy; known: {', '.join(known)} "
                                        "(register others with featuredao.sync.register_conflict)", strategy)
    version = model.conflict.version
    if strategy == "last_writer_wins" and version is None:
        issue(("conflict", "version"), "last_writer_wins needs the version field")
    if version is not None:
        if fields is not None and version not in fields:
            issue(("conflict", "version"), "not a field of the source rows after the transforms", version)
        for _, target in targets:
            if version not in target.features:
                issue(("conflict", "version"), f"target view {target.name!r} does not hold this field",
                      version)
    for j, target in targets:
        if target.sequence is not None and (deletes or strategy != "source_wins"):
            issue(("to", j), "a sequence view takes events: appended, never deleted (no cdc, "
                             "delete_missing or conflict strategy)", target.name)
    if fields is not None:
        for j, target in targets:
            # A sequence view's events come from its fields, keyed by the record's field named like its key.
            needed = [target.key, *target.sequence.fields] if target.sequence is not None else target.features
            lacking = [f for f in needed if f not in fields]
            if lacking:
                issue(("to", j), f"target features {lacking} are not produced by the source after the "
                                 "transforms (rename or compute them)", target.name)

    ckpt = model.checkpoint.source
    if ckpt is not None:
        adapter = adapters.get(ckpt)
        if adapter is None:
            issue(("checkpoint", "source"), f"unknown source; known: {', '.join(adapters)}", ckpt)
        elif not adapter.capabilities.state:
            issue(("checkpoint", "source"), f"adapter {adapter.type_name!r} cannot hold checkpoints "
                                            "(use a sqlite source)", ckpt)
    if source is None:
        return None
    return SyncJob(model.name, model.from_, tuple(model.to), model.mode, model.watermark, model.batch_size,
                   model.delete_missing, tuple(steps), model.conflict, model.dead_letter.path, ckpt,
                   model.rate_limit_rows_s, model.retry_backoff_s, model.on_gap, model.parallelism,
                   int(loc[1]), model)


def _caps(adapters: Mapping[str, Adapter], view: View) -> Any:
    adapter = adapters.get(view.source)
    return None if adapter is None else adapter.capabilities


def _check_step(body: Mapping[str, Any], loc: tuple[int | str, ...], fields: set[str] | None,
                issues: list[ConfigIssue]) -> Step | None:
    """Validate one step and update ``fields`` (the fields a row has after it)."""
    kinds = [k for k in body if k in _STEPS]
    if len(body) != 1 or len(kinds) != 1:
        issues.append(ConfigIssue(json_path(loc), "a transform step is an object with exactly one of: "
                                                  + ", ".join(_STEPS), None))
        return None
    kind = kinds[0]
    try:
        parsed: Any = _STEPS[kind].model_validate(body)
    except ValidationError as exc:
        issues.extend(_issues(exc, loc))
        return None
    args = getattr(parsed, kind)

    def missing(name: str, *where: int | str) -> bool:
        if fields is not None and name not in fields:
            issues.append(ConfigIssue(json_path((*loc, kind, *where)),
                                      f"no field {name!r} at this step; fields: {', '.join(sorted(fields))}",
                                      repr(name)))
            return True
        return False

    if kind == "rename":
        for old, new in args.items():
            if not missing(old, old) and fields is not None:
                if new in fields and new != old:
                    issues.append(ConfigIssue(json_path((*loc, kind, old)),
                                              f"renaming onto existing field {new!r}", repr(new)))
                fields.discard(old)
                fields.add(new)
    elif kind == "cast":
        for name in args:
            missing(name, name)
    elif kind == "default":
        if fields is not None:
            fields.update(args)
    elif kind == "drop_if_null":
        for j, name in enumerate(args):
            missing(name, j)
    elif kind == "filter":
        missing(args.field, "field")
        if args.op in ("in", "not_in") and not isinstance(args.value, list):
            issues.append(ConfigIssue(json_path((*loc, kind, "value")), f"{args.op} needs a list",
                                      repr(args.value)))
    elif kind == "derive":
        for j, name in enumerate(args.input_names):
            missing(name, "input" if args.input is not None else "inputs", *(() if args.input else (j,)))
        if fields is not None:
            fields.add(args.name)
    elif kind == "compute":
        if functions.transform(args.fn) is None:
            known = functions.transform_names()
            issues.append(ConfigIssue(json_path((*loc, kind, "fn")),
                                      "unknown function (register it with featuredao.sync."
                                      f"register_transform); known: {', '.join(known) or 'none'}",
                                      repr(args.fn)))
        if fields is not None:
            fields.add(args.field)
    return Step(kind, args)


register_section("sync", check_jobs)
