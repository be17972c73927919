"""The Redis adapter beyond the contract: stored layouts, round trips, errors and secrets, on real servers."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]
import orjson
import pytest
import redis
from featuredao.adapters._redis_kv import NodeBreaker

from featuredao import factory
from featuredao.config import CircuitBreakerConfig
from featuredao.dao import BaseDao
from featuredao.errors import (
    BackendAuthError,
    BackendQueryError,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
    Overloaded,
)
from featuredao.testing.servers import RedisCluster, RedisServer, free_port
from featuredao.types import Reason

pytestmark = pytest.mark.redis

FEATURES = {"price": "float", "clicks": "int", "title": "str", "hot": "bool", "emb": "list[float]",
            "tags": "list[str]"}
DEFAULTS = {"price": -1.0, "clicks": 0}
LAYOUTS = {"hash": {"layout": "hash"}, "msgpack": {"layout": "string", "encoding": "msgpack"},
           "json": {"layout": "string", "encoding": "json"}, "csv": {"layout": "string", "encoding": "csv"}}


def build(source: dict[str, Any], options: dict[str, Any], *, key_type: str = "str",
          features: dict[str, str] | None = None) -> tuple[factory.Runtime, BaseDao]:
    cfg = {"sources": {"r": {"type": "redis", **source}},
           "views": [{"name": "items", "entity": "item", "source": "r", "table": f"t{secrets.token_hex(4)}",
                      "key": "id", "key_type": key_type, "features": features or FEATURES,
                      "defaults": DEFAULTS, "options": options}]}
    runtime = factory.build(cfg)
    dao = runtime.daos["items"]
    assert isinstance(dao, BaseDao)
    return runtime, dao


@pytest.fixture
def server_source(redis_server: RedisServer) -> dict[str, Any]:
    return {"host": redis_server.host, "port": redis_server.port}


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    yield client
    client.close()


@pytest.fixture(params=list(LAYOUTS))
def layout_dao(request: pytest.FixtureRequest, server_source: dict[str, Any]) -> Iterator[BaseDao]:
    runtime, dao = build(server_source, LAYOUTS[request.param])
    yield dao
    runtime.close()


def test_building_a_source_does_not_connect() -> None:
    closed = free_port()
    for source in ({"port": closed}, {"cluster": True, "startup_nodes": [f"127.0.0.1:{closed}"]}):
        runtime, dao = build(source, LAYOUTS["hash"])  # nothing listens: building must still succeed
        with pytest.raises(BackendUnavailable):
            dao.read(["a"])
        runtime.close()


def test_key_template_and_int_keys(server_source: dict[str, Any], raw: redis.Redis) -> None:
    runtime, dao = build(server_source, {"layout": "string", "key_template": "item:{table}:{key}:v1"},
                         key_type="int")
    try:
        dao.upsert([(42, {"price": 1.5})])
        assert raw.exists(f"item:{dao.view.table}:42:v1")
        assert dao.read(["42", 7])[0] == {"price": 1.5, "clicks": 0, "title": None, "hot": None, "emb": None,
                                           "tags": None}
    finally:
        runtime.close()


def test_stored_encodings_are_the_documented_ones(server_source: dict[str, Any], raw: redis.Redis) -> None:
    row = {"price": 0.1, "clicks": 3, "title": "a,b:c%d", "hot": True, "emb": [0.5, -1.0], "tags": ["x,y"]}
    stored: dict[str, Any] = {}
    for name, options in LAYOUTS.items():
        runtime, dao = build(server_source, options)
        dao.upsert([("k", row)])
        key = f"{dao.view.table}:k"
        stored[name] = raw.hgetall(key) if name == "hash" else raw.get(key)
        assert dao.read(["k"])[0] == row
        runtime.close()
    assert stored["hash"] == {b"price": b"0.1", b"clicks": b"3", b"title": b"a,b:c%d", b"hot": b"1",
                              b"emb": b"[0.5,-1.0]", b"tags": b'["x,y"]'}
    assert msgpack.unpackb(stored["msgpack"]) == row
    assert orjson.loads(stored["json"]) == row
    assert stored["csv"] == b'price:0.1,clicks:3,title:a%2Cb:c%25d,hot:1,emb:[0.5%2C-1.0],tags:["x%2Cy"]'


def test_values_written_by_other_producers_are_coerced(server_source: dict[str, Any],
                                                       raw: redis.Redis) -> None:
    expected = {"price": 2.0, "clicks": 5, "title": "t", "hot": False, "emb": [1.0, 2.0], "tags": []}
    by_hand: dict[str, Any] = {
        "hash": {"price": "2", "clicks": " 5", "title": "t", "hot": "false", "emb": "[1, 2]", "tags": "[]"},
        "msgpack": msgpack.packb({"price": 2, "clicks": 5.0, "title": "t", "hot": 0, "emb": [1, 2.0],
                                  "tags": [], "unknown": "ignored"}),
        "json": orjson.dumps({"price": 2, "clicks": 5, "title": "t", "hot": False, "emb": [1, 2],
                              "tags": []}),
        "csv": b"title:t,price:2,clicks:5,hot:0,emb:[1%2C2],tags:[]",
    }
    for name, options in LAYOUTS.items():
        runtime, dao = build(server_source, options)
        key = f"{dao.view.table}:k"
        if name == "hash":
            raw.hset(key, mapping=by_hand[name])
        else:
            raw.set(key, by_hand[name])
        result = dao.read(["k", "absent"])
        assert list(result) == [expected, None], name
        assert result.degraded == [], name
        runtime.close()


@pytest.mark.parametrize("name", ["msgpack", "json"])
def test_packed_rows_of_any_writer_read_alike_in_one_batch(name: str, server_source: dict[str, Any],
                                                            raw: redis.Redis) -> None:
    """Rows typed as they decode (ours, another writer's with an extra key and an int for a float, a
    sparse one) and a batch the typed decode refuses (an int stored as 5.0) give the same rows."""
    runtime, dao = build(server_source, LAYOUTS[name])
    pack = msgpack.packb if name == "msgpack" else orjson.dumps
    full = {"price": 0.5, "clicks": 3, "title": "x", "hot": True, "emb": [1.0], "tags": ["a"]}
    dao.upsert([("ours", full)])
    raw.set(f"{dao.view.table}:other", pack({**full, "price": 2, "extra": {"nested": 1}}))
    raw.set(f"{dao.view.table}:sparse", pack({"clicks": 4}))
    sparse = {**dict.fromkeys(FEATURES), **DEFAULTS, "clicks": 4}
    result = dao.read(["ours", "other", "sparse", "absent"])
    assert list(result) == [full, {**full, "price": 2.0}, sparse, None]
    assert type(result[1]["price"]) is float and result.degraded == []  # type: ignore[index]
    raw.set(f"{dao.view.table}:lax", pack({**full, "clicks": 5.0}))  # the core's coercion decides
    result = dao.read(["ours", "lax", "sparse"])
    assert list(result) == [full, {**full, "clicks": 5}, sparse] and result.degraded == []
    runtime.close()


def test_bad_values_degrade_only_their_feature_or_row(layout_dao: BaseDao, raw: redis.Redis) -> None:
    dao = layout_dao
    dao.upsert([("good", {"price": 1.0, "clicks": 1})])
    key = f"{dao.view.table}:bad"
    fmt = dao.view.options.format
    if fmt == "hash":
        raw.hset(key, mapping={"price": "not a number", "clicks": "7"})
    else:
        raw.set(key, b"\xc1 not a value" if fmt != "csv" else b"no pairs here")
    result = dao.read(["bad", "good"])
    assert result[1] is not None and result[1]["price"] == 1.0
    if fmt == "hash":
        assert result[0] is not None and result[0]["price"] == -1.0 and result[0]["clicks"] == 7
        assert [d.reason for d in result.degraded] == [Reason.COERCION]
    else:
        assert result[0] is None
        assert [(d.reason, d.keys) for d in result.degraded] == [(Reason.ROW_ERROR, ("bad",))]


def test_hash_upsert_removes_fields_that_became_null(server_source: dict[str, Any], raw: redis.Redis) -> None:
    runtime, dao = build(server_source, LAYOUTS["hash"])
    try:
        dao.upsert([("k", {"price": 1.0, "title": "x", "tags": ["a"]})])
        dao.upsert([("k", {"price": 2.0})])
        assert raw.hgetall(f"{dao.view.table}:k") == {b"price": b"2.0"}
        dao.upsert([("k", {})])
        assert not raw.exists(f"{dao.view.table}:k")
    finally:
        runtime.close()


def test_projection_of_null_features_tells_row_from_missing(server_source: dict[str, Any]) -> None:
    runtime, dao = build(server_source, LAYOUTS["hash"])
    try:
        dao.upsert([("k", {"price": 1.0})])
        assert list(dao.read(["k", "absent"], ["clicks", "tags"])) == [{"clicks": 0, "tags": None}, None]
    finally:
        runtime.close()


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_ttl_is_set_on_every_write(name: str, server_source: dict[str, Any], raw: redis.Redis) -> None:
    runtime, dao = build(server_source, {**LAYOUTS[name], "ttl_s": 300})
    try:
        dao.upsert([("k", {"price": 1.0})])
        assert 0 < raw.ttl(f"{dao.view.table}:k") <= 300
    finally:
        runtime.close()


@pytest.mark.parametrize("name", ["hash", "msgpack"])
def test_a_batch_costs_one_round_trip_per_chunk(name: str, server_source: dict[str, Any],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    runtime, dao = build({**server_source, "batch_size": 100, "pool_size": 1}, LAYOUTS[name])
    try:
        dao.upsert((str(i), {"clicks": i}) for i in range(0, 250, 2))
        sent: list[int] = []
        real = redis.connection.AbstractConnection.send_packed_command

        def counting(self: Any, command: Any, check_health: bool = True) -> None:
            sent.append(1)
            real(self, command, check_health)

        # The real driver still talks to the server; this only counts what it sends.
        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
        result = dao.read([str(i) for i in range(250)])
        assert len(sent) == 3
        assert [r["clicks"] if r else None for r in result] == [i if i % 2 == 0 else None for i in range(250)]
    finally:
        runtime.close()


def test_wrongtype_names_the_view_not_the_key(server_source: dict[str, Any], raw: redis.Redis) -> None:
    runtime, dao = build(server_source, LAYOUTS["hash"])
    try:
        raw.set(f"{dao.view.table}:user-secret-4711", "a string, not a hash")
        with pytest.raises(BackendQueryError) as info:
            dao.read(["user-secret-4711"])
        assert "WRONGTYPE" in str(info.value) and "items" in str(info.value)
        assert "user-secret-4711" not in str(info.value)
        assert info.value.__cause__ is not None
    finally:
        runtime.close()


def test_auth_failure_and_secrets_never_shown(redis_server: RedisServer, raw: redis.Redis,
                                              monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    user, password = f"fd_{secrets.token_hex(4)}", f"pw-{secrets.token_hex(8)}"
    raw.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"], commands=["+@all"])
    monkeypatch.setenv("FD_REDIS_USER", user)
    monkeypatch.setenv("FD_REDIS_PASSWORD", password)
    source = {"host": redis_server.host, "port": redis_server.port,
              "username": "${FD_REDIS_USER}", "password": "${FD_REDIS_PASSWORD}"}
    caplog.set_level(logging.DEBUG)
    try:
        runtime, dao = build(source, LAYOUTS["msgpack"])
        dao.upsert([("k", {"clicks": 1})])
        assert dao.read(["k"])[0] is not None
        source_obj = runtime.sources["r"]
        shown = [repr(source_obj), repr(runtime.config), repr(source_obj.options), repr(dao)]
        runtime.close()
        monkeypatch.setenv("FD_REDIS_PASSWORD", password + "-wrong")
        runtime, dao = build(source, LAYOUTS["msgpack"])
        with pytest.raises(BackendAuthError) as info:
            dao.read(["k"])
        with pytest.raises(BackendAuthError):
            dao.ping()
        runtime.close()
        shown += [str(info.value), repr(info.value), caplog.text]
        for text in shown:
            assert password not in text and user not in text
    finally:
        raw.acl_deluser(user)


def test_frozen_server_times_out_and_recovers(redis_server: RedisServer) -> None:
    runtime, dao = build({"host": redis_server.host, "port": redis_server.port, "socket_timeout_ms": 300},
                         LAYOUTS["msgpack"])
    try:
        dao.upsert([("k", {"clicks": 1})])
        redis_server.freeze()
        try:
            with pytest.raises(BackendTimeout):
                dao.read(["k"])
        finally:
            redis_server.thaw()
        assert dao.read(["k"])[0] is not None
    finally:
        runtime.close()


@pytest.mark.parametrize("name", ["msgpack", "hash"])
def test_a_read_gives_up_at_its_own_timeout_not_the_sockets(name: str, redis_server: RedisServer) -> None:
    """The worker and its connection are free when the read's time is up, however long the socket waits."""
    runtime, dao = build({"host": redis_server.host, "port": redis_server.port, "socket_timeout_ms": 5000,
                          "pool_size": 1}, LAYOUTS[name])
    try:
        dao.upsert([("k", {"clicks": 1})])
        assert dao.read(["k"])[0] is not None  # the pool's one connection is open
        redis_server.freeze()
        try:
            for _ in range(2):  # the late connection was dropped, not left out of step in the pool
                started = time.monotonic()
                with pytest.raises(BackendTimeout):
                    dao.read(["k"], timeout_s=0.2)
                assert time.monotonic() - started < 2.0  # far below the socket's 5 s
        finally:
            redis_server.thaw()
        assert dao.read(["k"])[0] == {**dict.fromkeys(FEATURES), **DEFAULTS, "clicks": 1}
    finally:
        runtime.close()


