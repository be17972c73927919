"""HBase-specific behaviour, through the unmodified happybase client against the local Thrift server."""

from __future__ import annotations

import importlib
import socket
import struct
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import happybase
import pytest

from featuredao import config, factory
from featuredao.dao import BaseDao
from featuredao.errors import BackendQueryError, BackendTimeout, BackendUnavailable, Overloaded
from featuredao.testing.hbase import HBaseThriftServer
from featuredao.types import CoercionError, Key, Reason

pytestmark = pytest.mark.hbase

TTransportException = importlib.import_module("thriftpy2.transport").TTransportException
CONFIG = Path(__file__).resolve().parents[2] / "config" / "hbase.json"
FEATURES = {"n": "int", "x": "float", "s": "str", "b": "bool", "tags": "list[str]", "v": "list[float]"}
ROW: dict[str, Any] = {"n": 42, "x": 0.1, "s": "ünï 🙂", "b": True, "tags": ["a", "b:c"], "v": [0.5, -2.0]}


@pytest.fixture(scope="module")
def server() -> Iterator[HBaseThriftServer]:
    with HBaseThriftServer() as srv:
        yield srv


@pytest.fixture
def raw(server: HBaseThriftServer) -> Iterator[Any]:
    """A plain happybase connection, to look at and write cells behind the adapter's back."""
    conn = happybase.Connection(**server.connection_kwargs())
    yield conn
    conn.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Built:
    """A runtime with one view on a fresh table."""

    def __init__(self, port: int, *, source: dict[str, Any] | None = None,
                 options: dict[str, Any] | None = None, features: dict[str, str] | None = None,
                 key_type: str = "str", table: str | None = None, defaults: dict[str, Any] | None = None,
                 prepare: bool = True) -> None:
        self.table = table or f"t_{uuid.uuid4().hex[:10]}"
        self.runtime = factory.build({
            "sources": {"hb": {"type": "hbase", "host": "127.0.0.1", "port": port, **(source or {})}},
            "views": [{"name": "items", "entity": "item", "source": "hb", "table": self.table, "key": "id",
                       "key_type": key_type, "features": features or FEATURES, "defaults": defaults or {},
                       "options": options or {}}],
        })
        dao = self.runtime.daos["items"]
        assert isinstance(dao, BaseDao)
        self.dao = dao
        if prepare:
            dao.prepare()

    def close(self) -> None:
        self.runtime.close()


@pytest.fixture
def built() -> Iterator[list[Built]]:
    made: list[Built] = []
    yield made
    for b in made:
        b.close()


def make(built: list[Built], port: int, **kwargs: Any) -> Built:
    b = Built(port, **kwargs)
    built.append(b)
    return b


# -- layout and encodings -----------------------------------------------------------------------------

def test_utf8_cells_are_text_and_lists_json(server: HBaseThriftServer, raw: Any, built: list[Built]) -> None:
    b = make(built, server.port)
    b.dao.upsert([("k1", ROW)])
    cells = raw.table(b.table).row(b"k1")
    assert cells == {
        b"f:": b"",  # the row marker
        b"f:n": b"42", b"f:x": b"0.1", b"f:s": "ünï 🙂".encode(), b"f:b": b"true",
        b"f:tags": b'["a","b:c"]', b"f:v": b"[0.5,-2.0]",
    }
    assert b.dao.read(["k1"])[0] == ROW


def test_binary_cells_follow_hbase_bytes(server: HBaseThriftServer, raw: Any, built: list[Built]) -> None:
    b = make(built, server.port, options={"encoding": "binary", "column_family": "cf"}, key_type="int")
    b.dao.upsert([(17, ROW), (-3, {**ROW, "b": False, "n": -(2**63)})])
    cells = raw.table(b.table).row(b"17")  # int keys are their decimal text
    assert cells[b"cf:n"] == struct.pack(">q", 42)
    assert cells[b"cf:x"] == struct.pack(">d", 0.1)
    assert cells[b"cf:b"] == b"\xff"
    assert cells[b"cf:s"] == "ünï 🙂".encode() and cells[b"cf:tags"] == b'["a","b:c"]'
    assert raw.table(b.table).row(b"-3")[b"cf:b"] == b"\x00"
    assert b.dao.read([-3, "17"]).rows == [{**ROW, "b": False, "n": -(2**63)}, ROW]


def test_binary_int_beyond_64_bits_is_refused(server: HBaseThriftServer, built: list[Built]) -> None:
    b = make(built, server.port, options={"encoding": "binary"})
    with pytest.raises(CoercionError, match="'n'"):
        b.dao.upsert([("big", {"n": 2**63})])
    assert b.dao.read(["big"])[0] is None  # nothing of the batch was sent


