"""TableStore-specific behaviour, driving the unmodified OTSClient against the local TableStore server."""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
import tablestore as ots

from featuredao import factory
from featuredao.dao import BaseDao
from featuredao.errors import (
    BackendAuthError,
    BackendQueryError,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
)
from featuredao.testing.tablestore import DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET, TableStoreServer
from featuredao.types import Reason

pytestmark = pytest.mark.tablestore

FEATURES = {"n": "int", "x": "float", "s": "str", "b": "bool", "tags": "list[str]", "vec": "list[float]"}
_tables = itertools.count()


@pytest.fixture(scope="module")
def server() -> Iterator[TableStoreServer]:
    with TableStoreServer("127.0.0.1") as srv:
        yield srv


@pytest.fixture(autouse=True)
def _no_leftover_injections(server: TableStoreServer) -> Iterator[None]:
    yield
    server.clear_injections()


def source(endpoint: str, **extra: Any) -> dict[str, Any]:
    return {"type": "tablestore", "endpoint": endpoint, "instance_name": "featuredao",
            "access_key_id": DEFAULT_ACCESS_KEY_ID, "access_key_secret": DEFAULT_ACCESS_KEY_SECRET,
            "retry_delay_ms": 1, **extra}


def build(endpoint: str, table: str | None = None, key_type: str = "str",
          **extra: Any) -> tuple[factory.Runtime, BaseDao]:
    runtime = factory.build({
        "sources": {"ots": source(endpoint, **extra)},
        "views": [{"name": "items", "entity": "item", "source": "ots", "table": table or f"t{next(_tables)}",
                   "key": "id", "key_type": key_type, "features": FEATURES, "defaults": {"n": 0}}],
    })
    dao = runtime.daos["items"]
    assert isinstance(dao, BaseDao)
    return runtime, dao


@pytest.fixture
def dao(server: TableStoreServer) -> Iterator[BaseDao]:
    runtime, dao = build(server.endpoint, max_retries=2)
    dao.prepare()
    try:
        yield dao
    finally:
        runtime.close()


def row(i: int) -> dict[str, Any]:
    return {"n": i, "x": i / 4, "s": f"s{i}", "b": i % 2 == 0, "tags": [f"t{i}"], "vec": [i * 0.5, -1.0]}


def raw_client(server: TableStoreServer, secret: str = DEFAULT_ACCESS_KEY_SECRET, **kwargs: Any) -> Any:
    return ots.OTSClient(server.endpoint, DEFAULT_ACCESS_KEY_ID, secret, server.instance_name,
                         retry_policy=ots.NoRetryPolicy(), **kwargs)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- per-row errors ----------------------------------------------------------------------------------

def test_row_error_once_is_retried_and_served(server: TableStoreServer, dao: BaseDao) -> None:
    dao.upsert([("a", row(1)), ("b", row(2))])
    server.inject_row_error(dao.view.table, [("id", "b")], "OTSServerBusy", count=1)
    before = server.call_count("BatchGetRow")
    result = dao.read(["a", "b", "zz"])
    assert result.rows == [row(1), row(2), None]
    assert result.degraded == []
    assert server.call_count("BatchGetRow") - before == 2  # the first request, then "b" alone


def test_row_error_twice_is_none_and_degraded(server: TableStoreServer, dao: BaseDao) -> None:
    dao.upsert([("a", row(1)), ("b", row(2))])
    server.inject_row_error(dao.view.table, [("id", "b")], "OTSInternalServerError", count=2,
                            message="partition hiccup")
    result = dao.read(["b", "a", "b"])
    assert result.rows == [None, row(1), None]
    assert len(result.degraded) == 1
    entry = result.degraded[0]
    assert (entry.view, entry.reason, entry.keys) == ("items", Reason.ROW_ERROR, ("b",))
    assert "OTSInternalServerError" in entry.detail and "partition hiccup" in entry.detail
    # The next read finds the row again: nothing was dropped or cached.
    assert dao.read(["b"]).rows == [row(2)]


def test_row_retries_zero_reports_at_once(server: TableStoreServer) -> None:
    runtime, dao = build(server.endpoint, row_retries=0)
    try:
        dao.prepare()
        dao.upsert([("a", row(1))])
        server.inject_row_error(dao.view.table, [("id", "a")], "OTSServerBusy", count=1)
        before = server.call_count("BatchGetRow")
        result = dao.read(["a"])
        assert result.rows == [None] and [d.reason for d in result.degraded] == [Reason.ROW_ERROR]
        assert server.call_count("BatchGetRow") - before == 1
    finally:
        runtime.close()


# -- request-level errors ----------------------------------------------------------------------------

def test_5xx_served_when_the_retries_suffice(server: TableStoreServer, dao: BaseDao) -> None:
    dao.upsert([("a", row(1))])
    server.inject_failure("BatchGetRow", 503, "OTSServerUnavailable", count=2)
    before = server.call_count("BatchGetRow")
    assert dao.read(["a"]).rows == [row(1)]
    assert server.call_count("BatchGetRow") - before == 3


