"""CDC soak on real servers whose binlog/WAL already holds several MB of unrelated changes: a random writer
for ~10 s while a real ``featuredao sync run --follow`` process copies the table; the process is SIGKILLed
midway and restarted, then stopped with SIGTERM (exit 0); source and target are compared row by row.
Also: a one-shot run with no new changes returns promptly however long the log is, and reads past
transactions of other tables move the checkpoint (and the PostgreSQL slot) on."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cdchelp import BACKENDS, Backend, Writer, differing, finish, make_backend, stream_checkpoint, wait_for
from synchelp import checkpoint, cli, config, row, seed, start_cli, view

from featuredao import build
from featuredao.sync.engine import SyncEngine

SEED_ROWS = 400
WRITE_S = 10.0


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    b = make_backend(request)
    yield b
    b.drop()


def _config(tmp_path: Path, b: Backend, batch_size: int = 50) -> Path:
    return config(tmp_path, sources={"off": b.source()},
                  views=[view("items", "off", b.table), view("copy", "dst", "items", prefix="c_")],
                  jobs=[{"name": "cdc", "from": "items", "to": ["copy"], "mode": "cdc",
                         "batch_size": batch_size, "retry_backoff_s": 0.2}])


def _follow(path: Path) -> subprocess.Popen[str]:
    return start_cli("sync", "run", str(path), "--job", "cdc", "--follow", "--interval", "0.2",
                     "--no-progress", "--stop-timeout", "5")


def test_soak_follow_killed_and_restarted_converges(tmp_path: Path, backend: Backend) -> None:
    seed_value = random.randrange(1 << 30)
    before = backend.log_bytes()
    backend.noise(megabytes=4, small_txns=1500)  # the log holds MB of other tables' changes first
    assert backend.log_bytes() - before >= 4_000_000
    path = _config(tmp_path, backend)
    seed(path, "items", {i: row(i) for i in range(SEED_ROWS)})
    state = tmp_path / "sync.sync.db"
    # The kinds of change checked at the end are made whatever the load (the writer goes on until they are).
    writer = Writer(backend, WRITE_S, seed_value, first_key=SEED_ROWS,
                    at_least={"delete": 6, "key_change": 3, "burst": 1, "multi_update": 6})
    writer.live.extend(range(SEED_ROWS))
    started = time.monotonic()
    writer.start()
    first = _follow(path)
    try:
        wait_for(lambda: stream_checkpoint(state), 20, "the first process streams")
        time.sleep(max(0.0, started + 0.4 * WRITE_S - time.monotonic()))  # midway through the writes
        at_kill = checkpoint(state, "cdc", "copy")
        assert first.poll() is None, finish(first)
    finally:
        first.send_signal(signal.SIGKILL)
        code, _, err = finish(first)
    assert code == -signal.SIGKILL, err
    assert at_kill is not None and at_kill["phase"] == "stream"
    time.sleep(1.0)  # the writer goes on while no process runs
    second = _follow(path)
    try:
        writer.join(timeout=WRITE_S + 90)  # at most a minute past WRITE_S to make every kind of change
        assert not writer.is_alive() and writer.error is None, writer.error
        keys = list(range(writer.next_key))
        wait_for(lambda: not differing(path, keys), 40, "the target equals the source", every=0.5)
        assert second.poll() is None, finish(second)
        stopping = time.monotonic()
        second.send_signal(signal.SIGTERM)
        code, _, err = finish(second, timeout=30)
        stop_s = time.monotonic() - stopping
    finally:
        if second.poll() is None:
            second.kill()
    assert code == 0, err
    assert stop_s < 10, stop_s
    assert "Traceback" not in err, err
    # Row by row, every key the writer ever used (deleted ones must be absent from both).
    diff = differing(path, keys)
    assert not diff, f"{len(diff)} keys differ (writer seed {seed_value}), e.g. {list(diff.items())[:3]}"
    assert sorted(backend.keys()) == sorted(writer.live)
    assert writer.ops.get("delete", 0) > 5 and writer.ops.get("key_change", 0) > 2, writer.ops
    assert writer.ops.get("burst", 0) >= 1 and writer.ops.get("multi_update", 0) > 5, writer.ops
    final = checkpoint(state, "cdc", "copy")
    assert final is not None and final["phase"] == "stream" and final["last_error"] is None
    assert final["cursor"] > at_kill["cursor"]


def test_one_shot_without_changes_is_prompt_on_a_long_log(tmp_path: Path, backend: Backend) -> None:
    backend.noise(megabytes=5, small_txns=500)
    path = _config(tmp_path, backend, batch_size=200)
    seed(path, "items", {i: row(i) for i in range(50)})
    out = cli("sync", "run", str(path), "--job", "cdc", "--json")
    assert out.returncode == 0, out.stderr
    # Only other tables change after the checkpoint: a read moves the checkpoint past them.
    backend.noise(megabytes=2, small_txns=3000)
    end_of_log = backend.log_position()
    out = cli("sync", "run", str(path), "--job", "cdc", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["read"] == 0
    cursor = checkpoint(tmp_path / "sync.sync.db", "cdc", "copy")["cursor"]  # type: ignore[index]
    if backend.which == "mysql":
        assert cursor[:2] >= end_of_log, (cursor, end_of_log)
    else:
        assert cursor[0] >= end_of_log
        lsn = backend.slot_lsn()
        assert lsn is not None and lsn >= end_of_log  # the slot released that WAL
    # And so a read with nothing new parses nothing: its cost is the new events, not the log's length.
    runtime = build(path)
    try:
        batch: Any = runtime.daos["items"].feed(cursor, 200)
    finally:
        runtime.close()
    assert list(batch) == [] and batch.at_end and batch.scanned == 0, (batch.scanned, batch.at_end)
    started = time.perf_counter()
    with SyncEngine.from_file(path, "cdc") as engine:
        report = engine.run()
    in_process_s = time.perf_counter() - started
    assert report.ok and report.read == 0
    started = time.perf_counter()
    out = cli("sync", "run", str(path), "--job", "cdc", "--json")
    cli_s = time.perf_counter() - started
    assert out.returncode == 0 and json.loads(out.stdout)["read"] == 0, out.stderr
    assert in_process_s < 1.0, in_process_s
    assert cli_s < 10.0, cli_s
    # A change after all that is found (the checkpoint really is the log's end, not past it).
    backend.run("UPDATE {t} SET price = 77.5 WHERE id = 3")
    out = cli("sync", "run", str(path), "--job", "cdc", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["read"] == 1, out.stdout + out.stderr
    assert not differing(path, list(range(50)))
