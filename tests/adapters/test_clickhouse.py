"""ClickHouse-specific behaviour, through the real clickhouse-driver against a throwaway server."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clickhouse_driver import Client
from clickhouse_driver import errors as ch_errors

from featuredao import config, factory
from featuredao.dao import BaseDao
from featuredao.errors import (
    BackendAuthError,
    BackendQueryError,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
)
from featuredao.testing.servers import ClickHouseServer, free_port

pytestmark = pytest.mark.clickhouse

CONFIG = Path(__file__).resolve().parents[2] / "config" / "clickhouse.json"
_names = itertools.count()


def table_name(what: str) -> str:
    return f"ch_{what}_{next(_names)}_{time.time_ns() % 10**9}"


def source_config(server: ClickHouseServer, **extra: Any) -> dict[str, Any]:
    return {"type": "clickhouse", "host": server.host, "port": server.port, "user": server.user,
            "password": server.password, "database": server.database, **extra}


def view_config(table: str, features: dict[str, str], *, options: dict[str, Any] | None = None,
                defaults: dict[str, Any] | None = None, key_type: str = "str", name: str = "v",
                prefix: str = "") -> dict[str, Any]:
    return {"name": name, "entity": "item", "source": "ch", "table": table, "key": "id",
            "key_type": key_type, "features": features, "defaults": defaults or {},
            "options": options or {}, "prefix": prefix}


def build(server: ClickHouseServer, *views: dict[str, Any], **source: Any) -> factory.Runtime:
    return factory.build({"sources": {"ch": source_config(server, **source)}, "views": list(views)})


def merge_until(raw: Any, table: str, count_sql: str, want: int) -> int:
    """OPTIMIZE ... FINAL until the count reaches ``want``: 18.16 may skip a merge while another runs."""
    count = -1
    for _ in range(30):
        raw.execute(f"OPTIMIZE TABLE {table} FINAL")
        count = int(raw.execute(count_sql)[0][0])
        if count <= want:
            break
        time.sleep(0.1)
    return count


@pytest.fixture
def raw(clickhouse_server: ClickHouseServer) -> Iterator[Any]:
    """A plain clickhouse-driver Client, to set up and look at tables behind the adapter's back."""
    client = Client(clickhouse_server.host, port=clickhouse_server.port, user=clickhouse_server.user,
                    password=clickhouse_server.password, database=clickhouse_server.database)
    yield client
    client.disconnect()


class QueryLog:
    """Record every statement the source sends (the real method still runs)."""

    def __init__(self, source: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[tuple[str, dict[str, Any] | None]] = []
        self._lock = threading.Lock()
        real = source.query

        def spy(sql: str, params: dict[str, Any] | None, timeout_s: float | None) -> list[Any]:
            with self._lock:
                self.sent.append((sql, params))
            rows: list[Any] = real(sql, params, timeout_s)
            return rows

        monkeypatch.setattr(source, "query", spy)


# -- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    {"table": "t`; DROP TABLE x; --"},
    {"key": "id` FROM t; --"},
    {"features": {"a; DROP TABLE t": "int"}},
    {"options": {"layout": "tall", "value_column": "v) FROM t --"}},
    {"options": {"layout": "tall", "event_time_column": "ts`, sleep(3)"}},
    {"options": {"version_column": "version\"; --"}},
    {"options": {"nulls_column": "n`"}},
])
def test_sql_injection_through_config_identifiers_is_a_config_error(bad: dict[str, Any]) -> None:
    view = {**view_config("t", {"a": "int"}), **bad}
    with pytest.raises(ConfigError) as info:
        config.load({"sources": {"ch": {"type": "clickhouse", "password": "hunter2"}}, "views": [view]})
    assert "hunter2" not in str(info.value)


def test_layout_options_are_checked() -> None:
    for options in ({"layout": "wide", "value_column": "v"}, {"layout": "tall", "nulls_column": "n"},
                    {"layout": "tall", "feature_column": "x", "value_column": "x"}, {"layout": "long"}):
        with pytest.raises(ConfigError):
            config.load({"sources": {"ch": {"type": "clickhouse"}},
                         "views": [view_config("t", {"a": "int"}, options=options)]})


