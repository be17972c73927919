"""TableStore sequence views on the local server: ground truth through the CLI, the layout, pushed filters."""

from __future__ import annotations

import math
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tablestore as ots
from sequence_truth import FIELDS, SPEC, assert_cli_matches, cli_fetch, events, truth_config

from featuredao import factory
from featuredao.dao import BaseDao
from featuredao.testing.tablestore import DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET, TableStoreServer

pytestmark = pytest.mark.tablestore

NOW = 1_700_000_000
TIE = ["item_id", "event", "play_time"]  # the _tie column: item, then the other fields but the time


@pytest.fixture(scope="module")
def server() -> Iterator[TableStoreServer]:
    with TableStoreServer("127.0.0.1") as srv:
        yield srv


@pytest.fixture
def raw(server: TableStoreServer) -> Any:
    return ots.OTSClient(server.endpoint, DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET, "featuredao",
                         retry_policy=ots.NoRetryPolicy())


def source(server: TableStoreServer, **extra: Any) -> dict[str, Any]:
    return {"type": "tablestore", "endpoint": server.endpoint, "instance_name": "featuredao",
            "access_key_id": DEFAULT_ACCESS_KEY_ID, "access_key_secret": DEFAULT_ACCESS_KEY_SECRET,
            "retry_delay_ms": 1, **extra}


def view(table: str, spec: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": "click_seq", "entity": "user", "kind": "sequence", "source": "ots", "table": table,
            "key": "user_id", "prefix": "click_", "sequence": spec, **extra}


def build(server: TableStoreServer, spec: dict[str, Any], src: dict[str, Any] | None = None,
          **extra: Any) -> tuple[Any, BaseDao, str]:
    table = f"seq_{uuid.uuid4().hex[:10]}"
    runtime = factory.build({"sources": {"ots": source(server, **(src or {}))},
                             "views": [view(table, spec, **extra)]})
    dao = runtime.daos["click_seq"]
    dao.prepare()
    return runtime, dao, table


# -- the documented layout, written by hand ----------------------------------------------------------
def tie(e: dict[str, Any]) -> bytearray:
    """item as 8 bytes of v + 2**63, the event's UTF-8 (NUL as 00 FF) ended by 00 01, play_time's bits."""
    bits = struct.unpack(">Q", struct.pack(">d", e["play_time"]))[0]
    play = bits ^ (2**64 - 1) if bits >> 63 else bits | 1 << 63
    return bytearray(struct.pack(">Q", e["item_id"] + 2**63) + e["event"].encode().replace(b"\0", b"\0\xff")
                     + b"\0\x01" + struct.pack(">Q", play))


def load(raw: Any, table: str, by_user: dict[str, list[dict[str, Any]]]) -> None:
    """The documented table, created and filled with the SDK: BatchWriteRow of 200 puts."""
    raw.create_table(ots.TableMeta(table, [("user_id", "STRING"), ("ts", "INTEGER"), ("_tie", "BINARY")]),
                     ots.TableOptions(time_to_live=-1, max_version=1),
                     ots.ReservedThroughput(ots.CapacityUnit(0, 0)))
    rows = {(u, e["ts"], bytes(tie(e))): ots.Row([("user_id", u), ("ts", e["ts"]), ("_tie", tie(e))],
                                                  [(f, e[f]) for f in FIELDS if f != "ts"])
            for u, evs in by_user.items() for e in evs}
    items = list(rows.values())
    for i in range(0, len(items), 200):
        request = ots.BatchWriteRowRequest()
        request.add(ots.TableInBatchWriteRowItem(table, [ots.PutRowItem(r, ots.Condition("IGNORE"))
                                                         for r in items[i:i + 200]]))
        assert raw.batch_write_row(request).is_all_succeed()


def test_ground_truth_through_the_cli(server: TableStoreServer, raw: Any, tmp_path: Path) -> None:
    table = f"truth_{uuid.uuid4().hex[:10]}"
    users = [f"u{i}" for i in range(8)] + ["用户-ü", "ユーザー:7", "emoji 🎧", "Ω"]
    by_user = events(16, users, 120, NOW)  # filters are pushed: the limit counts kept events only
    # Ties at the store's limit: 200 events at one time, 96 passing the filters, more than the 80
    # (4 x max_len, for dedupe) the read asks for. The _tie column orders them as the core does (item,
    # then the other fields, highest first), so the store returns the 80 the truth ranks first.
    by_user["tie-用户"] = [{"item_id": i % 90, "event": ("click", "buy", "view")[i % 3], "ts": NOW - 30,
                           "play_time": float(i % 7)} for i in range(200)]
    by_user["tie-用户"].append({"item_id": 99, "event": "buy", "ts": NOW - 31, "play_time": 5.0})
    load(raw, table, by_user)
    config = truth_config(tmp_path, "ots", source(server), view(table, SPEC))
    assert_cli_matches(config, by_user, NOW, once=True)
    tied = cli_fetch(config, "tie-用户", NOW)["user"]["click_item_id"]
    assert tied[:3] == [88, 87, 84] and 99 not in tied  # in a store-chosen 80 of the 96: mostly not


