"""``factory.compose`` on its own, without a FeatureService: breaker and fallbacks, then the cache."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from featuredao import factory
from featuredao.cache import CachedDao
from featuredao.config import CacheConfig, L1Config
from featuredao.errors import BackendUnavailable
from featuredao.memory import MemorySource
from featuredao.resilience import ResilientDao


def _view(name: str, source: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "table": "items", "entity": "item", "source": source, "key": "id",
            "key_type": "int", "features": {"n": "int"}, **extra}


@pytest.fixture
def runtime() -> Iterator[factory.Runtime]:
    rt = factory.build({
        "sources": {"a": {"type": "memory", "circuit_breaker": {"failure_threshold": 100}},
                    "b": {"type": "memory"}},
        "views": [_view("items", "a", fallback=["items_b"], cache={"l1": {"ttl_s": 60}}),
                  _view("items_b", "b"), _view("plain", "a", prefix="plain_")],
    })
    rt.daos["items"].prepare()
    rt.daos["items_b"].prepare()
    rt.daos["items"].upsert([(1, {"n": 1})])
    rt.daos["items_b"].upsert([(1, {"n": 10}), (2, {"n": 20})])
    yield rt
    rt.close()


def _source(rt: factory.Runtime, name: str) -> MemorySource:
    source = rt.sources[name]
    assert isinstance(source, MemorySource)
    return source


def test_without_cache_it_is_the_breaker_over_the_view_with_its_fallbacks(runtime: factory.Runtime) -> None:
    dao = factory.compose(runtime, "items", cache=False)
    assert isinstance(dao, ResilientDao) and dao.primary is runtime.daos["items"]
    assert [type(f) for f in dao.fallbacks] == [ResilientDao]
    assert dao.fallbacks[0].primary is runtime.daos["items_b"]  # type: ignore[attr-defined]
    assert dao.read([1, 2]).rows == [{"n": 1}, None]  # the primary answers: no fallback
    _source(runtime, "a").down = True
    result = dao.read([1, 2])
    assert result.rows == [{"n": 10}, {"n": 20}]  # the primary is down: the fallback serves
    assert result.degraded


def test_with_the_views_cache_a_second_read_is_served_from_l1(runtime: factory.Runtime) -> None:
    dao = factory.compose(runtime, "items")
    assert isinstance(dao, CachedDao) and isinstance(dao.inner, ResilientDao)
    assert dao.read([1]).rows == [{"n": 1}]
    _source(runtime, "a").down = _source(runtime, "b").down = True
    assert dao.read([1]).rows == [{"n": 1}]
    dao.close()


def test_a_cache_config_given_is_used_and_a_view_without_one_gets_none(runtime: factory.Runtime) -> None:
    assert isinstance(factory.compose(runtime, "plain"), ResilientDao)  # no cache configured
    dao = factory.compose(runtime, "plain", cache=CacheConfig(l1=L1Config(ttl_s=60)))
    assert isinstance(dao, CachedDao) and dao.config.l1 is not None and dao.config.l1.ttl_s == 60
    assert dao.read([1]).rows == [{"n": 1}]
    _source(runtime, "a").down = True
    assert dao.read([1]).rows == [{"n": 1}]
    with pytest.raises(BackendUnavailable):
        factory.compose(runtime, "plain", cache=False).read([1])  # each call composes anew
    dao.close()
