"""The local HBase Thrift server, driven only through the unmodified happybase client."""

from __future__ import annotations

import importlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

happybase = pytest.importorskip("happybase")

from featuredao.testing.hbase import HBaseThriftServer  # noqa: E402

pytestmark = pytest.mark.hbase

# happybase loads its IDL as the module "Hbase_thrift"; its exception classes live there.
Hbase_thrift = importlib.import_module("Hbase_thrift")
HBaseIOError = Hbase_thrift.IOError
AlreadyExists = Hbase_thrift.AlreadyExists
TTransportException = importlib.import_module("thriftpy2.transport").TTransportException

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server() -> Iterator[HBaseThriftServer]:
    with HBaseThriftServer() as srv:
        yield srv


@pytest.fixture
def conn(server: HBaseThriftServer) -> Iterator[Any]:
    connection = happybase.Connection("127.0.0.1", server.port)
    yield connection
    connection.close()


@pytest.fixture
def table_name(conn: Any) -> Iterator[bytes]:
    name = f"t_{uuid.uuid4().hex[:12]}".encode()
    yield name
    if name in conn.tables():
        conn.delete_table(name, disable=True)


@pytest.fixture
def table(conn: Any, table_name: bytes) -> Any:
    conn.create_table(table_name, {"cf": {"max_versions": 3}, "meta": {"max_versions": 1}})
    return conn.table(table_name)


def _fill(table: Any, n: int = 20) -> list[bytes]:
    keys = [f"row{i:02d}".encode() for i in range(n)]
    with table.batch() as b:
        for i, key in enumerate(keys):
            b.put(key, {b"cf:a": f"a{i}".encode(), b"cf:b": f"b{i}".encode(), b"meta:m": b"m"})
    return keys


# --------------------------------------------------------------------------- admin


def test_server_picks_free_port_and_reports_it(server: HBaseThriftServer) -> None:
    assert server.running
    assert server.port > 0
    assert server.address == ("127.0.0.1", server.port)
    with socket.create_connection(("127.0.0.1", server.port), timeout=2):
        pass


def test_create_list_enable_disable_delete(conn: Any) -> None:
    names = [f"adm_{uuid.uuid4().hex[:8]}_{i}".encode() for i in (2, 1)]
    for name in names:
        conn.create_table(name, {"cf": {}})
    listed = conn.tables()
    assert set(names) <= set(listed)
    assert listed == sorted(listed)

    name = names[0]
    assert conn.is_table_enabled(name) is True
    conn.disable_table(name)
    assert conn.is_table_enabled(name) is False
    with pytest.raises(HBaseIOError, match="TableNotEnabledException"):
        conn.table(name).row(b"r")
    conn.enable_table(name)
    assert conn.is_table_enabled(name) is True

    # HBase refuses to delete an enabled table
    with pytest.raises(HBaseIOError, match="TableNotDisabledException"):
        conn.delete_table(name)
    conn.delete_table(name, disable=True)
    conn.disable_table(names[1])
    conn.delete_table(names[1])
    assert not set(names) & set(conn.tables())


def test_duplicate_create_raises_already_exists(conn: Any, table: Any) -> None:
    with pytest.raises(AlreadyExists) as info:
        conn.create_table(table.name, {"cf": {}})
    assert table.name.decode() in info.value.message.decode()
    # the connection is still usable after a declared exception
    assert table.name in conn.tables()


def test_families_report_column_descriptors(table: Any) -> None:
    families = table.families()
    assert set(families) == {b"cf", b"meta"}
    assert families[b"cf"]["name"] == b"cf:"
    assert families[b"cf"]["max_versions"] == 3
    assert families[b"meta"]["max_versions"] == 1
    assert families[b"meta"]["time_to_live"] == -1
    assert families[b"meta"]["compression"] == b"NONE"


def test_family_options_round_trip(conn: Any, table_name: bytes) -> None:
    conn.create_table(table_name, {"f": {"max_versions": 7, "in_memory": True, "block_cache_enabled": True}})
    fam = conn.table(table_name).families()[b"f"]
    assert (fam["max_versions"], fam["in_memory"], fam["block_cache_enabled"]) == (7, True, True)


