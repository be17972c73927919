"""A sync job closed mid-chunk: it stops with ``Closed`` (or finishes), loses nothing, and resumes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from synchelp import assert_same, config, row, seed, view

from featuredao import Closed
from featuredao.sync.engine import SyncEngine

pytestmark = pytest.mark.sqlite

KEYS = list(range(20000))


@pytest.mark.parametrize("after_s", [0.02, 0.1, 0.25])
def test_closing_a_running_job_mid_chunk_then_resuming_copies_everything(tmp_path: Path,
                                                                         after_s: float) -> None:
    path = config(tmp_path, views=[view("items", "src", "items"), view("copy", "dst", "items", prefix="c_")],
                  jobs=[{"name": "full", "from": "items", "to": ["copy"], "batch_size": 200}])
    seed(path, "items", {i: row(i) for i in KEYS})
    engine = SyncEngine.from_file(path, "full")
    outcome: list[BaseException | str] = []
    chunks: list[int] = []

    def run() -> None:
        try:
            engine.run(on_progress=chunks.append)
            outcome.append("finished")
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(after_s)
    engine.close()
    engine.close()  # idempotent
    worker.join(timeout=30)
    assert not worker.is_alive(), "the job hangs after close()"
    assert outcome == ["finished"] or isinstance(outcome[0], Closed), outcome
    with SyncEngine.from_file(path, "full") as again:
        report = again.run()
    assert report.ok
    assert_same(path, "items", "copy", KEYS)
