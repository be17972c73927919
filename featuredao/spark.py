"""Write a Spark DataFrame into a featuredao view from the executors (extra ``spark``).

``write_view(df, "featuredao.json", "item_features")`` checks the DataFrame's columns against the view
on the driver (before any task starts), then runs one task per partition: each builds its own DAO from
the config, types the rows by the view's features, upserts them in batches (idempotent: a retried task
writes the same rows again), retries a target that is unavailable with backoff, sends the records it
cannot write to one dead-letter file per partition, and returns its counts to the driver.

pyspark is imported lazily and only here (and by ``featuredao.sync.spark_engine``): the core package
imports without it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featuredao.config import Config, View, load
from featuredao.errors import BackendError, BackendUnavailable, UsageError
from featuredao.types import FeatureType

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import DataType, StructType

    from featuredao.sync.sink import Sink

log = logging.getLogger("featuredao.spark")

ConfigRef = str | os.PathLike[str] | Mapping[str, Any]
"""A config file (executors read it: a shared path, or shipped with ``--files``) or the config document."""

_INTEGRAL = frozenset({"byte", "short", "integer", "long"})
_FRACTIONAL = frozenset({"float", "double", "decimal"})
_TEXT = frozenset({"string", "varchar", "char"})
_CAST = {FeatureType.INT: "bigint", FeatureType.FLOAT: "double", FeatureType.STR: "string",
         FeatureType.BOOL: "boolean", FeatureType.LIST_INT: "array<bigint>",
         FeatureType.LIST_FLOAT: "array<double>", FeatureType.LIST_STR: "array<string>"}
_SAMPLES = 20
"""Dead-letter reasons returned to the driver with the counts (the files hold every record)."""


_STATS_SCHEMA = (("partition", "int"), ("rows", "bigint"), ("written", "bigint"), ("failed", "bigint"),
                 ("retries", "bigint"), ("errors", "array<string>"), ("file", "string"))
"""The counts a task returns to the driver, as a Spark schema (the Arrow path's output rows)."""


def _pyarrow() -> Any:
    import pyarrow  # type: ignore[import-untyped]

    return pyarrow


def _arrow_schema() -> Any:
    pa = _pyarrow()
    types = {"int": pa.int32(), "bigint": pa.int64(), "string": pa.string(),
             "array<string>": pa.list_(pa.string())}
    return pa.schema([(name, types[kind]) for name, kind in _STATS_SCHEMA])


def _has_arrow() -> bool:
    """Whether pyspark's Arrow path is installed here (pyarrow and pandas: ``pyspark[sql]``)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("pyarrow", "pandas"))


class ColumnMismatch(UsageError):
    """The DataFrame's columns do not fit the view: every missing or mistyped column, by name."""

    def __init__(self, view: str, problems: Sequence[str]) -> None:
        self.view = view
        self.problems = list(problems)
        super().__init__(f"DataFrame does not fit view {view!r}: " + "; ".join(self.problems))


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What ``write_view`` did, summed over the partitions."""

    rows: int
    """Rows read from the DataFrame."""
    written: int
    """Rows the view's store confirmed (a key repeated in one batch counts once)."""
    failed: int
    """Records sent to the dead letters (bad keys, values that do not coerce, rejected or unwritable)."""
    retries: int
    """Batches tried again after the store was unavailable."""
    partitions: int
    elapsed_s: float
    dead_letter_files: tuple[str, ...] = ()
    errors: tuple[str, ...] = field(default=())
    """A sample of dead-letter reasons (at most 20)."""

    @property
    def ok(self) -> bool:
        """True when no record went to the dead letters."""
        return self.failed == 0


def _fits(ftype: FeatureType, dtype: DataType) -> bool:
    """Whether every value of a Spark column of ``dtype`` converts to ``ftype`` without loss or guessing."""
    kind = dtype.typeName()
    if ftype.is_list:
        element = getattr(dtype, "elementType", None)
        return kind == "array" and element is not None and _fits(ftype.element, element)
    if ftype is FeatureType.INT:
        return kind in _INTEGRAL or (kind == "decimal" and getattr(dtype, "scale", 1) == 0)
    if ftype is FeatureType.FLOAT:
        return kind in _INTEGRAL or kind in _FRACTIONAL
    if ftype is FeatureType.STR:
        return kind in _TEXT or kind in _INTEGRAL
    return kind == "boolean"


def check_columns(schema: StructType, view: View) -> list[str]:
    """The DataFrame columns ``write_view`` reads (key first, then the features); raise ColumnMismatch
    naming every missing or mistyped column."""
    by_name = {f.name: f.dataType for f in schema.fields}
    problems: list[str] = []
    wanted: list[tuple[str, FeatureType, str]] = [
        (view.key, FeatureType.INT if view.key_type == "int" else FeatureType.STR, "key")]
    if view.sequence is not None:  # a sequence view: each row is one event of the key
        wanted += [(name, FeatureType(kind), "event field") for name, kind in view.sequence.fields.items()]
    else:
        wanted += [(name, ftype, "feature") for name, ftype in view.features.items()]
    for name, ftype, what in wanted:
        dtype = by_name.get(name)
        if dtype is None:
            problems.append(f"missing column {name!r} (the view's {what}, {ftype.value})")
        elif not _fits(ftype, dtype):
            problems.append(f"column {name!r} is {dtype.simpleString()}, the view's {what} is {ftype.value} "
                            f"(cast it: df[{name!r}].cast({_CAST[ftype]!r}))")
    if problems:
        raise ColumnMismatch(view.name, problems)
    return [name for name, _, _ in wanted]


def _conflict(conflict: str | Mapping[str, Any] | None, view: View) -> Any:
    from featuredao.sync.config import ConflictConfig

    spec = {"strategy": conflict} if isinstance(conflict, str) else dict(conflict or {})
    try:
        model = ConflictConfig.model_validate(spec)
    except ValueError as exc:
        raise UsageError(f"conflict {conflict!r}: {exc}") from None
    if view.sequence is not None and model.strategy != "source_wins":
        raise UsageError(f"view {view.name!r} is a sequence view: its events are appended (no conflict "
                         "strategy)")
    # Functions registered on the driver do not exist in the executors' interpreters: built-ins only.
    if model.strategy not in ("source_wins", "last_writer_wins", "target_wins"):
        raise UsageError(f"conflict strategy {model.strategy!r}: write_view supports source_wins, "
                         "last_writer_wins and target_wins")
    if model.strategy == "last_writer_wins" and model.version not in view.features:
        raise UsageError(f"conflict last_writer_wins needs a 'version' that is a feature of view "
                         f"{view.name!r} (got {model.version!r})")
    return model


def _portable(config: ConfigRef) -> str | dict[str, Any]:
    """What the tasks get: the file's absolute path, or a plain dict (both pickle)."""
    if isinstance(config, Mapping):
        return dict(config)
    return str(Path(config).resolve())


def _load_in_task(config: str | dict[str, Any]) -> Config:
    if isinstance(config, dict) or Path(config).exists():
        return load(config)
    # On a cluster the file may have come with ``spark-submit --files``: it is then in the task's files.
    from pyspark import SparkFiles

    shipped = Path(SparkFiles.get(Path(config).name))
    if shipped.exists():
        return load(shipped)
    return load(config)  # the ConfigError names the missing file


def _sink(cfg: Config, view: str, batch_size: int, conflict: Any) -> tuple[Any, Sink]:
    """A runtime of the config and the sync sink that types, resolves and writes the view's rows."""
    from featuredao.factory import build
    from featuredao.metrics import Metrics
    from featuredao.sync.config import SyncJob
    from featuredao.sync.sink import Sink

    job = SyncJob(name="write_view", source=view, targets=(view,), mode="full", watermark=None,
                  batch_size=batch_size, delete_missing=False, steps=(), conflict=conflict, dead_letter=None,
                  checkpoint_source=None)
    runtime = build(cfg, Metrics.disabled())
    try:
        return runtime, Sink(runtime, job, view, Metrics.disabled())
    except BaseException:
        runtime.close()
        raise


class _PartitionWriter:
    """The task body: one partition's rows into the view; yields one dict of counts."""

    def __init__(self, config: str | dict[str, Any], view: str, columns: list[str], batch_size: int,
                 conflict: Any, dead_letter: str | None, retries: int, backoff_s: float) -> None:
        self.config = config
        self.view = view
        self.columns = columns
        self.batch_size = batch_size
        self.conflict = conflict
        self.dead_letter = dead_letter
        self.retries = retries
        self.backoff_s = backoff_s

    def write(self, index: int, records: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """Write one partition's records (dicts by column name); return its counts."""
        from featuredao.sync.pipeline import DeadLetters

        stats: dict[str, Any] = {"partition": index, "rows": 0, "written": 0, "failed": 0, "retries": 0,
                                 "errors": [], "file": None}
        dlq: DeadLetters | None = None
        if self.dead_letter is not None:
            path = Path(self.dead_letter) / f"part-{index:05d}.jsonl"
            path.unlink(missing_ok=True)  # a retried task attempt writes its file anew
            dlq = DeadLetters(path)
        runtime, sink = _sink(_load_in_task(self.config), self.view, self.batch_size, self.conflict)
        try:
            down = False
            batch: list[Any] = []
            for record in records:
                batch.append(record)
                if len(batch) >= self.batch_size:
                    down = self._batch(sink, batch, stats, dlq, down)
                    batch = []
            if batch:
                self._batch(sink, batch, stats, dlq, down)
        finally:
            runtime.close()
        return stats

    def __call__(self, index: int, rows: Iterable[Any]) -> Iterator[dict[str, Any]]:
        """The RDD task body (``mapPartitionsWithIndex``): Spark Rows, one dict of counts out."""
        columns = self.columns
        yield self.write(index, (dict(zip(columns, r, strict=True)) for r in rows))

    def arrow(self, batches: Iterable[Any]) -> Iterator[Any]:
        """The Arrow task body (``mapInArrow``): record batches in, one batch of counts out."""
        from pyspark import TaskContext

        context = TaskContext.get()
        index = context.partitionId() if context is not None else 0
        stats = self.write(index, (r for b in batches for r in b.to_pylist()))
        yield _pyarrow().RecordBatch.from_pylist([stats], schema=_arrow_schema())

    def _batch(self, sink: Sink, records: list[dict[str, Any]], stats: dict[str, Any], dlq: Any,
               down: bool) -> bool:
        """Write one batch; return whether the store is down (then the next batch gets one try only)."""
        from featuredao.sync.sink import Item

        key = self.columns[0]
        # The record is the row too: the sink projects it onto the view's features (the key is left out).
        items = [Item(record[key], record, record, None) for record in records]
        stats["rows"] += len(items)
        attempt = 0
        while True:
            dead: list[dict[str, Any]] = []
            try:
                written, _, _ = sink.apply(items, dead)
                down = False
                break
            except BackendUnavailable as exc:
                if attempt >= (0 if down else self.retries):
                    dead, written, down = self._unwritten(items, "unavailable", exc), 0, True
                    break
                attempt += 1
                stats["retries"] += 1
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            except BackendError as exc:  # rejected as a whole (a missing table, credentials): no retry
                dead, written = self._unwritten(items, "write", exc), 0
                break
        stats["written"] += written
        if dead:
            stats["failed"] += len(dead)
            room = _SAMPLES - len(stats["errors"])
            stats["errors"].extend(f"key {e['key']!r}: {e['stage']}: {e['reason']}" for e in dead[:room])
            if dlq is not None:
                dlq.add(dead)
                stats["file"] = str(dlq.path)
        return down

    def _unwritten(self, items: list[Any], stage: str, exc: BaseException) -> list[dict[str, Any]]:
        reason = f"{type(exc).__name__}: {exc}"
        log.warning("write_view %s: a batch of %d rows was not written: %s", self.view, len(items), reason)
        return [{"job": "write_view", "target": self.view, "stage": stage, "reason": reason, "key": it.key,
                 "position": None, "record": it.source_row} for it in items]


def write_view(df: DataFrame, config: ConfigRef, view: str, *, batch_size: int = 1000,
               conflict: str | Mapping[str, Any] | None = None,
               dead_letter: str | os.PathLike[str] | None = None, retries: int = 3, backoff_s: float = 0.5,
               prepare: bool = True) -> WriteResult:
    """Upsert every row of ``df`` into ``view`` from the executors; return the counts.

    ``conflict``: ``source_wins`` (default), ``target_wins``, or ``{"strategy": "last_writer_wins",
    "version": feature}``. ``dead_letter``: a directory every executor can write; each partition with
    records it could not write leaves ``part-NNNNN.jsonl`` there (stale ones are removed first).
    A batch whose store is unavailable is retried ``retries`` times with doubling ``backoff_s``, then
    goes to the dead letters. ``prepare`` creates the view's table on the driver first where the store
    has one.
    """
    if batch_size < 1 or retries < 0 or backoff_s < 0:
        raise UsageError("write_view: batch_size must be >= 1, retries and backoff_s >= 0")
    started = time.perf_counter()
    portable = _portable(config)
    cfg = load(portable)
    if view not in cfg.views:
        raise UsageError(f"write_view: no view {view!r}; known: {', '.join(sorted(cfg.views))}")
    columns = check_columns(df.schema, cfg.views[view])
    resolved = _conflict(conflict, cfg.views[view])
    folder = None
    if dead_letter is not None:
        folder = Path(dead_letter).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("part-*.jsonl"):
            stale.unlink()
    if prepare:
        _prepare(cfg, view, batch_size, resolved)
    writer = _PartitionWriter(portable, view, columns, batch_size, resolved,
                              None if folder is None else str(folder), retries, backoff_s)
    selected = df.select(*columns)
    if _has_arrow():
        # Arrow batches cross from the JVM about twice as fast as pickled Rows (measured; see benchmarks).
        schema = ", ".join(f"{name} {kind}" for name, kind in _STATS_SCHEMA)
        parts = [r.asDict() for r in selected.mapInArrow(writer.arrow, schema).collect()]
    else:
        parts = selected.rdd.mapPartitionsWithIndex(writer).collect()
    errors: list[str] = []
    for p in parts:
        errors.extend(p["errors"][:max(0, _SAMPLES - len(errors))])
    result = WriteResult(rows=sum(p["rows"] for p in parts), written=sum(p["written"] for p in parts),
                         failed=sum(p["failed"] for p in parts), retries=sum(p["retries"] for p in parts),
                         partitions=len(parts), elapsed_s=time.perf_counter() - started,
                         dead_letter_files=tuple(sorted({p["file"] for p in parts if p["file"]})),
                         errors=tuple(errors))
    log.info("write_view %s: %d rows, %d written, %d dead letters, %d retries, %d partitions in %.1fs",
             view, result.rows, result.written, result.failed, result.retries, result.partitions,
             result.elapsed_s)
    return result


def _prepare(cfg: Config, view: str, batch_size: int, conflict: Any) -> None:
    runtime, sink = _sink(cfg, view, batch_size, conflict)
    try:
        sink.dao.prepare()
    except BackendError as exc:  # the tasks retry and dead-letter what they cannot write
        log.warning("write_view %s: preparing the view failed: %s", view, exc)
    finally:
        runtime.close()


def local_session(master: str = "local[2]", app: str = "featuredao") -> SparkSession:
    """A SparkSession whose Python workers run this interpreter (where featuredao is installed)."""
    from pyspark.sql import SparkSession

    # pyspark starts its Python workers with $PYSPARK_PYTHON, else whatever "python3" is on the PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.master(master).appName(app)
    # Small local jobs: a few shuffle partitions, no UI port to collide with other runs, no progress bar
    # drawn over the command's own output.
    builder = (builder.config("spark.sql.shuffle.partitions", "4").config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false"))
    return builder.getOrCreate()