def test_5xx_gives_backend_unavailable_after_the_configured_retries(server: TableStoreServer,
                                                                    dao: BaseDao) -> None:
    server.inject_failure("BatchGetRow", 500, "OTSInternalServerError", count=3)
    before = server.call_count("BatchGetRow")
    with pytest.raises(BackendUnavailable) as info:
        dao.read(["a"])
    assert server.call_count("BatchGetRow") - before == 3  # 1 + max_retries
    assert isinstance(info.value.__cause__, ots.OTSServiceError)
    assert "OTSInternalServerError" in str(info.value) and "view='items'" in str(info.value)


def test_server_timeout_code_is_backend_timeout(server: TableStoreServer) -> None:
    runtime, dao = build(server.endpoint, max_retries=0)
    try:
        server.inject_failure("BatchGetRow", 503, "OTSTimeout", count=1)
        with pytest.raises(BackendTimeout):
            dao.read(["a"])
    finally:
        runtime.close()


def test_5xx_on_writes_is_retried(server: TableStoreServer, dao: BaseDao) -> None:
    server.inject_failure("BatchWriteRow", 503, "OTSServerUnavailable", count=1)
    assert dao.upsert([("w", row(3))]) == 1
    assert dao.read(["w"]).rows == [row(3)]


def test_wrong_secret_is_auth_error_fast_and_never_shows_the_secret(
        server: TableStoreServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "Wr0ng-s3cret-value-42"
    monkeypatch.setenv("FEATUREDAO_TEST_OTS_SECRET", wrong)
    runtime = factory.build({
        # The default-like retry settings would take many seconds if an auth failure were retried.
        "sources": {"ots": {**source(server.endpoint), "access_key_secret": "${FEATUREDAO_TEST_OTS_SECRET}",
                            "max_retries": 10, "retry_delay_ms": 2000}},
        "views": [{"name": "items", "entity": "item", "source": "ots", "table": "anything", "key": "id",
                   "features": FEATURES}],
    })
    try:
        dao = runtime.daos["items"]
        started = time.monotonic()
        with pytest.raises(BackendAuthError) as info:
            dao.read(["a", "b"])
        assert time.monotonic() - started < 5
        with pytest.raises(BackendAuthError):
            dao.ping()
        text = str(info.value)
        assert "access key id or secret was rejected" in text and "OTSAuthFailed" in text
        shown = [text, repr(info.value), str(info.value.__cause__),
                 "".join(traceback.format_exception(info.value)), caplog.text,
                 repr(runtime.sources["ots"]), repr(runtime.sources["ots"].options), repr(runtime.config)]
        assert all(wrong not in s for s in shown)
    finally:
        runtime.close()


def test_missing_table_is_a_query_error_naming_the_view(server: TableStoreServer) -> None:
    runtime, dao = build(server.endpoint, table="absent_table")
    try:
        with pytest.raises(BackendQueryError, match="view='items'") as info:
            dao.read(["a"])
        assert "absent_table" in str(info.value)
        with pytest.raises(BackendQueryError, match="view='items'"):
            dao.upsert([("a", row(1))])
    finally:
        runtime.close()


def test_missing_table_reported_per_row_is_still_a_query_error() -> None:
    with TableStoreServer("127.0.0.1", missing_table_in_batch="row") as srv:
        runtime, dao = build(srv.endpoint, table="absent_table")
        try:
            with pytest.raises(BackendQueryError, match=r"absent_table.*view='items'"):
                dao.read(["a", "b"])
            with pytest.raises(BackendQueryError, match="view 'items'"):
                dao.upsert([("a", row(1))])
        finally:
            runtime.close()


def test_unreachable_endpoint_fails_fast_and_construction_does_not_connect(server: TableStoreServer) -> None:
    before = server.call_count()
    runtime, dao = build(server.endpoint)
    runtime.close()
    assert server.call_count() == before  # building a source sends nothing
    runtime, dao = build(f"http://127.0.0.1:{closed_port()}", max_retries=10, retry_delay_ms=2000)
    try:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            dao.read(["a"])
        assert time.monotonic() - started < 5
    finally:
        runtime.close()


def test_socket_timeout_is_backend_timeout() -> None:
    # A listener that accepts connections but never answers.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        runtime, dao = build(f"http://127.0.0.1:{port}", socket_timeout_ms=200)
        try:
            with pytest.raises(BackendTimeout):
                dao.read(["a"])
        finally:
            runtime.close()


# -- signing, batching, options ------------------------------------------------------------------------

def test_v4_signing_with_a_region() -> None:
    with TableStoreServer("127.0.0.1", region="cn-featuredao") as srv:
        runtime, dao = build(srv.endpoint, region="cn-featuredao")
        try:
            dao.prepare()
            dao.upsert([("a", row(1))])
            assert dao.read(["a", "b"]).rows == [row(1), None]
        finally:
            runtime.close()
        runtime, dao = build(srv.endpoint, table=dao.view.table, region="us-elsewhere")
        try:
            with pytest.raises(BackendAuthError):
                dao.read(["a"])
        finally:
            runtime.close()


def test_250_keys_take_three_batch_get_row_calls(server: TableStoreServer, dao: BaseDao) -> None:
    keys = [f"k{i}" for i in range(250)]
    dao.upsert((k, row(i)) for i, k in enumerate(keys) if i % 3 == 0)
    before = server.call_count("BatchGetRow")
    result = dao.read(keys)
    assert server.call_count("BatchGetRow") - before == 3
    assert result.rows == [row(i) if i % 3 == 0 else None for i in range(250)]


def test_batch_size_above_the_service_limit_is_a_config_error(server: TableStoreServer) -> None:
    with pytest.raises(ConfigError, match=r"\$\.sources\.ots\.batch_size"):
        build(server.endpoint, batch_size=101)
    with pytest.raises(ConfigError, match=r"\$\.sources\.ots\.endpoint"):
        build("127.0.0.1:8080")


def test_integer_keys(server: TableStoreServer) -> None:
    runtime, dao = build(server.endpoint, key_type="int")
    try:
        dao.prepare()
        dao.prepare()  # the table exists already: fine
        dao.upsert([(7, row(7)), (2**40, row(1))])
        assert dao.read([2**40, "7", 8]).rows == [row(1), row(7), None]
        got = raw_client(server).get_row(dao.view.table, [("id", 7)], max_version=1)[1]
        assert got.primary_key == [("id", 7)]
    finally:
        runtime.close()


# -- encodings and writes ----------------------------------------------------------------------------

def test_stored_encodings_and_whole_row_puts(server: TableStoreServer, dao: BaseDao) -> None:
    dao.upsert([("a", row(2))])
    client = raw_client(server)
    _, stored, _ = client.get_row(dao.view.table, [("id", "a")], max_version=1)
    cells = {name: value for name, value, _ in stored.attribute_columns}
    assert cells == {"n": 2, "x": 0.5, "s": "s2", "b": True, "tags": '["t2"]', "vec": "[1.0,-1.0]"}
    assert type(cells["b"]) is bool and type(cells["n"]) is int and type(cells["x"]) is float
    # A null feature disappears from the stored row; reads give the default (or None).
    dao.upsert([("a", {**row(2), "n": None, "tags": None})])
    _, stored, _ = client.get_row(dao.view.table, [("id", "a")], max_version=1)
    assert {name for name, _, _ in stored.attribute_columns} == {"x", "s", "b", "vec"}
    assert dao.read(["a"])[0] == {**row(2), "n": 0, "tags": None}


def test_row_with_every_feature_null_is_found(dao: BaseDao) -> None:
    dao.upsert([("empty", {})])
    result = dao.read(["empty", "none"], ["s", "tags"])
    assert result.rows == [{"s": None, "tags": None}, None]


def test_row_write_error_once_is_retried(server: TableStoreServer, dao: BaseDao) -> None:
    server.inject_row_error(dao.view.table, [("id", "b")], "OTSServerBusy", count=1)
    assert dao.upsert([("a", row(1)), ("b", row(2))]) == 2
    assert dao.read(["a", "b"]).rows == [row(1), row(2)]


def test_row_write_error_twice_raises_naming_the_view(server: TableStoreServer, dao: BaseDao) -> None:
    server.inject_row_error(dao.view.table, [("id", "b")], "OTSParameterInvalid", count=2,
                            message="bad cell")
    with pytest.raises(BackendQueryError) as info:
        dao.upsert([("a", row(1)), ("b", row(2)), ("c", row(3))])
    text = str(info.value)
    assert "view 'items'" in text and "1 of 3 rows were not written after 2 attempts" in text
    assert "'b'" in text and "OTSParameterInvalid" in text and "bad cell" in text


def test_large_upsert_and_concurrent_reads(server: TableStoreServer) -> None:
    runtime, dao = build(server.endpoint, pool_size=4)
    try:
        dao.prepare()
        keys = [f"k{i}" for i in range(450)]
        before = server.call_count("BatchWriteRow")
        assert dao.upsert((k, row(i)) for i, k in enumerate(keys)) == 450
        assert server.call_count("BatchWriteRow") - before == 5  # chunks of batch_size (100)
        errors: list[BaseException] = []

        def reader() -> None:
            try:
                for _ in range(3):
                    assert dao.read(keys[::-1]).rows == [row(i) for i in reversed(range(450))]
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
    finally:
        runtime.close()


def test_raw_reader_returns_the_same_rows(dao: BaseDao) -> None:
    dao.upsert([("a", row(1)), ("b", row(2))])
    read = dao.raw_reader()
    assert read is not None
    keys: list[Any] = ["b", "x", "a"]
    assert read(keys, list(FEATURES)) == dao.read(keys).rows
    assert read(keys, ["tags", "s"]) == dao.read(keys, ["tags", "s"]).rows
