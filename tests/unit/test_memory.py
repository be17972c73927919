"""The memory adapter's own knobs (its contract is checked by tests/contract like every adapter's)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from featuredao import factory
from featuredao.dao import BaseDao
from featuredao.errors import BackendQueryError, BackendTimeout, BackendUnavailable, Closed
from featuredao.memory import MemorySource
from featuredao.types import Reason


def build(**source: Any) -> factory.Runtime:
    view = {"entity": "item", "source": "mem", "key": "id", "key_type": "int",
            "features": {"n": "int", "tags": "list[str]"}, "defaults": {"n": -1}}
    return factory.build({"sources": {"mem": {"type": "memory", **source}},
                          "views": [{**view, "name": "items", "table": "items"}]})


@pytest.fixture
def runtime() -> Iterator[factory.Runtime]:
    rt = build()
    yield rt
    rt.close()


def parts(rt: factory.Runtime) -> tuple[MemorySource, BaseDao]:
    source, dao = rt.sources["mem"], rt.daos["items"]
    assert isinstance(source, MemorySource) and isinstance(dao, BaseDao)
    return source, dao


def test_raw_values_are_coerced_on_read(runtime: factory.Runtime) -> None:
    source, dao = parts(runtime)
    source.put("items", {1: {"n": "7", "tags": '["a"]'}, 2: {"n": "seven"}})
    result = dao.read([1, 2])
    assert result.rows == [{"n": 7, "tags": ["a"]}, {"n": -1, "tags": None}]
    assert [(d.reason, d.keys) for d in result.degraded] == [(Reason.COERCION, (2,))]


def test_injected_failures_and_down(runtime: factory.Runtime) -> None:
    source, dao = parts(runtime)
    dao.prepare()
    source.fail_next(2, error="query")
    for _ in range(2):
        with pytest.raises(BackendQueryError):
            dao.read([1])
    assert dao.read([1]).rows == [None]
    source.down = True
    with pytest.raises(BackendUnavailable):
        dao.upsert([(1, {"n": 1})])
    source.down = False
    assert dao.upsert([(1, {"n": 1})]) == 1 and source.round_trips == 6


def test_down_from_the_config() -> None:
    rt = build(down=True)
    try:
        with pytest.raises(BackendUnavailable):
            rt.daos["items"].ping()
    finally:
        rt.close()


def test_sources_naming_one_shared_store_see_the_same_rows() -> None:
    first, second, alone = build(shared="unit"), build(shared="unit"), build()
    try:
        parts(first)[1].prepare()
        parts(first)[1].upsert([(1, {"n": 5})])
        assert parts(second)[1].read([1])[0] == {"n": 5, "tags": None}
        with pytest.raises(BackendQueryError):  # its own store: the table was never created there
            parts(alone)[1].read([1])
    finally:
        for rt in (first, second, alone):
            rt.close()
        MemorySource.clear_shared()


def test_latency_is_cut_at_the_deadline_and_by_close() -> None:
    rt = build(latency_ms=3000)
    dao = parts(rt)[1]
    with pytest.raises(BackendTimeout):
        dao.read([1], timeout_s=0.05)
    errors: list[BaseException] = []

    def slow_ping() -> None:
        try:
            dao.ping()
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=slow_ping)
    worker.start()
    time.sleep(0.05)
    started = time.monotonic()
    rt.close()  # wakes the round trip waiting out its latency
    worker.join(5)
    assert time.monotonic() - started < 1.0 and [type(e) for e in errors] == [Closed]
