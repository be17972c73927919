"""The contract every adapter honours, run against each adapter's real server."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
from backends.base import ContractBackend
from conftest import SMALL_BATCH, build_dao

from featuredao.dao import BaseDao
from featuredao.errors import BackendQueryError, BackendTimeout, BackendUnavailable
from featuredao.types import Key, Row


def row(i: int) -> Row:
    """A row whose every value depends on i, so misaligned rows are caught."""
    return {
        "f_int": i, "f_float": i + 0.25, "f_str": f"s{i}", "f_bool": i % 2 == 0,
        "f_ints": [i, i + 1, -i], "f_floats": [i / 2, -0.5], "f_strs": [f"a{i}", f"b{i}"],
    }


def seed(dao: BaseDao, keys: list[Key]) -> None:
    assert dao.upsert((k, row(i)) for i, k in enumerate(keys)) == len(set(keys))


def calls(dao: BaseDao, monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[Key], list[str]]]:
    """Record every batch the DAO sends to its store (the real method still runs)."""
    seen: list[tuple[list[Key], list[str]]] = []
    real = dao._fetch_batch

    def spy(keys: list[Key], fields: list[str], timeout_s: float | None) -> Any:
        seen.append((list(keys), list(fields)))
        return real(keys, fields, timeout_s)

    monkeypatch.setattr(dao, "_fetch_batch", spy)
    return seen


def test_empty_batch_makes_no_round_trip(dao: BaseDao, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = calls(dao, monkeypatch)
    result = dao.read([])
    assert list(result) == [] and result.degraded == []
    assert seen == []


def test_missing_key_in_the_middle_is_none_in_place(dao: BaseDao) -> None:
    seed(dao, ["a", "c"])
    result = dao.read(["a", "b", "c"])
    assert [r is None for r in result] == [False, True, False]
    assert result[0] == row(0) and result[2] == row(1)


def test_all_missing(dao: BaseDao) -> None:
    assert list(dao.read(["nope", "none"])) == [None, None]


def test_order_preserved(dao: BaseDao) -> None:
    keys = [f"k{i}" for i in range(30)]
    seed(dao, keys)
    order = [keys[(i * 11) % 30] for i in range(30)]
    result = dao.read(order)
    assert [r["f_str"] if r else None for r in result] == [f"s{keys.index(k)}" for k in order]


def test_duplicate_keys_are_read_once(dao: BaseDao, monkeypatch: pytest.MonkeyPatch) -> None:
    seed(dao, ["a", "b"])
    seen = calls(dao, monkeypatch)
    result = dao.read(["a", "b", "a", "x", "a"])
    assert [r["f_int"] if r else None for r in result] == [0, 1, 0, None, 0]
    sent = [k for keys, _ in seen for k in keys]
    assert sorted(sent) == ["a", "b", "x"]


def test_batch_larger_than_max_batch_size(small_batch_dao: BaseDao, monkeypatch: pytest.MonkeyPatch) -> None:
    dao = small_batch_dao
    keys = [f"key{i}" for i in range(50)]
    seed(dao, keys[::2])  # every other key exists
    seen = calls(dao, monkeypatch)
    result = dao.read(keys)
    assert len(seen) == math.ceil(50 / SMALL_BATCH)
    assert all(len(k) <= SMALL_BATCH for k, _ in seen)
    for i, r in enumerate(result):
        assert (r is None) == (i % 2 == 1)
        if r is not None:
            assert r == row(i // 2)


def test_feature_projection(dao: BaseDao, monkeypatch: pytest.MonkeyPatch) -> None:
    seed(dao, ["a"])
    seen = calls(dao, monkeypatch)
    result = dao.read(["a", "b"], ["f_str", "f_ints"])
    assert result[0] == {"f_str": "s0", "f_ints": [0, 1, 0]}
    assert result[1] is None
    assert seen[0][1] == ["f_str", "f_ints"]


def test_unicode_keys(dao: BaseDao) -> None:
    keys = ["用户-42", "é café", "emoji-🙂", "plain"]
    seed(dao, keys)
    result = dao.read(list(reversed(keys)))
    assert [r["f_int"] if r else None for r in result] == [3, 2, 1, 0]


def test_upsert_is_idempotent_and_updates(dao: BaseDao) -> None:
    keys = ["a", "b", "c"]
    seed(dao, keys)
    first = list(dao.read(keys))
    seed(dao, keys)
    assert list(dao.read(keys)) == first
    dao.upsert([("b", {**row(1), "f_int": 99, "f_strs": []})])
    after = dao.read(keys)
    assert after[1] == {**row(1), "f_int": 99, "f_strs": []}
    assert after[0] == first[0] and after[2] == first[2]


def test_every_value_type_round_trips(dao: BaseDao) -> None:
    values: dict[str, Any] = {
        "f_int": -(2**53) + 1, "f_float": 1234.5678125, "f_str": "naïve 用户 🙂 'quoted' \"x\" ;--",
        "f_bool": True, "f_ints": [0, -7, 2**40], "f_floats": [0.1, -2.5, 1e-7, 3.0],
        "f_strs": ["x,y", "a:b", "ünï", ""],
    }
    dao.upsert([("v", values)])
    got = dao.read(["v"])[0]
    assert got is not None
    assert got == values
    assert type(got["f_bool"]) is bool and type(got["f_int"]) is int and type(got["f_float"]) is float


def test_null_reads_back_as_default(dao: BaseDao) -> None:
    dao.upsert([("n", {"f_int": None, "f_str": "only"})])
    got = dao.read(["n"])[0]
    assert got is not None
    assert got["f_str"] == "only"
    assert got["f_int"] == -1 and got["f_float"] == -1.0 and got["f_bool"] is False
    assert got["f_ints"] is None


def test_integer_keys(int_dao: BaseDao) -> None:
    seed(int_dao, [10, 20, 30])
    result = int_dao.read([30, "10", 99, 20])  # string forms of int keys are normalised
    assert [r["f_int"] if r else None for r in result] == [2, 0, None, 1]
    assert result.keys == [30, 10, 99, 20]


def test_invalid_keys_never_reach_the_store_and_cost_only_themselves(
        dao: BaseDao, int_dao: BaseDao, monkeypatch: pytest.MonkeyPatch) -> None:
    seed(dao, ["a", "b"])
    seed(int_dao, [1, 2])
    sent = calls(dao, monkeypatch)
    sent_int = calls(int_dao, monkeypatch)
    text = dao.read(["a", None, 1.5, True, ["x"], b"b", "z" * 5000, "b"])
    assert [r["f_int"] if r else None for r in text] == [0, None, None, None, None, 1, None, 1]
    numbers = int_dao.read([1, None, 1.5, True, 10 ** 30, b"2", "abc", float("nan"), 2, "2"])
    assert [r["f_int"] if r else None for r in numbers] == [0] + [None] * 7 + [1, 1]
    # Only valid keys travel, whatever their position in the batch.
    assert sorted(k for batch, _ in sent for k in batch) == ["a", "b"]
    assert sorted(k for batch, _ in sent_int for k in batch) == [1, 2]
    assert [d.reason.value for d in text.degraded] == ["invalid_key"]
    assert len(numbers.degraded[0].keys) == 7


def test_ping(dao: BaseDao) -> None:
    dao.ping()


def test_unreachable_server_gives_backend_unavailable(backend: ContractBackend) -> None:
    if backend.unreachable is None:
        pytest.skip("embedded store: there is no server to be unreachable")  # not a networked backend
    runtime, dao = build_dao(backend, backend.unreachable)
    try:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable) as info:
            dao.read(["a", "b"], timeout_s=5.0)
        assert time.monotonic() - started < 10
        assert info.value.__cause__ is not None
        with pytest.raises(BackendUnavailable):
            dao.ping()
    finally:
        runtime.close()


@pytest.mark.needs("slow")
def test_deadline_cuts_a_slow_read(backend: ContractBackend) -> None:
    assert backend.slow is not None
    runtime, dao = build_dao(backend, {**backend.source, "batch_size": SMALL_BATCH})
    try:
        backend.slow(dao)
        keys = [f"k{i}" for i in range(3 * SMALL_BATCH)]  # three chunks, each of them slow
        started = time.monotonic()
        with pytest.raises(BackendTimeout):
            dao.read(keys[:1], timeout_s=0.2)
        result = dao.read_partial(keys, timeout_s=0.2)
        assert time.monotonic() - started < 3  # two reads cut at 0.2 s each, not the seconds they take
        assert result.rows == [None] * len(keys)
        assert sorted(result.failed) == sorted(keys) and isinstance(result.error, BackendTimeout)
    finally:
        runtime.close()


def test_failed_chunk_leaves_its_keys_in_failed(small_batch_dao: BaseDao,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    dao = small_batch_dao
    keys = [f"key{i:02d}" for i in range(3 * SMALL_BATCH)]
    seed(dao, keys)
    real = dao._fetch_batch
    sent: list[list[Key]] = []

    def second_chunk_fails(chunk: list[Key], fields: list[str], timeout_s: float | None) -> Any:
        sent.append(list(chunk))
        if keys[SMALL_BATCH] in chunk:
            raise BackendUnavailable("this chunk's shard is down")
        return real(chunk, fields, timeout_s)

    monkeypatch.setattr(dao, "_fetch_batch", second_chunk_fails)
    result = dao.read_partial(keys)
    concurrent = dao.source.capabilities.concurrent_chunks and dao.source.concurrency > 1
    # Sequential reads stop knocking on a store that just failed: the chunks after it fail unasked.
    lost = keys[SMALL_BATCH:2 * SMALL_BATCH] if concurrent else keys[SMALL_BATCH:]
    assert sorted(result.failed) == lost and isinstance(result.error, BackendUnavailable)
    assert len(sent) == (3 if concurrent else 2)
    assert result.rows == [None if k in lost else row(i) for i, k in enumerate(keys)]
    with pytest.raises(BackendUnavailable):
        dao.read(keys)


@pytest.mark.needs("create")
def test_missing_table_is_a_query_error(backend: ContractBackend) -> None:
    runtime, dao = build_dao(backend, backend.source)  # its storage never created
    try:
        with pytest.raises(BackendQueryError) as info:
            dao.read(["a", "b"], timeout_s=5.0)
        assert info.value.view == dao.view.name
    finally:
        runtime.close()
