"""Recommender semantics end to end on real servers: items on MariaDB, their categories and a user x item
cross view on Redis (keyed by features and by a composite key), context, derived features, freshness;
every value checked against the rows read back with the raw drivers."""

from __future__ import annotations

import math
import time
from typing import Any

import msgpack
import pymysql
import pytest
import redis

from featuredao import FeatureService, build
from featuredao.testing.servers import MariaDbServer, RedisServer

pytestmark = [pytest.mark.mysql, pytest.mark.redis]
NOW = time.time()


def config(db: MariaDbServer, rd: RedisServer) -> dict[str, Any]:
    packed = {"layout": "string", "encoding": "msgpack"}
    cfg: dict[str, Any] = {
        "sources": {
            "sql": {"type": "mysql", "host": db.host, "port": db.port, "user": db.user,
                    "password": db.password, "database": db.database},
            "kv": {"type": "redis", "host": rd.host, "port": rd.port},
        },
        "views": [
            {"name": "items", "entity": "item", "source": "sql", "table": "sem_items", "key": "item_id",
             "key_type": "int", "features": {"category_id": "int", "price": "float", "updated_at": "float"},
             "freshness": {"field": "updated_at", "max_age_s": 3600}},
            {"name": "categories", "entity": "item", "source": "kv", "table": "sem_cat", "key": "id",
             "key_type": "int", "key_from": "item.category_id", "features": {"name": "str", "ctr": "float"},
             "prefix": "cat_", "options": packed},
            {"name": "user_item", "entity": "item", "source": "kv", "table": "sem_ui", "key": "id",
             "key_from": ["user.user_id", "item.item_id"], "features": {"clicks": "int"}, "prefix": "ui_",
             "defaults": {"clicks": 0}, "options": packed},
        ],
        "context": {"hour": {"type": "int", "default": 0}},
        "derived": [
            {"name": "log_price", "entity": "item", "op": "log1p", "input": "price", "default": 0.0},
            {"name": "cat_x_hour", "entity": "item", "op": "cross", "inputs": ["cat_name", "context.hour"]},
        ],
        "service": {"deadline_ms": 2000},
    }
    for view in cfg["views"]:  # this test is about values, not deadlines: a cold first read may be slow
        view["timeout_ms"] = 2000
    return cfg


def test_stages_context_derived_and_freshness_match_the_raw_rows(mariadb_server: MariaDbServer,
                                                                 redis_server: RedisServer) -> None:
    cfg = config(mariadb_server, redis_server)
    runtime = build(cfg)
    try:
        for dao in runtime.daos.values():
            dao.prepare()
        runtime.daos["items"].upsert([
            (1, {"category_id": 10, "price": 2.5, "updated_at": NOW}),
            (2, {"category_id": 20, "price": 8.0, "updated_at": NOW}),
            (3, {"category_id": 10, "price": 1.0, "updated_at": NOW - 86400}),  # too old
        ])
        runtime.daos["categories"].upsert([(10, {"name": "books", "ctr": 0.1}),
                                           (20, {"name": "toys", "ctr": 0.3})])
        runtime.daos["user_item"].upsert([("u7_2", {"clicks": 4})])
    finally:
        runtime.close()

    with FeatureService.from_config(cfg) as service:
        result = service.fetch("u7", [1, 2, 3, 4], context={"hour": 21})

    conn = pymysql.connect(host=mariadb_server.host, port=mariadb_server.port, user=mariadb_server.user,
                           password=mariadb_server.password, database=mariadb_server.database)
    with conn.cursor() as cur:
        cur.execute("SELECT item_id, category_id, price FROM sem_items")
        items = {r[0]: (r[1], r[2]) for r in cur.fetchall()}
    conn.close()
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    categories = {k: msgpack.unpackb(client.get(f"sem_cat:{k}")) for k in (10, 20)}
    clicks = msgpack.unpackb(client.get("sem_ui:u7_2"))["clicks"]
    client.close()

    first, second, old, unknown = result.items
    assert (first["category_id"], first["price"]) == items[1]
    assert first["cat_name"] == categories[10]["name"] and first["cat_ctr"] == categories[10]["ctr"]
    assert first["ui_clicks"] == 0 and second["ui_clicks"] == clicks
    assert second["cat_name"] == categories[20]["name"]
    assert first["log_price"] == math.log1p(items[1][1]) and first["cat_x_hour"] == "books_21"
    assert old["price"] is None and old["cat_name"] is None  # stale: missing, its category not read
    assert unknown["price"] is None and unknown["ui_clicks"] == 0
    assert result.context == {"hour": 21}
    # The cross view is keyed by the request's own ids: it reads u7_3 and u7_4 whatever the item rows hold.
    assert result.missing == {"items": [3, 4], "user_item": ["u7_1", "u7_3", "u7_4"]}
    assert [d.reason.value for d in result.degraded] == ["stale"]
