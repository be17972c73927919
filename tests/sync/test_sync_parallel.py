"""Parallel sync (``"parallelism": N``) on real servers: key ranges cover every key exactly once (keys at
split points, empty ranges, skewed keys), full and incremental runs with 2 worker processes equal the
source (SQLite, MariaDB and PostgreSQL into Redis), a worker SIGKILLed mid-run resumes from its range's
checkpoint, and the ranges show in ``featuredao sync status``."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from synchelp import (
    assert_same,
    checkpoint,
    cli,
    config,
    contents,
    redis_source,
    redis_view,
    row,
    seed,
    sqlite_exec,
    start_cli,
    view,
)

from featuredao import build
from featuredao.config import load
from featuredao.errors import ConfigError
from featuredao.sync.engine import SyncEngine
from featuredao.sync.partitions import Range, load_plan, plan_pass, ranges, split_points
from featuredao.testing.servers import RedisServer


def _mysql(server: Any) -> dict[str, Any]:
    return {"type": "mysql", "host": server.host, "port": server.port, "user": server.user,
            "password": server.password, "database": server.database}


def _postgres(server: Any) -> dict[str, Any]:
    return {"type": "hologres", "host": server.host, "port": server.port, "user": server.user,
            "password": server.password, "database": server.dbname, "sslmode": "disable"}


def _clickhouse(server: Any) -> dict[str, Any]:
    return {"type": "clickhouse", "host": server.host, "port": server.port, "user": server.user,
            "password": server.password, "database": server.database}


SOURCES = {
    "sqlite": pytest.param(None, id="sqlite", marks=pytest.mark.sqlite),
    "mysql": pytest.param(("mariadb_server", _mysql), id="mysql", marks=pytest.mark.mysql),
    "postgres": pytest.param(("postgres_server", _postgres), id="postgres", marks=pytest.mark.hologres),
    "clickhouse": pytest.param(("clickhouse_server", _clickhouse), id="clickhouse",
                               marks=pytest.mark.clickhouse),
}


def _source(request: pytest.FixtureRequest) -> tuple[dict[str, Any], str]:
    """The ``off`` source of a parametrised test and the name of its table."""
    if request.param is None:
        return {"type": "sqlite", "path": "off.db"}, f"t{uuid.uuid4().hex[:10]}"
    fixture, make = request.param
    return make(request.getfixturevalue(fixture)), f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=[SOURCES["sqlite"], SOURCES["mysql"], SOURCES["postgres"], SOURCES["clickhouse"]])
def any_source(request: pytest.FixtureRequest) -> tuple[dict[str, Any], str]:
    return _source(request)


@pytest.fixture(params=[SOURCES["sqlite"], SOURCES["mysql"]])
def full_source(request: pytest.FixtureRequest) -> tuple[dict[str, Any], str]:
    return _source(request)


@pytest.fixture(params=[SOURCES["sqlite"], SOURCES["postgres"]])
def incremental_source(request: pytest.FixtureRequest) -> tuple[dict[str, Any], str]:
    return _source(request)


def _scan_range(dao: Any, r: Range, batch: int) -> list[Any]:
    keys: list[Any] = []
    after = r.lower
    while True:
        rows = dao.scan(after, batch, upper=r.upper) if r.upper is not None else dao.scan(after, batch)
        keys.extend(k for k, _ in rows)
        if len(rows) < batch:
            return keys
        after = rows[-1][0]


def _covered(dao: Any, rs: list[Range], batch: int) -> list[Any]:
    """Every key scanned over the ranges, each range's keys checked to lie in it."""
    out: list[Any] = []
    for r in rs:
        got = _scan_range(dao, r, batch)
        assert all(r.holds(k) for k in got), (r, [k for k in got if not r.holds(k)][:5])
        out.extend(got)
    return out


# Skewed: a dense run, a gap, a lone key and a far tail of few keys.
SKEWED = [*range(1, 301), 1000, *range(5000, 5004), 10**9]


