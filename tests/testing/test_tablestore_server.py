"""End-to-end tests of the local TableStore server, driven through the unmodified SDK.

Everything goes through ``tablestore.OTSClient`` over a real socket; raw HTTP is only used for
the request-authentication rejections the SDK cannot produce (bad MD5, stale date, tampering).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import http.client
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

tablestore = pytest.importorskip("tablestore")

import tablestore.protobuf.table_store_pb2 as pb  # noqa: E402
from tablestore import (  # noqa: E402
    INF_MAX,
    INF_MIN,
    BatchGetRowRequest,
    BatchWriteRowRequest,
    CapacityUnit,
    ComparatorType,
    Condition,
    DeleteRowItem,
    OTSClient,
    OTSServiceError,
    PutRowItem,
    ReservedThroughput,
    ReturnType,
    Row,
    RowExistenceExpectation,
    SingleColumnCondition,
    TableInBatchGetRowItem,
    TableInBatchWriteRowItem,
    TableMeta,
    TableOptions,
    UpdateRowItem,
)
from tablestore.auth import RequestContext, SignV2  # noqa: E402
from tablestore.credentials import Credentials  # noqa: E402
from tablestore.protocol import OTSProtocol  # noqa: E402
from tablestore.retry import DefaultRetryPolicy, NoRetryPolicy  # noqa: E402

from featuredao.testing.tablestore import TableStoreServer  # noqa: E402

pytestmark = pytest.mark.tablestore

AK = "test-ak"
SECRET = "test-secret-value"
INSTANCE = "unit"
ROOT = Path(__file__).resolve().parents[2]


class NoDelayRetry(DefaultRetryPolicy):  # type: ignore[misc]
    """The SDK's default retry decisions, without sleeping."""

    def get_retry_delay(self, retry_times: int, exception: Any, api_name: str) -> float:
        return 0.0


@pytest.fixture(scope="module")
def server() -> Iterator[TableStoreServer]:
    logging.getLogger("tablestore-client").setLevel(logging.CRITICAL)
    with TableStoreServer(instance_name=INSTANCE, access_key_id=AK, access_key_secret=SECRET) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _clean(server: TableStoreServer) -> None:
    server.reset()


def make_client(server: TableStoreServer, secret: str = SECRET, **kwargs: Any) -> Any:
    kwargs.setdefault("retry_policy", NoDelayRetry())
    kwargs.setdefault("logger_name", "tablestore-client")
    return OTSClient(
        server.endpoint, kwargs.pop("ak", AK), secret, kwargs.pop("instance", INSTANCE), **kwargs
    )


@pytest.fixture
def client(server: TableStoreServer) -> Any:
    return make_client(server)


def create(client: Any, name: str, pk: list[tuple[str, str]], max_version: int = 1) -> None:
    client.create_table(
        TableMeta(name, pk), TableOptions(max_version=max_version), ReservedThroughput(CapacityUnit(0, 0))
    )


def service_error(excinfo: pytest.ExceptionInfo[OTSServiceError]) -> tuple[int, str]:
    return excinfo.value.get_http_status(), excinfo.value.get_error_code()


def now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------- tables


def test_table_lifecycle(client: Any) -> None:
    assert client.list_table() == ()
    client.create_table(
        TableMeta("users", [("uid", "INTEGER"), ("name", "STRING"), ("blob", "BINARY")]),
        TableOptions(time_to_live=-1, max_version=3, max_time_deviation=3600),
        ReservedThroughput(CapacityUnit(0, 0)),
    )
    create(client, "items", [("id", "STRING")])
    assert client.list_table() == ("items", "users")

    desc = client.describe_table("users")
    assert desc.table_meta.table_name == "users"
    assert desc.table_meta.schema_of_primary_key == [
        ("uid", "INTEGER"),
        ("name", "STRING"),
        ("blob", "BINARY"),
    ]
    assert desc.table_options.max_version == 3
    assert desc.table_options.time_to_live == -1
    assert desc.table_options.max_time_deviation == 3600

    with pytest.raises(OTSServiceError) as exc:
        create(client, "users", [("uid", "INTEGER")])
    assert service_error(exc) == (409, "OTSObjectAlreadyExist")

    client.delete_table("users")
    assert client.list_table() == ("items",)
    with pytest.raises(OTSServiceError) as exc:
        client.describe_table("users")
    assert service_error(exc) == (404, "OTSObjectNotExist")
    with pytest.raises(OTSServiceError) as exc:
        client.delete_table("users")
    assert service_error(exc) == (404, "OTSObjectNotExist")