def test_example_config_loads_and_hides_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLICKHOUSE_PASSWORD", "s3cret-pw")
    cfg = config.load(CONFIG)
    spec = next(s for s in cfg.sources.values() if s.type == "clickhouse")
    assert spec.options.password.get_secret_value() == "s3cret-pw"
    runtime = factory.build(cfg)  # building never connects
    try:
        for text in (repr(spec), repr(spec.options), repr(runtime.sources[spec.name]),
                     *(repr(d) for d in runtime.daos.values())):
            assert "s3cret-pw" not in text
    finally:
        runtime.close()
    raw_doc = json.loads(CONFIG.read_text())
    assert "${" in json.dumps(raw_doc)  # the file holds a reference, never the secret


def test_construction_does_not_connect() -> None:
    port = free_port()  # nothing listens here: connecting would fail
    runtime = factory.build({"sources": {"ch": {"type": "clickhouse", "port": port}},
                             "views": [view_config("t", {"a": "int"})]})
    try:
        assert runtime.daos["v"].view.name == "v"
        with pytest.raises(BackendUnavailable) as info:
            runtime.daos["v"].read(["x"], timeout_s=2.0)
        assert isinstance(info.value.__cause__, ch_errors.NetworkError)
    finally:
        runtime.close()


# -- reads -----------------------------------------------------------------------------------------