def test_ranges_cover_every_key_once(tmp_path: Path, any_source: tuple[dict[str, Any], str]) -> None:
    source, table = any_source
    path = config(tmp_path, sources={"off": source}, views=[view("items", "off", table)], jobs=[])
    seed(path, "items", {i: row(i) for i in SKEWED})
    if source["type"] == "clickhouse":
        seed(path, "items", {i: row(i, 1) for i in SKEWED[::3]})  # unmerged newer versions of some keys
    runtime = build(path)
    try:
        dao = runtime.daos["items"]
        for n in (2, 3, 7):
            points = split_points(dao, n)  # type: ignore[arg-type]
            assert points == sorted(set(points)) and len(points) <= n - 1
            assert sorted(_covered(dao, ranges(points), 7)) == SKEWED
        cases = [
            [],                      # one range: everything
            [1, 300, 1000, 5003],    # split points that are keys: each belongs to the range it ends
            [0, 150, 151, 152],      # a range below every key, then single-key ranges
            [301, 302, 999],         # empty ranges inside the gap
            [10**9, 10**10],         # the last key ends a range; the ranges above it are empty
        ]
        for points in cases:
            got = _covered(dao, ranges(points), 5)
            assert sorted(got) == SKEWED and len(got) == len(set(got)), points
        if source["type"] == "clickhouse":
            # Newest version of every key, exactly once, through the windowed scan.
            values = {k: dict(v) for k, v in dao.scan(None, 1000)}  # type: ignore[attr-defined]
            assert sorted(values) == SKEWED
            assert all(values[k]["updated_at"] == (1 if k in SKEWED[::3] else 0) for k in SKEWED)
    finally:
        runtime.close()


@pytest.mark.memory
def test_ranges_without_adapter_support_cut_and_sample_in_python() -> None:
    # The in-memory adapter offers neither split points nor bounded scans: the core samples and cuts.
    runtime = build({"sources": {"m": {"type": "memory"}},
                     "views": [view("items", "m", "items")]})
    try:
        dao: Any = runtime.daos["items"]
        dao.prepare()
        dao.upsert({i: row(i) for i in SKEWED}.items())
        for n in (2, 4):
            points = split_points(dao, n, batch_size=16)
            assert sorted(_covered(dao, ranges(points), 16)) == SKEWED
        got = _covered(dao, ranges([1, 300, 301, 302, 10**9]), 9)
        assert sorted(got) == SKEWED and len(got) == len(set(got))
        dao.upsert({i: {**row(i, 2), "updated_at": 7} for i in SKEWED[::4]}.items())
        window = dao.changes("updated_at", (0, 10**12), 5, lower=150, upper=1000)
        assert [k for _, k, _ in window] == [k for k in SKEWED[::4] if 150 < k <= 1000][:5]
    finally:
        runtime.close()


def _redis_config(tmp_path: Path, redis: RedisServer, source: dict[str, Any], table: str,
                  **job: Any) -> Path:
    return config(tmp_path, sources={"off": source, "hot": redis_source(redis)},
                  views=[view("items", "off", table), redis_view("copy")],
                  jobs=[{"name": "par", "from": "items", "to": ["copy"], "batch_size": 200,
                         "parallelism": 2, **job}])