def test_update_table_changes_max_versions(client: Any) -> None:
    create(client, "t", [("k", "INTEGER")], max_version=1)
    client.update_table("t", TableOptions(max_version=4))
    assert client.describe_table("t").table_options.max_version == 4


def test_missing_table_is_object_not_exist(client: Any) -> None:
    with pytest.raises(OTSServiceError) as exc:
        client.get_row("nope", [("k", 1)])
    assert service_error(exc) == (404, "OTSObjectNotExist")
    with pytest.raises(OTSServiceError) as exc:
        client.put_row("nope", Row([("k", 1)], [("a", 1)]))
    assert service_error(exc) == (404, "OTSObjectNotExist")


# --------------------------------------------------------------------------- single rows


def test_put_get_roundtrip_all_types(client: Any) -> None:
    create(client, "t", [("uid", "INTEGER"), ("name", "STRING"), ("blob", "BINARY")])
    pk = [("uid", -5), ("name", "héllo"), ("blob", bytearray(b"\x00\xff"))]
    attrs = [("i", 2**40), ("f", 1.25), ("b", True), ("s", "text"), ("bin", bytearray(b"\x01\x02"))]
    client.put_row("t", Row(pk, attrs))

    _, row, _ = client.get_row("t", pk)
    assert row.primary_key == pk
    got = {name: value for name, value, _ts in row.attribute_columns}
    assert got == dict(attrs)
    assert isinstance(got["bin"], bytearray)

    _, row, _ = client.get_row("t", pk, columns_to_get=["s", "missing"])
    assert [(n, v) for n, v, _ in row.attribute_columns] == [("s", "text")]
    _, row, _ = client.get_row("t", pk, columns_to_get=["missing"])
    assert row is None
    _, row, _ = client.get_row("t", [("uid", 99), ("name", "x"), ("blob", bytearray(b""))])
    assert row is None


def test_put_row_replaces_the_whole_row(client: Any) -> None:
    create(client, "t", [("k", "INTEGER")])
    client.put_row("t", Row([("k", 1)], [("a", 1), ("b", 2)]))
    client.put_row("t", Row([("k", 1)], [("c", 3)]))
    _, row, _ = client.get_row("t", [("k", 1)])
    assert [(n, v) for n, v, _ in row.attribute_columns] == [("c", 3)]


def test_primary_key_validation(client: Any) -> None:
    create(client, "t", [("k", "INTEGER"), ("b", "BINARY")])
    with pytest.raises(OTSServiceError) as exc:
        client.put_row("t", Row([("k", "one"), ("b", bytearray(b"x"))], [("a", 1)]))
    assert service_error(exc) == (400, "OTSParameterInvalid")
    # SDK quirk: plain ``bytes`` are encoded as VT_STRING, so a BINARY key needs a bytearray.
    with pytest.raises(OTSServiceError) as exc:
        client.put_row("t", Row([("k", 1), ("b", b"x")], [("a", 1)]))
    assert service_error(exc) == (400, "OTSParameterInvalid")
    with pytest.raises(OTSServiceError) as exc:
        client.get_row("t", [("k", 1)])
    assert service_error(exc) == (400, "OTSParameterInvalid")