def test_table_prefix_filters_table_names(server: HBaseThriftServer, conn: Any) -> None:
    prefix = f"ns{uuid.uuid4().hex[:6]}"
    prefixed = happybase.Connection("127.0.0.1", server.port, table_prefix=prefix)
    try:
        prefixed.create_table("inner", {"cf": {}})
        assert prefixed.tables() == [b"inner"]
        assert f"{prefix}_inner".encode() in conn.tables()
        prefixed.table("inner").put(b"r", {b"cf:q": b"v"})
        assert conn.table(f"{prefix}_inner").row(b"r") == {b"cf:q": b"v"}
        prefixed.delete_table("inner", disable=True)
        assert prefixed.tables() == []
    finally:
        prefixed.close()


def test_regions_and_compaction(conn: Any, table: Any, server: HBaseThriftServer) -> None:
    regions = table.regions()
    assert len(regions) == 1
    region = regions[0]
    assert region["start_key"] == b"" and region["end_key"] == b""
    assert region["name"].startswith(table.name + b",,")
    assert region["port"] == server.port
    conn.compact_table(table.name)
    conn.compact_table(table.name, major=True)
    with pytest.raises(HBaseIOError, match="TableNotFoundException"):
        conn.compact_table(b"no_such_table_for_compaction")


# --------------------------------------------------------------------- put / get


def test_put_and_row(table: Any) -> None:
    before = int(time.time() * 1000)
    table.put(b"r1", {b"cf:a": b"1", b"cf:b": b"2", b"meta:m": b"x"})
    after = int(time.time() * 1000)
    assert table.row(b"r1") == {b"cf:a": b"1", b"cf:b": b"2", b"meta:m": b"x"}
    with_ts = table.row(b"r1", include_timestamp=True)
    values = {col: v for col, (v, _ts) in with_ts.items()}
    stamps = {ts for _v, ts in with_ts.values()}
    assert values == {b"cf:a": b"1", b"cf:b": b"2", b"meta:m": b"x"}
    # all cells of one put share one server timestamp, in milliseconds
    assert len(stamps) == 1
    assert before - 1000 <= stamps.pop() <= after + 1000
    assert table.row(b"missing") == {}


def test_binary_row_keys_and_values(table: Any) -> None:
    key = b"\x00\xff\xfe binary"
    value = bytes(range(256))
    table.put(key, {b"cf:\xffq": value})
    assert table.row(key) == {b"cf:\xffq": value}
    assert list(table.scan()) == [(key, {b"cf:\xffq": value})]


def test_rows_omits_missing_rows_and_keeps_request_order(table: Any) -> None:
    for key in (b"r1", b"r2", b"r3"):
        table.put(key, {b"cf:a": key})
    result = table.rows([b"r3", b"nope", b"r1", b"r2", b"zzz"])
    assert result == [(b"r3", {b"cf:a": b"r3"}), (b"r1", {b"cf:a": b"r1"}), (b"r2", {b"cf:a": b"r2"})]
    assert table.rows([b"nope"]) == []
    # happybase short-circuits an empty request without a round trip (and returns a dict!)
    assert table.rows([]) == {}


def test_column_projection(table: Any) -> None:
    table.put(b"r", {b"cf:a": b"1", b"cf:b": b"2", b"cf:": b"empty", b"meta:m": b"3"})
    assert table.row(b"r", columns=[b"cf:a"]) == {b"cf:a": b"1"}
    assert table.row(b"r", columns=[b"cf"]) == {b"cf:a": b"1", b"cf:b": b"2", b"cf:": b"empty"}
    assert table.row(b"r", columns=[b"cf:b", b"meta"]) == {b"cf:b": b"2", b"meta:m": b"3"}
    # "cf:" is the column with the empty qualifier (modern HBase parseColumn)
    assert table.row(b"r", columns=[b"cf:"]) == {b"cf:": b"empty"}
    assert table.row(b"r", columns=[b"cf:nope"]) == {}
    assert table.rows([b"r"], columns=[b"meta:m"]) == [(b"r", {b"meta:m": b"3"})]
    with pytest.raises(HBaseIOError, match="NoSuchColumnFamilyException"):
        table.row(b"r", columns=[b"nofam:x"])


