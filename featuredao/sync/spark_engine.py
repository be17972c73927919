"""``featuredao sync run CONFIG --job NAME --engine spark``: a full job's key ranges as Spark tasks.

The driver takes the job's pass plan (:func:`featuredao.sync.partitions.plan_pass`: the running pass's
ranges after a restart, else new split points), runs every range some target has not finished as one
Spark task (:func:`~featuredao.sync.partitions.run_range`: it scans its range through the source adapter
and writes through the target adapters, checkpointing each chunk per target and range, exactly as a
local worker process does), and once no range is pending closes the pass (``delete_missing``'s deletes).
A Spark job that failed or was killed resumes from the range checkpoints on the next run.

The checkpoints must be reachable from every executor: on one machine the default SQLite file next to
the config is; on a cluster give the job a ``checkpoint`` source (MySQL, Hologres). For ``spark-submit``
:mod:`featuredao.sync.spark_submit` is the application file.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featuredao.errors import ConfigError, ConfigIssue, UsageError
from featuredao.sync.engine import CycleReport, SyncEngine
from featuredao.sync.partitions import finish_pass, pending, plan_pass, run_range

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger("featuredao.sync")


class _RangeTask:
    """The task body: run the ranges of one Spark partition (one each) from their checkpoints."""

    def __init__(self, config: str, job: str, base_dir: str, config_name: str) -> None:
        self.config = config
        self.job = job
        self.base_dir = base_dir
        self.config_name = config_name

    def __call__(self, ids: Iterable[int]) -> Iterator[dict[str, Any]]:
        config, base_dir = Path(self.config), Path(self.base_dir)
        if not config.exists():
            # On a cluster the config may have come with ``spark-submit --files``.
            from pyspark import SparkFiles

            config = Path(SparkFiles.get(config.name))
            base_dir = base_dir if base_dir.is_dir() else config.parent
        for range_id in ids:
            report = run_range(config, self.job, range_id, base_dir=base_dir, config_name=self.config_name)
            yield {"range": range_id, **asdict(report)}


class SparkSync:
    """The object ``featuredao sync run --engine spark`` runs: like a SyncEngine's ``run``, one pass."""

    def __init__(self, config: str | Path, job: str, *, master: str | None = None) -> None:
        self.path = Path(config).resolve()
        self.master = master
        self.engine = SyncEngine.from_file(self.path, job)
        self.job = self.engine.job
        if self.job.mode != "full":
            self.engine.close()
            raise ConfigError([ConfigIssue(f"$.sync[{self.job.index}].mode", "--engine spark runs full jobs "
                                           "(incremental and cdc jobs run with the local engine)",
                                           repr(self.job.mode))])
        self._spark: SparkSession | None = None
        self._own_spark = False
        self._group = f"featuredao-sync-{self.job.name}-{uuid.uuid4().hex[:8]}"
        self._abandoned = threading.Event()

    def session(self) -> SparkSession:
        """spark-submit's SparkSession when launched by it, else a local one (``master``, default all
        cores)."""
        if self._spark is None:
            from pyspark.sql import SparkSession

            from featuredao.spark import local_session

            active = SparkSession.getActiveSession()
            if active is not None:
                self._spark = active
            elif "PYSPARK_GATEWAY_PORT" in os.environ:  # started by spark-submit: its master and conf
                builder = SparkSession.builder.appName(f"featuredao sync {self.job.name}")
                self._spark = (builder.master(self.master) if self.master else builder).getOrCreate()
                self._own_spark = True
            else:
                self._spark = local_session(self.master or "local[*]", f"featuredao sync {self.job.name}")
                self._own_spark = True
        return self._spark

    def run(self, *, follow: bool = False, interval_s: float = 5.0, stop: threading.Event | None = None,
            on_progress: Callable[[int], None] | None = None,
            on_cycle: Callable[[CycleReport], None] | None = None) -> CycleReport:
        """One pass: every pending range as a Spark task, then the pass's deletes once none is pending."""
        if follow:
            raise UsageError("--follow runs with the local engine (a Spark job runs one full pass)")
        stop = stop or threading.Event()
        report = CycleReport()
        sc = self.session().sparkContext
        # Ranges: the job's parallelism, or as many as Spark runs at once when the job names none.
        n = self.job.parallelism if self.job.parallelism > 1 else sc.defaultParallelism
        plan = plan_pass(self.engine, max(1, n))
        todo = pending(self.engine, plan)
        if todo:
            log.info("job %s: %d of %d ranges as Spark tasks", self.job.name, len(todo), len(plan.ranges))
            task = _RangeTask(str(self.path), self.job.name, str(self.path.parent), self.path.stem)
            finished = threading.Event()

            def cancel_on_stop() -> None:
                while not finished.is_set():
                    if stop.wait(0.2):
                        self.abandon()
                        return

            threading.Thread(target=cancel_on_stop, name="featuredao-spark-stop", daemon=True).start()
            sc.setJobGroup(self._group, f"featuredao sync {self.job.name}", interruptOnCancel=True)
            try:
                results = sc.parallelize(todo, len(todo)).mapPartitions(task).collect()
            except Exception as exc:
                if stop.is_set() or self._abandoned.is_set():
                    report.interrupted = True  # cancelled: the ranges' checkpoints hold what was confirmed
                    return self._done(report, on_progress, on_cycle)
                text = str(exc).strip().splitlines()
                report.source_error = f"Spark job failed: {text[0] if text else type(exc).__name__}"
                log.warning("job %s: %s (range checkpoints stay; the next run resumes)", self.job.name,
                            report.source_error)
                return self._done(report, on_progress, on_cycle)
            finally:
                finished.set()
            for r in results:
                _merge(report, r)
        if report.ok and not pending(self.engine, plan):
            closing = finish_pass(self.engine, plan)
            report.deleted += closing.deleted
            report.down.update(closing.down)
        return self._done(report, on_progress, on_cycle)

    def _done(self, report: CycleReport, on_progress: Callable[[int], None] | None,
              on_cycle: Callable[[CycleReport], None] | None) -> CycleReport:
        if on_progress is not None and report.read:
            on_progress(report.read)
        if on_cycle is not None:
            on_cycle(report)
        return report

    def abandon(self) -> None:
        """Cancel the running Spark job (from another thread): its tasks are killed mid-chunk, which the
        next run reads again; what the targets confirmed is checkpointed."""
        self._abandoned.set()
        if self._spark is not None:
            self._spark.sparkContext.cancelJobGroup(self._group)

    def status(self) -> list[dict[str, Any]]:
        """The job's checkpoints, as ``featuredao sync status`` shows them."""
        return self.engine.status()

    def close(self) -> None:
        """Close the driver's engine and stop the SparkSession this runner created."""
        self.engine.close()
        if self._spark is not None and self._own_spark:
            self._spark.stop()
        self._spark = None

    def __enter__(self) -> SparkSync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _merge(report: CycleReport, part: dict[str, Any]) -> None:
    for name in ("read", "written", "deleted", "filtered", "failed"):
        setattr(report, name, getattr(report, name) + int(part[name]))
    for target, error in part["down"].items():
        report.down[f"{target}@{part['range']}"] = error
    if part["source_error"] and report.source_error is None:
        report.source_error = f"range {part['range']}: {part['source_error']}"
    report.interrupted = report.interrupted or bool(part["interrupted"])