def test_versions_max_version_and_time_range(client: Any) -> None:
    create(client, "t", [("k", "INTEGER")], max_version=2)
    base = now_ms() - 10_000
    client.put_row("t", Row([("k", 1)], [("v", 0, base)]))
    for i in (1, 2):
        client.update_row("t", Row([("k", 1)], {"put": [("v", i, base + i)]}), None)

    _, row, _ = client.get_row("t", [("k", 1)], max_version=10)
    assert row.attribute_columns == [("v", 2, base + 2), ("v", 1, base + 1)]  # table keeps only 2
    _, row, _ = client.get_row("t", [("k", 1)])  # SDK default max_version=1
    assert row.attribute_columns == [("v", 2, base + 2)]
    _, row, _ = client.get_row("t", [("k", 1)], max_version=None, time_range=base + 1)
    assert row.attribute_columns == [("v", 1, base + 1)]
    _, row, _ = client.get_row("t", [("k", 1)], max_version=5, time_range=(base, base + 2))
    assert row.attribute_columns == [("v", 1, base + 1)]
    with pytest.raises(OTSServiceError) as exc:  # the service rejects specific time + max versions
        client.get_row("t", [("k", 1)], max_version=1, time_range=base + 1)
    assert service_error(exc) == (400, "OTSParameterInvalid")


def test_explicit_timestamp_outside_time_deviation_rejected(client: Any) -> None:
    create(client, "t", [("k", "INTEGER")])
    with pytest.raises(OTSServiceError) as exc:
        client.put_row("t", Row([("k", 1)], [("v", 1, 1000)]))
    assert service_error(exc) == (400, "OTSParameterInvalid")


def test_update_row_operations(client: Any) -> None:
    create(client, "t", [("k", "INTEGER")], max_version=3)
    ts = now_ms() - 5000
    client.put_row("t", Row([("k", 1)], [("a", "x", ts), ("b", 1), ("gone", 0)]))
    client.update_row("t", Row([("k", 1)], {"put": [("a", "y", ts + 1)]}), None)
    client.update_row(
        "t",
        Row(
            [("k", 1)],
            {"delete": [("a", None, ts)], "delete_all": ["gone"], "increment": [("b", 5), ("n", 2)]},
        ),
        Condition(RowExistenceExpectation.EXPECT_EXIST),
    )
    _, row, _ = client.get_row("t", [("k", 1)], max_version=3)
    cols: dict[str, list[tuple[Any, int]]] = {}
    for name, value, stamp in row.attribute_columns:
        cols.setdefault(name, []).append((value, stamp))
    assert cols["a"] == [("y", ts + 1)]
    assert "gone" not in cols
    assert cols["b"][0][0] == 6 and cols["b"][1][0] == 1
    assert [v for v, _ in cols["n"]] == [2]

    with pytest.raises(OTSServiceError) as exc:  # increment of a string column
        client.update_row("t", Row([("k", 1)], {"increment": [("a", 1)]}), None)
    assert service_error(exc) == (400, "OTSParameterInvalid")

    _, returned = client.update_row(
        "t", Row([("k", 2)], {"put": [("z", 1)]}), None, return_type=ReturnType.RT_PK
    )
    assert returned.primary_key == [("k", 2)]


def test_delete_row(client: Any) -> None:
    create(client, "t", [("k", "INTEGER")])
    client.put_row("t", Row([("k", 1)], [("a", 1)]))
    client.delete_row("t", Row([("k", 1)]), Condition(RowExistenceExpectation.EXPECT_EXIST))
    assert client.get_row("t", [("k", 1)])[1] is None
    with pytest.raises(OTSServiceError) as exc:
        client.delete_row("t", Row([("k", 1)]), Condition(RowExistenceExpectation.EXPECT_EXIST))
    assert service_error(exc) == (403, "OTSConditionCheckFail")
    client.delete_row("t", Row([("k", 1)]), Condition(RowExistenceExpectation.IGNORE))