def test_put_to_unknown_family_is_an_io_error(table: Any) -> None:
    with pytest.raises(HBaseIOError, match="NoSuchColumnFamilyException"):
        table.put(b"r", {b"cf:a": b"1", b"nofam:x": b"2"})
    # the whole call is rejected, nothing was written
    assert table.row(b"r") == {}


# ---------------------------------------------------------- timestamps / versions


def test_versions_are_kept_up_to_max_versions_newest_first(table: Any) -> None:
    for ts in range(1, 6):
        table.put(b"r", {b"cf:a": f"v{ts}".encode(), b"meta:m": f"m{ts}".encode()}, timestamp=ts * 10)
    assert table.cells(b"r", b"cf:a") == [b"v5", b"v4", b"v3"]  # max_versions=3
    assert table.cells(b"r", b"cf:a", versions=2, include_timestamp=True) == [(b"v5", 50), (b"v4", 40)]
    assert table.cells(b"r", b"meta:m", include_timestamp=True) == [(b"m5", 50)]  # max_versions=1
    assert table.cells(b"r", b"cf:missing") == []
    assert table.cells(b"missing", b"cf:a") == []


def test_timestamps_on_reads_are_exclusive_upper_bounds(table: Any) -> None:
    for ts in (10, 20, 30):
        table.put(b"r", {b"cf:a": f"v{ts}".encode()}, timestamp=ts)
    table.put(b"r2", {b"cf:a": b"only30"}, timestamp=30)
    # HBase's Thrift server uses setTimeRange(0, timestamp): the bound is exclusive
    assert table.cells(b"r", b"cf:a", timestamp=30, include_timestamp=True) == [(b"v20", 20), (b"v10", 10)]
    assert table.cells(b"r", b"cf:a", timestamp=31) == [b"v30", b"v20", b"v10"]
    assert table.row(b"r", timestamp=30, include_timestamp=True) == {b"cf:a": (b"v20", 20)}
    assert table.row(b"r", timestamp=21) == {b"cf:a": b"v20"}
    assert table.row(b"r", timestamp=10) == {}
    assert table.row(b"r", columns=[b"cf:a"], timestamp=11) == {b"cf:a": b"v10"}
    assert table.rows([b"r", b"r2"], timestamp=25) == [(b"r", {b"cf:a": b"v20"})]
    assert list(table.scan(timestamp=15)) == [(b"r", {b"cf:a": b"v10"})]
    assert table.row(b"r") == {b"cf:a": b"v30"}


def test_same_timestamp_overwrites_and_older_versions_sort_in(table: Any) -> None:
    table.put(b"r", {b"cf:a": b"first"}, timestamp=100)
    table.put(b"r", {b"cf:a": b"second"}, timestamp=100)
    table.put(b"r", {b"cf:a": b"older"}, timestamp=50)
    table.put(b"r", {b"cf:a": b"newest"}, timestamp=200)
    assert table.cells(b"r", b"cf:a", include_timestamp=True) == [
        (b"newest", 200),
        (b"second", 100),
        (b"older", 50),
    ]
    # a 4th version pushes out the oldest one
    table.put(b"r", {b"cf:a": b"middle"}, timestamp=150)
    assert table.cells(b"r", b"cf:a") == [b"newest", b"middle", b"second"]


# ----------------------------------------------------------------------- deletes


def test_delete_columns_and_whole_rows(table: Any) -> None:
    table.put(b"r1", {b"cf:a": b"1", b"cf:b": b"2", b"meta:m": b"3"})
    table.put(b"r2", {b"cf:a": b"1", b"meta:m": b"3"})
    table.delete(b"r1", columns=[b"cf:a"])
    assert table.row(b"r1") == {b"cf:b": b"2", b"meta:m": b"3"}
    table.delete(b"r1", columns=[b"meta"])  # a whole family
    assert table.row(b"r1") == {b"cf:b": b"2"}
    table.delete(b"r2")  # a whole row: happybase lists the families first
    assert table.row(b"r2") == {}
    assert table.rows([b"r1", b"r2"]) == [(b"r1", {b"cf:b": b"2"})]
    assert [key for key, _ in table.scan()] == [b"r1"]
    table.delete(b"r1")
    assert list(table.scan()) == []


