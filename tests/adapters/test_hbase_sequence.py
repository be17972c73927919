"""HBase sequence views on the local Thrift server: ground truth through the CLI, the layout, pipelining."""

from __future__ import annotations

import math
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import happybase
import pytest
from sequence_truth import FIELDS, SPEC, assert_cli_matches, cli_fetch, events, truth_config

from featuredao import factory
from featuredao.dao import BaseDao
from featuredao.errors import BackendQueryError
from featuredao.testing.hbase import HBaseThriftServer
from featuredao.types import CoercionError

pytestmark = pytest.mark.hbase

NOW = 1_700_000_000
ORDER = ["ts", "item_id", "event", "play_time"]  # the order key: time, item, then the other fields


@pytest.fixture(scope="module", params=[("buffered", "binary"), ("framed", "compact")],
                ids=["buffered", "framed"])
def server(request: pytest.FixtureRequest) -> Iterator[HBaseThriftServer]:
    transport, protocol = request.param
    with HBaseThriftServer(transport=transport, protocol=protocol) as srv:
        yield srv


@pytest.fixture
def raw(server: HBaseThriftServer) -> Iterator[Any]:
    conn = happybase.Connection(**server.connection_kwargs())
    yield conn
    conn.close()


def source(server: HBaseThriftServer, **extra: Any) -> dict[str, Any]:
    return {"type": "hbase", "host": "127.0.0.1", "port": server.port, "transport": server.transport,
            "protocol": server.protocol, **extra}


def view(table: str, spec: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": "click_seq", "entity": "user", "kind": "sequence", "source": "hb", "table": table,
            "key": "user_id", "prefix": "click_", "sequence": spec, **extra}


def build(server: HBaseThriftServer, spec: dict[str, Any], src: dict[str, Any] | None = None,
          **extra: Any) -> tuple[Any, BaseDao, str]:
    table = f"seq_{uuid.uuid4().hex[:10]}"
    runtime = factory.build({"sources": {"hb": source(server, **(src or {}))},
                             "views": [view(table, spec, **extra)]})
    dao = runtime.daos["click_seq"]
    dao.prepare()
    return runtime, dao, table


# -- the documented layout, written by hand ----------------------------------------------------------
def order_key(e: dict[str, Any]) -> bytes:
    """time, item, event, play_time: int as 8 bytes of v + 2**63, str escaped and terminated, float bits."""
    bits = struct.unpack(">Q", struct.pack(">d", e["play_time"]))[0]
    play = bits ^ (2**64 - 1) if bits >> 63 else bits | 1 << 63
    return (struct.pack(">Q", e["ts"] + 2**63) + struct.pack(">Q", e["item_id"] + 2**63)
            + e["event"].encode().replace(b"\0", b"\0\xff") + b"\0\x01" + struct.pack(">Q", play))


def row_key(user: str, e: dict[str, Any]) -> bytes:
    return user.encode() + b"\0" + bytes(255 - b for b in order_key(e))


def load(raw: Any, table: str, by_user: dict[str, list[dict[str, Any]]]) -> None:
    """Events as the documented layout (utf8 cells), with happybase: one batch."""
    with raw.table(table).batch() as batch:
        for user, evs in by_user.items():
            for e in evs:
                batch.put(row_key(user, e), {
                    b"f:item_id": str(e["item_id"]).encode(), b"f:event": e["event"].encode(),
                    b"f:ts": str(e["ts"]).encode(), b"f:play_time": repr(e["play_time"]).encode()})


