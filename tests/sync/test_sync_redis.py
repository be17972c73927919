"""Sync into real Redis servers: a `featuredao sync run` process SIGKILLed mid-run and restarted, a target
down while another one progresses, cache invalidation of the written keys."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from synchelp import (
    assert_same,
    checkpoint,
    cli,
    config,
    contents,
    redis_count,
    redis_source,
    redis_view,
    row,
    seed,
    sqlite_exec,
    sqlite_keys,
    start_cli,
    table_of,
    view,
)

from featuredao import FeatureService
from featuredao.sync.engine import SyncEngine
from featuredao.testing.servers import RedisServer

pytestmark = pytest.mark.redis

N = 6000


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


def wait_for(predicate: Any, seconds: float = 60.0) -> Any:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def kill_when(proc: Any, state_db: Path, job: str, target: str, reached: Any) -> dict[str, Any]:
    """SIGKILL the sync process as soon as the target's checkpoint satisfies ``reached``."""
    def ready() -> dict[str, Any] | None:
        assert proc.poll() is None, f"sync exited early: {proc.communicate()}"
        ck = checkpoint(state_db, job, target)
        return ck if ck is not None and reached(ck) else None

    try:
        wait_for(ready)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    after = checkpoint(state_db, job, target)
    assert after is not None
    return after


def test_full_run_killed_and_restarted(tmp_path: Path, redis_server: RedisServer) -> None:
    hot = redis_view("hot_copy")
    path = config(tmp_path, sources={"hot": redis_source(redis_server)},
                  views=[view("items", "src", "items"), view("copy", "dst", "items", prefix="c_"), hot],
                  jobs=[{"name": "full", "from": "items", "to": ["copy", "hot_copy"], "batch_size": 100,
                         "delete_missing": True, "rate_limit_rows_s": 2000}])
    seed(path, "items", {i: row(i) for i in range(N)})
    seed(path, "copy", {N + 5: row(N + 5)})  # a row another writer put there: never the job's to delete
    state = tmp_path / "sync.sync.db"
    proc = start_cli("sync", "run", str(path), "--job", "full")
    at_kill = kill_when(proc, state, "full", "copy", lambda ck: (ck.get("cursor") or 0) >= 1500)
    assert at_kill["phase"] == "scan" and at_kill["cursor"] < N - 1  # really killed mid-pass
    assert redis_count(redis_server, hot["table"]) < N
    # While it was down: rows deleted behind the cursor, rows updated ahead of it.
    src = tmp_path / "src.db"
    sqlite_exec(src, "DELETE FROM items WHERE id IN (10, 20, 5990)")
    sqlite_exec(src, "UPDATE items SET price = -1.5 WHERE id IN (30, 5000)")
    out = cli("sync", "run", str(path), "--job", "full", "--json")
    assert out.returncode == 0, out.stderr
    # Resumed, not restarted: the second process read less than the whole table.
    assert json.loads(out.stdout)["read"] < N - 1000
    keys = list(range(N))
    # 5990 was deleted ahead of the cursor: this pass never saw it, so it went at the end of the pass.
    # 10 and 20 went behind the cursor, after this pass had seen them: the next pass deletes them.
    assert set(sqlite_keys(tmp_path / "dst.db", "items")) - set(sqlite_keys(src, "items")) == {10, 20, N + 5}
    out = cli("sync", "run", str(path), "--job", "full", "--json")
    assert out.returncode == 0, out.stderr
    assert sqlite_keys(tmp_path / "dst.db", "items") == [*sqlite_keys(src, "items"), N + 5]
    assert redis_count(redis_server, hot["table"]) == N - 3
    assert_same(path, "items", "copy", keys)
    assert_same(path, "items", "hot_copy", keys)