def test_delete_all_versions_and_delete_with_timestamp(table: Any) -> None:
    for ts in (10, 20, 30):
        table.put(b"r", {b"cf:a": f"v{ts}".encode(), b"cf:b": b"b"}, timestamp=ts)
    # a delete with a timestamp removes the versions <= that timestamp
    table.delete(b"r", columns=[b"cf:a"], timestamp=20)
    assert table.cells(b"r", b"cf:a", include_timestamp=True) == [(b"v30", 30)]
    # a delete without timestamp removes every version
    table.delete(b"r", columns=[b"cf:a"])
    assert table.cells(b"r", b"cf:a") == []
    assert table.row(b"r") == {b"cf:b": b"b"}


def test_batch_flushes_on_exit_and_on_batch_size(table: Any) -> None:
    with table.batch(batch_size=2) as b:
        b.put(b"r1", {b"cf:a": b"1"})
        assert table.row(b"r1") == {}  # buffered
        b.put(b"r2", {b"cf:a": b"2"})
        assert table.row(b"r1") == {b"cf:a": b"1"}  # flushed at batch_size
        b.put(b"r3", {b"cf:a": b"3"})
        assert table.row(b"r3") == {}
        b.delete(b"r1")  # one delete per family: 3 mutations >= 2, flushed again
        assert table.row(b"r1") == {}
        assert table.row(b"r3") == {b"cf:a": b"3"}
        b.put(b"r4", {b"cf:a": b"4"})
        assert table.row(b"r4") == {}
    assert table.row(b"r4") == {b"cf:a": b"4"}
    assert table.rows([b"r1", b"r2", b"r3"]) == [(b"r2", {b"cf:a": b"2"}), (b"r3", {b"cf:a": b"3"})]


def test_batch_with_timestamp(table: Any) -> None:
    with table.batch(timestamp=1234) as b:
        b.put(b"r", {b"cf:a": b"1"})
        b.put(b"s", {b"cf:a": b"2"})
    assert table.row(b"r", include_timestamp=True) == {b"cf:a": (b"1", 1234)}
    assert table.row(b"s", include_timestamp=True) == {b"cf:a": (b"2", 1234)}


def test_transaction_batch_is_not_sent_on_error(table: Any) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom), table.batch(transaction=True) as b:
        b.put(b"tx", {b"cf:a": b"1"})
        raise Boom
    assert table.row(b"tx") == {}

    # without transaction=True the mutations are still sent on error
    with pytest.raises(Boom), table.batch() as b:
        b.put(b"notx", {b"cf:a": b"1"})
        raise Boom
    assert table.row(b"notx") == {b"cf:a": b"1"}

    with table.batch(transaction=True) as b:
        b.put(b"tx", {b"cf:a": b"ok"})
        b.put(b"tx2", {b"cf:a": b"ok"})
    assert table.rows([b"tx", b"tx2"]) == [(b"tx", {b"cf:a": b"ok"}), (b"tx2", {b"cf:a": b"ok"})]


def test_delete_wins_over_put_in_the_same_batch(table: Any) -> None:
    table.put(b"r", {b"cf:a": b"old", b"cf:b": b"keep"})
    # like HBase's mutateRows: puts are applied first, then deletes
    with table.batch() as b:
        b.delete(b"r", columns=[b"cf:a"])
        b.put(b"r", {b"cf:a": b"new"})
    assert table.row(b"r") == {b"cf:b": b"keep"}


# ------------------------------------------------------------------------- scans


def test_scan_full_and_ranges(table: Any) -> None:
    keys = _fill(table)
    full = list(table.scan())
    assert [k for k, _ in full] == keys
    assert full[3] == (b"row03", {b"cf:a": b"a3", b"cf:b": b"b3", b"meta:m": b"m"})
    assert [k for k, _ in table.scan(row_start=b"row05", row_stop=b"row08")] == keys[5:8]
    assert [k for k, _ in table.scan(row_start=b"row175")] == keys[18:]
    assert [k for k, _ in table.scan(row_stop=b"row02")] == keys[:2]
    assert list(table.scan(row_start=b"zzz")) == []


