"""The two-level cache over fake DAOs and an in-memory key-value store."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from fakes import FakeDao, MemoryKV, make_view

from featuredao.cache import CachedDao, flush_background
from featuredao.config import CacheConfig, L1Config, L2Config
from featuredao.errors import BackendUnavailable
from featuredao.types import Reason


def rows(n: int) -> dict[str | int, dict[str, object]]:
    return {f"k{i}": {"a": i, "b": f"v{i}"} for i in range(n)}


def config(**kw: object) -> CacheConfig:
    base: dict[str, object] = {"l1": L1Config(ttl_s=60, max_entries=1000)}
    base.update(kw)
    return CacheConfig.model_validate(base)


def test_partial_hits_at_every_level_stay_aligned() -> None:
    store = FakeDao(make_view(), rows(20))
    kv = MemoryKV()
    warm_l1 = CachedDao(store, config(l2=L2Config(source="kv")), kv)
    warm_l1.read(["k0", "k1", "k2", "k3"])  # L1 (and L2) of this instance
    other = CachedDao(FakeDao(make_view(), rows(20)), config(l2=L2Config(source="kv")), kv)
    other.read(["k4", "k5", "k6"])  # only reaches the shared L2
    assert flush_background()  # L2 is written off the request path
    store.calls.clear()
    kv.gets = 0
    keys = ["k6", "k0", "k9", "missing", "k4", "k1", "k8", "k5", "k2", "k3", "k0"]
    result = warm_l1.read(keys)
    assert [r["a"] if r else None for r in result] == [6, 0, 9, None, 4, 1, 8, 5, 2, 3, 0]
    assert kv.gets == 1  # one L2 round trip for every L1 miss
    assert store.calls == [["k9", "missing", "k8"]]  # one source batch for what L2 lacked


def test_projection_is_served_from_cached_rows() -> None:
    store = FakeDao(make_view(), rows(3))
    dao = CachedDao(store, config())
    dao.read(["k1"])
    assert dao.read(["k1", "k2"], ["b"]).rows == [{"b": "v1"}, {"b": "v2"}]
    assert store.calls == [["k1"], ["k2"]]


def test_negative_caching() -> None:
    store = FakeDao(make_view(), rows(2))
    dao = CachedDao(store, config(negative_ttl_s=30))
    assert dao.read(["nope"]).rows == [None]
    assert dao.read(["nope"]).rows == [None]
    assert store.calls == [["nope"]]
    plain = FakeDao(make_view(), rows(2))
    no_negative = CachedDao(plain, config())
    no_negative.read(["nope"])
    no_negative.read(["nope"])
    assert plain.calls == [["nope"], ["nope"]]


def test_concurrent_requests_for_one_cold_key_make_one_read() -> None:
    store = FakeDao(make_view(), rows(5), delay=0.3)
    dao = CachedDao(store, config())
    start = threading.Barrier(50)

    def one(_: int) -> object:
        start.wait()
        return dao.read(["k3"], timeout_s=5).rows[0]

    with ThreadPoolExecutor(50) as pool:
        threading.Timer(0.2, store.release.set).start()
        results = list(pool.map(one, range(50)))
    assert all(r == {"a": 3, "b": "v3"} for r in results)
    assert store.calls == [["k3"]]


def test_stale_while_revalidate_serves_old_and_refreshes_once() -> None:
    store = FakeDao(make_view(), rows(2))
    dao = CachedDao(store, config(l1=L1Config(ttl_s=0.05), stale_while_revalidate_s=30))
    dao.read(["k1"])
    store.rows["k1"] = {"a": 100, "b": "new"}
    time.sleep(0.08)
    assert dao.read(["k1"]).rows == [{"a": 1, "b": "v1"}]  # stale, at once
    for _ in range(100):
        if dao.read(["k1"]).rows == [{"a": 100, "b": "new"}]:
            break
        time.sleep(0.01)
    assert dao.read(["k1"]).rows == [{"a": 100, "b": "new"}]
    assert store.calls == [["k1"], ["k1"]]  # one background refresh


def test_stale_if_error() -> None:
    store = FakeDao(make_view(), rows(2))
    dao = CachedDao(store, config(l1=L1Config(ttl_s=0.05), stale_if_error_s=30))
    dao.read(["k0", "k1"])
    time.sleep(0.08)
    store.error = BackendUnavailable("down")
    result = dao.read(["k1", "k0"])
    assert result.rows == [{"a": 1, "b": "v1"}, {"a": 0, "b": "v0"}]
    assert [d.reason for d in result.degraded] == [Reason.STALE]
    try:
        dao.read(["never-seen"])
    except BackendUnavailable:
        pass
    else:
        raise AssertionError("a key with nothing stale must fail")


def test_l2_down_is_bypassed() -> None:
    kv = MemoryKV()
    kv.down = True
    store = FakeDao(make_view(), rows(3))
    dao = CachedDao(store, CacheConfig(l2=L2Config(source="kv")), kv)
    assert dao.read(["k2", "k1"]).rows == [{"a": 2, "b": "v2"}, {"a": 1, "b": "v1"}]
    assert dao.read(["k2"]).rows == [{"a": 2, "b": "v2"}]
    assert store.calls == [["k2", "k1"], ["k2"]]


def test_invalidation_reaches_every_instance() -> None:
    kv = MemoryKV()
    store = FakeDao(make_view(), rows(3))
    a = CachedDao(store, config(l2=L2Config(source="kv")), kv)
    b = CachedDao(store, config(l2=L2Config(source="kv")), kv)
    a.read(["k1"])
    b.read(["k1"])
    store.rows["k1"] = {"a": 11, "b": "changed"}
    assert b.read(["k1"]).rows == [{"a": 1, "b": "v1"}]  # cached
    a.invalidate(["k1"])
    assert b.read(["k1"]).rows == [{"a": 11, "b": "changed"}]
    assert a.read(["k1"]).rows == [{"a": 11, "b": "changed"}]


def test_upsert_writes_through_and_invalidates() -> None:
    kv = MemoryKV()
    store = FakeDao(make_view(), rows(3))
    dao = CachedDao(store, config(l2=L2Config(source="kv")), kv)
    dao.read(["k0"])
    dao.upsert([("k0", {"a": 5, "b": "five"})])
    assert dao.read(["k0"]).rows == [{"a": 5, "b": "five"}]


def test_peek_answers_only_when_every_key_is_fresh_in_l1() -> None:
    store = FakeDao(make_view(), rows(5))
    dao = CachedDao(store, config())
    assert dao.peek(["k1", "k2"]) is None
    dao.read(["k1", "k2", "absent"])
    hit = dao.peek(["k2", "k1", "k2"])
    assert hit is not None and hit.rows == [{"a": 2, "b": "v2"}, {"a": 1, "b": "v1"}, {"a": 2, "b": "v2"}]
    assert dao.peek(["k1", "k3"]) is None
    assert store.calls == [["k1", "k2", "absent"]]
