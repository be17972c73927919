"""``featuredao sync run --engine spark`` as real processes on a local Spark (local[2]): a full job's key
ranges run as Spark tasks from MariaDB into Redis; the driver SIGKILLed mid-run, the job run again resumes
each range from its checkpoint, and the target equals the source afterwards."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sparkhelp import config_file, contents, mysql_source, redis_source, redis_view, view

from featuredao import build
from featuredao.testing.servers import MariaDbServer, RedisServer

pytestmark = [pytest.mark.spark, pytest.mark.mysql, pytest.mark.redis]

EXE = str(Path(sys.executable).with_name("featuredao"))
N = 12_000


def features(i: int) -> dict[str, Any]:
    return {"price": i * 0.5, "tags": [f"t{i % 5}"], "clicks": i, "flag": i % 2 == 0,
            "name": None if i % 13 == 0 else f"item-{i}"}


def checkpoints(db: Path, job: str) -> dict[str, Any]:
    if not db.exists():
        return {}
    conn = sqlite3.connect(db, timeout=10)
    try:
        sql = "SELECT name, value FROM featuredao_sync_state WHERE scope = ?"
        rows = conn.execute(sql, (job,)).fetchall()
    except sqlite3.OperationalError:
        return {}  # not created yet
    finally:
        conn.close()
    return {name: json.loads(value) for name, value in rows}


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (the Spark JVM of a driver)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def run_sync(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, "sync", "run", str(path), "--job", "full", "--engine", "spark",
                           "--master", "local[2]", "--json", *extra], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_spark_full_job_killed_and_resumed(tmp_path: Path, mariadb_server: MariaDbServer,
                                           redis_server: RedisServer) -> None:
    job = {"name": "full", "from": "items", "to": ["hot_items"], "batch_size": 200, "parallelism": 2,
           # Slow enough that the kill lands mid-range: each range task reads at most 1,500 rows/s.
           "rate_limit_rows_s": 1500}
    path = config_file(tmp_path, {"sql": mysql_source(mariadb_server), "hot": redis_source(redis_server)},
                       [view("items", "sql"), redis_view("hot_items")], [job], name="spark.json")
    keys = list(range(1, N + 1))
    runtime = build(path)
    try:
        runtime.daos["items"].prepare()  # type: ignore[attr-defined]
        runtime.daos["items"].upsert((i, features(i)) for i in keys)
    finally:
        runtime.close()
    state = tmp_path / "spark.sync.db"

    proc = subprocess.Popen([EXE, "sync", "run", str(path), "--job", "full", "--engine", "spark",
                             "--master", "local[2]", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:  # until both range tasks have checkpointed some chunks
            assert proc.poll() is None, f"sync exited early: {proc.communicate()}"
            assert time.monotonic() < deadline, "the ranges did not start in time"
            ck = checkpoints(state, "full")
            ranges = [ck.get(f"hot_items@{r}", {}) for r in (0, 1)]
            if all(r.get("written", 0) >= 1000 for r in ranges):
                break
            time.sleep(0.05)
        jvms = children(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert jvms, "the driver had no Spark JVM"
    end = time.monotonic() + 30
    while any(alive(p) for p in jvms) and time.monotonic() < end:
        time.sleep(0.1)
    assert not any(alive(p) for p in jvms), "the Spark JVM outlived its killed driver"

    killed = checkpoints(state, "full")
    assert killed["@pass"]["phase"] == "scan"
    done_before = sum(killed[f"hot_items@{r}"]["written"] for r in (0, 1))
    assert 2000 <= done_before < N
    assert any(killed[f"hot_items@{r}"]["phase"] != "done" for r in (0, 1))

    second = run_sync(path)
    assert second.returncode == 0, second.stderr[-3000:]
    report = json.loads(second.stdout.strip().splitlines()[-1])
    # Resumed, not started over: the second run read only what the ranges had not confirmed (plus at most
    # the chunk in flight of each range when the driver died).
    assert report["read"] == N - done_before
    assert report["source_error"] is None and report["down"] == {}
    after = checkpoints(state, "full")
    assert after["@pass"]["phase"] == "idle"
    assert after["hot_items"]["phase"] == "idle" and after["hot_items"]["passes"] == 1
    assert contents(path, "hot_items", keys) == {i: features(i) for i in keys}


def test_a_target_down_fails_the_run_and_the_next_run_completes(tmp_path: Path) -> None:
    redis = RedisServer().start()
    port = redis.port
    job = {"name": "full", "from": "items", "to": ["hot_items"], "batch_size": 500, "parallelism": 2,
           "retry_backoff_s": 0.1}
    sources = {"src": {"type": "sqlite", "path": "src.db"}, "hot": redis_source(redis)}
    path = config_file(tmp_path, sources, [view("items", "src", table="items"), redis_view("hot_items")],
                       [job], name="down.json")
    keys = list(range(1, 3001))
    runtime = build(path)
    try:
        runtime.daos["items"].prepare()  # type: ignore[attr-defined]
        runtime.daos["items"].upsert((i, features(i)) for i in keys)
    finally:
        runtime.close()
    redis.stop()
    try:
        failed = run_sync(path)
        assert failed.returncode == 1, failed.stderr[-3000:]
        report = json.loads(failed.stdout.strip().splitlines()[-1])
        assert report["written"] == 0 and set(report["down"]) == {"hot_items@0", "hot_items@1"}
        assert checkpoints(tmp_path / "down.sync.db", "full")["@pass"]["phase"] == "scan"
        redis = RedisServer(port=port).start()  # the same address: the config is unchanged
        second = run_sync(path)
        assert second.returncode == 0, second.stderr[-3000:]
        assert json.loads(second.stdout.strip().splitlines()[-1])["written"] == len(keys)
        assert contents(path, "hot_items", keys) == {i: features(i) for i in keys}
    finally:
        redis.stop()


def test_engine_spark_runs_full_jobs_only(tmp_path: Path) -> None:
    path = config_file(tmp_path, {"src": {"type": "sqlite", "path": "src.db"}},
                       [view("items", "src", table="items"), view("copy", "src", table="copy", prefix="c_")],
                       [{"name": "full", "from": "items", "to": ["copy"], "mode": "incremental",
                         "watermark": "clicks"}])
    out = run_sync(path)
    assert out.returncode == 2
    assert "--engine spark runs full jobs" in out.stderr
    follow = subprocess.run([EXE, "sync", "run", str(path), "--job", "full", "--engine", "spark", "--follow"],
                            capture_output=True, text=True, timeout=60)
    assert follow.returncode == 2 and "--follow runs with the local engine" in follow.stderr
    master = subprocess.run([EXE, "sync", "run", str(path), "--job", "full", "--master", "local[2]"],
                            capture_output=True, text=True, timeout=60)
    assert master.returncode == 2 and "--master applies to --engine spark" in master.stderr