def test_scan_row_prefix(table: Any) -> None:
    _fill(table)
    table.put(b"other", {b"cf:a": b"x"})
    table.put(b"row1\xff\xff", {b"cf:a": b"edge"})
    assert [k for k, _ in table.scan(row_prefix=b"row1")] == [
        *(f"row{i}".encode() for i in range(10, 20)),
        b"row1\xff\xff",
    ]
    assert [k for k, _ in table.scan(row_prefix=b"oth")] == [b"other"]
    assert list(table.scan(row_prefix=b"nothing")) == []


def test_scan_columns_limit_and_batch_size(table: Any) -> None:
    keys = _fill(table, 25)
    assert list(table.scan(columns=[b"cf:b"], limit=2)) == [
        (b"row00", {b"cf:b": b"b0"}),
        (b"row01", {b"cf:b": b"b1"}),
    ]
    assert next(iter(table.scan(columns=[b"meta"]))) == (b"row00", {b"meta:m": b"m"})
    # batch_size smaller than the result: several scannerGetList round trips
    assert [k for k, _ in table.scan(batch_size=4)] == keys
    assert [k for k, _ in table.scan(batch_size=3, limit=10)] == keys[:10]
    assert [k for k, _ in table.scan(batch_size=1, row_prefix=b"row2")] == keys[20:]


def test_scan_include_timestamp_sorted_columns_and_reverse(table: Any) -> None:
    table.put(b"a", {b"cf:z": b"1", b"cf:b": b"2", b"meta:m": b"3"}, timestamp=77)
    table.put(b"b", {b"cf:a": b"4"}, timestamp=78)
    table.put(b"c", {b"cf:a": b"5"}, timestamp=79)
    rows = dict(table.scan(include_timestamp=True))
    assert rows[b"a"] == {b"cf:z": (b"1", 77), b"cf:b": (b"2", 77), b"meta:m": (b"3", 77)}
    (_key, ordered), *_ = table.scan(sorted_columns=True)
    assert list(ordered.items()) == [(b"cf:b", b"2"), (b"cf:z", b"1"), (b"meta:m", b"3")]
    assert [k for k, _ in table.scan(reverse=True)] == [b"c", b"b", b"a"]
    assert [k for k, _ in table.scan(row_start=b"b", row_stop=b"a", reverse=True)] == [b"b"]


def test_scan_batching_splits_wide_rows(table: Any) -> None:
    table.put(b"wide", {f"cf:c{i}".encode(): b"v" for i in range(5)})
    parts = list(table.scan(scan_batching=2))
    assert [k for k, _ in parts] == [b"wide"] * 3
    assert [len(d) for _, d in parts] == [2, 2, 1]


def test_scan_filters(table: Any) -> None:
    _fill(table)
    table.put(b"other", {b"cf:a": b"a-other"})
    assert [k for k, _ in table.scan(filter=b"PrefixFilter('row1')")] == [
        f"row{i}".encode() for i in range(10, 20)
    ]
    assert list(table.scan(filter="PrefixFilter('row01') AND ColumnPrefixFilter('b')")) == [
        (b"row01", {b"cf:b": b"b1"})
    ]
    assert list(table.scan(filter=b"ValueFilter(=, 'binary:a-other')")) == [(b"other", {b"cf:a": b"a-other"})]
    assert [k for k, _ in table.scan(filter=b"RowFilter(<, 'binary:row02')")] == [
        b"other",
        b"row00",
        b"row01",
    ]
    keys_only = list(table.scan(row_prefix=b"row00", filter=b"KeyOnlyFilter()"))
    assert keys_only == [(b"row00", {b"cf:a": b"", b"cf:b": b"", b"meta:m": b""})]
    assert list(table.scan(row_prefix=b"row00", filter=b"FirstKeyOnlyFilter()")) == [
        (b"row00", {b"cf:a": b"a0"})
    ]
    assert [k for k, _ in table.scan(filter=b"PageFilter(3)")] == [b"other", b"row00", b"row01"]
    assert [
        k for k, _ in table.scan(filter=b"SingleColumnValueFilter('cf', 'a', =, 'binary:a7', true, true)")
    ] == [b"row07"]


