"""CDC prerequisites and failures on real servers: each missing setting or privilege is a clear message
naming it and how to fix it (exit 1, recorded in ``sync status``); an event written before
binlog_row_metadata=FULL and an expired binlog (or a dropped slot) say a new snapshot is needed, or take
one with ``"on_gap": "resnapshot"``; a source that goes down is reported once per attempt, retried with
backoff and caught up with; SIGTERM and Ctrl-C stop a job blocked on a frozen source within a bound.
PostgreSQL session settings come from the ``options`` source option."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cdchelp import (
    BACKENDS,
    Backend,
    differing,
    finish,
    make_backend,
    own_server,
    stream_checkpoint,
    wait_for,
)
from synchelp import EXE, checkpoint, cli, config, row, seed, start_cli, view

KEYS = list(range(1, 31))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    b = make_backend(request)
    yield b
    b.drop()


@pytest.fixture
def mysql(request: pytest.FixtureRequest) -> Iterator[Backend]:
    b = make_backend(request, "mysql")
    yield b
    b.drop()


@pytest.fixture
def pg(request: pytest.FixtureRequest) -> Iterator[Backend]:
    b = make_backend(request, "hologres")
    yield b
    b.drop()


def _config(tmp_path: Path, b: Backend, *, source: dict[str, Any] | None = None, mode: str = "cdc",
            **job: Any) -> Path:
    extra = {"watermark": "updated_at"} if mode == "incremental" else {}
    return config(tmp_path, sources={"off": source or b.source()},
                  views=[view("items", "off", b.table), view("copy", "dst", "items", prefix="c_")],
                  jobs=[{"name": "cdc", "from": "items", "to": ["copy"], "mode": mode, "batch_size": 7,
                         "retry_backoff_s": 0.2, **extra, **job}])


def _set_on_gap(path: Path, value: str) -> None:
    cfg = json.loads(path.read_text())
    cfg["sync"][0]["on_gap"] = value
    path.write_text(json.dumps(cfg))


def _run(path: Path, *extra: str) -> tuple[int, dict[str, Any], str]:
    out = cli("sync", "run", str(path), "--job", "cdc", "--json", *extra)
    return out.returncode, json.loads(out.stdout) if out.stdout.strip() else {}, out.stderr


def _status(path: Path) -> dict[str, Any]:
    out = cli("sync", "status", str(path), "--job", "cdc", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 1, rows
    return rows[0]  # type: ignore[no-any-return]


def _warnings(stderr: str) -> list[str]:
    """featuredao's own warnings (a driver's pool may log its reconnects besides)."""
    return [line for line in stderr.splitlines() if line.startswith("WARNING featuredao")]


def _fails_clearly(path: Path, *expected: str, phase: str) -> dict[str, Any]:
    """A one-shot run exits 1 with one warning (no traceback) naming ``expected``; status records it."""
    started = time.time()
    code, report, err = _run(path)
    assert code == 1, err
    assert "Traceback" not in err, err
    warnings = _warnings(err)
    assert len(warnings) == 1, err
    for text in expected:
        assert text in warnings[0], warnings[0]
        assert text in report["source_error"], report
    status = _status(path)
    assert status["phase"] == phase
    assert status["last_error"].startswith("source items: "), status
    for text in expected:
        assert text in status["last_error"], status
    assert status["updated_at"] >= started - 1
    table = subprocess.run([EXE, "sync", "status", str(path)], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "COLUMNS": "2000"})
    assert status["last_error"][-150:] in table.stdout, table.stdout  # shown as text ("[mysqld]" too)
    return status


def _runs_cleanly(path: Path) -> dict[str, Any]:
    code, report, err = _run(path)
    assert code == 0, err
    assert "Traceback" not in err
    status = _status(path)
    assert status["last_error"] is None and status["phase"] == "stream", status
    return report


# -- MariaDB ----------------------------------------------------------------------------------------

@pytest.mark.mysql
@pytest.mark.parametrize(("variable", "bad", "expected"), [
    ("binlog_format", "STATEMENT", "binlog_format is STATEMENT, it must be ROW"),
    ("binlog_row_metadata", "MINIMAL", "binlog_row_metadata is MINIMAL, it must be FULL"),
    ("binlog_row_image", "MINIMAL", "binlog_row_image is MINIMAL, it must be FULL"),
])
def test_mysql_settings_are_checked_when_the_job_starts(tmp_path: Path, mysql: Backend, variable: str,
                                                        bad: str, expected: str) -> None:
    path = _config(tmp_path, mysql)
    seed(path, "items", {i: row(i) for i in KEYS})
    good = mysql.query(f"SELECT @@GLOBAL.{variable}")[0][0]
    mysql.run(f"SET GLOBAL {variable} = '{bad}'")
    try:
        _fails_clearly(path, expected, f"SET GLOBAL {variable}", phase="new")
    finally:
        mysql.run(f"SET GLOBAL {variable} = '{good}'")
    _runs_cleanly(path)
    assert not differing(path, KEYS)


@pytest.mark.mysql
def test_mysql_without_binary_log(tmp_path: Path) -> None:
    server = own_server("mysql", extra_args=["--skip-log-bin"])
    try:
        b = Backend("mysql", server)
        path = _config(tmp_path, b)
        seed(path, "items", {i: row(i) for i in KEYS})
        _fails_clearly(path, "binary logging is off", "log_bin", phase="new")
    finally:
        server.stop()


@pytest.mark.mysql
@pytest.mark.parametrize(("grants", "expected"), [
    ([], "GRANT REPLICATION CLIENT"),
    (["REPLICATION CLIENT"], "GRANT REPLICATION SLAVE"),
])
def test_mysql_replication_privileges(tmp_path: Path, mysql: Backend, grants: list[str],
                                      expected: str) -> None:
    user = f"np{uuid.uuid4().hex[:8]}"
    db = mysql.server.database
    mysql.run(f"CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'")
    try:
        mysql.run(f"GRANT ALL ON `{db}`.* TO '{user}'@'%'")
        for grant in grants:
            mysql.run(f"GRANT {grant} ON *.* TO '{user}'@'%'")
        path = _config(tmp_path, mysql, source=mysql.source(user=user, password="pw"))
        seed(path, "items", {i: row(i) for i in KEYS})
        _fails_clearly(path, "BackendAuthError", f"user '{user}'", expected, phase="new")
    finally:
        mysql.run(f"DROP USER '{user}'@'%'")


@pytest.mark.mysql
def test_mysql_event_without_column_names(tmp_path: Path, mysql: Backend) -> None:
    path = _config(tmp_path, mysql)
    seed(path, "items", {i: row(i) for i in KEYS})
    _runs_cleanly(path)
    at = _status(path)["cursor"]
    mysql.run("SET GLOBAL binlog_row_metadata = 'MINIMAL'")
    try:
        mysql.run("UPDATE {t} SET price = 5.5 WHERE id = 3")  # logged without column names
        mysql.run("DELETE FROM {t} WHERE id = 4")
    finally:
        mysql.run("SET GLOBAL binlog_row_metadata = 'FULL'")
    mysql.run("UPDATE {t} SET price = 6.5 WHERE id = 5")
    status = _fails_clearly(path, "binlog_row_metadata", "carries no column names", "new snapshot",
                            '"on_gap": "resnapshot"', phase="stream")
    assert re.search(r"at binlog\.\d+:\d+", status["last_error"]), status
    assert "KeyError" not in status["last_error"]
    assert status["cursor"] == at  # nothing skipped
    _set_on_gap(path, "resnapshot")
    report = _runs_cleanly(path)
    assert report["read"] >= len(KEYS) - 1  # a new snapshot
    assert not differing(path, KEYS)


@pytest.mark.mysql
def test_mysql_expired_binlog(tmp_path: Path, mysql: Backend) -> None:
    path = _config(tmp_path, mysql)
    seed(path, "items", {i: row(i) for i in KEYS})
    _runs_cleanly(path)
    old_file = _status(path)["cursor"][0]
    mysql.run("FLUSH BINARY LOGS")
    mysql.run("DELETE FROM {t} WHERE id IN (2, 9)")  # lost with the purged file, still to be propagated
    mysql.run("UPDATE {t} SET price = 1.5 WHERE id = 3")
    mysql.run("FLUSH BINARY LOGS")
    current = mysql.query("SHOW MASTER STATUS")[0][0]

    def purged() -> bool:  # once InnoDB's binlog checkpoint has passed the old files
        mysql.run(f"PURGE BINARY LOGS TO '{current}'")
        return old_file not in [r[0] for r in mysql.query("SHOW BINARY LOGS")]

    wait_for(purged, 20, "the old binlog purged", every=0.1)
    _fails_clearly(path, f"binlog file {old_file}", "is no longer on the server", "a new snapshot is needed",
                   '"on_gap": "resnapshot"', phase="stream")
    _set_on_gap(path, "resnapshot")
    _runs_cleanly(path)
    assert not differing(path, KEYS)  # 2 and 9 were deleted from the target too
    mysql.run("UPDATE {t} SET price = 2.5 WHERE id = 10")
    assert _runs_cleanly(path)["read"] == 1


# -- PostgreSQL -------------------------------------------------------------------------------------

@pytest.mark.hologres
def test_postgres_wal_level(tmp_path: Path) -> None:
    server = own_server("hologres", settings={"wal_level": "replica"})
    try:
        b = Backend("hologres", server)
        path = _config(tmp_path, b)
        seed(path, "items", {i: row(i) for i in KEYS})
        _fails_clearly(path, "wal_level is replica, it must be logical", "postgresql.conf", phase="new")
    finally:
        server.stop()


@pytest.mark.hologres
def test_postgres_replication_privilege(tmp_path: Path, pg: Backend) -> None:
    user = f"np{uuid.uuid4().hex[:8]}"
    pg.run(f"CREATE ROLE {user} LOGIN PASSWORD 'pw' NOSUPERUSER NOREPLICATION")
    try:
        path = _config(tmp_path, pg, source=pg.source(user=user, password="pw"))
        pg.run("CREATE TABLE {t} (id BIGINT PRIMARY KEY, price DOUBLE PRECISION, tags TEXT[], "
               "updated_at BIGINT, flag BOOLEAN, name TEXT)")
        pg.run(f"GRANT ALL ON {{t}} TO {user}")
        _fails_clearly(path, "BackendAuthError", "neither REPLICATION nor superuser",
                       f"ALTER ROLE {user} WITH REPLICATION", phase="new")
    finally:
        pg.drop()
        pg.run(f"DROP ROLE {user}")


@pytest.mark.hologres
def test_postgres_wal2json_not_loadable_named_through_session_options(tmp_path: Path, pg: Backend) -> None:
    # The source's libpq options give the session a library path where wal2json is not.
    path = _config(tmp_path, pg, source=pg.source(options="-c dynamic_library_path=/nonexistent"))
    seed(path, "items", {i: row(i) for i in KEYS})
    _fails_clearly(path, "wal2json output plugin cannot be loaded", 'could not access file "wal2json"',
                   phase="new")
    assert pg.slot_lsn() is None  # no half-made slot left behind


@pytest.mark.hologres
def test_postgres_session_options_reach_the_feed(tmp_path: Path, pg: Backend) -> None:
    schema = f"s{uuid.uuid4().hex[:8]}"
    pg.run(f"CREATE SCHEMA {schema}")
    try:
        # The view names the table without its schema: only the session's search_path finds it.
        pg.run(f"CREATE TABLE {schema}.{{t}} (id BIGINT PRIMARY KEY, price DOUBLE PRECISION, tags TEXT[], "
               "updated_at BIGINT, flag BOOLEAN, name TEXT)")
        path = _config(tmp_path, pg, source=pg.source(options=f"-c search_path={schema}"))
        seed(path, "items", {i: row(i) for i in KEYS})
        _runs_cleanly(path)
        pg.run(f"UPDATE {schema}.{{t}} SET price = 3.25 WHERE id = 4")
        pg.run(f"DELETE FROM {schema}.{{t}} WHERE id = 5")
        assert _runs_cleanly(path)["read"] == 2
        assert not differing(path, KEYS)
    finally:
        pg.drop()
        pg.run(f"DROP SCHEMA {schema} CASCADE")


@pytest.mark.hologres
def test_postgres_dropped_slot(tmp_path: Path, pg: Backend) -> None:
    path = _config(tmp_path, pg)
    seed(path, "items", {i: row(i) for i in KEYS})
    _runs_cleanly(path)
    pg.run("SELECT pg_drop_replication_slot(%s)", (pg.slot,))
    pg.run("DELETE FROM {t} WHERE id IN (2, 9)")  # never decoded: the slot is gone
    pg.run("UPDATE {t} SET price = 1.5 WHERE id = 3")
    _fails_clearly(path, f"replication slot {pg.slot} no longer exists", "a new snapshot is needed",
                   '"on_gap": "resnapshot"', phase="stream")
    assert pg.slot_lsn() is None  # not quietly recreated (that would hide the gap)
    _set_on_gap(path, "resnapshot")
    _runs_cleanly(path)
    assert not differing(path, KEYS)
    pg.run("UPDATE {t} SET price = 2.5 WHERE id = 10")
    assert _runs_cleanly(path)["read"] == 1


# -- a source that fails; signals ----------------------------------------------------------------------

@pytest.fixture(params=BACKENDS)
def own(request: pytest.FixtureRequest) -> Iterator[Backend]:
    server = own_server(request.param)
    try:
        yield Backend(request.param, server)
    finally:
        server.stop()


def _attempts(stderr: str) -> list[tuple[int, float]]:
    found = re.findall(r"failed \(attempt (\d+); retried in ([\d.]+)s", stderr)
    return [(int(n), float(s)) for n, s in found]


def test_source_down_reported_retried_and_caught_up(tmp_path: Path, own: Backend) -> None:
    path = _config(tmp_path, own, source=own.source(connect_timeout_ms=500, read_timeout_ms=2000))
    seed(path, "items", {i: row(i) for i in KEYS})
    _runs_cleanly(path)
    own.server.kill()
    try:
        started = time.monotonic()
        status = _fails_clearly(path, "Backend", phase="stream")
        assert time.monotonic() - started < 20
        assert "Unavailable" in status["last_error"] or "Timeout" in status["last_error"], status
        # Follow mode: one warning per attempt, the wait doubling from retry_backoff_s (0.2 s). Its
        # stderr goes to a file, read while it runs: the source comes back after the third attempt,
        # however long a loaded machine takes to start the process (a fixed wait could end before).
        errors = tmp_path / "follow.err"
        with errors.open("w") as sink:
            proc = subprocess.Popen([EXE, "sync", "run", str(path), "--job", "cdc", "--follow", "--interval",
                                     "0.1", "--no-progress"], stdout=subprocess.PIPE, stderr=sink, text=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            wait_for(lambda: len(_attempts(errors.read_text())) >= 3 or proc.poll() is not None, 60,
                     "three attempts while the source is down", every=0.05)
            assert proc.poll() is None, errors.read_text()
        except BaseException:
            proc.kill()
            proc.communicate()
            raise
    finally:
        own.server.restart()
    own.run("UPDATE {t} SET price = 42.0 WHERE id = 6")
    own.run("DELETE FROM {t} WHERE id = 7")
    try:
        wait_for(lambda: not differing(path, KEYS), 30, "caught up after the source came back", every=0.3)
        proc.send_signal(signal.SIGTERM)
        code, _, _ = finish(proc)
        err = errors.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, err
    assert "Traceback" not in err, err
    attempts = _attempts(err)
    assert len(attempts) >= 3, err
    assert [n for n, _ in attempts] == list(range(1, len(attempts) + 1))
    assert [s for _, s in attempts[:3]] == [0.2, 0.4, 0.8]
    assert len(_warnings(err)) == len(attempts), err
    status = _status(path)
    assert status["last_error"] is None and status["phase"] == "stream"


@pytest.mark.mysql
@pytest.mark.parametrize("mode", ["full", "incremental"])
def test_source_down_in_other_modes(tmp_path: Path, mode: str) -> None:
    server = own_server("mysql")
    try:
        b = Backend("mysql", server)
        path = _config(tmp_path, b, mode=mode, source=b.source(connect_timeout_ms=500))
        seed(path, "items", {i: row(i) for i in KEYS})
        server.kill()
        status = _fails_clearly(path, "BackendUnavailable", phase="scan" if mode == "full" else "changes")
        assert status["written"] == 0
        server.restart()
        code, _, err = _run(path)
        assert code == 0, err
        assert not differing(path, KEYS)
        assert _status(path)["last_error"] is None
    finally:
        server.stop()


@pytest.mark.parametrize(("sig", "exit_code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_signal_stops_a_job_blocked_on_a_frozen_source(tmp_path: Path, own: Backend, sig: int,
                                                       exit_code: int) -> None:
    # Long timeouts: nothing but the signal ends the blocked read.
    path = _config(tmp_path, own, source=own.source(connect_timeout_ms=120_000, read_timeout_ms=120_000))
    seed(path, "items", {i: row(i) for i in KEYS})
    state = tmp_path / "sync.sync.db"
    proc = start_cli("sync", "run", str(path), "--job", "cdc", "--follow", "--interval", "0.05",
                     "--no-progress", "--stop-timeout", "1")
    try:
        wait_for(lambda: stream_checkpoint(state), 20, "the job streams")
        own.run("UPDATE {t} SET price = 8.5 WHERE id = 8")
        wait_for(lambda: not differing(path, KEYS), 20, "the change is copied", every=0.2)
        own.server.freeze()
        time.sleep(1.0)  # the next read is now waiting for the frozen server
        assert proc.poll() is None
        started = time.monotonic()
        proc.send_signal(sig)
        code, _, err = finish(proc, timeout=30)
        stop_s = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
        own.server.thaw()
    assert code == exit_code, err
    assert stop_s < 5, stop_s  # --stop-timeout 1, then the read is abandoned
    assert "still busy" not in err, err  # abandoned cleanly, not by the last-resort exit
    assert "Traceback" not in err, err
    ck = checkpoint(state, "cdc", "copy")
    assert ck is not None and ck["phase"] == "stream"
    own.run("DELETE FROM {t} WHERE id = 9")
    assert _runs_cleanly(path)["read"] >= 1
    assert not differing(path, KEYS)
