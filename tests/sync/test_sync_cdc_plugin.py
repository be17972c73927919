"""PostgreSQL CDC on a server whose output_plugin_libraries lacks wal2json: the first run names the
setting and how to change it (exit 1, recorded in ``sync status``) and leaves no slot behind."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cdchelp import Backend, make_backend
from synchelp import cli, config, row, seed, view


@pytest.fixture
def pg(request: pytest.FixtureRequest) -> Iterator[Backend]:
    b = make_backend(request, "hologres")
    yield b
    b.drop()


@pytest.mark.hologres
def test_postgres_output_plugin_libraries_without_wal2json_is_named(tmp_path: Path, pg: Backend) -> None:
    # The test server's build has the setting (its harness lists wal2json); a superuser session may narrow
    # it, and the list binds superusers too: the source's libpq options stand in for a stricter server.
    listed = pg.query("SELECT count(*) FROM pg_settings WHERE name = 'output_plugin_libraries'")
    if not listed[0][0]:
        pytest.skip("this PostgreSQL build has no output_plugin_libraries setting")
    source = pg.source(options="-c output_plugin_libraries=pgoutput")
    path = config(tmp_path, sources={"off": source},
                  views=[view("items", "off", pg.table), view("copy", "dst", "items", prefix="c_")],
                  jobs=[{"name": "cdc", "from": "items", "to": ["copy"], "mode": "cdc", "batch_size": 7,
                         "retry_backoff_s": 0.2}])
    seed(path, "items", {i: row(i) for i in range(1, 6)})
    out = cli("sync", "run", str(path), "--job", "cdc", "--json")
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    for text in ('library "wal2json" may not be used as an output plugin',
                 "add it to output_plugin_libraries in postgresql.conf", "SELECT pg_reload_conf()"):
        assert text in out.stderr and text in json.loads(out.stdout)["source_error"], out.stderr
    assert "dynamic_library_path" not in out.stderr  # not the advice for a plugin that is not installed
    status = cli("sync", "status", str(path), "--job", "cdc", "--json")
    last = json.loads(status.stdout)
    assert last["phase"] == "new" and "output_plugin_libraries" in last["last_error"], last
    assert pg.slot_lsn() is None  # no half-made slot left behind