def test_unsupported_filter_is_an_io_error_and_keeps_the_connection(table: Any) -> None:
    table.put(b"r", {b"cf:a": b"1"})
    for bad in (b"NoSuchFilter('x')", b"PrefixFilter('r') OR PrefixFilter('s')", b"PrefixFilter("):
        with pytest.raises(HBaseIOError, match="IllegalArgumentException"):
            list(table.scan(filter=bad))
    assert table.row(b"r") == {b"cf:a": b"1"}


def test_scans_are_independent_when_interleaved(table: Any) -> None:
    keys = _fill(table, 6)
    first = table.scan(batch_size=2)
    second = table.scan(batch_size=2, row_start=b"row03")
    got = [next(first), next(second), next(first), next(second)]
    assert [k for k, _ in got] == [keys[0], keys[3], keys[1], keys[4]]
    assert [k for k, _ in first] == keys[2:]
    assert [k for k, _ in second] == keys[5:]


# ---------------------------------------------------------------------- counters


def test_counters(table: Any) -> None:
    assert table.counter_get(b"c", b"cf:n") == 0
    assert table.counter_inc(b"c", b"cf:n") == 1
    assert table.counter_inc(b"c", b"cf:n", value=41) == 42
    assert table.counter_dec(b"c", b"cf:n", value=50) == -8
    # stored as an 8-byte big-endian signed long, as HBase does
    assert table.row(b"c", columns=[b"cf:n"]) == {b"cf:n": struct.pack(">q", -8)}
    table.counter_set(b"c", b"cf:n", 1000)
    assert table.counter_inc(b"c", b"cf:n", 5) == 1005
    assert table.counter_get(b"c", b"cf:n") == 1005
    assert table.counter_inc(b"c", b"meta:big", 2**62) == 2**62


def test_counter_on_non_long_value_is_an_io_error(table: Any) -> None:
    table.put(b"c", {b"cf:text": b"abc"})
    with pytest.raises(HBaseIOError, match="not a long"):
        table.counter_inc(b"c", b"cf:text")
    with pytest.raises(HBaseIOError, match="NoSuchColumnFamilyException"):
        table.counter_inc(b"c", b"nofam:n")
    assert table.row(b"c") == {b"cf:text": b"abc"}


def test_concurrent_counter_increments_are_atomic(server: HBaseThriftServer, table: Any) -> None:
    def work() -> None:
        c = happybase.Connection("127.0.0.1", server.port)
        try:
            t = c.table(table.name)
            for _ in range(50):
                t.counter_inc(b"hits", b"cf:n")
        finally:
            c.close()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert table.counter_get(b"hits", b"cf:n") == 200


# ------------------------------------------------------------------------ errors


def test_missing_table_raises_io_error(conn: Any) -> None:
    missing = conn.table(b"no_such_table")
    with pytest.raises(HBaseIOError) as info:
        missing.row(b"r")
    assert info.value.message == b"TableNotFoundException: no_such_table"
    for call in (
        lambda: missing.put(b"r", {b"cf:a": b"1"}),
        lambda: missing.rows([b"r"]),
        lambda: list(missing.scan()),
        lambda: missing.families(),
        lambda: missing.cells(b"r", b"cf:a"),
        lambda: missing.counter_inc(b"r", b"cf:a"),
        lambda: conn.delete_table(b"no_such_table"),
        lambda: conn.is_table_enabled(b"no_such_table"),
    ):
        with pytest.raises(HBaseIOError, match="TableNotFoundException"):
            call()
    # HBase's Thrift1 handler answers an empty region list for unknown tables
    assert missing.regions() == []
    # errors are declared Thrift exceptions: the same connection keeps working
    assert isinstance(conn.tables(), list)