def test_row_existence_and_column_conditions(client: Any) -> None:
    create(client, "t", [("k", "INTEGER")])
    not_exist = Condition(RowExistenceExpectation.EXPECT_NOT_EXIST)
    client.put_row("t", Row([("k", 1)], [("state", "new"), ("n", 3)]), not_exist)
    with pytest.raises(OTSServiceError) as exc:
        client.put_row("t", Row([("k", 1)], [("state", "dup")]), not_exist)
    assert service_error(exc) == (403, "OTSConditionCheckFail")
    with pytest.raises(OTSServiceError) as exc:
        client.update_row(
            "t", Row([("k", 2)], {"put": [("a", 1)]}), Condition(RowExistenceExpectation.EXPECT_EXIST)
        )
    assert service_error(exc) == (403, "OTSConditionCheckFail")

    ok = Condition(
        RowExistenceExpectation.EXPECT_EXIST, SingleColumnCondition("state", "new", ComparatorType.EQUAL)
    )
    client.update_row("t", Row([("k", 1)], {"put": [("state", "done")]}), ok)
    bad = Condition(
        RowExistenceExpectation.IGNORE, SingleColumnCondition("n", 10, ComparatorType.GREATER_THAN)
    )
    with pytest.raises(OTSServiceError) as exc:
        client.update_row("t", Row([("k", 1)], {"put": [("state", "x")]}), bad)
    assert service_error(exc) == (403, "OTSConditionCheckFail")
    _, row, _ = client.get_row("t", [("k", 1)], columns_to_get=["state"])
    assert row.attribute_columns[0][1] == "done"

    # Read-side column filter: a non-matching row comes back as "no row".
    flt = SingleColumnCondition("n", 3, ComparatorType.EQUAL)
    assert client.get_row("t", [("k", 1)], column_filter=flt)[1] is not None
    flt = SingleColumnCondition("n", 4, ComparatorType.EQUAL)
    assert client.get_row("t", [("k", 1)], column_filter=flt)[1] is None


# --------------------------------------------------------------------------- batch


def _fill(client: Any, table: str, n: int) -> None:
    for i in range(n):
        client.put_row(table, Row([("k", i)], [("v", i * 10)]))


def test_batch_get_row(client: Any) -> None:
    create(client, "a", [("k", "INTEGER")])
    create(client, "b", [("k", "INTEGER")])
    _fill(client, "a", 3)
    _fill(client, "b", 2)
    req = BatchGetRowRequest()
    req.add(TableInBatchGetRowItem("a", [[("k", 2)], [("k", 99)], [("k", 0)]], max_version=1))
    req.add(TableInBatchGetRowItem("b", [[("k", 1)]], columns_to_get=["v"], max_version=1))
    result = client.batch_get_row(req)
    assert result.is_all_succeed()
    rows_a = result.get_result_by_table("a")
    assert [r.is_ok for r in rows_a] == [True, True, True]
    assert rows_a[0].row.primary_key == [("k", 2)] and rows_a[0].row.attribute_columns[0][1] == 20
    assert rows_a[1].row is None  # missing row: ok, but empty
    assert rows_a[2].row.attribute_columns[0][1] == 0
    assert result.get_result_by_table("b")[0].row.attribute_columns[0][:2] == ("v", 10)


def test_batch_get_row_missing_table_fails_whole_request(client: Any) -> None:
    # Documented service behaviour: a missing table fails the whole BatchGetRow.
    create(client, "a", [("k", "INTEGER")])
    req = BatchGetRowRequest()
    req.add(TableInBatchGetRowItem("a", [[("k", 1)]], max_version=1))
    req.add(TableInBatchGetRowItem("missing", [[("k", 1)]], max_version=1))
    with pytest.raises(OTSServiceError) as exc:
        client.batch_get_row(req)
    assert service_error(exc) == (404, "OTSObjectNotExist")


def test_batch_get_row_missing_table_per_row_mode() -> None:
    with TableStoreServer(
        instance_name=INSTANCE, access_key_id=AK, access_key_secret=SECRET, missing_table_in_batch="row"
    ) as srv:
        client = make_client(srv)
        create(client, "a", [("k", "INTEGER")])
        _fill(client, "a", 2)
        req = BatchGetRowRequest()
        req.add(TableInBatchGetRowItem("a", [[("k", 1)]], max_version=1))
        req.add(TableInBatchGetRowItem("missing", [[("k", 1)], [("k", 2)]], max_version=1))
        result = client.batch_get_row(req)
        assert not result.is_all_succeed()
        succeeded, failed = result.get_result()
        assert len(succeeded) == 1 and succeeded[0].row.attribute_columns[0][1] == 10
        assert [(f.table_name, f.error_code) for f in failed] == [("missing", "OTSObjectNotExist")] * 2
        assert failed[0].row is None


