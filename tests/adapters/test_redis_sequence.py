"""Redis sequence views on real servers: ground truth through the CLI, layout, retain, cluster nodes."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]
import pytest
import redis
from featuredao.adapters.redis import PartialWrite
from redis.cluster import ClusterNode
from redis.cluster import RedisCluster as RawCluster
from redis.crc import key_slot
from sequence_truth import (
    FIELDS,
    SPEC,
    assert_cli_matches,
    cli_fetch,
    distinct,
    events,
    expected,
    truth_config,
)

from featuredao import factory
from featuredao.dao import BaseDao
from featuredao.errors import BackendQueryError, CircuitOpen, ConfigError
from featuredao.testing.servers import RedisCluster, RedisServer

NOW = 1_700_000_000
ORDER = list(FIELDS)  # a member is a msgpack array of the fields in this order


@pytest.fixture(params=["standalone", pytest.param("cluster", marks=pytest.mark.redis_cluster)])
def store(request: pytest.FixtureRequest) -> Iterator[tuple[dict[str, Any], Any]]:
    """A source config and a raw redis-py client of the same server or cluster."""
    if request.param == "standalone":
        server: RedisServer = request.getfixturevalue("redis_server")
        client: Any = redis.Redis(host=server.host, port=server.port, password=server.password)
        source: dict[str, Any] = {"type": "redis", "host": server.host, "port": server.port}
        if server.password:
            source["password"] = server.password
    else:
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        nodes = [f"{h}:{p}" for h, p in cluster.startup_nodes]
        client = RawCluster(startup_nodes=[ClusterNode(h, p) for h, p in cluster.startup_nodes])
        source = {"type": "redis", "cluster": True, "startup_nodes": nodes}
    yield source, client
    client.close()


def view(table: str, spec: dict[str, Any], **extra: Any) -> dict[str, Any]:
    # A generous timeout: a CLI process reads the cluster's slot map on its first read, on a busy machine.
    return {"name": "click_seq", "entity": "user", "kind": "sequence", "source": "r", "table": table,
            "key": "user_id", "prefix": "click_", "timeout_ms": 5000, "sequence": spec, **extra}


def build(source: dict[str, Any], spec: dict[str, Any], **extra: Any) -> tuple[factory.Runtime, BaseDao, str]:
    table = f"seq{secrets.token_hex(4)}"
    runtime = factory.build({"sources": {"r": source}, "views": [view(table, spec, **extra)]})
    return runtime, runtime.daos["click_seq"], table


def load(client: Any, table: str, by_user: dict[str, list[dict[str, Any]]]) -> None:
    """Events as the documented layout, with the raw driver: one ZADD per user."""
    for user, evs in by_user.items():
        if evs:
            client.zadd(f"{table}:{user}", {msgpack.packb([e[f] for f in ORDER]): e["ts"] for e in evs})


def test_ground_truth_through_the_cli(store: tuple[dict[str, Any], Any], tmp_path: Path) -> None:
    source, client = store
    table = f"truth{secrets.token_hex(4)}"
    users = [f"u{i}" for i in range(8)] + ["用户-ü", "ユーザー:7", "emoji 🎧", "Ω"]
    by_user = events(16, users, 60, NOW)
    # A tie the store orders otherwise: equal times, where member bytes sort -1 (0xff) above 300 (0xcd..)
    # above 2, and "click" above "buy"; the core's order is by item (300, 2, -1), then the other fields.
    tie = [{"item_id": item, "event": ev, "ts": NOW - 30, "play_time": play}
           for item, ev, play in ((-1, "click", 3.0), (2, "buy", 4.0), (300, "click", 2.5), (300, "buy", 9.0),
                                  (2, "click", 2.0))]
    by_user["tie-用户"] = [*tie, {"item_id": 5, "event": "buy", "ts": NOW - 31, "play_time": 5.0}]
    # More events at one time than the read's limit (4 x max_len = 80): the limit cuts inside the tie, and
    # member bytes put the 100 negative items (0xd0.., 0xe0..0xff) above the positive ones, unlike the core.
    cut = [{"item_id": i, "event": "click", "ts": NOW - 40, "play_time": 7.0} for i in range(-100, 20)]
    by_user["cut-用户"] = [*cut, {"item_id": 99, "event": "buy", "ts": NOW, "play_time": 3.0}]
    load(client, table, by_user)
    config = truth_config(tmp_path, "r", source, view(table, SPEC))
    assert_cli_matches(config, by_user, NOW, once=True)
    assert cli_fetch(config, "tie-用户", NOW)["user"]["click_item_id"] == [300, 2, -1, 5]
    assert cli_fetch(config, "cut-用户", NOW)["user"]["click_item_id"] == [99, *range(19, 0, -1)]


def test_no_filters_read_the_newest_of_the_window_across_users(store: tuple[dict[str, Any], Any]) -> None:
    source, client = store
    spec = {"time_field": "ts", "item_field": "item_id", "event_field": "event", "fields": FIELDS,
            "max_len": 7, "window_s": 3000}
    runtime, dao, table = build(source, spec)
    try:
        users = [f"ü-{i}" for i in range(150)]  # more than one chunk (batch_size 100)
        by_user = events(3, users, 25, NOW)
        load(client, table, by_user)
        rows = dao.read(users, as_of=NOW)
        for user, row in zip(users, rows, strict=True):
            want = expected(distinct(by_user[user]), spec, NOW, prefix="")
            assert (row or {f: [] for f in FIELDS}) == want, user
    finally:
        runtime.close()


def test_a_limit_cutting_through_one_time_keeps_the_core_order(store: tuple[dict[str, Any], Any],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    source, client = store
    spec = {"time_field": "ts", "item_field": "item_id", "event_field": "event", "fields": FIELDS,
            "max_len": 3}
    runtime, dao, table = build({**source, "socket_timeout_ms": 10_000}, spec)
    try:
        # Per user: newer events (one each), events of one time, older events (one each). Member bytes put
        # negative items first among events of one time; the core puts the highest items first.
        # "a": the limit (3) cuts the tie; "d": the tie fills the limit and more.
        shape = {"a": (1, [(-1, "x"), (-2, "x"), (-3, "x"), (300, "x"), (5, "x"), (5, "y")], 0),
                 "b": (0, [(-1, "x"), (7, "x")], 0),  # a tie within the limit
                 "c": (1, [(-1, "x"), (9, "x")], 2),  # the limit ends where the tie ends: no cut
                 "d": (0, [(-1, "x"), (-2, "x"), (-3, "x"), (-4, "x"), (1, "x"), (3, "x"), (2, "x")], 0)}
        stored: dict[str, list[dict[str, Any]]] = {}
        for user, (new, same, old) in shape.items():
            stored[user] = [{"item_id": 1000 + n, "event": "z", "ts": NOW - n, "play_time": 1.0}
                            for n in range(new)]
            stored[user] += [{"item_id": i, "event": e, "ts": NOW - 5, "play_time": 1.0} for i, e in same]
            stored[user] += [{"item_id": 2000 + n, "event": "o", "ts": NOW - 9 - n, "play_time": 1.0}
                             for n in range(old)]
        load(client, table, stored)
        sent: list[int] = []
        real = redis.connection.AbstractConnection.send_packed_command

        def counting(self: Any, command: Any, check_health: bool = True) -> None:
            sent.append(1)
            real(self, command, check_health)

        # The same read first: the slot map and every connection it needs are there before counting.
        dao.read(["a", "b", "c", "d"], as_of=NOW)
        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
        a, b, c, d = rows = dao.read(["a", "b", "c", "d"], as_of=NOW)
        assert a is not None and b is not None and c is not None and d is not None
        assert list(zip(a["item_id"], a["event"], strict=True)) == [(1000, "z"), (300, "x"), (5, "y")]
        assert b["item_id"] == [7, -1] and c["item_id"] == [1000, 9, -1] and d["item_id"] == [3, 2, 1]
        for user, row in zip("abcd", rows, strict=True):
            assert row == expected(distinct(stored[user]), {**spec, "window_s": None}, NOW, prefix=""), user
        # Only the keys whose limit cuts a tie ("a", "d") cost a second round trip (one per node at most).
        if source.get("cluster"):
            assert len(sent) <= 3 + 2
        else:
            assert len(sent) == 2
    finally:
        runtime.close()


def test_appends_store_the_documented_members_once(store: tuple[dict[str, Any], Any]) -> None:
    source, client = store
    spec = {"time_field": "ts", "item_field": "item_id", "fields": FIELDS, "max_len": 10}
    runtime, dao, table = build(source, spec)
    try:
        evs = [("ü", {"item_id": 1, "event": "click", "ts": NOW - 5, "play_time": 1.5}),
               ("ü", {"item_id": 2, "ts": NOW - 1})]
        assert dao.append(evs) == 2
        assert dao.append(evs[:1]) == 1  # the same event again: the same member, nothing added
        stored = client.zrange(f"{table}:ü", 0, -1, withscores=True)
        assert [(msgpack.unpackb(m), s) for m, s in stored] == [([1, "click", NOW - 5, 1.5], NOW - 5),
                                                                ([2, "", NOW - 1, 0.0], NOW - 1)]
        assert dao.read(["ü"], as_of=NOW)[0] == {"item_id": [2, 1], "event": ["", "click"],
                                                  "ts": [NOW - 1, NOW - 5], "play_time": [0.0, 1.5]}
    finally:
        runtime.close()


def test_retain_trims_on_append(store: tuple[dict[str, Any], Any]) -> None:
    source, client = store
    spec = {"time_field": "ts", "time_unit": "ms", "fields": {"item_id": "int", "ts": "int"}, "max_len": 50,
            "retain": {"max_len": 5, "max_age_s": 10}}
    runtime, dao, table = build(source, spec, options={"ttl_s": 600})
    rk = f"{table}:u"

    def stored() -> list[int]:
        return [m[0] for m in map(msgpack.unpackb, client.zrevrange(rk, 0, -1))]

    try:
        ms = NOW * 1000
        dao.append(("u", {"item_id": i, "ts": ms - 1000 * i}) for i in range(3))
        dao.append([("u", {"item_id": 9, "ts": ms - 9_500})])
        # Older than the stored newest minus 10 s, but the age is counted from the newest event of the
        # append (documented): a late event stays until the key's next append.
        dao.append([("u", {"item_id": 20, "ts": ms - 20_000})])
        assert stored() == [0, 1, 2, 9, 20]
        dao.append([("u", {"item_id": 100, "ts": ms + 5000})])  # 10 s before it: ms - 5000
        assert stored() == [100, 0, 1, 2]
        dao.append(("u", {"item_id": 200 + i, "ts": ms + 5001 + i}) for i in range(3))  # at most 5
        assert stored() == [202, 201, 200, 100, 0]
        assert 0 < client.ttl(rk) <= 600
    finally:
        runtime.close()


def test_older_and_foreign_members(store: tuple[dict[str, Any], Any],
                                   caplog: pytest.LogCaptureFixture) -> None:
    source, client = store
    spec = {"time_field": "ts", "item_field": "item_id", "fields": FIELDS, "max_len": 10}
    runtime, dao, table = build(source, spec)
    try:
        older = msgpack.packb([1, "click", NOW - 3])  # written before play_time was added
        longer = msgpack.packb([2, "buy", NOW - 2, 1.0, "gone"])  # written before a last field was dropped
        client.zadd(f"{table}:u", {older: NOW - 3, longer: NOW - 2, b"not msgpack \xc1": NOW - 1,
                                   msgpack.packb({"a": 1}): NOW})
        row = dao.read(["u"], as_of=NOW)[0]
        assert row == {"item_id": [2, 1], "event": ["buy", "click"], "ts": [NOW - 2, NOW - 3],
                       "play_time": [1.0, 0.0]}
        assert "2 stored event(s) are not msgpack arrays" in caplog.text
    finally:
        runtime.close()


def test_wrongtype_and_layout_options(store: tuple[dict[str, Any], Any]) -> None:
    source, client = store
    spec = {"time_field": "ts", "fields": {"ts": "int"}}
    runtime, dao, table = build(source, spec)
    try:
        client.set(f"{table}:s", b"x")
        for call in (lambda: dao.read(["s"]), lambda: dao.append([("s", {"ts": 1})])):
            with pytest.raises(BackendQueryError) as info:
                call()
            assert "sorted set" in str(info.value) and f"{table}:s" not in str(info.value)
    finally:
        runtime.close()
    with pytest.raises(ConfigError, match="layout, encoding and delimiter do not apply"):
        build(source, spec, options={"layout": "string", "encoding": "msgpack"})


def test_raw_sequence_reader_reads_what_the_dao_reads(redis_server: RedisServer) -> None:
    source = {"type": "redis", "host": redis_server.host, "port": redis_server.port}
    # With a join, the view's features include the joined ones: the members hold the event fields only.
    spec = {"time_field": "ts", "item_field": "item_id", "fields": FIELDS, "max_len": 5, "window_s": 50,
            "join": {"view": "items", "features": ["category"]}}
    items = {"name": "items", "entity": "item", "source": "r", "table": f"items{secrets.token_hex(4)}",
             "key": "id", "key_type": "int", "features": {"category": "str"}}
    events_view = view(f"raw{secrets.token_hex(4)}", spec)
    runtime = factory.build({"sources": {"r": source}, "views": [events_view, items]})
    dao = runtime.daos["click_seq"]
    try:
        dao.append((u, {"item_id": i, "event": "e", "ts": NOW - 10 * i, "play_time": 0.5})
                   for u in ("a", "b") for i in range(9))
        raw = dao.raw_sequence_reader()
        assert raw is not None
        query = dao.sequence_query(NOW)
        for keys in (["b", "none", "a"], ["a"]):
            assert raw(keys, query) == list(dao.read(keys, as_of=NOW))
    finally:
        runtime.close()


def test_a_batch_costs_one_round_trip_per_chunk(store: tuple[dict[str, Any], Any],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    source, _ = store
    spec = {"time_field": "ts", "fields": {"n": "int", "ts": "int"}, "max_len": 2}
    # A long socket timeout: on a busy machine a timed-out connection would reconnect and send more.
    runtime, dao, _ = build({**source, "batch_size": 100, "pool_size": 1, "socket_timeout_ms": 10_000}, spec)
    try:
        users = [f"ü{i}" for i in range(250)]
        dao.append((u, {"n": i, "ts": NOW - j}) for i, u in enumerate(users) if i % 2 == 0 for j in range(3))
        # The same read first: the slot map and every connection it needs are there before counting.
        dao.read(users, as_of=NOW)
        sent: list[int] = []
        real = redis.connection.AbstractConnection.send_packed_command

        def counting(self: Any, command: Any, check_health: bool = True) -> None:
            sent.append(1)
            real(self, command, check_health)

        # The real driver still talks to the server; this only counts what it sends.
        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
        rows = dao.read(users, as_of=NOW)
        # Three chunks: one pipeline each on a server; one per chunk and node (3 masters) on the cluster.
        assert len(sent) == (9 if source.get("cluster") else 3)
        assert [r["n"] if r else None for r in rows] == [[i, i] if i % 2 == 0 else None for i in range(250)]
    finally:
        runtime.close()


@pytest.mark.redis_cluster
def test_a_failed_cluster_node_costs_only_its_keys(redis_cluster: RedisCluster) -> None:
    nodes = [f"{h}:{p}" for h, p in redis_cluster.startup_nodes]
    source = {"type": "redis", "cluster": True, "startup_nodes": nodes,
              "node_breaker": {"failure_threshold": 1, "reset_timeout_s": 600}}
    spec = {"time_field": "ts", "fields": {"n": "int", "ts": "int"}, "max_len": 3}
    runtime, dao, table = build(source, spec)
    try:
        users = [f"用户{i}" for i in range(60)]
        dao.append((u, {"n": i, "ts": NOW - i}) for i, u in enumerate(users))
        router = runtime.sources["r"].router()  # type: ignore[attr-defined]
        owner = router.slot_map().owner
        down = owner[key_slot(f"{table}:{users[0]}".encode())]
        router.breaker(down).failure()  # open: its keys fail fast, the others are read and written
        lost = [u for u in users if owner[key_slot(f"{table}:{u}".encode())] == down]
        assert 0 < len(lost) < len(users)
        result = dao.read_partial(users, as_of=NOW)
        assert sorted(result.failed) == sorted(lost) and isinstance(result.error, CircuitOpen)
        assert down in str(result.error)
        assert [r["n"] if r else None for r in result.rows] == \
            [None if u in lost else [i] for i, u in enumerate(users)]
        with pytest.raises(PartialWrite) as info:
            dao.append((u, {"n": 100 + i, "ts": NOW}) for i, u in enumerate(users))
        assert sorted(info.value.failed) == sorted(lost) and info.value.written == len(users) - len(lost)
        served = [u for u in users if u not in lost]
        assert [r["n"] if r else None for r in dao.read(served, as_of=NOW)] == \
            [[100 + users.index(u), users.index(u)] for u in served]
    finally:
        runtime.close()
