"""ClickHouse sequence views on a real server (18.16 in the harness): events loaded with clickhouse-driver
into the documented layout, read through the CLI and the DAO, compared with the rules in plain Python."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clickhouse_driver import Client
from sequence_truth import (
    FIELDS,
    SPEC,
    assert_cli_matches,
    cli_fetch,
    events,
    expected,
    tied_user,
    truth_config,
)

from featuredao import factory
from featuredao.dao import BaseDao
from featuredao.testing.servers import ClickHouseServer

pytestmark = pytest.mark.clickhouse

NOW = 1_700_000_000
ORDER = list(FIELDS)


@pytest.fixture
def raw(clickhouse_server: ClickHouseServer) -> Iterator[Client]:
    s = clickhouse_server
    client = Client(s.host, port=s.port, user=s.user, password=s.password, database=s.database)
    yield client
    client.disconnect()


def source(server: ClickHouseServer, **extra: Any) -> dict[str, Any]:
    return {"type": "clickhouse", "host": server.host, "port": server.port, "user": server.user,
            "password": server.password, "database": server.database, **extra}


def load(raw: Client, table: str, by_user: dict[str, list[dict[str, Any]]]) -> None:
    """The documented layout made by hand; events inserted in two blocks (two parts, unmerged)."""
    raw.execute(f"CREATE TABLE `{table}` (user_id String, item_id Int64, event String, ts Int64, "
                "play_time Float64) ENGINE = MergeTree ORDER BY (user_id, ts)")
    rows = [(user, *(e[f] for f in ORDER)) for user, evs in by_user.items() for e in evs]
    half = len(rows) // 2
    for block in (rows[:half], rows[half:]):
        raw.execute(f"INSERT INTO `{table}` (user_id, {', '.join(ORDER)}) VALUES", block)


def view(table: str, spec: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": "click_seq", "entity": "user", "kind": "sequence", "source": "ch", "table": table,
            "key": "user_id", "prefix": "click_", "sequence": spec, **extra}


def test_ground_truth_through_the_cli(clickhouse_server: ClickHouseServer, raw: Client,
                                      tmp_path: Path) -> None:
    table = f"truth_{secrets.token_hex(4)}"
    users = [f"u{i}" for i in range(6)] + ["用户-ü", "ユーザー:7", "emoji 🎧", "Ω"]
    by_user = events(16, users, 120, NOW)
    by_user["tie-用户"] = tied_user(NOW)
    load(raw, table, by_user)
    config = truth_config(tmp_path, "ch", source(clickhouse_server), view(table, SPEC))
    assert_cli_matches(config, by_user, NOW)
    tie = cli_fetch(config, "tie-用户", NOW)["user"]
    # Per item the newest is ("click", 7.0): "click" sorts above "buy", then the higher play time.
    assert tie["click_item_id"] == list(range(40, 20, -1)) and set(tie["click_play_time"]) == {7.0}


@pytest.mark.parametrize("spec", [
    {"max_len": 7, "window_s": 3000},
    {"max_len": 5, "window_s": 6000, "events": ["buy"], "min": {"play_time": 4.0}},
    {"max_len": 4, "dedupe": "item_id", "scan_len": 40},
], ids=["window", "filters", "dedupe"])
def test_a_batch_of_users_matches_the_truth(clickhouse_server: ClickHouseServer, raw: Client,
                                            spec: dict[str, Any]) -> None:
    table = f"batch_{secrets.token_hex(4)}"
    users = [f"ü-{i}" for i in range(150)]
    by_user = events(3, users, 40, NOW)
    by_user["tie"] = tied_user(NOW)
    load(raw, table, by_user)
    full = {"time_field": "ts", "item_field": "item_id", "event_field": "event", "fields": FIELDS, **spec}
    runtime = factory.build({"sources": {"ch": source(clickhouse_server, batch_size=64)},
                             "views": [view(table, full)]})
    try:
        names = [*users, "tie", "nobody"]
        rows = runtime.daos["click_seq"].read(names, timeout_s=10.0, as_of=NOW).rows
        for user, row in zip(names, rows, strict=True):
            want = expected(by_user.get(user, []), full, NOW, prefix="")
            if not want["item_id"]:
                assert row is None, user
            else:
                assert row == want, user
    finally:
        runtime.close()


def test_prepare_makes_a_merge_tree_that_keeps_every_event(clickhouse_server: ClickHouseServer,
                                                          raw: Client) -> None:
    table = f"made_{secrets.token_hex(4)}"
    spec = {"time_field": "ts", "item_field": "item_id", "event_field": "event", "fields": FIELDS,
            "max_len": 10}
    runtime = factory.build({"sources": {"ch": source(clickhouse_server)}, "views": [view(table, spec)]})
    try:
        dao = runtime.daos["click_seq"]
        assert isinstance(dao, BaseDao)
        dao.prepare()
        dao.prepare()  # idempotent
        ((create,),) = raw.execute(f"SHOW CREATE TABLE `{table}`")
        assert "ENGINE = MergeTree ORDER BY (user_id, ts)" in create, create
        same = {"item_id": 1, "event": "click", "ts": NOW - 5, "play_time": 1.5}
        dao.append([("ü", same), ("ü", same)])  # one event twice: both kept (a log, not a table of rows)
        dao.append([("ü", {**same, "ts": NOW - 1})])  # another part
        row = dao.read(["ü"], as_of=NOW).rows[0]
        assert row is not None and row["ts"] == [NOW - 1, NOW - 5, NOW - 5]
    finally:
        runtime.close()


def test_int_keys_and_a_float_time_in_milliseconds(clickhouse_server: ClickHouseServer) -> None:
    table = f"ms_{secrets.token_hex(4)}"
    spec = {"time_field": "at", "item_field": "item", "fields": {"item": "str", "at": "float"},
            "time_unit": "ms", "max_len": 3, "window_s": 10}
    runtime = factory.build({"sources": {"ch": source(clickhouse_server)},
                             "views": [{**view(table, spec), "key_type": "int"}]})
    try:
        dao = runtime.daos["click_seq"]
        dao.prepare()
        at = NOW * 1000.0
        dao.append([(7, {"item": "a", "at": at - 10_000.5}), (7, {"item": "b", "at": at - 9_999.5}),
                    (7, {"item": "c", "at": at - 0.25}), (7, {"item": "é", "at": at - 0.25}),
                    (7, {"item": "z", "at": at + 1}), (8, {"item": "x", "at": at - 5})])
        rows = dao.read([7, 8, 9], as_of=NOW).rows
        assert rows[0] == {"item": ["é", "c", "b"], "at": [at - 0.25, at - 0.25, at - 9_999.5]}
        assert rows[1] == {"item": ["x"], "at": [at - 5]} and rows[2] is None
    finally:
        runtime.close()