def _run(path: Path, *extra: str) -> dict[str, Any]:
    done = cli("sync", "run", str(path), "--job", "par", "--json", *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def _status(path: Path) -> list[dict[str, Any]]:
    done = cli("sync", "status", str(path), "--job", "par", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def _delete(path: Path, keys: list[int]) -> None:
    runtime = build(path)
    try:
        runtime.daos["items"].delete(keys)  # type: ignore[attr-defined]
    finally:
        runtime.close()


@pytest.mark.redis
def test_parallel_full_sync_equals_source(tmp_path: Path, redis_server: RedisServer,
                                          full_source: tuple[dict[str, Any], str]) -> None:
    source, table = full_source
    path = _redis_config(tmp_path, redis_server, source, table, delete_missing=True)
    keys = list(range(1, 3001))
    seed(path, "items", {i: row(i) for i in keys})
    report = _run(path)
    assert report["read"] == len(keys) and report["written"] == len(keys) and report["failed_ranges"] == {}
    assert_same(path, "items", "copy", keys)
    ranged = [r for r in _status(path) if "range" in r]
    assert [r["range"] for r in ranged] == [0, 1] and all(r["phase"] == "done" for r in ranged)
    assert sum(r["written"] for r in ranged) == len(keys)
    assert ranged[0]["upper"] == ranged[1]["lower"] and ranged[0]["lower"] is None

    # A second pass: new rows, changed rows and deleted rows, split anew.
    seed(path, "items", {i: row(i, 1) for i in [*keys[::7], *range(3001, 3201)]})
    gone = [1, 1500, 1501, 3000]
    _delete(path, gone)
    report = _run(path)
    assert report["deleted"] == len(gone)
    now = [k for k in range(1, 3201) if k not in gone]
    assert_same(path, "items", "copy", now)
    assert all(v is None for v in contents(path, "copy", gone).values())
    targets = [r for r in _status(path) if "range" not in r]
    assert targets[0]["passes"] == 2 and targets[0]["phase"] == "idle"


@pytest.mark.redis
def test_parallel_incremental_sync_equals_source(tmp_path: Path, redis_server: RedisServer,
                                                 incremental_source: tuple[dict[str, Any], str]) -> None:
    source, table = incremental_source
    path = _redis_config(tmp_path, redis_server, source, table, mode="incremental",
                         watermark="updated_at")
    keys = list(range(1, 2001))
    seed(path, "items", {i: {**row(i), "updated_at": i % 5} for i in keys})
    report = _run(path)
    assert report["read"] == len(keys) and report["failed_ranges"] == {}
    assert_same(path, "items", "copy", keys)
    # Changes on both sides of the split point, ties at the last watermark, and new keys past the top.
    changed = [*keys[::11], *range(2001, 2101)]
    seed(path, "items", {i: {**row(i, 3), "updated_at": 10} for i in changed})
    report = _run(path)
    assert report["read"] == len(changed)
    assert_same(path, "items", "copy", list(range(1, 2101)))
    ranged = [r for r in _status(path) if "range" in r]
    assert len(ranged) == 2 and all(r["cursor"][0] == 10 for r in ranged)


def _workers(pid: int) -> list[int]:
    """The spawned worker processes of a ``featuredao sync run`` process."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    out = []
    for child in children:
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"featuredao.sync.parallel" in cmd:
            out.append(int(child))
    return out


@pytest.mark.redis
def test_worker_killed_mid_run_resumes_its_range(tmp_path: Path, redis_server: RedisServer) -> None:
    path = _redis_config(tmp_path, redis_server, {"type": "sqlite", "path": "off.db"}, "items",
                         rate_limit_rows_s=1500, delete_missing=True)
    keys = list(range(1, 6001))
    seed(path, "items", {i: row(i) for i in keys})
    state = tmp_path / "sync.sync.db"
    proc = start_cli("sync", "run", str(path), "--job", "par", "--json", "--no-progress")
    try:
        def progressed() -> list[int] | None:
            marks = [checkpoint(state, "par", f"copy@{r}") for r in (0, 1)]
            if all(m is not None and m["written"] >= 600 for m in marks):
                return _workers(proc.pid) or None
            return None

        end = time.monotonic() + 60
        workers = None
        while workers is None and time.monotonic() < end:
            workers = progressed()
            time.sleep(0.02)
        assert workers, "the workers did not make progress"
        os.kill(workers[0], signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    [(killed, why)] = report["failed_ranges"].items()
    assert "signal 9" in why
    left = checkpoint(state, "par", f"copy@{killed}")
    assert left is not None and left["phase"] == "scan" and left["written"] >= 600
    other = checkpoint(state, "par", f"copy@{1 - int(killed)}")
    assert other is not None and other["phase"] == "done"

    # The restart resumes the same pass: only what the killed range had left is read, and no key the
    # pass saw before the kill is deleted (not even one deleted from the source since: the next pass does).
    gone = [1, 3001]  # the first key of each range: written before the kill
    sqlite_exec(tmp_path / "off.db", 'DELETE FROM "items" WHERE id IN (1, 3001)')
    report = _run(path)
    assert 0 < report["read"] <= 3000 - left["written"] + 200
    assert report["deleted"] == 0
    kept = [k for k in keys if k not in gone]
    assert_same(path, "items", "copy", kept)
    assert all(v is not None for v in contents(path, "copy", gone).values())
    report = _run(path)
    assert report["read"] == len(kept) and report["deleted"] == len(gone)
    assert all(v is None for v in contents(path, "copy", gone).values())


@pytest.mark.sqlite
def test_restart_reuses_the_persisted_split_points(tmp_path: Path) -> None:
    path = config(tmp_path, views=[view("items", "src", "items"), view("copy", "dst", "copy", prefix="c_")],
                  jobs=[{"name": "par", "from": "items", "to": ["copy"], "parallelism": 3}])
    seed(path, "items", {i: row(i) for i in range(1, 91)})
    with SyncEngine.from_file(path, "par") as engine:
        first = plan_pass(engine)
        seed(path, "items", {i: row(i) for i in range(1000, 1300)})  # would move the quantiles
        again = plan_pass(engine)
        assert again == first and load_plan(engine) == first
        assert first.points == [30, 60]


@pytest.mark.clickhouse
@pytest.mark.redis
def test_clickhouse_windowed_scan_syncs_newest_versions(tmp_path: Path, redis_server: RedisServer,
                                                         clickhouse_server: Any) -> None:
    path = _redis_config(tmp_path, redis_server, _clickhouse(clickhouse_server), f"t{uuid.uuid4().hex[:10]}",
                         batch_size=3)
    keys = list(range(1, 401))
    seed(path, "items", {i: row(i) for i in keys})
    hot = keys[100:106]
    for version in range(1, 21):  # more unmerged versions of a few keys than one probe holds
        seed(path, "items", {i: row(i, version) for i in hot})
    seed(path, "items", {i: {**row(i, 1), "tags": None, "name": None} for i in keys[::9]})
    with SyncEngine.from_file(path, "par") as engine:  # one process, the plain keyset scan
        report = engine.run()
    assert report.ok and report.read == len(keys)
    assert_same(path, "items", "copy", keys)
    assert all(v is not None and v["updated_at"] == 20 for v in contents(path, "copy", hot).values())
    seed(path, "items", {i: row(i, 30) for i in keys[::5]})
    report_json = _run(path)  # two workers, each scanning its range in windows
    assert report_json["read"] == len(keys) and report_json["failed_ranges"] == {}
    assert_same(path, "items", "copy", keys)


def test_parallelism_is_validated_with_paths() -> None:
    def issues(**job: Any) -> dict[str, str]:
        cfg = {"sources": {"src": {"type": "sqlite", "path": "src.db"},
                           "dst": {"type": "sqlite", "path": "d.db"}},
               "views": [view("items", "src", "items"), view("copy", "dst", "items", prefix="c_")],
               "sync": [{"name": "j", "from": "items", "to": ["copy"], **job}]}
        with pytest.raises(ConfigError) as info:
            load(cfg)
        return {i.path: i.message for i in info.value.issues}

    assert "$.sync[0].parallelism" in issues(parallelism=0)
    assert "$.sync[0].parallelism" in issues(parallelism="two")
    assert "one ordered stream" in issues(mode="cdc", parallelism=2)["$.sync[0].parallelism"]
    ok = load({"sources": {"src": {"type": "sqlite", "path": "src.db"}},
               "views": [view("items", "src", "items"), view("copy", "src", "copy", prefix="c_")],
               "sync": [{"name": "j", "from": "items", "to": ["copy"], "mode": "incremental",
                         "watermark": "updated_at", "parallelism": 4}]})
    assert ok.sync[0].parallelism == 4