def test_batch_get_row_limits(client: Any) -> None:
    create(client, "a", [("k", "INTEGER")])
    req = BatchGetRowRequest()
    req.add(TableInBatchGetRowItem("a", [[("k", i)] for i in range(101)], max_version=1))
    with pytest.raises(OTSServiceError) as exc:
        client.batch_get_row(req)
    assert service_error(exc) == (400, "OTSParameterInvalid")


def test_batch_write_row(client: Any) -> None:
    create(client, "a", [("k", "INTEGER")])
    create(client, "b", [("k", "STRING")])
    _fill(client, "a", 3)
    req = BatchWriteRowRequest()
    req.add(
        TableInBatchWriteRowItem(
            "a",
            [
                PutRowItem(Row([("k", 10)], [("v", 100)]), Condition(RowExistenceExpectation.IGNORE)),
                UpdateRowItem(
                    Row([("k", 1)], {"increment": [("v", 1)]}), Condition(RowExistenceExpectation.IGNORE)
                ),
                DeleteRowItem(Row([("k", 2)]), Condition(RowExistenceExpectation.IGNORE)),
                # Fails its condition: row 0 exists.
                PutRowItem(Row([("k", 0)], [("v", -1)]), Condition(RowExistenceExpectation.EXPECT_NOT_EXIST)),
            ],
        )
    )
    req.add(TableInBatchWriteRowItem("b", [PutRowItem(Row([("k", "x")], [("s", "y")]), Condition("IGNORE"))]))
    result = client.batch_write_row(req)
    assert not result.is_all_succeed()
    puts_ok, puts_failed = result.get_put()
    assert len(puts_ok) == 2
    assert [(f.error_code, f.index) for f in puts_failed] == [("OTSConditionCheckFail", 3)]
    assert all(r.is_ok for r in result.get_update_by_table("a") + result.get_delete_by_table("a"))

    assert client.get_row("a", [("k", 10)])[1].attribute_columns[0][1] == 100
    assert client.get_row("a", [("k", 1)])[1].attribute_columns[0][1] == 11
    assert client.get_row("a", [("k", 2)])[1] is None
    assert client.get_row("a", [("k", 0)])[1].attribute_columns[0][1] == 0
    assert client.get_row("b", [("k", "x")])[1].attribute_columns[0][1] == "y"


def test_batch_write_row_request_level_errors(client: Any) -> None:
    create(client, "a", [("k", "INTEGER")])
    dup = BatchWriteRowRequest()
    dup.add(
        TableInBatchWriteRowItem(
            "a",
            [PutRowItem(Row([("k", 1)], [("v", 1)]), None), PutRowItem(Row([("k", 1)], [("v", 2)]), None)],
        )
    )
    with pytest.raises(OTSServiceError) as exc:
        client.batch_write_row(dup)
    assert service_error(exc) == (400, "OTSParameterInvalid")
    missing = BatchWriteRowRequest()
    missing.add(TableInBatchWriteRowItem("nope", [PutRowItem(Row([("k", 1)], [("v", 1)]), None)]))
    with pytest.raises(OTSServiceError) as exc:
        client.batch_write_row(missing)
    assert service_error(exc) == (404, "OTSObjectNotExist")
    assert client.get_row("a", [("k", 1)])[1] is None  # nothing was applied


# --------------------------------------------------------------------------- GetRange