def test_waiting_for_the_pool_ends_at_the_reads_own_time(redis_server: RedisServer) -> None:
    """A read whose time is up while another holds the pool's one connection is load, and says so then."""
    runtime, dao = build({"host": redis_server.host, "port": redis_server.port, "pool_size": 1,
                          "pool_timeout_ms": 5000, "socket_timeout_ms": 5000}, LAYOUTS["msgpack"])
    try:
        dao.upsert([("k", {"clicks": 1})])
        redis_server.freeze()
        holder = threading.Thread(target=lambda: dao.read_partial(["k"], timeout_s=1.5))
        holder.start()
        time.sleep(0.3)  # the holder's read now waits on the frozen server with the only connection
        try:
            started = time.monotonic()
            with pytest.raises(Overloaded):
                dao.read(["k"], timeout_s=0.2)
            assert time.monotonic() - started < 1.2  # not the pool's 5 s, and before the holder gives up
        finally:
            redis_server.thaw()
            holder.join()
        assert dao.read(["k"])[0] is not None
    finally:
        runtime.close()


def test_reads_work_again_after_a_server_restart(redis_server: RedisServer) -> None:
    runtime, dao = build({"host": redis_server.host, "port": redis_server.port}, LAYOUTS["hash"])
    try:
        dao.upsert([("k", {"clicks": 1})])
        assert dao.read(["k"])[0] is not None
        redis_server.restart()
        # The pooled connection is dead: the driver reconnects once, and the (memory-only) data is gone.
        assert list(dao.read(["k"])) == [None]
    finally:
        runtime.close()