def test_appends_write_the_documented_rows_once(server: TableStoreServer, raw: Any) -> None:
    runtime, dao, table = build(server, {"time_field": "ts", "item_field": "item_id", "fields": FIELDS,
                                         "max_len": 10})
    try:
        evs = [{"item_id": 3, "event": "a\0b", "ts": NOW, "play_time": -1.5},
               {"item_id": -2, "event": "", "ts": NOW, "play_time": 0.0},
               {"item_id": 3, "event": "a\0b", "ts": NOW, "play_time": -1.5}]  # identical: one row
        assert dao.append(("ü", e) for e in evs) == 3
        dao.append([("ü", evs[0])])
        _, _, rows, _ = raw.get_range(table, ots.Direction.FORWARD,
                                      [("user_id", ots.INF_MIN), ("ts", ots.INF_MIN), ("_tie", ots.INF_MIN)],
                                      [("user_id", ots.INF_MAX), ("ts", ots.INF_MAX), ("_tie", ots.INF_MAX)])
        assert [r.primary_key for r in rows] == [[("user_id", "ü"), ("ts", NOW), ("_tie", tie(e))]
                                                 for e in (evs[1], evs[0])]
        assert [(c[0], c[1]) for c in rows[1].attribute_columns] == [
            ("event", "a\0b"), ("item_id", 3), ("play_time", -1.5)]
        (row,) = dao.read(["ü"], as_of=NOW).rows
        assert row is not None and row["item_id"] == [3, -2] and row["event"] == ["a\0b", ""]
    finally:
        runtime.close()


def test_filters_are_pushed_past_the_services_scan_cap(server: TableStoreServer) -> None:
    spec = {"time_field": "ts", "item_field": "item_id", "event_field": "event", "fields": FIELDS,
            "max_len": 3, "events": ["buy", "click"], "min": {"play_time": 2.5, "item_id": 0.5}}
    runtime, dao, _ = build(server, spec)
    try:
        # The newest 6,000 events fail a filter: one response ends after 5,000 scanned rows with none.
        dao.append([("u", {"item_id": i + 1, "event": "view", "ts": NOW - i, "play_time": 9.0})
                    for i in range(2000)] +
                   [("u", {"item_id": i + 1, "event": "buy", "ts": NOW - i, "play_time": 2.0})
                    for i in range(2000, 4000)] +
                   [("u", {"item_id": 0, "event": "click", "ts": NOW - i, "play_time": 2.5})
                    for i in range(4000, 6000)] +
                   [("u", {"item_id": i, "event": ("click", "buy")[i % 2], "ts": NOW - 10_000 - i,
                           "play_time": 2.5 + i}) for i in range(1, 10)])
        before = server.call_count("GetRange")
        (row,) = dao.read(["u"], as_of=NOW).rows
        assert row is not None and row["item_id"] == [1, 2, 3] and row["event"] == ["buy", "click", "buy"]
        assert server.call_count("GetRange") - before == 2  # the limit counted kept events: no third
    finally:
        runtime.close()


def test_int_keys_float_times_and_many_keys_at_once(server: TableStoreServer) -> None:
    fields = {"t": "float", "item": "int", "w": "str"}
    spec = {"time_field": "t", "item_field": "item", "fields": fields, "max_len": 50, "window_s": 10}
    runtime, dao, _ = build(server, spec, src={"pool_size": 4}, key_type="int")
    try:
        times = [NOW - 10.0, math.nextafter(NOW - 10.0, 0), NOW - 5.25, float(NOW),
                 math.nextafter(NOW, math.inf), -3.5, 0.0]
        keys = list(range(-60, 90))  # two chunks of up to 100 keys, each fanned out on the pool
        dao.append((k, {"t": t, "item": i, "w": "ü"}) for k in keys if k % 3 for i, t in enumerate(times))
        rows = dao.read([*keys, 10**12], as_of=NOW).rows
        for k, row in zip(keys, rows, strict=False):
            if k % 3:
                assert row is not None and row["t"] == [NOW, NOW - 5.25, NOW - 10.0], k
                assert row["item"] == [3, 2, 0] and row["w"] == ["ü"] * 3
            else:
                assert row is None, k
        assert rows[-1] is None
        (row,) = dao.read([1], as_of=0.0).rows
        assert row is not None and row["t"] == [0.0, -3.5]  # the window is [-10, 0]
        runtime2, dao2, _ = build(server, {**spec, "window_s": 1e10}, key_type="int")
        try:
            dao2.append((1, {"t": t, "item": i, "w": "x"}) for i, t in enumerate(times))
            (row,) = dao2.read([1], as_of=None).rows  # no upper bound
            assert row is not None and row["t"] == sorted(times, reverse=True)
        finally:
            runtime2.close()
    finally:
        runtime.close()


def test_raw_sequence_reader_reads_what_the_dao_reads(server: TableStoreServer) -> None:
    spec = {"time_field": "ts", "item_field": "item_id", "event_field": "event", "fields": FIELDS,
            "max_len": 4, "window_s": 500, "events": ["e", "f"], "min": {"play_time": 0.5}}
    runtime, dao, _ = build(server, spec)
    try:
        users = ["ü", "b", "nobody"]
        dao.append((u, {"item_id": j, "event": "efx"[j % 3], "ts": NOW - 30 * j, "play_time": j % 4 / 2})
                   for u in users[:2] for j in range(20))
        assert dao._sequencer is not None
        query = dao._sequencer.query(NOW, True)
        reader = dao.raw_sequence_reader()
        assert reader is not None
        got: Any = reader(users, query)
        rows = dao.read(users, as_of=NOW).rows
        assert [g and {f: g[f] for f in FIELDS} for g in got] == rows
        assert rows[0] is not None and rows[0]["item_id"] == [1, 3, 6, 7]  # filtered in the store
    finally:
        runtime.close()
