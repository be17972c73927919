"""The grouped-reads part of the contract: every adapter with ``capabilities.grouped_reads`` answers views
read together (``featuredao.steps.drive`` handing their fetches to ``Source.read_group``) exactly as it
answers each view read alone."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from backends.base import ContractBackend
from conftest import DEFAULTS, SMALL_BATCH

from featuredao import FeatureService, factory
from featuredao.dao import BaseDao
from featuredao.deadline import Deadline
from featuredao.errors import BackendQueryError
from featuredao.steps import Chunks, Fetch, drive
from featuredao.types import BatchResult, Key, Row

pytestmark = pytest.mark.needs("grouped_reads")

USER_FEATURES = {"f_int": "int", "f_str": "str", "f_ints": "list[int]"}
ITEM_FEATURES = {"f_float": "float", "f_bool": "bool", "f_strs": "list[str]"}
_tables = itertools.count()


def user_row(i: int) -> Row:
    return {"f_int": i, "f_str": f"u{i}", "f_ints": [i, -i]}


def item_row(i: int) -> Row:
    return {"f_float": i + 0.5, "f_bool": i % 2 == 1, "f_strs": [f"i{i}", ""]}


def config(backend: ContractBackend, batch_size: int | None = None) -> dict[str, Any]:
    """A user view and an item view on fresh tables of the one backend's source (different features)."""
    n = next(_tables)
    source = dict(backend.source)
    if batch_size is not None:
        source["batch_size"] = batch_size

    def view(name: str, entity: str, features: dict[str, str], prefix: str) -> dict[str, Any]:
        return {"name": name, "entity": entity, "source": "store",
                "table": f"{backend.table_prefix}g{n}_{name}", "key": "id", "key_type": "str",
                "features": features, "prefix": prefix, "timeout_ms": 5000,
                "defaults": {f: DEFAULTS[f] for f in features if f in DEFAULTS},
                "options": backend.view_options}

    return {"sources": {"store": source},
            "views": [view("users", "user", USER_FEATURES, "u_"), view("items", "item", ITEM_FEATURES, "i_")],
            "service": {"deadline_ms": 10_000}}


class Pair:
    """Both views' own DAOs on one runtime of the backend, their storage created."""

    def __init__(self, backend: ContractBackend, batch_size: int | None = None,
                 prepare: Sequence[str] = ("users", "items")) -> None:
        self.config = config(backend, batch_size)
        self.runtime = factory.build(self.config)
        users, items = self.runtime.daos["users"], self.runtime.daos["items"]
        assert isinstance(users, BaseDao) and isinstance(items, BaseDao)
        self.users, self.items = users, items
        for name in prepare:
            self.runtime.daos[name].prepare()
        assert users.grouped() and items.grouped()

    def seed(self, users: Sequence[Key], items: Sequence[Key]) -> None:
        assert self.users.upsert((k, user_row(i)) for i, k in enumerate(users)) == len(set(users))
        assert self.items.upsert((k, item_row(i)) for i, k in enumerate(items)) == len(set(items))

    def outcomes(self, user_keys: Sequence[Key], item_keys: Sequence[Key]) -> list[BatchResult | Exception]:
        """Both views read with one ``drive``: their fetches go to the source's ``read_group`` at once."""
        return drive([self.users.read_steps(user_keys, deadline=Deadline.after(5)),
                      self.items.read_steps(item_keys, deadline=Deadline.after(5))])

    def together(self, user_keys: Sequence[Key], item_keys: Sequence[Key]) -> list[BatchResult]:
        """``outcomes``, each of them an answer."""
        outcomes = self.outcomes(user_keys, item_keys)
        out = []
        for outcome in outcomes:
            assert isinstance(outcome, BatchResult), outcome
            out.append(outcome)
        return out

    def groups(self, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, list[list[Key]]]]:
        """Every ``read_group`` of the source: per call, each view's chunks (the real call still runs)."""
        source = self.users.source
        seen: list[dict[str, list[list[Key]]]] = []
        real = source.read_group

        def spy(fetches: Sequence[Fetch], timeout_s: float | None) -> list[Chunks | Exception]:
            seen.append({f.view: [list(c) for c in f.chunks] for f in fetches})
            return real(fetches, timeout_s)

        monkeypatch.setattr(source, "read_group", spy)
        return seen


def same(got: BatchResult, alone: BatchResult) -> None:
    assert (got.keys, got.rows, got.failed, got.error) == (alone.keys, alone.rows, alone.failed, alone.error)
    assert [(d.view, d.reason, d.keys) for d in got.degraded] == \
        [(d.view, d.reason, d.keys) for d in alone.degraded]


@pytest.fixture
def pair(backend: ContractBackend) -> Iterator[Any]:
    made: list[Pair] = []

    def build(batch_size: int | None = None, prepare: Sequence[str] = ("users", "items")) -> Pair:
        p = Pair(backend, batch_size, prepare)
        made.append(p)
        return p

    yield build
    for p in made:
        p.runtime.close()