def test_ground_truth_through_the_cli(server: HBaseThriftServer, raw: Any, tmp_path: Path) -> None:
    table = f"truth_{uuid.uuid4().hex[:10]}"
    raw.create_table(table, {"f": {"max_versions": 1}})
    users = [f"u{i}" for i in range(8)] + ["用户-ü", "ユーザー:7", "emoji 🎧", "Ω"]
    by_user = events(16, users, 60, NOW)
    # Ties at the store's limit: 100 events at one time, more than the 80 (4 x max_len) the read asks for.
    # The row keys order them as the core does (item, then the other fields, highest first), so the
    # store keeps the same 80 the truth ranks first.
    by_user["tie-用户"] = [{"item_id": i % 45, "event": ("click", "buy", "view")[i % 3], "ts": NOW - 30,
                           "play_time": float(i % 7)} for i in range(100)]
    by_user["tie-用户"].append({"item_id": 99, "event": "buy", "ts": NOW - 31, "play_time": 5.0})
    load(raw, table, by_user)
    config = truth_config(tmp_path, "hb", source(server), view(table, SPEC))
    assert_cli_matches(config, by_user, NOW, once=True)
    tied = cli_fetch(config, "tie-用户", NOW)["user"]["click_item_id"]
    assert tied[:3] == [43, 42, 40] and 99 not in tied  # in a store-chosen 80 of the 100 ties: not so


def test_appends_write_the_documented_rows_once(server: HBaseThriftServer, raw: Any) -> None:
    runtime, dao, table = build(server, {"time_field": "ts", "item_field": "item_id", "fields": FIELDS,
                                         "max_len": 10})
    try:
        evs = [{"item_id": 3, "event": "a\0b", "ts": NOW, "play_time": -1.5},
               {"item_id": -2, "event": "", "ts": NOW, "play_time": 0.0},
               {"item_id": 3, "event": "a\0b", "ts": NOW, "play_time": -1.5}]  # identical: one row
        assert dao.append(("ü", e) for e in evs) == 3
        dao.append([("ü", evs[0])])  # again: still one row
        rows = list(raw.table(table).scan())
        assert [k for k, _ in rows] == sorted(row_key("ü", e) for e in evs[:2])
        assert rows[0][1] == {b"f:item_id": b"3", b"f:event": b"a\0b", b"f:ts": str(NOW).encode(),
                              b"f:play_time": b"-1.5"}
        (row,) = dao.read(["ü"], as_of=NOW).rows
        assert row["item_id"] == [3, -2] and row["event"] == ["a\0b", ""]
        with pytest.raises(CoercionError, match="NUL"):
            dao.append([("a\0b", evs[0])])
        assert dao.read(["a\0b", "ü\0"], as_of=NOW).rows == [None, None]  # such keys hold no events
    finally:
        runtime.close()


def test_window_bounds_are_exact_for_float_times_and_binary_cells(server: HBaseThriftServer) -> None:
    fields = {"t": "float", "item": "int", "w": "str"}
    runtime, dao, _ = build(server, {"time_field": "t", "item_field": "item", "fields": fields, "max_len": 50,
                                     "window_s": 10}, options={"encoding": "binary"})
    try:
        times = [NOW - 10.0, math.nextafter(NOW - 10.0, 0), NOW - 5.25, NOW - 0.0,
                 math.nextafter(NOW, math.inf), -3.5, 0.0]
        dao.append(("k", {"t": t, "item": i, "w": "x"}) for i, t in enumerate(times))
        (row,) = dao.read(["k"], as_of=NOW).rows
        assert row["t"] == [NOW, NOW - 5.25, NOW - 10.0] and row["item"] == [3, 2, 0]
        (row,) = dao.read(["k"], as_of=None).rows  # no upper bound, the window from now: nothing that old
        assert row is None
        runtime2, dao2, _ = build(server, {"time_field": "t", "fields": fields, "max_len": 3},
                                  options={"encoding": "binary"})
        try:
            dao2.append(("k", {"t": t, "item": i, "w": "x"}) for i, t in enumerate(times))
            (row,) = dao2.read(["k"], as_of=None).rows
            assert row["t"] == [math.nextafter(NOW, math.inf), NOW, NOW - 5.25]
            (row,) = dao2.read(["k"], as_of=0.0).rows
            assert row["t"] == [0.0, -3.5]
        finally:
            runtime2.close()
    finally:
        runtime.close()