def test_get_range_forward_backward_limit_and_paging(client: Any) -> None:
    create(client, "t", [("g", "INTEGER"), ("s", "STRING")], max_version=2)
    keys = [(g, s) for g in (2, 1, 3) for s in ("b", "a", "c")]
    for g, s in keys:
        client.put_row("t", Row([("g", g), ("s", s)], [("v", f"{g}{s}"), ("w", 1)]))
    ordered = sorted(keys)

    _, next_pk, rows, _ = client.get_range(
        "t", "FORWARD", [("g", INF_MIN), ("s", INF_MIN)], [("g", INF_MAX), ("s", INF_MAX)]
    )
    assert next_pk is None
    assert [tuple(v for _, v in r.primary_key) for r in rows] == ordered

    _, _, rows, _ = client.get_range(
        "t", "BACKWARD", [("g", INF_MAX), ("s", INF_MAX)], [("g", INF_MIN), ("s", INF_MIN)]
    )
    assert [tuple(v for _, v in r.primary_key) for r in rows] == ordered[::-1]

    # Bounded range on the first column, all of the second; columns_to_get.
    _, _, rows, _ = client.get_range(
        "t", "FORWARD", [("g", 2), ("s", INF_MIN)], [("g", 2), ("s", INF_MAX)], columns_to_get=["v"]
    )
    assert [(r.primary_key[1][1], r.attribute_columns[0][:2]) for r in rows] == [
        ("a", ("v", "2a")),
        ("b", ("v", "2b")),
        ("c", ("v", "2c")),
    ]
    # Exclusive end, inclusive start.
    _, _, rows, _ = client.get_range("t", "FORWARD", [("g", 1), ("s", "b")], [("g", 2), ("s", "b")])
    assert [tuple(v for _, v in r.primary_key) for r in rows] == [(1, "b"), (1, "c"), (2, "a")]
    _, _, rows, _ = client.get_range("t", "BACKWARD", [("g", 2), ("s", "b")], [("g", 1), ("s", "b")])
    assert [tuple(v for _, v in r.primary_key) for r in rows] == [(2, "b"), (2, "a"), (1, "c")]

    # Paging with limit + next_start_primary_key, both directions.
    for direction, start, end, expected in (
        ("FORWARD", [("g", INF_MIN), ("s", INF_MIN)], [("g", INF_MAX), ("s", INF_MAX)], ordered),
        ("BACKWARD", [("g", INF_MAX), ("s", INF_MAX)], [("g", INF_MIN), ("s", INF_MIN)], ordered[::-1]),
    ):
        seen: list[tuple[Any, ...]] = []
        pages = 0
        while start is not None:
            _, start, rows, _ = client.get_range("t", direction, start, end, limit=4)
            assert len(rows) <= 4
            seen.extend(tuple(v for _, v in r.primary_key) for r in rows)
            pages += 1
        assert seen == expected
        assert pages == 3


def test_get_range_invalid_bounds(client: Any) -> None:
    create(client, "t", [("k", "INTEGER")])
    with pytest.raises(OTSServiceError) as exc:
        client.get_range("t", "FORWARD", [("k", 5)], [("k", 1)])
    assert service_error(exc) == (400, "OTSParameterInvalid")
    with pytest.raises(OTSServiceError) as exc:
        client.get_range("t", "BACKWARD", [("k", 1)], [("k", 5)])
    assert service_error(exc) == (400, "OTSParameterInvalid")


# --------------------------------------------------------------------------- auth


def test_wrong_secret_rejected_fast(server: TableStoreServer) -> None:
    for policy in (NoRetryPolicy(), DefaultRetryPolicy()):
        bad = make_client(server, secret="wrong-secret", retry_policy=policy)
        started = time.monotonic()
        with pytest.raises(OTSServiceError) as exc:
            bad.list_table()
        assert service_error(exc) == (403, "OTSAuthFailed")
        assert time.monotonic() - started < 2.0
    assert server.call_count() == 0  # never reached an API handler


def test_wrong_access_key_or_instance_rejected(server: TableStoreServer) -> None:
    for kwargs in ({"ak": "other-ak"}, {"instance": "other-instance"}):
        with pytest.raises(OTSServiceError) as exc:
            make_client(server, **kwargs).list_table()
        assert service_error(exc) == (403, "OTSAuthFailed")


def test_v4_signing_with_region(server: TableStoreServer) -> None:
    v4 = make_client(server, region="cn-hangzhou")
    create(v4, "t", [("k", "INTEGER")])
    v4.put_row("t", Row([("k", 1)], [("a", "v4")]))
    assert v4.get_row("t", [("k", 1)])[1].attribute_columns[0][1] == "v4"
    with pytest.raises(OTSServiceError) as exc:
        make_client(server, secret="wrong-secret", region="cn-hangzhou").list_table()
    assert service_error(exc) == (403, "OTSAuthFailed")