def test_exceptions_are_happybase_classes(conn: Any) -> None:
    with pytest.raises(Exception) as info:
        conn.table(b"no_such_table").row(b"r")
    assert type(info.value) is sys.modules["Hbase_thrift"].IOError


# ------------------------------------------------------------- pools / transports


def test_connection_pool_with_several_threads(server: HBaseThriftServer, table: Any) -> None:
    pool = happybase.ConnectionPool(size=3, host="127.0.0.1", port=server.port)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(25):
                with pool.connection() as c:
                    t = c.table(table.name)
                    key = f"w{worker}-{i:02d}".encode()
                    t.put(key, {b"cf:a": key})
                    assert t.row(key) == {b"cf:a": key}
                    t.counter_inc(b"total", b"cf:n")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert errors == []
    with pool.connection() as c:
        t = c.table(table.name)
        assert t.counter_get(b"total", b"cf:n") == 150
        assert len([k for k, _ in t.scan(row_prefix=b"w")]) == 150


def test_idle_pooled_connection_is_not_dropped(server: HBaseThriftServer, table: Any) -> None:
    pool = happybase.ConnectionPool(size=1, host="127.0.0.1", port=server.port)
    with pool.connection() as c:
        c.table(table.name).put(b"idle", {b"cf:a": b"1"})
    time.sleep(3.5)  # longer than thriftpy2's default 3 s server-side client timeout
    with pool.connection() as c:
        assert c.table(table.name).row(b"idle") == {b"cf:a": b"1"}


@pytest.mark.parametrize(("transport", "protocol"), [("framed", "compact"), ("framed", "binary")])
def test_framed_transport_and_compact_protocol(transport: str, protocol: str) -> None:
    with HBaseThriftServer(transport=transport, protocol=protocol) as srv:
        c = happybase.Connection("127.0.0.1", srv.port, transport=transport, protocol=protocol)
        try:
            c.create_table("fc", {"cf": {"max_versions": 2}})
            t = c.table("fc")
            t.put(b"\xffkey", {b"cf:a": b"\x00v"}, timestamp=5)
            t.put(b"\xffkey", {b"cf:a": b"\x00w"}, timestamp=6)
            assert t.row(b"\xffkey") == {b"cf:a": b"\x00w"}
            assert t.cells(b"\xffkey", b"cf:a", include_timestamp=True) == [(b"\x00w", 6), (b"\x00v", 5)]
            assert t.counter_inc(b"n", b"cf:c", -3) == -3
            assert [k for k, _ in t.scan(batch_size=1)] == [b"n", b"\xffkey"]
            with pytest.raises(HBaseIOError, match="TableNotFoundException"):
                c.table("nope").row(b"r")
            with pytest.raises(AlreadyExists):
                c.create_table("fc", {"cf": {}})
            assert c.tables() == [b"fc"]
        finally:
            c.close()


# ------------------------------------------------------------------ lifecycle


def test_restart_on_the_same_port_keeps_data() -> None:
    srv = HBaseThriftServer().start()
    try:
        port = srv.port
        c = happybase.Connection("127.0.0.1", port)
        c.create_table("restart", {"cf": {}})
        c.table("restart").put(b"r", {b"cf:a": b"1"})
        srv.stop()
        assert not srv.running
        with pytest.raises((TTransportException, OSError)):
            c.tables()  # the old connection was dropped by the stop
        c.close()
        srv.start()
        assert srv.port == port
        c2 = happybase.Connection("127.0.0.1", port)
        assert c2.table("restart").row(b"r") == {b"cf:a": b"1"}
        c2.close()
    finally:
        srv.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_constructor_validates_options() -> None:
    with pytest.raises(ValueError, match="transport"):
        HBaseThriftServer(transport="http")
    with pytest.raises(ValueError, match="protocol"):
        HBaseThriftServer(protocol="json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_module_cli_serves_until_interrupted() -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "featuredao.testing.hbase", "--port", str(port), "--transport", "framed"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert f"127.0.0.1:{port}" in banner
        c = happybase.Connection("127.0.0.1", port, transport="framed")
        c.create_table("cli", {"cf": {}})
        assert c.tables() == [b"cli"]
        c.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
