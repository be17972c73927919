"""The sequence part of the contract: every adapter with ``capabilities.sequences`` reads events alike.

One variant per adapter module (a sequence's store layout does not depend on a table view's layout
options): its first, or the ones a module lists in ``SEQUENCE_VARIANTS``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import _variants

from featuredao import factory
from featuredao.dao import BaseDao

pytestmark = pytest.mark.needs("sequences")

NOW = 1_700_000_000
FIELDS = {"item_id": "int", "event": "str", "ts": "int", "play_time": "float"}
_tables = itertools.count()


def _sequence_variants() -> list[Any]:
    kept: list[Any] = []
    seen: set[str] = set()
    for param in _variants():
        module, variant = param.values[0]
        chosen = getattr(module, "SEQUENCE_VARIANTS", None)
        if variant in chosen if chosen is not None else module.__name__ not in seen:
            kept.append(param)
        seen.add(module.__name__)
    return kept


def event(item: int, ts: int, kind: str = "click", play: float = 5.0) -> dict[str, Any]:
    return {"item_id": item, "event": kind, "ts": ts, "play_time": play}


class Seq:
    """Sequence views (online, offline) and an item view on fresh tables of one backend."""

    def __init__(self, backend: Any, **spec: Any) -> None:
        n = next(_tables)
        prefix = f"{backend.table_prefix}seq{n}_"
        options = getattr(backend, "sequence_options", None) or {}

        def view(name: str, table: str, **extra: Any) -> dict[str, Any]:
            seq = {"time_field": "ts", "item_field": "item_id", "event_field": "event", "fields": FIELDS,
                   "max_len": 5, **spec, **extra}
            return {"name": name, "entity": "user", "kind": "sequence", "source": "store",
                    "table": prefix + table, "key": "user_id", "prefix": "click_", "sequence": seq,
                    "options": options}

        cfg = {"sources": {"store": backend.source},
               "views": [view("online", "events", merge=["offline"],
                              join={"view": "items", "features": ["category"]}),
                         view("offline", "events_off"),
                         {"name": "items", "entity": "item", "source": "store", "table": prefix + "items",
                          "key": "id", "key_type": "int", "features": {"category": "str"},
                          "defaults": {"category": "?"}, "options": backend.view_options}]}
        self.runtime = factory.build(cfg)
        self.daos: dict[str, BaseDao] = self.runtime.daos
        for dao in self.daos.values():
            dao.prepare()
        self.served = self.runtime.served["online"]

    def read(self, users: list[Any], as_of: float | None = NOW) -> list[Any]:
        return self.served.read(users, timeout_s=5.0, as_of=as_of).rows

    def online(self, users: list[Any], as_of: float | None = NOW) -> list[Any]:
        """The online view alone (no merge, no join)."""
        return self.daos["online"].read(users, timeout_s=5.0, as_of=as_of).rows


@pytest.fixture
def seq(backend: Any) -> Iterator[Any]:
    made: list[Seq] = []

    def build(**spec: Any) -> Seq:
        s = Seq(backend, **spec)
        made.append(s)
        return s

    yield build
    for s in made:
        s.runtime.close()


parametrized = pytest.mark.parametrize("backend", _sequence_variants(), indirect=True)


@parametrized
def test_newest_first_and_capped(seq: Any) -> None:
    s = seq()
    s.daos["online"].append(("u1", event(i, NOW - 100 + i)) for i in range(12))
    (row,) = s.online(["u1"])
    assert row["item_id"] == [11, 10, 9, 8, 7]
    assert row["ts"] == [NOW - 89, NOW - 90, NOW - 91, NOW - 92, NOW - 93]
    assert row["event"] == ["click"] * 5 and row["play_time"] == [5.0] * 5


@parametrized
def test_window_ends_at_the_request_time(seq: Any) -> None:
    s = seq(window_s=100)
    s.daos["online"].append([("u1", event(1, NOW - 150)), ("u1", event(2, NOW - 50)), ("u1", event(3, NOW)),
                             ("u1", event(4, NOW + 10))])
    assert s.online(["u1"])[0]["item_id"] == [3, 2]
    assert s.online(["u1"], as_of=NOW + 60)[0]["item_id"] == [4, 3]


@parametrized
def test_event_filter_thresholds_dedupe_then_cap(seq: Any) -> None:
    s = seq(events=["click", "buy"], min={"play_time": 3.0}, dedupe="item_id", max_len=3)
    evs = [event(1, NOW - 1, "view"), event(2, NOW - 2, "click", 1.0), event(3, NOW - 3, "buy"),
           event(3, NOW - 4, "click"), event(4, NOW - 5), event(3, NOW - 6), event(5, NOW - 7),
           event(6, NOW - 8)]
    s.daos["online"].append(("u1", e) for e in evs)
    row = s.online(["u1"])[0]
    assert row["item_id"] == [3, 4, 5] and row["event"] == ["buy", "click", "click"]


@parametrized
def test_filters_pass_beyond_max_len_of_rejected_events(seq: Any) -> None:
    # The newest 30 events are all filtered out: the kept ones are further back than max_len.
    s = seq(events=["buy"], max_len=2, scan_len=40)
    s.daos["online"].append([("u1", event(i, NOW - i, "view")) for i in range(30)] +
                            [("u1", event(100 + i, NOW - 30 - i, "buy")) for i in range(3)])
    assert s.online(["u1"])[0]["item_id"] == [100, 101]


@parametrized
def test_ties_on_time_have_one_documented_order(seq: Any) -> None:
    s = seq()
    s.daos["online"].append([("u1", event(1, NOW, "buy")), ("u1", event(3, NOW, "a")),
                             ("u1", event(2, NOW, "b"))])
    row = s.online(["u1"])[0]
    assert row["item_id"] == [3, 2, 1] and row["event"] == ["a", "b", "buy"]


@parametrized
def test_merge_and_join(seq: Any) -> None:
    s = seq(dedupe="item_id")
    s.daos["items"].upsert([(1, {"category": "books"}), (3, {"category": "games"})])
    s.daos["online"].append([("u1", event(1, NOW - 1)), ("u1", event(2, NOW - 2))])
    s.daos["offline"].append([("u1", event(2, NOW - 100)), ("u1", event(3, NOW - 200)),
                              ("u2", event(3, NOW - 5))])
    u1, u2, nobody = s.read(["u1", "u2", "nobody"])
    assert u1["item_id"] == [1, 2, 3] and u1["ts"] == [NOW - 1, NOW - 2, NOW - 200]
    assert u1["category"] == ["books", "?", "games"]
    assert u2["item_id"] == [3] and u2["category"] == ["games"]
    assert nobody is None


@parametrized
def test_many_users_in_one_batch_with_unicode_keys(seq: Any) -> None:
    s = seq()
    users = {f"用户-{i}-ü": [event(j, NOW - 10 * i - j) for j in range(i % 4)] for i in range(120)}
    s.daos["online"].append((u, e) for u, evs in users.items() for e in evs)
    rows = s.online(list(users))
    for (user, evs), row in zip(users.items(), rows, strict=True):
        if not evs:
            assert row is None, user
        else:
            assert row is not None and row["item_id"] == [e["item_id"] for e in evs][:5], user