def test_server_region_restriction() -> None:
    with TableStoreServer(
        instance_name=INSTANCE, access_key_id=AK, access_key_secret=SECRET, region="cn-a"
    ) as srv:
        assert make_client(srv, region="cn-a").list_table() == ()
        with pytest.raises(OTSServiceError) as exc:
            make_client(srv, region="cn-b").list_table()
        assert service_error(exc) == (403, "OTSAuthFailed")
        assert make_client(srv).list_table() == ()  # v2 signing is region-less


def _signed_request(server: TableStoreServer, api: str = "ListTable") -> tuple[str, dict[str, str], bytes]:
    protocol = OTSProtocol(INSTANCE, "utf8", logging.getLogger("tablestore-client"))
    query, headers, body = protocol.make_request(api, SignV2("utf8"), RequestContext(Credentials(AK, SECRET)))
    return query, dict(headers), bytes(body)


def _post(server: TableStoreServer, query: str, headers: dict[str, str], body: bytes) -> tuple[int, Any, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("POST", query, body=body, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, resp.headers, payload
    finally:
        conn.close()


def _error(payload: bytes) -> Any:
    err = pb.Error()
    err.ParseFromString(payload)
    return err


def test_raw_http_valid_request_gets_signed_response(server: TableStoreServer) -> None:
    query, headers, body = _signed_request(server)
    status, resp_headers, payload = _post(server, query, headers, body)
    assert status == 200
    assert resp_headers["x-ots-contentmd5"] == base64.b64encode(hashlib.md5(payload).digest()).decode()
    ots = sorted(
        f"{k.lower()}:{v.strip()}" for k, v in resp_headers.items() if k.lower().startswith("x-ots-")
    )
    expected = base64.b64encode(
        hmac.new(SECRET.encode(), ("\n".join(ots) + "\n" + query).encode(), hashlib.sha1).digest()
    ).decode()
    assert resp_headers["Authorization"] == f"OTS {AK}:{expected}"


def _resign(query: str, headers: dict[str, str]) -> None:
    del headers["x-ots-signature"]
    SignV2("utf8").make_request_signature_and_add_headers(
        query, headers, RequestContext(Credentials(AK, SECRET))
    )


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("md5", "MD5"),  # validly signed, but the MD5 header does not match the body
        ("body", "MD5"),  # body changed after signing
        ("stale_date", "system time"),  # validly signed, date 16 minutes off
        ("signature", "Signature mismatch"),
        ("missing_signature", "x-ots-signature"),
    ],
)
def test_raw_http_rejections(server: TableStoreServer, tamper: str, reason: str) -> None:
    query, headers, body = _signed_request(server, "ListTable")
    status, _, _ = _post(server, query, dict(headers), body)
    assert status == 200  # the untampered request is accepted
    if tamper == "md5":
        headers["x-ots-contentmd5"] = base64.b64encode(hashlib.md5(b"other").digest()).decode()
        _resign(query, headers)
    elif tamper == "stale_date":
        stale = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=16)
        headers["x-ots-date"] = stale.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        _resign(query, headers)
    elif tamper == "body":
        body = body + b"\x00"
    elif tamper == "signature":
        headers["x-ots-signature"] = base64.b64encode(b"x" * 20).decode()
    else:
        del headers["x-ots-signature"]
    status, resp_headers, payload = _post(server, query, headers, body)
    assert status == 403
    error = _error(payload)
    assert error.code == "OTSAuthFailed"
    assert reason in error.message
    assert "Authorization" not in resp_headers