def test_incremental_run_killed_and_restarted(tmp_path: Path, redis_server: RedisServer) -> None:
    hot = redis_view("hot_copy")
    path = config(tmp_path, sources={"hot": redis_source(redis_server)},
                  views=[view("items", "src", "items"), view("copy", "dst", "items", prefix="c_"), hot],
                  jobs=[{"name": "inc", "from": "items", "to": ["copy", "hot_copy"], "mode": "incremental",
                         "watermark": "updated_at", "batch_size": 64, "rate_limit_rows_s": 2000}])
    # Watermarks with ties: 7 rows per value, so chunk boundaries fall inside ties.
    seed(path, "items", {i: {**row(i), "updated_at": i // 7} for i in range(N)})
    state = tmp_path / "sync.sync.db"
    src = tmp_path / "src.db"
    proc = start_cli("sync", "run", str(path), "--job", "inc")
    wait_for(lambda: (checkpoint(state, "inc", "copy") or {}).get("cursor"))
    # Rows change while the job runs: behind the cursor and ahead of it.
    sqlite_exec(src, "UPDATE items SET price = price + 1000, updated_at = 5000 WHERE id IN (1, 2, 3000)")
    at_kill = kill_when(proc, state, "inc", "hot_copy",
                        lambda ck: ck.get("cursor") and ck["cursor"][0] >= 300)
    assert at_kill["cursor"][0] < N // 7  # mid-run
    sqlite_exec(src, "UPDATE items SET price = price + 7, updated_at = 6000 WHERE id IN (4, 5999)")
    sqlite_exec(src, "INSERT INTO items (id, price, tags, updated_at, flag, name) "
                     "VALUES (99999, 1.0, '[\"x\"]', 6000, 1, 'late')")
    out = cli("sync", "run", str(path), "--job", "inc")
    assert out.returncode == 0, out.stderr
    keys = [*range(N), 99999]
    assert_same(path, "items", "copy", keys)
    assert_same(path, "items", "hot_copy", keys)
    assert redis_count(redis_server, hot["table"]) == N + 1
    for target in ("copy", "hot_copy"):
        assert checkpoint(state, "inc", target)["cursor"] == [6000, 99999]  # type: ignore[index]


def test_target_down_while_another_progresses(tmp_path: Path, own_redis: RedisServer) -> None:
    hot = redis_view("hot_copy")
    path = config(tmp_path, sources={"hot": redis_source(own_redis)},
                  views=[view("items", "src", "items"), view("copy", "dst", "items", prefix="c_"), hot],
                  jobs=[{"name": "inc", "from": "items", "to": ["hot_copy", "copy"], "mode": "incremental",
                         "watermark": "updated_at", "batch_size": 50, "retry_backoff_s": 0.1}])
    seed(path, "items", {i: {**row(i), "updated_at": i // 3} for i in range(500)})
    own_redis.kill()
    with SyncEngine.from_file(path, "inc") as engine:
        report = engine.run()
        status = {s["target"]: s for s in engine.status()}
    assert "hot_copy" in report.down and not report.ok
    assert report.written == 500  # the healthy target got everything
    assert status["copy"]["cursor"] == [499 // 3, 499]
    assert status["hot_copy"]["cursor"] is None and "BackendUnavailable" in status["hot_copy"]["last_error"]
    assert_same(path, "items", "copy", list(range(500)))
    # More changes while Redis is still down, then it comes back (empty: no persistence).
    seed(path, "items", {i: {**row(i, 2), "updated_at": 1000 + i} for i in range(400, 600)})
    with SyncEngine.from_file(path, "inc") as engine:
        assert "hot_copy" in engine.run().down
    own_redis.restart()
    out = cli("sync", "run", str(path), "--job", "inc", "--json")
    assert out.returncode == 0, out.stderr
    keys = list(range(600))
    assert_same(path, "items", "hot_copy", keys)
    assert_same(path, "items", "copy", keys)
    assert redis_count(own_redis, hot["table"]) == 600
    state = tmp_path / "sync.sync.db"
    a, b = checkpoint(state, "inc", "copy"), checkpoint(state, "inc", "hot_copy")
    assert a is not None and b is not None and a["cursor"] == b["cursor"] == [1599, 599]
    assert b["last_error"] is None
    # The healthy target was not written again while the other one caught up.
    assert a["written"] == 500 + 200


def test_cli_exit_1_when_a_target_is_down(tmp_path: Path, own_redis: RedisServer) -> None:
    path = config(tmp_path, sources={"hot": redis_source(own_redis)},
                  views=[view("items", "src", "items"), redis_view("hot_copy")],
                  jobs=[{"name": "full", "from": "items", "to": ["hot_copy"]}])
    seed(path, "items", {i: row(i) for i in range(10)})
    own_redis.kill()
    out = cli("sync", "run", str(path), "--job", "full")
    assert out.returncode == 1 and "target hot_copy not updated" in out.stdout
    assert "Traceback" not in out.stderr


def test_written_keys_are_invalidated_in_caches(tmp_path: Path, redis_server: RedisServer) -> None:
    cached = view("copy", "dst", "items", prefix="c_",
                  cache={"l1": {"ttl_s": 600}, "l2": {"source": "hot", "ttl_s": 600}})
    path = config(tmp_path, sources={"hot": redis_source(redis_server)},
                  views=[view("items", "src", "items"), cached],
                  jobs=[{"name": "full", "from": "items", "to": ["copy"]}])
    seed(path, "items", {i: row(i) for i in range(20)})
    seed(path, "copy", {i: row(i, 1) for i in range(20)})
    with FeatureService.from_config(path) as service:
        before = service.read_view("copy", [3, 4])
        assert before.rows[0]["price"] == row(3, 1)["price"]  # type: ignore[index]
        out = cli("sync", "run", str(path), "--job", "full")  # another process
        assert out.returncode == 0, out.stderr
        # This process's L1 drops the keys when the invalidation message arrives; L2 is gone already.
        after = wait_for(lambda: (lambda b: b if b.rows[0]["price"] == row(3)["price"] else None)(
            service.read_view("copy", [3, 4])), seconds=10)
        assert after.rows[1]["price"] == row(4)["price"]
    assert contents(path, "copy", [3])[3] == contents(path, "items", [3])[3]
    assert table_of(path, "copy") == "items"
