"""The synchronization hooks, on every variant whose capabilities say it has them (see ``needs``)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from test_contract import row, seed

from featuredao.dao import BaseDao, Change
from featuredao.types import Key


def pages(read: Callable[[Any, int], list[Any]], cursor: Callable[[Any], Any], limit: int) -> list[Any]:
    """Everything a paged hook returns, page after page of ``limit``, each page after the last one's end."""
    out: list[Any] = []
    after = None
    while True:
        page = read(after, limit)
        assert len(page) <= limit
        out.extend(page)
        if len(page) < limit:
            return out
        after = cursor(page[-1])


@pytest.mark.needs("scan")
def test_scan_pages_through_keys_in_order(int_dao: BaseDao) -> None:
    keys = [100, 7, 3000, 20, 5, 64, 1]  # numeric order differs from text order
    seed(int_dao, keys)
    got = pages(int_dao.scan, lambda r: r[0], limit=3)
    assert [k for k, _ in got] == sorted(keys)
    assert all(r["f_int"] == keys.index(k) for k, r in got)
    assert int_dao.scan(max(keys), 10) == []
    assert [k for k, _ in int_dao.scan(20, 2)] == [64, 100]  # strictly after, at most the limit


@pytest.mark.needs("changes")
def test_changes_by_watermark_never_skip_ties(dao: BaseDao) -> None:
    # Watermark f_int with runs of three equal values, so page ends fall inside a tie.
    keys = [f"k{i:02d}" for i in range(10)]
    dao.upsert((k, {**row(i), "f_int": i // 3}) for i, k in enumerate(keys))
    dao.upsert([("knull", {**row(99), "f_int": None})])  # no watermark: never returned
    got = pages(lambda after, n: dao.changes("f_int", after, n), lambda c: (c[0], c[1]), limit=2)
    assert [(w, k) for w, k, _ in got] == [(i // 3, k) for i, k in enumerate(keys)]
    assert [r["f_str"] for _, _, r in got] == [f"s{i}" for i in range(10)]
    assert [k for _, k, _ in dao.changes("f_int", (1, "k04"), 3)] == ["k05", "k06", "k07"]
    dao.upsert([("k00", {**row(0), "f_int": 7})])  # a newer change moves the row to the end
    assert [(w, k) for w, k, _ in dao.changes("f_int", (3, "k09"), 10)] == [(7, "k00")]


@pytest.mark.needs("delete")
def test_delete_removes_keys_and_ignores_absent_ones(dao: BaseDao) -> None:
    seed(dao, ["a", "b", "c", "d"])
    assert dao.delete(["b", "nope", "b", "d"]) == 3
    assert [r is None for r in dao.read(["a", "b", "c", "d"])] == [False, True, False, True]
    assert dao.delete([]) == 0
    assert dao.read(["c"])[0] == row(2)


@pytest.mark.needs("change_feed", "delete")
def test_change_feed_records_insert_update_delete(dao: BaseDao) -> None:
    dao.install_feed()
    dao.install_feed()  # idempotent
    start = dao.feed_position()
    dao.upsert([("a", row(1))])
    dao.upsert([("b", row(2))])
    dao.upsert([("a", {**row(1), "f_int": 99})])
    dao.delete(["b"])
    changes: list[Change] = pages(lambda after, n: dao.feed(start if after is None else after, n),
                                  lambda c: c.position, limit=3)
    assert [c.key for c in changes] == ["a", "b", "a", "b"]
    positions = [c.position for c in changes]
    assert positions == sorted(positions) and len({repr(p) for p in positions}) == len(positions)
    last: dict[Key, Any] = {c.key: c.row for c in changes}  # the newest change of each key wins
    assert last["b"] is None and last["a"] is not None and last["a"]["f_int"] == 99
    assert all(c.ts is None or c.ts > 0 for c in changes)
    dao.ack_feed(positions[-1])
    assert dao.feed(positions[-1], 10) == []


@pytest.mark.needs("state")
def test_state_store_commits_loads_and_tracks_unseen_keys(dao: BaseDao) -> None:
    store = dao.source.state_store()
    scope, other = f"contract_{uuid.uuid4().hex[:8]}", f"contract_{uuid.uuid4().hex[:8]}"
    try:
        assert store.load(scope) == {}
        store.commit(scope, {"t1": {"cursor": [3, "k3"], "phase": "scan"}, "t2": 5},
                     seen=("t1", ["k1", "k2", "k3"], 1))
        store.commit(other, {"t1": "elsewhere"}, seen=("t1", ["k9"], 1))
        assert store.load(scope) == {"t1": {"cursor": [3, "k3"], "phase": "scan"}, "t2": 5}
        store.commit(scope, {"t2": 6}, seen=("t1", ["k1"], 2))  # one checkpoint updated, one kept
        assert store.load(scope) == {"t1": {"cursor": [3, "k3"], "phase": "scan"}, "t2": 6}
        assert store.unseen(scope, "t1", 2, 10) == ["k2", "k3"]
        assert store.unseen(scope, "t1", 2, 1) == ["k2"]
        assert store.unseen(scope, "t1", 1, 10) == [] and store.unseen(scope, "t2", 5, 10) == []
        store.commit(scope, {}, forget=("t1", ["k2", "never"]))
        assert store.unseen(scope, "t1", 2, 10) == ["k3"]
        assert store.load(other) == {"t1": "elsewhere"} and store.unseen(other, "t1", 2, 10) == ["k9"]
    finally:
        store.close()