def test_pipelined_reads_of_many_keys_in_one_chunk(server: HBaseThriftServer) -> None:
    spec = {"time_field": "ts", "item_field": "item_id", "fields": FIELDS, "max_len": 4, "window_s": 100}
    runtime, dao, _ = build(server, spec, src={"batch_size": 1000})
    try:
        users = [f"用户{i}" for i in range(300)]  # more calls than one pipelining window
        dao.append((u, {"item_id": j, "event": "e", "ts": NOW - 30 * j, "play_time": 1.0})
                   for i, u in enumerate(users) for j in range(i % 6))
        rows = dao.read(users, as_of=NOW).rows
        for i, row in enumerate(rows):
            kept = list(range(min(i % 6, 4)))
            assert (row is None) if not kept else row["item_id"] == kept, i
    finally:
        runtime.close()


def test_a_failed_scan_leaves_the_connection_in_sync(server: HBaseThriftServer, raw: Any) -> None:
    spec = {"time_field": "ts", "fields": FIELDS, "max_len": 4}
    runtime, dao, table = build(server, spec, src={"pool_size": 1})
    try:
        raw.delete_table(table, disable=True)
        with pytest.raises(BackendQueryError, match="TableNotFound"):
            dao.read(["a", "b", "c"], as_of=NOW)  # every pipelined open is answered with the error
        dao.prepare()
        dao.append([("a", {"item_id": 1, "event": "e", "ts": NOW, "play_time": 1.0})])
        (row, none) = dao.read(["a", "b"], as_of=NOW).rows  # the same (only) connection answers in order
        assert row["item_id"] == [1] and none is None
    finally:
        runtime.close()


def test_raw_sequence_reader_reads_what_the_dao_reads(server: HBaseThriftServer) -> None:
    spec = {"time_field": "ts", "item_field": "item_id", "fields": FIELDS, "max_len": 6, "window_s": 500}
    runtime, dao, _ = build(server, spec)
    try:
        users = ["ü", "b", "nobody"]
        dao.append((u, {"item_id": j, "event": "e", "ts": NOW - 60 * j, "play_time": 0.5})
                   for u in users[:2] for j in range(12))
        assert dao._sequencer is not None
        query = dao._sequencer.query(NOW, False)
        reader = dao.raw_sequence_reader()
        assert reader is not None
        got: Any = reader(users, query)
        rows = dao.read(users, as_of=NOW).rows
        assert [g and {f: g[f] for f in FIELDS} for g in got] == rows
    finally:
        runtime.close()


def test_cells_written_by_other_tools(server: HBaseThriftServer, raw: Any) -> None:
    spec = {"time_field": "ts", "item_field": "item_id", "fields": FIELDS, "max_len": 10}
    runtime, dao, table = build(server, spec)
    try:
        good = {"item_id": 1, "event": "e", "ts": NOW - 1, "play_time": 1.0}
        odd = {"item_id": 2, "event": "e", "ts": NOW - 2, "play_time": 1.0}
        short = {"item_id": 3, "event": "e", "ts": NOW - 3, "play_time": 1.0}
        dao.append([("u", good)])
        # An int cell that is not a number drops its event; a missing cell reads as its type's zero.
        raw.table(table).put(row_key("u", odd), {b"f:item_id": b"two", b"f:event": b"e",
                                                  b"f:ts": str(NOW - 2).encode(), b"f:play_time": b"1.0"})
        raw.table(table).put(row_key("u", short), {b"f:item_id": b"3", b"f:ts": str(NOW - 3).encode()})
        (row,) = dao.read(["u"], as_of=NOW).rows
        assert row is not None and row["item_id"] == [1, 3] and row["event"] == ["e", ""]
        assert row["play_time"] == [1.0, 0.0]
    finally:
        runtime.close()