def test_cells_written_by_other_tools_decode(server: HBaseThriftServer, raw: Any, built: list[Built]) -> None:
    text = make(built, server.port, defaults={"n": -1})
    binary = make(built, server.port, options={"encoding": "binary"})
    raw.table(text.table).put(b"r", {b"f:n": b" 7 ", b"f:b": b"yes", b"f:x": b"nan", b"f:tags": b"[]"})
    raw.table(binary.table).put(b"r", {b"f:n": b"12", b"f:b": b"\x01", b"f:x": struct.pack(">d", 2.5)})
    got = text.dao.read(["r"])[0]
    assert got is not None and got["n"] == 7 and got["b"] is True and got["tags"] == []
    assert got["x"] != got["x"]  # NaN survives the text encoding
    # Binary cells of another width are read as text; any non-zero byte is true.
    assert binary.dao.read(["r"])[0] == {"n": 12, "b": True, "x": 2.5, "s": None, "tags": None, "v": None}


def test_undecodable_cell_degrades_to_default(server: HBaseThriftServer, raw: Any,
                                              built: list[Built]) -> None:
    b = make(built, server.port, options={"encoding": "binary"}, defaults={"n": 0})
    b.dao.upsert([("ok", ROW)])
    raw.table(b.table).put(b"bad", {b"f:n": b"\x00\x01", b"f:s": b"fine"})
    result = b.dao.read(["bad", "ok"])
    assert result.rows[0] == {"n": 0, "x": None, "s": "fine", "b": None, "tags": None, "v": None}
    assert result.rows[1] == ROW
    assert [(d.reason, d.keys, d.feature) for d in result.degraded] == [(Reason.COERCION, ("bad",), "n")]


# -- reads ----------------------------------------------------------------------------------------------

def test_missing_rows_are_realigned_by_key(server: HBaseThriftServer, raw: Any, built: list[Built]) -> None:
    # Small chunks over three pooled connections: rows() omits missing rows in every chunk.
    b = make(built, server.port, source={"batch_size": 3, "pool_size": 3}, features={"n": "int"})
    table = raw.table(b.table)
    for i in range(0, 20, 3):  # written by another tool: no row marker
        table.put(f"k{i}".encode(), {b"f:n": str(i).encode()})
    keys = [f"k{i}" for i in reversed(range(20))] + ["k3", "nope", "k0"]
    got = [r["n"] if r else None for r in b.dao.read(keys)]
    want = [int(k[1:]) if k != "nope" and int(k[1:]) % 3 == 0 else None for k in keys]
    assert got == want


