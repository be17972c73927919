"""Run a job's key ranges in worker processes on one machine (a job's ``"parallelism": N``).

The parent plans the pass (:func:`featuredao.sync.partitions.plan_pass`: split points persisted with it),
starts one worker per range not finished yet, and once every range is done runs the pass's deletes
(``delete_missing``) and closes the pass. Each worker runs :func:`~featuredao.sync.partitions.run_range`:
its range's checkpoints are its own, so a worker that dies (SIGKILL, out of memory) loses at most its
chunk in flight, and the next run of the job resumes that range where its checkpoint stands.

A worker is a subprocess ``python -m featuredao.sync.parallel CONFIG JOB RANGE``: a fresh interpreter
that loads the config file and opens its own connections. A forked child would inherit the parent's
connection pools, sockets and background threads mid-state (``fork`` from a process with threads is
unsafe), and multiprocessing's ``spawn`` re-runs the caller's main script in every child (a script
without an ``if __name__ == "__main__"`` guard would start workers recursively). Functions named by
``compute`` steps or conflicts must therefore be registered by a module the job ``imports``. Each worker
reports JSON lines on its own stdout pipe (never a shared queue, whose lock a killed worker could take
with it); its stderr is the parent's.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from featuredao.metrics import Metrics
from featuredao.sync.engine import CycleReport, SyncEngine
from featuredao.sync.partitions import finish_pass, pending, plan_pass, run_range

_TERM_GRACE_S = 30.0
"""After asking workers to stop, how long they may take to finish their chunk before they are killed."""


@dataclass
class ParallelReport(CycleReport):
    """A cycle over every range: the workers' counts summed, and the ranges whose worker failed."""

    ranges: int = 0
    failed_ranges: dict[int, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every range finished with its targets up and the source readable."""
        return super().ok and not self.failed_ranges

    def add(self, other: CycleReport, range_id: int | None = None) -> None:
        """Sum another report into this one."""
        self.read += other.read
        self.written += other.written
        self.deleted += other.deleted
        self.filtered += other.filtered
        self.failed += other.failed
        self.down.update(other.down)
        self.source_error = self.source_error or other.source_error
        self.interrupted = self.interrupted or other.interrupted
        if range_id is not None and not other.ok:
            self.failed_ranges[range_id] = other.source_error or "; ".join(
                f"{t}: {e}" for t, e in other.down.items())


def worker_main(argv: list[str]) -> None:
    """One range in this process (``CONFIG JOB RANGE``); SIGTERM finishes the chunk in flight, then exits."""
    config, job, range_id = argv[0], argv[1], int(argv[2])
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # The reports own the stdout pipe: anything else this process prints goes to stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def say(kind: str, value: Any) -> None:
        out.write(json.dumps([kind, value], default=str) + "\n")
        out.flush()

    report = run_range(config, job, range_id, stop=stop, on_progress=lambda rows: say("rows", rows))
    say("done", asdict(report))


class ParallelRun:
    """A job with ``parallelism`` > 1 run from a config file, with :class:`SyncEngine`'s ``run`` interface."""

    def __init__(self, path: str | Path, job: str, *, metrics: Metrics | None = None) -> None:
        self.path = Path(path)
        self.engine = SyncEngine.from_file(self.path, job, metrics=metrics)
        self.job = self.engine.job
        self._procs: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()

    def __enter__(self) -> ParallelRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop workers still running and close the parent's engine."""
        self.abandon()
        self.engine.close()

    def abandon(self) -> None:
        """End every worker now (their confirmed chunks are checkpointed; the chunks in flight are not)."""
        with self._lock:
            procs = list(self._procs)
        for p in procs:
            if p.poll() is None:
                p.kill()

    def worker_pids(self) -> list[int]:
        """The running workers' process ids."""
        with self._lock:
            return [p.pid for p in self._procs if p.poll() is None]

    def run(self, *, follow: bool = False, interval_s: float = 5.0, stop: threading.Event | None = None,
            on_progress: Callable[[int], None] | None = None,
            on_cycle: Callable[[CycleReport], None] | None = None) -> ParallelReport:
        """One pass over every range (or cycles every ``interval_s`` until ``stop`` with ``follow``)."""
        stop = stop or threading.Event()
        while True:
            report = self.cycle(stop, on_progress)
            if on_cycle is not None:
                on_cycle(report)
            if not follow or stop.is_set() or report.interrupted:
                return report
            stop.wait(interval_s)

    def cycle(self, stop: threading.Event | None = None,
              on_progress: Callable[[int], None] | None = None) -> ParallelReport:
        """Plan (or resume) the pass, run its unfinished ranges in workers, then close the pass."""
        stop = stop or threading.Event()
        report = ParallelReport()
        plan = plan_pass(self.engine)
        todo = pending(self.engine, plan)
        report.ranges = len(plan.ranges)
        self._run_workers(todo, stop, on_progress, report)
        if stop.is_set():
            report.interrupted = True
        if report.ok and not report.interrupted and not pending(self.engine, plan):
            report.add(finish_pass(self.engine, plan))
        return report

    def _run_workers(self, todo: list[int], stop: threading.Event,
                     on_progress: Callable[[int], None] | None, report: ParallelReport) -> None:
        procs: dict[int, subprocess.Popen[bytes]] = {}
        sel = selectors.DefaultSelector()
        buffers: dict[int, bytes] = {}
        finished: dict[int, CycleReport] = {}
        try:
            for rid in todo:
                proc = subprocess.Popen([sys.executable, "-m", "featuredao.sync.parallel", str(self.path),
                                         self.job.name, str(rid)], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE)
                assert proc.stdout is not None
                procs[rid] = proc
                buffers[rid] = b""
                sel.register(proc.stdout, selectors.EVENT_READ, rid)
            with self._lock:
                self._procs = list(procs.values())
            asked_stop = 0.0
            while sel.get_map():
                if stop.is_set() and not asked_stop:
                    asked_stop = time.monotonic()
                    for p in procs.values():
                        if p.poll() is None:
                            p.terminate()  # SIGTERM: the worker finishes its chunk in flight, then exits
                if asked_stop and time.monotonic() - asked_stop > _TERM_GRACE_S:
                    self.abandon()
                for key, _ in sel.select(timeout=0.2):
                    rid = key.data
                    chunk = os.read(key.fd, 65536)
                    if not chunk:  # the worker ended (after its report, or killed)
                        sel.unregister(key.fileobj)
                        continue
                    *lines, buffers[rid] = (buffers[rid] + chunk).split(b"\n")
                    for line in lines:
                        try:
                            kind, value = json.loads(line)
                        except ValueError:
                            continue  # not a report
                        if kind == "rows":
                            if on_progress is not None:
                                on_progress(int(value))
                        else:
                            finished[rid] = CycleReport(**value)
        finally:
            sel.close()
            for p in procs.values():
                p.wait()
                if p.stdout is not None:
                    p.stdout.close()
            with self._lock:
                self._procs = []
        for rid, proc in procs.items():
            got = finished.get(rid)
            if got is not None:
                report.add(got, rid)
            elif not stop.is_set():
                code = proc.returncode
                why = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                report.failed_ranges[rid] = f"worker of range {rid} ended without finishing ({why})"


if __name__ == "__main__":
    worker_main(sys.argv[1:])