@pytest.mark.redis_cluster
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_cluster_spreads_keys_over_every_master(name: str, redis_cluster: RedisCluster) -> None:
    nodes = [f"{h}:{p}" for h, p in redis_cluster.startup_nodes]
    runtime, dao = build({"cluster": True, "startup_nodes": nodes}, LAYOUTS[name])
    try:
        before = [int(str(node.command("DBSIZE"))) for node in redis_cluster.nodes]
        dao.upsert((f"k{i}", {"clicks": i}) for i in range(300))
        after = [int(str(node.command("DBSIZE"))) for node in redis_cluster.nodes]
        assert all(a > b for a, b in zip(after, before, strict=True))
        keys = [f"k{i}" for i in range(-5, 300)]
        assert [r["clicks"] if r else None for r in dao.read(keys)] == [None] * 5 + list(range(300))
    finally:
        runtime.close()


def test_raw_reader_reads_what_the_dao_reads(redis_server: RedisServer) -> None:
    cfg = {"sources": {"r": {"type": "redis", "host": redis_server.host, "port": redis_server.port}},
           "views": [{"name": "v", "entity": "item", "source": "r", "table": "raw_reader", "key": "id",
                      "features": {"n": "int", "tags": "list[str]"},
                      "options": {"layout": "string", "encoding": "msgpack"}}]}
    runtime = factory.build(cfg)
    try:
        dao: Any = runtime.daos["v"]
        dao.upsert([("a", {"n": 1, "tags": ["x"]}), ("b", {"n": 2, "tags": ["y", "z"]})])
        raw = dao.raw_reader()
        assert raw is not None
        assert raw(["b", "missing", "a"], ["n", "tags"]) == list(dao.read(["b", "missing", "a"]))
    finally:
        runtime.close()