def test_raw_http_rejects_non_post(server: TableStoreServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/ListTable")
        resp = conn.getresponse()
        assert resp.status == 405
        assert _error(resp.read()).code == "OTSMethodNotAllowed"
    finally:
        conn.close()


# --------------------------------------------------------------------------- injection


def test_injected_5xx_retried_for_reads(server: TableStoreServer, client: Any) -> None:
    create(client, "t", [("k", "INTEGER")])
    client.put_row("t", Row([("k", 1)], [("a", 1)]))
    server.inject_failure("GetRow", 503, "OTSServerUnavailable", count=2)
    before = server.call_count("GetRow")
    assert client.get_row("t", [("k", 1)])[1].attribute_columns[0][1] == 1  # SDK retried twice
    assert server.call_count("GetRow") - before == 3

    server.inject_failure("GetRow", 500, "OTSInternalServerError", message="boom")
    with pytest.raises(OTSServiceError) as exc:
        make_client(server, retry_policy=NoRetryPolicy()).get_row("t", [("k", 1)])
    assert service_error(exc) == (500, "OTSInternalServerError")
    assert exc.value.get_error_message() == "boom"


def test_injected_5xx_not_retried_for_writes(server: TableStoreServer, client: Any) -> None:
    create(client, "t", [("k", "INTEGER")])
    server.inject_failure("PutRow", 503, "OTSServerUnavailable")
    with pytest.raises(OTSServiceError) as exc:
        client.put_row("t", Row([("k", 1)], [("a", 1)]))
    assert service_error(exc) == (503, "OTSServerUnavailable")
    assert server.call_count("PutRow") == 1
    client.put_row("t", Row([("k", 1)], [("a", 1)]))  # injection consumed


def test_injected_row_errors_in_batches(server: TableStoreServer, client: Any) -> None:
    create(client, "t", [("k", "INTEGER")])
    _fill(client, "t", 3)
    server.inject_row_error("t", [("k", 1)], "OTSServerBusy", count=1)
    req = BatchGetRowRequest()
    req.add(TableInBatchGetRowItem("t", [[("k", 0)], [("k", 1)], [("k", 2)]], max_version=1))
    result = client.batch_get_row(req)
    rows = result.get_result_by_table("t")
    assert [r.is_ok for r in rows] == [True, False, True]
    assert rows[1].error_code == "OTSServerBusy" and rows[1].row is None
    assert client.batch_get_row(req).is_all_succeed()  # count=1 consumed

    server.inject_row_error("t", (2,), "OTSPartitionUnavailable", message="try again")
    wreq = BatchWriteRowRequest()
    wreq.add(
        TableInBatchWriteRowItem(
            "t",
            [PutRowItem(Row([("k", 2)], [("v", -2)]), None), PutRowItem(Row([("k", 5)], [("v", 50)]), None)],
        )
    )
    wresult = client.batch_write_row(wreq)
    ok, failed = wresult.get_put()
    assert [(f.index, f.error_code, f.error_message) for f in failed] == [
        (0, "OTSPartitionUnavailable", "try again")
    ]
    assert len(ok) == 1
    assert client.get_row("t", [("k", 2)])[1].attribute_columns[0][1] == 20  # failed row not applied
    assert client.get_row("t", [("k", 5)])[1].attribute_columns[0][1] == 50


# --------------------------------------------------------------------------- concurrency & CLI


def test_concurrent_increments_are_atomic(server: TableStoreServer, client: Any) -> None:
    create(client, "t", [("k", "INTEGER")])
    errors: list[BaseException] = []

    def worker() -> None:
        local = make_client(server)
        try:
            for _ in range(20):
                local.update_row("t", Row([("k", 1)], {"increment": [("n", 1)]}), None)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert client.get_row("t", [("k", 1)])[1].attribute_columns[0][1] == 80


def test_command_line_server(tmp_path: Path) -> None:
    env = dict(os.environ, FEATUREDAO_TABLESTORE_ACCESS_KEY_SECRET="cli-secret-123")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "featuredao.testing.tablestore",
            "--port",
            "0",
            "--instance",
            "cli",
            "--access-key-id",
            "cli-ak",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line
        assert "cli-secret-123" not in line
        endpoint = line.split("listening on ", 1)[1].split()[0]
        cli_client = OTSClient(endpoint, "cli-ak", "cli-secret-123", "cli", retry_policy=NoRetryPolicy())
        assert cli_client.list_table() == ()
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "cli-secret-123" not in out + err
