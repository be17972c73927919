"""The exception hierarchy: what a caller's mistake raises, and that every class keeps its builtin base."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

import featuredao
from featuredao import errors, factory, registry
from featuredao.dao import BaseDao
from featuredao.errors import (
    BackendError,
    ConfigError,
    FeatureDaoError,
    UnknownAdapter,
    UnknownView,
    Unsupported,
    UsageError,
)
from featuredao.service import FeatureService

VIEW = {"entity": "item", "source": "mem", "key": "id", "key_type": "int", "features": {"n": "int"},
        "name": "items", "table": "items"}


@pytest.fixture
def dao() -> Iterator[BaseDao]:
    runtime = factory.build({"sources": {"mem": {"type": "memory"}}, "views": [VIEW]})
    yield runtime.daos["items"]
    runtime.close()


@pytest.mark.parametrize(("cls", "builtin"), [
    (errors.UsageError, ValueError),
    (errors.CoercionError, ValueError),
    (errors.InvalidKeyError, ValueError),
    (errors.ArgumentTypeError, TypeError),
    (errors.UnknownView, KeyError),
    (errors.UnknownAdapter, LookupError),
    (errors.Unsupported, NotImplementedError),
])
def test_each_class_is_ours_and_keeps_its_builtin_base(cls: type[Exception],
                                                       builtin: type[Exception]) -> None:
    # Existing ``except ValueError`` (and the like) clauses still catch them.
    assert issubclass(cls, FeatureDaoError) and issubclass(cls, builtin)
    assert not issubclass(cls, BackendError)  # a caller's mistake is not a store's failure


def test_every_exception_class_is_exported() -> None:
    ours = {name for name, obj in vars(errors).items()
            if isinstance(obj, type) and issubclass(obj, FeatureDaoError)}
    assert ours <= set(featuredao.__all__)
    assert all(getattr(featuredao, name) is getattr(errors, name) for name in ours)


def test_an_unknown_feature_is_a_usage_error(dao: BaseDao) -> None:
    with pytest.raises(UsageError, match="unknown features") as caught:
        dao.read([1], features=["nope"])
    assert type(caught.value) is UsageError


def test_a_write_to_a_read_only_view_is_unsupported(dao: BaseDao, monkeypatch: pytest.MonkeyPatch) -> None:
    dao.prepare()
    monkeypatch.setattr(dao.source, "capabilities", dataclasses.replace(dao.source.capabilities, write=False))
    with pytest.raises(Unsupported, match="no write support") as caught:
        dao.upsert([(1, {"n": 1})])
    assert not isinstance(caught.value, UsageError)
    assert dao.read([1]).rows == [None]  # nothing was written


def test_an_unknown_adapter() -> None:
    with pytest.raises(UnknownAdapter, match="did you mean 'memory'"):
        registry.get_adapter("memroy")
    # In a config it is a ConfigError naming the JSON path.
    with pytest.raises(ConfigError, match=r"\$\.sources\.mem\.type: unknown adapter type"):
        factory.build({"sources": {"mem": {"type": "memroy"}}, "views": [VIEW]})


def test_an_unknown_view(dao: BaseDao) -> None:
    service = FeatureService({"items": dao})
    try:
        with pytest.raises(UnknownView, match="unknown view 'nope'; known: items") as caught:
            service.read_view("nope", [1])
        assert isinstance(caught.value, KeyError)
    finally:
        service.close()