def test_cluster_settings_are_validated() -> None:
    with pytest.raises(ConfigError) as info:
        build({"port": free_port(), "read_from_replicas": True}, LAYOUTS["msgpack"])
    assert "read_from_replicas applies to a cluster only" in str(info.value)
    with pytest.raises(ConfigError):
        build({"cluster": True, "node_breaker": {"failure_threshold": 0}}, LAYOUTS["msgpack"])


@pytest.mark.redis_cluster
def test_cluster_read_without_time_left_sends_nothing_and_blames_no_node(redis_cluster: RedisCluster) -> None:
    nodes = [f"{h}:{p}" for h, p in redis_cluster.startup_nodes]
    runtime, dao = build({"cluster": True, "startup_nodes": nodes}, LAYOUTS["msgpack"])
    try:
        dao.upsert((f"k{i}", {"clicks": i}) for i in range(30))
        keys = [f"k{i}" for i in range(30)]
        # Enough time for nothing: the batch fails as ours (overloaded), and no node's breaker counts it.
        result = dao.read_partial(keys, timeout_s=1e-6)
        assert sorted(result.failed) == sorted(keys) and isinstance(result.error, Overloaded)
        assert [r["clicks"] if r else None for r in dao.read(keys, timeout_s=1.0)] == list(range(30))
        source: Any = runtime.sources["r"]
        assert len(source.node_breakers()) == 3 and set(source.node_breakers().values()) == {"closed"}
    finally:
        runtime.close()


