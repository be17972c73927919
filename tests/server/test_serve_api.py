"""The HTTP API of a real ``featuredao serve`` process: every route, scenes, bad input, the client."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from servehelp import ITEMS, STATS, Served, metric

from featuredao import FeatureService, UnknownView, UsageError
from featuredao.client import FeatureClient, RequestRejected

pytestmark = [pytest.mark.serve, pytest.mark.redis]

REQUEST = {"user_id": "u1", "item_ids": [3, 1, 99], "keys": {"shop": "s9"}, "context": {"hour": 9}}


def post(server: Served, path: str, body: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}{path}", content=content, timeout=5.0)


def item_row(i: int) -> dict[str, Any]:
    return {**ITEMS[i], "s_ctr": STATS[i]["ctr"], "s_clicks": STATS[i]["clicks"]}


def test_fetch_merges_every_view_in_item_order(api_server: Served, seeded_config: Path) -> None:
    response = post(api_server, "/v1/fetch", REQUEST)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["user"] == {"u_age": 31, "u_city": "paris"}
    assert body["items"] == [item_row(3), item_row(1),
                             {"price": 0.0, "category": None, "tags": None, "s_ctr": 0.0, "s_clicks": 0}]
    assert body["entities"] == {"shop": {"shop_rating": 4.5}}
    assert body["context"] == {"hour": 9, "device": "unknown"}
    assert body["missing"] == {"items": [99], "item_stats": [99]}
    assert body["degraded"] == []
    assert body["config"] == httpx.get(f"{api_server.url}/v1/config").json()["config"]

    # The same request on the embedded service answers the same.
    with FeatureService.from_config(seeded_config) as service:
        embedded = service.fetch("u1", [3, 1, 99], keys={"shop": "s9"}, context={"hour": 9})
    assert (body["user"], body["items"], body["entities"], body["context"], body["missing"]) == \
        (embedded.user, embedded.items, embedded.entities, embedded.context, embedded.missing)


def test_health_readiness_metrics_and_config_routes(api_server: Served) -> None:
    health = httpx.get(f"{api_server.url}/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"

    ready = httpx.get(f"{api_server.url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True
    assert {s["source"]: (s["ok"], s["breaker"]) for s in ready.json()["sources"]} == \
        {"local": (True, "closed"), "cache": (True, "closed")}

    post(api_server, "/v1/fetch", REQUEST)
    metrics = httpx.get(f"{api_server.url}/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert metric(metrics.text, "featuredao_http_requests_total", route="/v1/fetch", code="200") >= 1
    assert metric(metrics.text, "featuredao_requests_total", view="item_stats") >= 1
    assert "featuredao_config_reloads_total" in metrics.text

    config = httpx.get(f"{api_server.url}/v1/config")
    assert config.status_code == 200
    doc = config.json()
    assert len(doc["config"]) == 16
    assert set(doc["views"]) == {"users", "items", "item_stats", "shops"}
    assert doc["views"]["item_stats"]["source_type"] == "redis"
    assert doc["views"]["items"]["features"] == {"price": "float", "category": "str", "tags": "list[str]"}
    assert doc["scenes"]["home"] == {"views": ["users", "items"], "deadline_ms": 500}
    assert doc["context"]["hour"] == {"type": "int", "default": 0}
    assert doc["entities"] == ["shop"]
    # No source option (hosts, ports, paths, credentials) ever leaves the server.
    assert "features.db" not in config.text and '"host"' not in config.text and '"port"' not in config.text


def test_view_route_reads_one_view(api_server: Served) -> None:
    response = post(api_server, "/v1/views/item_stats", {"keys": [2, 99, "4"]})
    assert response.status_code == 200
    assert response.json()["rows"] == [STATS[2], None, STATS[4]]
    projected = post(api_server, "/v1/views/items", {"keys": [5], "features": ["price"]})
    assert projected.json()["rows"] == [{"price": 5.5}]
    unknown_feature = post(api_server, "/v1/views/items", {"keys": [5], "features": ["colour"]})
    assert unknown_feature.status_code == 400 and unknown_feature.json()["field"] == "features"


def test_scenes_read_only_their_views(api_server: Served) -> None:
    home = post(api_server, "/v1/fetch", {**REQUEST, "scene": "home", "keys": None}).json()
    assert home["user"] == {"u_age": 31, "u_city": "paris"}
    assert home["items"][0] == ITEMS[3]  # no item_stats in this scene
    ranking = post(api_server, "/v1/fetch", {"user_id": "u1", "item_ids": [3], "scene": "ranking"}).json()
    assert ranking["user"] == {}
    assert ranking["items"] == [item_row(3)]
    unknown = post(api_server, "/v1/fetch", {"scene": "checkout"})
    assert unknown.status_code == 400
    assert unknown.json()["field"] == "scene" and "home, ranking" in unknown.json()["error"]


BAD_FETCH_BODIES = [
    (b"{not json", "body"),
    (b"", "body"),
    (b"[1, 2]", "body"),
    (b'"text"', "body"),
    (b'{"item_ids": "123"}', "item_ids"),
    (b'{"item_ids": {"a": 1}}', "item_ids"),
    (b'{"item_ids": [1, [2]]}', "item_ids[1]"),
    (b'{"item_ids": [1, null]}', "item_ids[1]"),
    (b'{"item_ids": [true]}', "item_ids[0]"),
    (b'{"user_id": {"a": 1}}', "user_id"),
    (b'{"user_id": false}', "user_id"),
    (b'{"scene": 5}', "scene"),
    (b'{"scene": "nope"}', "scene"),
    (b'{"context": [1]}', "context"),
    (b'{"context": {"weather": "rain"}}', "context.weather"),
    (b'{"keys": "s9"}', "keys"),
    (b'{"keys": {"planet": "x"}}', "keys.planet"),
    (b'{"keys": {"shop": [1]}}', "keys.shop"),
    (b'{"deadline_ms": -5}', "deadline_ms"),
    (b'{"deadline_ms": 0}', "deadline_ms"),
    (b'{"deadline_ms": "fast"}', "deadline_ms"),
    (b'{"strict": "yes"}', "strict"),
    (b'{"colour": 1}', "colour"),
    (json.dumps({"item_ids": list(range(51))}).encode(), "item_ids"),  # --max-keys 50
]


@pytest.mark.parametrize(("body", "field"), BAD_FETCH_BODIES,
                         ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD_FETCH_BODIES)])
def test_bad_fetch_bodies_are_400_naming_the_field(api_server: Served, body: bytes, field: str) -> None:
    response = post(api_server, "/v1/fetch", body)
    assert response.status_code == 400, response.text
    answer = response.json()
    assert answer["field"] == field
    assert isinstance(answer["error"], str) and answer["error"]
    assert "Traceback" not in response.text


BAD_VIEW_REQUESTS = [
    ("/v1/views/items", b"{}", "keys"),
    ("/v1/views/items", b'{"keys": 5}', "keys"),
    ("/v1/views/items", b'{"keys": [1, {}]}', "keys[1]"),
    ("/v1/views/items", b'{"keys": [1], "features": "price"}', "features"),
    ("/v1/views/items", b'{"keys": [1], "features": [1]}', "features[0]"),
    ("/v1/views/items", b'{"keys": [1], "columns": []}', "columns"),
    ("/v1/views/nope", b'{"keys": [1]}', "view"),
]


@pytest.mark.parametrize(("path", "body", "field"), BAD_VIEW_REQUESTS)
def test_bad_view_requests_are_400_naming_the_field(api_server: Served, path: str, body: bytes,
                                                    field: str) -> None:
    response = post(api_server, path, body)
    assert response.status_code == 400, response.text
    assert response.json()["field"] == field


def test_limits_and_unknown_routes(api_server: Served) -> None:
    big = post(api_server, "/v1/fetch", {"user_id": "u1", "context": {"device": "x" * 5000}})
    assert big.status_code == 413 and big.json()["field"] == "body"
    chunked = httpx.post(f"{api_server.url}/v1/fetch", content=iter([b'{"user_id": "', b"x" * 5000, b'"}']))
    assert chunked.status_code == 413
    missing = httpx.get(f"{api_server.url}/v2/anything")
    assert missing.status_code == 404 and missing.json()["kind"] == "not_found"
    wrong_method = httpx.get(f"{api_server.url}/v1/fetch")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    # The server still answers after all of it.
    assert post(api_server, "/v1/fetch", REQUEST).status_code == 200


def test_invalid_keys_degrade_or_are_refused_in_strict_mode(api_server: Served) -> None:
    lenient = post(api_server, "/v1/fetch", {"user_id": "u1", "item_ids": ["abc", 1, 2.5]})
    assert lenient.status_code == 200
    body = lenient.json()
    assert body["items"][1] == item_row(1)
    assert body["items"][0]["price"] == 0.0 and body["items"][2]["price"] == 0.0
    assert {d["reason"] for d in body["degraded"]} == {"invalid_key"}

    strict = post(api_server, "/v1/fetch", {"user_id": "u1", "item_ids": ["abc", 1], "strict": True})
    assert strict.status_code == 400
    answer = strict.json()
    assert answer["field"] == "item_ids" and answer["kind"] == "invalid_key"
    assert "'abc'" in answer["keys"]["items"]


def test_client_returns_the_embedded_result_type(api_server: Served, seeded_config: Path) -> None:
    with FeatureService.from_config(seeded_config) as service:
        embedded = service.fetch("u1", [3, 1, 99], keys={"shop": "s9"}, context={"hour": 9})
    with FeatureClient(api_server.url, timeout_s=2.0) as client:
        remote = client.fetch("u1", [3, 1, 99], keys={"shop": "s9"}, context={"hour": 9})
        assert type(remote) is type(embedded)
        assert remote.item_ids == [3, 1, 99]
        assert (remote.user, remote.items, remote.entities, remote.context, remote.missing) == \
            (embedded.user, embedded.items, embedded.entities, embedded.context, embedded.missing)
        assert remote.items_by_id()[3] == item_row(3)
        assert client.config == httpx.get(f"{api_server.url}/v1/config").json()["config"]
        # One connection, reused.
        for _ in range(5):
            client.fetch("u2", [1])
        assert client._sync is not None
        rows = client.read_view("item_stats", [2, 99])
        assert list(rows) == [STATS[2], None]

        with pytest.raises(RequestRejected) as rejected:
            client.fetch("u1", [1], scene="checkout")
        assert rejected.value.field == "scene" and isinstance(rejected.value, UsageError)
        with pytest.raises(UnknownView):
            client.read_view("nope", [1])

    async def concurrently() -> list[Any]:
        async with FeatureClient(api_server.url, timeout_s=2.0) as aclient:
            return await asyncio.gather(*(aclient.afetch("u1", [i, i + 1]) for i in range(1, 11)))

    results = asyncio.run(concurrently())
    assert [r.items for r in results] == [[item_row(i), item_row(i + 1)] for i in range(1, 11)]