def test_two_views_read_together_answer_as_each_alone(pair: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    p: Pair = pair()
    p.seed(["a", "c"], ["b", "c", "d"])
    user_keys, item_keys = ["a", "b", "c", "a", "zz"], ["d", "x", "b", "d", "c"]
    groups = p.groups(monkeypatch)
    users, items = p.together(user_keys, item_keys)
    assert groups == [{"users": [["a", "b", "c", "zz"]], "items": [["d", "x", "b", "c"]]}]
    same(users, p.users.read(user_keys))
    same(items, p.items.read(item_keys))
    assert users.rows == [user_row(0), None, user_row(1), user_row(0), None]
    assert items.rows == [item_row(2), None, item_row(0), item_row(2), item_row(1)]


def test_more_keys_than_a_batch_go_in_chunks_of_one_group(pair: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    p: Pair = pair(SMALL_BATCH)
    user_keys = [f"user{i:02d}" for i in range(50)]
    item_keys = [f"item{i:02d}" for i in range(3 * SMALL_BATCH + 2)]
    p.seed(user_keys[::2], item_keys[1::3])
    groups = p.groups(monkeypatch)
    users, items = p.together(list(reversed(user_keys)), item_keys)
    assert len(groups) == 1
    sizes = {view: [len(c) for c in chunks] for view, chunks in groups[0].items()}
    assert len(sizes["users"]) == math.ceil(50 / SMALL_BATCH) and max(sizes["users"]) <= SMALL_BATCH
    assert len(sizes["items"]) == math.ceil(len(item_keys) / SMALL_BATCH)
    assert max(sizes["items"]) <= SMALL_BATCH
    assert sorted(k for c in groups[0]["users"] for k in c) == sorted(user_keys)
    same(users, p.users.read(list(reversed(user_keys))))
    same(items, p.items.read(item_keys))
    assert [r is not None for r in items.rows] == [i % 3 == 1 for i in range(len(item_keys))]


def test_an_empty_side_reads_nothing(pair: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    p: Pair = pair()
    p.seed(["a"], ["b"])
    groups = p.groups(monkeypatch)
    users, items = p.together([], ["b", "nope"])
    assert list(users) == [] and users.degraded == [] and users.failed == []
    same(items, p.items.read(["b", "nope"]))
    assert groups == [{"items": [["b", "nope"]]}]  # the empty read sent nothing
    users, items = p.together([], [])
    assert list(users) == [] and list(items) == [] and len(groups) == 1


@pytest.mark.needs("grouped_reads", "create")
def test_a_missing_table_fails_its_own_view_only(pair: Any) -> None:
    """One view's query the store rejects: that read raises, as read alone; the other view is answered."""
    p: Pair = pair(prepare=["users"])  # the items' storage is never created
    assert p.users.upsert([("u1", user_row(1))]) == 1
    users, items = p.outcomes(["u1", "u9"], ["a"])
    assert isinstance(items, BackendQueryError), items
    assert isinstance(users, BatchResult), users
    same(users, p.users.read(["u1", "u9"]))
    assert users.rows == [user_row(1), None]
    with pytest.raises(BackendQueryError):
        p.items.read(["a"])


def test_a_fetch_of_a_user_and_items_answers_as_each_view_alone(pair: Any,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    p: Pair = pair()
    p.seed(["u1", "u2"], ["a", "b", "c"])
    item_keys = ["c", "zz", "a", "c"]
    with FeatureService.from_config(p.config) as service:
        assert service.runtime is not None
        source = service.runtime.sources["store"]
        seen: list[list[str]] = []
        real = source.read_group

        def spy(fetches: Sequence[Fetch], timeout_s: float | None) -> list[Chunks | Exception]:
            seen.append(sorted(f.view for f in fetches))
            return real(fetches, timeout_s)

        monkeypatch.setattr(source, "read_group", spy)
        result = service.fetch("u2", item_keys)
        user = service.read_view("users", ["u2"])
        items = service.read_view("items", item_keys)
    assert seen == [["items", "users"]]  # one group for both views
    assert result.degraded == []
    assert user.rows[0] is not None and result.user == {f"u_{k}": v for k, v in user.rows[0].items()}
    defaults = {f"i_{f}": DEFAULTS.get(f) for f in ITEM_FEATURES}
    assert result.items == [{f"i_{k}": v for k, v in r.items()} if r is not None else defaults
                            for r in items.rows]
    assert result.items[0] == {f"i_{k}": v for k, v in item_row(2).items()}
    assert result.missing == {"items": ["zz"]}


@pytest.mark.needs("grouped_reads", "async_reads")
def test_an_afetch_of_a_user_and_items_is_one_group_answering_as_fetch(
        pair: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the loop, the views of one source go to ``aread_group`` together and answer as ``fetch``."""
    p: Pair = pair()
    p.seed(["u1", "u2"], ["a", "b", "c"])
    item_keys = ["c", "zz", "a", "c"]
    with FeatureService.from_config(p.config) as service:
        assert service.runtime is not None
        source = service.runtime.sources["store"]
        seen: list[list[str]] = []
        real = source.aread_group

        async def spy(fetches: Sequence[Fetch], timeout_s: float | None) -> list[Chunks | Exception]:
            seen.append(sorted(f.view for f in fetches))
            return await real(fetches, timeout_s)

        expected = service.fetch("u2", item_keys)
        monkeypatch.setattr(source, "aread_group", spy)
        got = asyncio.run(service.afetch("u2", item_keys))
    assert seen == [["items", "users"]]
    assert got.degraded == [] and expected.degraded == []
    assert (got.user, got.items, got.missing) == (expected.user, expected.items, expected.missing)