@pytest.mark.redis_cluster
def test_cluster_key_value_tier_routes_per_node(redis_cluster: RedisCluster) -> None:
    nodes = [f"{h}:{p}" for h, p in redis_cluster.startup_nodes]
    runtime, _ = build({"cluster": True, "startup_nodes": nodes}, LAYOUTS["msgpack"])
    try:
        kv = runtime.sources["r"].key_value()
        keys = [f"kv-test:{secrets.token_hex(4)}:{i}" for i in range(50)]
        kv.set_many([(k, k.encode(), 60) for k in keys])
        assert kv.get_many([*keys, "kv-test:absent"], timeout_s=1.0) == [k.encode() for k in keys] + [None]
        kv.delete_many(keys)
        assert kv.get_many(keys) == [None] * len(keys)
    finally:
        runtime.close()


def test_node_breaker_opens_fails_fast_and_only_a_background_probe_closes_it() -> None:
    # A reset timeout a loaded machine cannot stall through between a failure and the next line (0.05 s
    # could: the breaker read half-open where the test expects it still open).
    reset_s = 0.5
    breaker = NodeBreaker("cluster node 10.0.0.1:7000", CircuitBreakerConfig(failure_threshold=2,
                                                                               reset_timeout_s=reset_s))
    breaker.failure()
    assert breaker.closed and breaker.state == "closed"
    breaker.failure()
    assert not breaker.closed and breaker.state == "open" and not breaker.probe_due()
    time.sleep(reset_s + 0.01)
    assert breaker.state == "half_open" and not breaker.closed  # requests still skip it
    assert breaker.probe_due() and not breaker.probe_due()  # one probe at a time
    breaker.failure()  # the probe failed: another reset timeout
    assert breaker.state == "open"
    time.sleep(reset_s + 0.01)
    assert breaker.probe_due()
    breaker.success()
    assert breaker.closed and breaker.state == "closed"