def test_one_query_per_chunk_with_projection(clickhouse_server: ClickHouseServer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    features = {f"f{i}": "int" for i in range(6)}
    runtime = build(clickhouse_server, view_config(table_name("chunks"), features),
                    batch_size=100, pool_size=3)
    try:
        dao = runtime.daos["v"]
        assert isinstance(dao, BaseDao)
        dao.prepare()
        keys = [f"k{i}" for i in range(250)]
        dao.upsert((k, {f: i * 10 + j for j, f in enumerate(features)}) for i, k in enumerate(keys))
        log = QueryLog(dao.source, monkeypatch)
        result = dao.read([*keys, "absent"], ["f4", "f1"])
        assert len(log.sent) == 3  # 251 keys in chunks of 100, never one query per key
        assert sorted(len(p["keys"]) for _, p in log.sent if p) == [51, 100, 100]
        for sql, _ in log.sent:
            assert "`f4`, `f1`" in sql and "`f0`" not in sql and "`f2`" not in sql
        assert result[7] == {"f4": 74, "f1": 71}
        assert result[250] is None
    finally:
        runtime.close()


def test_tall_projection_filters_features_on_the_server(clickhouse_server: ClickHouseServer,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = build(clickhouse_server, view_config(table_name("tallproj"), {"a": "int", "b": "str"},
                                                   options={"layout": "tall"}))
    try:
        dao = runtime.daos["v"]
        assert isinstance(dao, BaseDao)
        dao.prepare()
        dao.upsert([("k", {"a": 1, "b": "x"})])
        log = QueryLog(dao.source, monkeypatch)
        assert dao.read(["k"], ["b"])[0] == {"b": "x"}
        assert log.sent[0][1] == {"keys": ("k",), "fields": ("b",)}
        # No features requested: only whether each key exists (an empty IN () is a syntax error).
        assert list(dao.read(["k", "nope"], [])) == [{}, None]
    finally:
        runtime.close()


def test_type_mapping_of_a_hand_made_table(clickhouse_server: ClickHouseServer, raw: Any) -> None:
    table = table_name("types")
    raw.execute(f"CREATE TABLE {table} (id String, i32 Nullable(Int32), u64 UInt64, dec Decimal(18, 4), "
                "f32 Float32, flag UInt8, fixed FixedString(8), txt Nullable(String), ints Array(Int32), "
                "floats Array(Float32), strs Array(String), bin String) ENGINE = MergeTree ORDER BY id")
    raw.execute(f"INSERT INTO {table} VALUES", [
        ("a", 7, 2**40, 12.3456, 0.5, 1, "abc", "naïve 🙂", [1, -2], [0.25], ["x", "ü"], "ok"),
        ("b", None, 0, 0, 0.0, 0, "", None, [], [], [], "\x00\x01"),
    ])
    features = {"i32": "int", "u64": "int", "dec": "float", "f32": "float", "flag": "bool", "fixed": "str",
                "txt": "str", "ints": "list[int]", "floats": "list[float]", "strs": "list[str]", "bin": "str"}
    view = view_config(table, features, defaults={"i32": -1, "txt": "none"},
                       options={"final": False, "nulls_column": None})
    runtime = build(clickhouse_server, view)
    try:
        a, b, missing = runtime.daos["v"].read(["a", "b", "c"])
        assert a == {"i32": 7, "u64": 2**40, "dec": 12.3456, "f32": 0.5, "flag": True, "fixed": "abc",
                     "txt": "naïve 🙂", "ints": [1, -2], "floats": [0.25], "strs": ["x", "ü"], "bin": "ok"}
        assert type(a["dec"]) is float and type(a["flag"]) is bool and type(a["i32"]) is int
        assert b is not None and b["i32"] == -1 and b["txt"] == "none" and b["flag"] is False
        assert b["ints"] == [] and b["bin"] == "\x00\x01"
        assert missing is None
    finally:
        runtime.close()


def test_hostile_binary_and_unicode_keys_are_harmless(clickhouse_server: ClickHouseServer, raw: Any) -> None:
    table = table_name("keys")
    runtime = build(clickhouse_server, view_config(table, {"n": "int"}))
    try:
        dao = runtime.daos["v"]
        assert isinstance(dao, BaseDao)
        dao.prepare()
        hostile = ["x') OR 1=1 --", "a'; DROP TABLE " + table + "; --", "back\\slash\\", "nul\x00byte",
                   "new\nline\ttab", "用户-42 🙂", "%(keys)s", "{x:String}", "'", "\\'", "\x7f\x01"]
        dao.upsert((k, {"n": i}) for i, k in enumerate(hostile))
        result = dao.read([*reversed(hostile), "' OR ''='"])
        assert [r["n"] if r else None for r in result] == [*reversed(range(len(hostile))), None]
        assert raw.execute(f"SELECT count() FROM {table}")[0][0] == len(hostile)
    finally:
        runtime.close()


def test_integer_keys(clickhouse_server: ClickHouseServer) -> None:
    runtime = build(clickhouse_server, view_config(table_name("ints"), {"n": "int"}, key_type="int"))
    try:
        dao = runtime.daos["v"]
        assert isinstance(dao, BaseDao)
        dao.prepare()
        dao.upsert([(-5, {"n": 1}), (2**62, {"n": 2})])
        assert [r["n"] if r else None for r in dao.read([2**62, "-5", 3])] == [2, 1, None]
    finally:
        runtime.close()


def test_a_chunk_larger_than_max_query_size(clickhouse_server: ClickHouseServer) -> None:
    runtime = build(clickhouse_server, view_config(table_name("big"), {"n": "int"}), batch_size=20000)
    try:
        dao = runtime.daos["v"]
        assert isinstance(dao, BaseDao)
        dao.prepare()
        keys = [f"{i:040d}" for i in range(20000)]  # ~900 KB of IN list, past the default 256 KiB
        dao.upsert((k, {"n": i}) for i, k in enumerate(keys) if i % 3 == 0)
        result = dao.read(keys, timeout_s=30)
        assert [r is not None for r in result] == [i % 3 == 0 for i in range(20000)]
    finally:
        runtime.close()


def test_concurrent_readers_share_the_pool(clickhouse_server: ClickHouseServer) -> None:
    runtime = build(clickhouse_server, view_config(table_name("threads"), {"n": "int", "s": "str"}),
                    pool_size=2, batch_size=16)
    try:
        dao = runtime.daos["v"]
        assert isinstance(dao, BaseDao)
        dao.prepare()
        keys = [f"k{i}" for i in range(100)]
        dao.upsert((k, {"n": i, "s": k}) for i, k in enumerate(keys))
        failures: list[BaseException] = []

        def reader(offset: int) -> None:
            try:
                for round_ in range(15):
                    chosen = keys[(offset + round_) % 50:][:40]
                    got = dao.read(chosen, timeout_s=20)
                    assert [r["s"] if r else None for r in got] == chosen
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []
    finally:
        runtime.close()


# -- ReplacingMergeTree, versions and FINAL ---------------------------------------------------------


def test_wide_reads_collapse_unmerged_versions_with_final(clickhouse_server: ClickHouseServer,
                                                          raw: Any) -> None:
    table = table_name("wide_final")
    runtime = build(clickhouse_server, view_config(table, {"n": "int", "tags": "list[str]"}),
                    {**view_config(table, {"n": "int", "tags": "list[str]"}, options={"final": False}),
                     "name": "nofinal", "prefix": "x_"})
    try:
        dao = runtime.daos["v"]
        assert isinstance(dao, BaseDao)
        dao.prepare()
        dao.upsert([("a", {"n": 1, "tags": ["x"]})])
        dao.upsert([("a", {"n": 2, "tags": None})])
        dao.upsert([("a", {"n": 3, "tags": []})])
        # Three inserts are three parts: the old versions are still stored until a merge.
        assert raw.execute(f"SELECT count() FROM {table}")[0][0] == 3
        assert dao.read(["a"])[0] == {"n": 3, "tags": []}
        assert runtime.daos["nofinal"].read(["a"])[0] is not None  # without FINAL: any of the three
        dao.upsert([("a", {"n": 4, "tags": None})])
        assert dao.read(["a"])[0] == {"n": 4, "tags": None}
        assert merge_until(raw, table, f"SELECT count() FROM {table}", 1) == 1
        assert dao.read(["a"])[0] == {"n": 4, "tags": None}
        assert runtime.daos["nofinal"].read(["a"])[0] == {"n": 4, "tags": None}
    finally:
        runtime.close()


def test_tall_newest_event_time_wins_before_and_after_merges(clickhouse_server: ClickHouseServer,
                                                             raw: Any) -> None:
    table = table_name("tall_events")
    view = view_config(table, {"age": "int", "city": "str", "tags": "list[str]"},
                       options={"layout": "tall", "event_time_column": "ts"}, defaults={"age": 0})
    runtime = build(clickhouse_server, view)
    try:
        dao = runtime.daos["v"]
        assert isinstance(dao, BaseDao)
        dao.prepare()
        t = [dt.datetime(2024, 1, d, tzinfo=dt.UTC) for d in (1, 2, 3)]
        insert = f"INSERT INTO {table} (id, feature, value, ts, version) VALUES"
        # One INSERT per row: separate parts, nothing merged yet.
        for row in [("u1", "age", "30", t[1], 1), ("u1", "age", "31", t[2], 1),
                    ("u1", "age", "29", t[0], 9),       # late-arriving older event: loses despite version 9
                    ("u1", "city", "Paris", t[1], 1),
                    ("u1", "city", "Oslo", t[1], 2),    # same event time re-written: higher version wins
                    ("u1", "tags", '["a"]', t[0], 1),
                    ("u1", "tags", None, t[1], 1),      # a newer null hides the older value
                    ("u2", "unknown", "x", t[2], 1)]:   # an undeclared feature is never read
            raw.execute(insert, [row])
        expected = [{"age": 31, "city": "Oslo", "tags": None}, None, None]
        assert list(dao.read(["u1", "u2", "u3"])) == expected
        raw.execute(f"OPTIMIZE TABLE {table} FINAL")
        # The merge collapsed only the re-write of one (key, feature, event time): history stays.
        assert raw.execute(f"SELECT count() FROM {table} WHERE id = 'u1'")[0][0] == 6
        assert list(dao.read(["u1", "u2", "u3"])) == expected
        # Upserts write "now" as the event time, so they supersede the history above.
        dao.upsert([("u1", {"age": 50})])
        assert dao.read(["u1"])[0] == {"age": 50, "city": None, "tags": None}
    finally:
        runtime.close()


def test_tall_without_event_time_uses_the_version(clickhouse_server: ClickHouseServer) -> None:
    view = view_config(table_name("tall_plain"), {"a": "int", "b": "list[float]", "c": "bool"},
                       options={"layout": "tall", "final": True})
    runtime = build(clickhouse_server, view)
    try:
        dao = runtime.daos["v"]
        assert isinstance(dao, BaseDao)
        dao.prepare()
        dao.upsert([("k1", {"a": 1, "b": [0.5], "c": True}), ("k2", {"a": 2})])
        dao.upsert([("k1", {"a": 10, "b": [], "c": False})])
        assert list(dao.read(["k1", "k2", "k3"])) == [
            {"a": 10, "b": [], "c": False}, {"a": 2, "b": None, "c": None}, None]
    finally:
        runtime.close()


# -- errors ----------------------------------------------------------------------------------------


def test_missing_table_and_column_are_query_errors_naming_the_view(clickhouse_server: ClickHouseServer,
                                                                    raw: Any) -> None:
    table = table_name("cols")
    raw.execute(f"CREATE TABLE {table} (id String, n Nullable(Int64), version UInt64) "
                "ENGINE = ReplacingMergeTree(version) ORDER BY id")
    runtime = build(clickhouse_server, view_config(table_name("absent"), {"n": "int"}, name="gone"),
                    view_config(table, {"n": "int", "nope": "int"}, name="partial", prefix="p_"))
    try:
        with pytest.raises(BackendQueryError) as info:
            runtime.daos["gone"].read(["a"])
        assert "gone" in str(info.value) and "doesn't exist" in str(info.value)
        assert isinstance(info.value.__cause__, ch_errors.ServerException)
        assert info.value.__cause__.code == 60
        with pytest.raises(BackendQueryError) as info:
            runtime.daos["partial"].read(["a"], ["nope"])
        assert "partial" in str(info.value)
        assert isinstance(info.value.__cause__, ch_errors.ServerException)
        assert info.value.__cause__.code in (16, 47)
        assert runtime.daos["partial"].read(["a"], ["n"])[0] is None  # the pool survived both
    finally:
        runtime.close()


def test_wrong_password_is_an_auth_error_without_the_password(clickhouse_server: ClickHouseServer) -> None:
    runtime = build(clickhouse_server, view_config("t", {"n": "int"}), password="not-the-password-123")
    try:
        with pytest.raises(BackendAuthError) as info:
            runtime.daos["v"].read(["a"])
        assert "not-the-password-123" not in str(info.value)
        assert "not-the-password-123" not in repr(runtime.sources["ch"])
    finally:
        runtime.close()


# -- timeouts and server failures --------------------------------------------------------------------


def _running(raw: Any, marker: str) -> int:
    count: int = raw.execute("SELECT count() FROM system.processes WHERE query LIKE %(m)s "
                             "AND query NOT LIKE '%%system.processes%%'", {"m": f"%{marker}%"})[0][0]
    return count


def test_timeout_cancels_the_query_on_the_server(clickhouse_server: ClickHouseServer, raw: Any) -> None:
    base = table_name("base")
    slow = f"{base}_slow"
    raw.execute(f"CREATE TABLE {base} (id String, n Nullable(Int64), version UInt64) "
                "ENGINE = ReplacingMergeTree(version) ORDER BY id")
    raw.execute(f"INSERT INTO {base} VALUES", [("a", 1, 1)])
    # A deliberately slow "table": an endless scan that never matches.
    raw.execute(f"CREATE VIEW {slow} AS SELECT toString(number) AS id, toInt64(number) AS n "
                "FROM system.numbers WHERE sipHash64(number) = 1")
    runtime = build(clickhouse_server, view_config(slow, {"n": "int"}, options={"final": False}),
                    {**view_config(base, {"n": "int"}), "name": "fast", "prefix": "f_"}, pool_size=1)
    try:
        with pytest.raises(BackendTimeout):
            runtime.daos["v"].read(["a"], timeout_s=0.3)
        # The query is gone from the server (cancelled, not merely abandoned by the client).
        for _ in range(100):
            if _running(raw, slow) == 0:
                break
            time.sleep(0.05)
        assert _running(raw, slow) == 0
        # The pool's only Client serves the next read.
        assert runtime.daos["fast"].read(["a"])[0] == {"n": 1}
        # No deadline from the caller: the source's read_timeout_ms applies, enforced the same way.
    finally:
        runtime.close()
    runtime = build(clickhouse_server, view_config(slow, {"n": "int"}, options={"final": False}),
                    read_timeout_ms=300)
    try:
        with pytest.raises(BackendTimeout):
            runtime.daos["v"].read(["a"])
    finally:
        runtime.close()


def test_server_side_limit_is_mapped_to_timeout(clickhouse_server: ClickHouseServer, raw: Any) -> None:
    slow = table_name("sleepy")
    # sleep() blocks without progress packets; the server's max_execution_time ends it (code 159).
    raw.execute(f"CREATE VIEW {slow} AS SELECT 'a' AS id, toInt64(sleep(2)) AS n")
    runtime = build(clickhouse_server, view_config(slow, {"n": "int"}, options={"final": False}),
                    settings={"max_execution_time": 1})
    try:
        with pytest.raises(BackendTimeout) as info:
            runtime.daos["v"].read(["a"], timeout_s=10)
        assert isinstance(info.value.__cause__, ch_errors.ServerException)
        assert info.value.__cause__.code == 159
    finally:
        runtime.close()


def test_recovers_after_a_server_restart(clickhouse_server: ClickHouseServer) -> None:
    runtime = build(clickhouse_server, view_config(table_name("restart"), {"n": "int"}), pool_size=2)
    try:
        dao = runtime.daos["v"]
        assert isinstance(dao, BaseDao)
        dao.prepare()
        dao.upsert([("a", {"n": 1})])
        assert dao.read(["a"])[0] == {"n": 1}
        clickhouse_server.restart()  # the pooled Client's socket is now dead
        assert dao.read(["a"], timeout_s=10)[0] == {"n": 1}
        clickhouse_server.kill()
        with pytest.raises(BackendUnavailable):
            dao.read(["a"], timeout_s=5)
        with pytest.raises(BackendUnavailable):
            dao.ping()
        clickhouse_server.restart()
        assert dao.read(["a"], timeout_s=10)[0] == {"n": 1}
    finally:
        if not clickhouse_server.running:
            clickhouse_server.restart()
        runtime.close()


def test_a_frozen_server_gives_a_timeout_and_the_pool_recovers(clickhouse_server: ClickHouseServer) -> None:
    runtime = build(clickhouse_server, view_config(table_name("frozen"), {"n": "int"}), pool_size=1)
    try:
        dao = runtime.daos["v"]
        assert isinstance(dao, BaseDao)
        dao.prepare()
        dao.upsert([("a", {"n": 1})])
        assert dao.read(["a"])[0] == {"n": 1}
        clickhouse_server.freeze()
        try:
            with pytest.raises(BackendUnavailable):  # BackendTimeout is one
                dao.read(["a"], timeout_s=0.5)
        finally:
            clickhouse_server.thaw()
        assert dao.read(["a"], timeout_s=10)[0] == {"n": 1}
    finally:
        if clickhouse_server.frozen:
            clickhouse_server.thaw()
        runtime.close()


def test_raw_reader_reads_what_the_dao_reads(clickhouse_server: ClickHouseServer) -> None:
    runtime = build(clickhouse_server, view_config(table_name("raw"), {"n": "int", "tags": "list[str]"}))
    dao: Any = runtime.daos["v"]
    try:
        dao.prepare()
        dao.upsert([("a", {"n": 1, "tags": ["x"]}), ("b", {"n": 2, "tags": ["y", "z"]})])
        raw = dao.raw_reader()
        assert raw is not None
        got = raw(["b", "missing", "a"], ["n", "tags"])
        assert isinstance(got, list) and got[1] is None
        assert [r["n"] for r in (got[0], got[2])] == [2, 1]
        assert [list(r["tags"]) for r in (got[0], got[2])] == [["y", "z"], ["x"]]
    finally:
        runtime.close()


# -- tables made by other tools: inspected on first use ----------------------------------------------


def test_a_foreign_merge_tree_table_is_inspected_once(clickhouse_server: ClickHouseServer, raw: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    table = table_name("foreign")
    raw.execute(f"CREATE TABLE {table} (id String, n Nullable(Int64), tags Array(String)) "
                "ENGINE = MergeTree ORDER BY id")
    raw.execute(f"INSERT INTO {table} VALUES", [(f"k{i}", i, [str(i)]) for i in range(30)])
    runtime = build(clickhouse_server, view_config(table, {"n": "int", "tags": "list[str]"}),
                    batch_size=10, pool_size=3)
    try:
        dao = runtime.daos["v"]
        log = QueryLog(dao.source, monkeypatch)
        keys = [f"k{i}" for i in range(30)]
        # Three chunks at once: one inspection between them, then one statement per chunk.
        assert [r["n"] if r else None for r in dao.read(keys)] == list(range(30))
        inspections = [sql for sql, _ in log.sent if "system.columns" in sql]
        assert len(inspections) == 1 and len(log.sent) == 4
        for sql, _ in log.sent[1:]:
            assert "FINAL" not in sql and "_nulls" not in sql and "version" not in sql
        log.sent.clear()
        assert dao.read(["k3", "nope"]).rows == [{"n": 3, "tags": ["3"]}, None]
        assert len(log.sent) == 1  # cached: the hot path has no extra round trip
        # Upserts write the columns the table has (a null list becomes [] without a nulls column).
        dao.upsert([("new", {"n": 7, "tags": None})])
        assert dao.read(["new"]).rows == [{"n": 7, "tags": []}]
        assert raw.execute(f"SELECT count() FROM {table}")[0][0] == 31
    finally:
        runtime.close()


def test_final_follows_the_engine(clickhouse_server: ClickHouseServer, raw: Any,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    replacing = table_name("noversion")
    # ReplacingMergeTree without a version column: FINAL keeps the last inserted row.
    raw.execute(f"CREATE TABLE {replacing} (id String, n Int64) ENGINE = ReplacingMergeTree ORDER BY id")
    raw.execute(f"INSERT INTO {replacing} VALUES", [("a", 1)])
    raw.execute(f"INSERT INTO {replacing} VALUES", [("a", 2)])
    memory, view = f"{replacing}_mem", f"{replacing}_view"
    raw.execute(f"CREATE TABLE {memory} (id String, n Int64) ENGINE = Memory")
    raw.execute(f"INSERT INTO {memory} VALUES", [("a", 3)])
    raw.execute(f"CREATE VIEW {view} AS SELECT id, n FROM {memory}")
    runtime = build(clickhouse_server, view_config(replacing, {"n": "int"}, name="rep"),
                    view_config(memory, {"n": "int"}, name="mem", prefix="m_"),
                    view_config(view, {"n": "int"}, name="view", prefix="w_"),
                    # Qualified by the database: looked up there, not in the current one.
                    view_config(f"{clickhouse_server.database}.{replacing}", {"n": "int"}, name="qualified",
                                prefix="q_"))
    try:
        log = QueryLog(runtime.sources["ch"], monkeypatch)
        assert runtime.daos["rep"].read(["a"]).rows == [{"n": 2}]
        assert runtime.daos["qualified"].read(["a"]).rows == [{"n": 2}]
        assert runtime.daos["mem"].read(["a"]).rows == [{"n": 3}]
        assert runtime.daos["view"].read(["a"]).rows == [{"n": 3}]
        selects = [sql for sql, _ in log.sent if "system.columns" not in sql]
        assert ["FINAL" in sql for sql in selects] == [True, True, False, False]
    finally:
        runtime.close()


@pytest.mark.parametrize(("options", "named"), [
    ({"nulls_column": "_nulls"}, "set options.nulls_column to null"),
    ({"version_column": "ver"}, "set options.version_column to"),
    ({"final": True}, "set options.final to false"),
    ({"layout": "tall", "event_time_column": "ts"}, "set options.event_time_column to"),
    ({"layout": "tall", "value_column": "val"}, "set options.value_column to"),
])
def test_a_configured_column_the_table_lacks_names_the_option(clickhouse_server: ClickHouseServer, raw: Any,
                                                              options: dict[str, Any], named: str) -> None:
    table = table_name("lacks")
    # Wide and tall at once (a wide view ignores the tall columns); no _nulls, version, ts or val.
    raw.execute(f"CREATE TABLE {table} (id String, n Nullable(Int64), tags Array(String), feature String, "
                "value Nullable(String)) ENGINE = MergeTree ORDER BY id")
    runtime = build(clickhouse_server, view_config(table, {"n": "int", "tags": "list[str]"}, options=options))
    try:
        for _ in range(2):  # not cached: the next use looks again
            with pytest.raises(BackendQueryError) as info:
                runtime.daos["v"].read(["a"])
            assert named in str(info.value) and table in str(info.value) and "'v'" in str(info.value)
            assert info.value.__cause__ is None  # our check, before any statement on the table
        with pytest.raises(BackendQueryError, match=named):
            runtime.daos["v"].upsert([("a", {"n": 1, "tags": []})])
    finally:
        runtime.close()


def test_a_wide_table_read_as_tall_names_the_feature_column(clickhouse_server: ClickHouseServer,
                                                            raw: Any) -> None:
    table = table_name("nottall")
    raw.execute(f"CREATE TABLE {table} (id String, n Int64) ENGINE = MergeTree ORDER BY id")
    runtime = build(clickhouse_server, view_config(table, {"n": "int"}, options={"layout": "tall"}))
    try:
        with pytest.raises(BackendQueryError, match=r"no column 'feature'.*set options\.feature_column to"):
            runtime.daos["v"].read(["a"])
    finally:
        runtime.close()


def test_tall_foreign_tables_without_a_version(clickhouse_server: ClickHouseServer, raw: Any) -> None:
    timed, plain = table_name("tall_ts"), table_name("tall_plain")
    raw.execute(f"CREATE TABLE {timed} (id String, feature String, value String, ts DateTime) "
                "ENGINE = MergeTree ORDER BY (id, feature)")
    t = [dt.datetime(2024, 1, d, tzinfo=dt.UTC) for d in (1, 2)]
    raw.execute(f"INSERT INTO {timed} VALUES", [("u", "age", "31", t[1]), ("u", "city", "Oslo", t[0])])
    raw.execute(f"INSERT INTO {timed} VALUES", [("u", "age", "30", t[0])])  # older, inserted later
    raw.execute(f"CREATE TABLE {plain} (id String, feature String, value Nullable(String)) "
                "ENGINE = MergeTree ORDER BY (id, feature)")
    raw.execute(f"INSERT INTO {plain} VALUES", [("u", "age", "5"), ("u", "city", None)])
    features = {"age": "int", "city": "str"}
    runtime = build(clickhouse_server,
                    view_config(timed, features, options={"layout": "tall", "event_time_column": "ts"}),
                    view_config(plain, features, options={"layout": "tall"}, name="plain", prefix="p_"))
    try:
        assert runtime.daos["v"].read(["u", "x"]).rows == [{"age": 31, "city": "Oslo"}, None]
        assert runtime.daos["plain"].read(["u", "x"]).rows == [{"age": 5, "city": None}, None]
        runtime.daos["plain"].upsert([("w", {"age": 9, "city": "Rome"})])  # no version column written
        assert runtime.daos["plain"].read(["w"], ["city"]).rows == [{"city": "Rome"}]
    finally:
        runtime.close()


def test_a_missing_table_is_looked_up_again(clickhouse_server: ClickHouseServer, raw: Any) -> None:
    table = table_name("later")
    runtime = build(clickhouse_server, view_config(table, {"n": "int"}))
    try:
        dao = runtime.daos["v"]
        with pytest.raises(BackendQueryError) as info:
            dao.read(["a"])
        assert isinstance(info.value.__cause__, ch_errors.ServerException)
        assert info.value.__cause__.code == 60
        raw.execute(f"CREATE TABLE {table} (id String, n Int64) ENGINE = MergeTree ORDER BY id")
        raw.execute(f"INSERT INTO {table} VALUES", [("a", 1)])
        assert dao.read(["a"]).rows == [{"n": 1}]
    finally:
        runtime.close()