def test_projection_is_pushed_down(server: HBaseThriftServer, built: list[Built],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    b = make(built, server.port)
    b.dao.upsert([("p", ROW), ("q", {"n": 1})])
    sent: list[list[bytes]] = []
    handler = server._handler
    real = handler.getRowsWithColumns

    def spy(table: bytes, rows: list[bytes], columns: list[bytes], attributes: Any) -> Any:
        sent.append(list(columns))
        return real(table, rows, columns, attributes)

    monkeypatch.setattr(handler, "getRowsWithColumns", spy)  # the server's side: the client is untouched
    result = b.dao.read(["p", "q", "r"], ["s", "b"])
    assert sent == [[b"f:", b"f:s", b"f:b"]]
    # "q" has none of the projected features, yet it exists: the marker says so.
    assert result.rows == [{"s": ROW["s"], "b": True}, {"s": None, "b": None}, None]


def test_newest_version_wins(server: HBaseThriftServer, raw: Any, built: list[Built]) -> None:
    b = make(built, server.port, options={"max_versions": 3}, features={"n": "int"})
    table = raw.table(b.table)
    table.put(b"v", {b"f:n": b"3"}, timestamp=300)
    table.put(b"v", {b"f:n": b"1"}, timestamp=100)  # written later, but older
    assert len(table.cells(b"v", b"f:n", versions=3)) == 2
    assert b.dao.read(["v"])[0] == {"n": 3}
    b.dao.upsert([("v", {"n": 9})])  # stamped with the server's time: newer than 300
    assert b.dao.read(["v"])[0] == {"n": 9}


def test_null_feature_deletes_its_column(server: HBaseThriftServer, raw: Any, built: list[Built]) -> None:
    b = make(built, server.port, defaults={"n": -1})
    b.dao.upsert([("d", ROW), ("e", ROW)])
    b.dao.upsert([("d", {**ROW, "s": None}), ("e", {})])
    assert b"f:s" not in raw.table(b.table).row(b"d")
    assert raw.table(b.table).row(b"e") == {b"f:": b""}
    result = b.dao.read(["d", "e"])
    assert result.rows[0] == {**ROW, "s": None}
    # An all-null row still exists (its marker) and reads as defaults, not as a missing key.
    assert result.rows[1] == {"n": -1, "x": None, "s": None, "b": None, "tags": None, "v": None}
    b.dao.upsert([("d", {**ROW, "s": None})])
    assert b.dao.read(["d"])[0] == {**ROW, "s": None}  # idempotent


# -- tables and names --------------------------------------------------------------------------------------

def test_table_prefix_and_existing_table(server: HBaseThriftServer, raw: Any, built: list[Built]) -> None:
    b = make(built, server.port, source={"table_prefix": "app", "table_prefix_separator": "_"})
    assert f"app_{b.table}".encode() in raw.tables()
    assert b.table.encode() not in raw.tables()
    b.dao.upsert([("a", ROW)])
    b.dao.prepare()  # the table exists: nothing happens, the data stays
    assert b.dao.read(["a"])[0] == ROW


def test_missing_table_is_a_query_error_naming_the_view(server: HBaseThriftServer,
                                                        built: list[Built]) -> None:
    b = make(built, server.port, source={"pool_size": 1}, prepare=False)
    with pytest.raises(BackendQueryError, match="view='items'") as info:
        b.dao.read(["a"])
    assert "TableNotFoundException" in str(info.value)
    assert isinstance(info.value.__cause__, importlib.import_module("Hbase_thrift").IOError)
    # The server answered: the pooled connection was healthy and is kept, not reconnected.
    source: Any = b.runtime.sources["hb"]
    (conn,) = source._seen
    transport = conn.transport
    with pytest.raises(BackendQueryError):
        b.dao.upsert([("a", {"n": 1})])
    assert conn.transport is transport and transport.is_open()


def test_missing_column_family_is_a_query_error(server: HBaseThriftServer, raw: Any,
                                                built: list[Built]) -> None:
    table = f"t_{uuid.uuid4().hex[:10]}"
    raw.create_table(table, {"other": {}})
    b = make(built, server.port, table=table)
    b.dao.prepare()  # the table exists (without the family): prepare leaves it alone
    with pytest.raises(BackendQueryError, match="view='items'"):
        b.dao.read(["a"])


# -- connections and failures ---------------------------------------------------------------------------

def test_refused_connection_is_unavailable_and_building_does_not_connect(built: list[Built]) -> None:
    b = make(built, closed_port(), prepare=False)  # building the source must not connect
    with pytest.raises(BackendUnavailable) as info:
        b.dao.read(["a"])
    assert not isinstance(info.value, BackendTimeout)
    assert isinstance(info.value.__cause__, TTransportException)
    with pytest.raises(BackendUnavailable):
        b.dao.ping()
    with pytest.raises(BackendUnavailable):
        b.dao.upsert([("a", ROW)])


def test_broken_connection_is_dropped_not_reused(built: list[Built]) -> None:
    with HBaseThriftServer() as srv:
        b = make(built, srv.port, source={"pool_size": 1}, features={"n": "int"})
        b.dao.upsert([("a", {"n": 1})])
        assert b.dao.read(["a"])[0] == {"n": 1}
        srv.stop()
        with pytest.raises(BackendUnavailable) as info:
            b.dao.read(["a"])
        assert info.value.__cause__ is not None
        srv.start()  # same port, data kept
        assert b.dao.read(["a"])[0] == {"n": 1}
        # A restart between two reads leaves a closed socket in the pool: happybase replaces it and
        # the adapter retries once on the fresh one, so the read succeeds.
        srv.stop()
        srv.start()
        assert b.dao.read(["a"])[0] == {"n": 1}
        b.dao.ping()


def test_unanswered_request_times_out(built: list[Built]) -> None:
    with socket.socket() as hole:  # accepts connections (backlog) and never answers
        hole.bind(("127.0.0.1", 0))
        hole.listen(8)
        b = make(built, hole.getsockname()[1], source={"timeout_ms": 200}, prepare=False)
        with pytest.raises(BackendTimeout) as info:
            b.dao.read(["a"])
        assert isinstance(info.value.__cause__, TimeoutError)


def test_no_free_connection_is_overloaded(server: HBaseThriftServer, built: list[Built]) -> None:
    b = make(built, server.port, source={"pool_size": 1, "pool_timeout_ms": 50}, features={"n": "int"})
    source: Any = b.runtime.sources["hb"]
    holding, release = threading.Event(), threading.Event()

    def hold(conn: Any) -> None:
        holding.set()
        release.wait(10)

    worker = threading.Thread(target=source.run, args=(hold,))
    worker.start()
    try:
        assert holding.wait(10)
        with pytest.raises(Overloaded, match="No connection available"):
            b.dao.read(["a"])
    finally:
        release.set()
        worker.join(10)
    assert b.dao.read(["a"])[0] is None


def test_example_config_validates() -> None:
    cfg = config.load(CONFIG)
    spec = cfg.sources["hbase"]
    assert spec.type == "hbase" and spec.options.pool_size >= 1
    assert {v.options.encoding for v in cfg.views.values()} == {"utf8", "binary"}


@pytest.mark.parametrize("encoding", ["utf8", "binary"])
def test_raw_reader_reads_what_the_dao_reads(server: HBaseThriftServer, built: list[Built],
                                             encoding: str) -> None:
    b = make(built, server.port, options={"encoding": encoding})
    b.dao.upsert([("a", ROW), ("b", {**ROW, "b": False, "tags": []})])
    keys: list[Key] = ["b", "zz", "a"]
    raw_read = b.dao.raw_reader()
    assert raw_read is not None
    assert raw_read(keys, list(FEATURES)) == b.dao.read(keys).rows
