"""The HTTP API of ``featuredao serve``: Starlette routes over the worker's active FeatureService.

Routes: ``POST /v1/fetch``, ``POST /v1/views/{name}``, ``GET /v1/config``, ``GET /healthz`` (alive, never
behind the token), ``GET /readyz`` and ``GET /metrics``. Responses are JSON encoded with orjson. A
caller's mistake is a 400 (413 for a body over the limit) ``{"error", "field", "kind"}`` naming the
field; a store failure the service could not degrade (strict mode) is a 503; nothing a caller sends
yields a 500 or a traceback.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from featuredao.errors import ArgumentTypeError, BackendError, Closed, FetchError, UnknownView, UsageError
from featuredao.server.metrics import ServerMetrics, exposition
from featuredao.server.protocol import (
    ApiError,
    RequestShape,
    caller_error,
    decode,
    fetch_body,
    parse_fetch,
    parse_view,
    view_body,
)
from featuredao.server.reload import Active, ServiceHolder
from featuredao.server.settings import ServeSettings

log = logging.getLogger("featuredao.server")

ROUTES = ("/healthz", "/readyz", "/metrics", "/v1/config", "/v1/fetch")
OPEN_ROUTES = frozenset({"/healthz"})
JSON = "application/json"


def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, default=str)


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response encoded with orjson (NaN and infinities become null)."""
    return Response(_dumps(obj), status, headers, media_type=JSON)


def service_error(exc: Exception, shape: RequestShape, *, view: str | None = None) -> ApiError:
    """A featuredao exception as the API answers it: the caller's (400) or the stores' (503)."""
    if isinstance(exc, UsageError | ArgumentTypeError | UnknownView):
        return caller_error(exc, shape, view=view)
    if isinstance(exc, FetchError):
        return ApiError(str(exc), None, status=503, kind="degraded",
                        extra={"degraded": [d.to_dict() for d in exc.degraded]})
    if isinstance(exc, Closed):
        return ApiError("the service is shutting down; retry", None, status=503, kind="unavailable")
    if isinstance(exc, BackendError):
        return ApiError(str(exc), None, status=503, kind="unavailable")
    raise exc


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past ``limit`` bytes without reading the rest."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise ApiError("invalid Content-Length header", "body") from None
        if declared > limit:
            raise ApiError(f"the body is {declared} bytes, more than the limit of {limit}", "body",
                           status=413, kind="too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(f"the body is more than the limit of {limit} bytes", "body", status=413,
                           kind="too_large")
        chunks.append(chunk)
    return b"".join(chunks)


Handler = Callable[[Request], Awaitable[Response]]


def guarded(handler: Handler) -> Handler:
    """Answer ApiError as JSON; an unexpected exception is a 500 without details (logged with its trace)."""
    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return json_response(exc.body(), exc.status)
        except Exception:
            log.exception("unexpected error answering %s %s", request.method, request.url.path)
            return json_response({"error": "internal error", "field": None, "kind": "internal"}, 500)
    return run


class Api:
    """The route handlers of one worker, over its ServiceHolder."""

    def __init__(self, holder: ServiceHolder, settings: ServeSettings) -> None:
        self.holder = holder
        self.settings = settings
        self.pid = os.getpid()

    async def fetch(self, request: Request) -> Response:
        doc = decode(await read_body(request, self.settings.max_body_bytes))
        with self.holder.use() as active:
            args = parse_fetch(doc, active.shape, self.settings.max_keys)
            try:
                result = await active.service.afetch(
                    args.user_id, args.item_ids, context=args.context, keys=args.keys, scene=args.scene,
                    deadline_ms=args.deadline_ms, strict=args.strict)
            except Exception as exc:
                raise service_error(exc, active.shape) from None
            return json_response(fetch_body(result, active.hash))

    async def view(self, request: Request) -> Response:
        name = request.path_params["name"]
        doc = decode(await read_body(request, self.settings.max_body_bytes))
        args = parse_view(doc, self.settings.max_keys)
        with self.holder.use() as active:
            if name not in active.shape.view_entity:
                raise ApiError(f"unknown view {name!r}; known: {', '.join(active.shape.view_entity)}",
                               "view", kind="unknown_view")
            try:
                batch = await run_in_threadpool(active.service.read_view, name, args.keys, args.features,
                                                timeout_s=args.timeout_s)
            except Exception as exc:
                raise service_error(exc, active.shape, view=name) from None
            return json_response(view_body(batch, active.hash))

    async def config(self, request: Request) -> Response:
        with self.holder.use() as active:
            return json_response(config_body(active, self.settings))

    async def healthz(self, request: Request) -> Response:
        return json_response({"status": "ok", "worker": self.pid})

    async def readyz(self, request: Request) -> Response:
        with self.holder.use() as active:
            reports = await run_in_threadpool(active.service.health, 2.0)
            sources = []
            for h in reports:
                entry: dict[str, Any] = {"source": h.source, "type": h.type, "ok": h.ok,
                                         "breaker": h.breaker, "latency_ms": round(h.latency_ms, 2)}
                if h.error:
                    entry["error"] = h.error.split(":", 1)[0]  # the kind only: a message may hold a host
                sources.append(entry)
            not_ready = [h.source for h in reports if not h.ok or h.breaker != "closed"]
            body = {"ready": not not_ready, "not_ready": not_ready, "sources": sources, "config": active.hash}
            return json_response(body, 503 if not_ready else 200)

    async def metrics(self, request: Request) -> Response:
        data, content_type = await run_in_threadpool(exposition)
        return Response(data, media_type=content_type)


def config_body(active: Active, settings: ServeSettings) -> dict[str, Any]:
    """The active config without any source option (hosts, credentials): hash, views, scenes, context."""
    service = active.service
    runtime = service.runtime
    kinds = {n: s.type for n, s in runtime.config.sources.items()} if runtime is not None else {}
    views = {}
    for name in service.views():
        v = service.view(name)
        views[name] = {"entity": v.entity, "key": v.key, "key_type": v.key_type, "source": v.source,
                       "source_type": kinds.get(v.source), "served": name in service.daos,
                       "features": {f: t.value for f, t in v.features.items()}, "prefix": v.prefix,
                       "timeout_ms": v.timeout_ms, "fallback": list(v.fallback), "key_from": list(v.key_from)}
    return {
        "config": active.hash,
        "loaded_at": active.loaded_at,
        "views": views,
        "scenes": {n: {"views": s.views, "deadline_ms": s.deadline_ms} for n, s in service.scenes.items()},
        "context": {n: {"type": c.type.value, "default": c.default}
                    for n, c in service.context_features.items()},
        "entities": list(active.shape.entities),
        "derived": [{"name": d.name, "entity": d.entity, "op": str(d.op)} for d in service.derived],
        "service": {"deadline_ms": service.settings.deadline_ms, "strict": service.settings.strict,
                    "max_keys_per_request": min(service.settings.max_keys_per_request, settings.max_keys)},
        "limits": {"max_body_bytes": settings.max_body_bytes, "max_keys": settings.max_keys},
    }


def route_of(path: str) -> str:
    """The route a path belongs to (a bounded label set for metrics)."""
    if path in ROUTES:
        return path
    return "/v1/views/{name}" if path.startswith("/v1/views/") else "other"


class Gatekeeper:
    """Pure ASGI middleware: the bearer token on every route but /healthz, and per-route metrics."""

    def __init__(self, app: ASGIApp, token: str | None, metrics: ServerMetrics) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.metrics = metrics

    def _authorized(self, scope: Scope) -> bool:
        assert self.token is not None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.token)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path: str = scope["path"]
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.token is not None and path not in OPEN_ROUTES and not self._authorized(scope):
                response = json_response({"error": "missing or wrong bearer token", "field": None,
                                          "kind": "unauthorized"}, 401,
                                         {"www-authenticate": 'Bearer realm="featuredao"'})
                await response(scope, receive, sending)
                return
            await self.app(scope, receive, sending)
        finally:
            self.metrics.request(route_of(path), status, time.perf_counter() - started)


async def _not_found(request: Request, exc: Exception) -> Response:
    return json_response({"error": f"no route {request.url.path}", "field": None, "kind": "not_found"}, 404)


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
    return json_response({"error": detail, "field": None, "kind": "http"}, status)


def create_app(holder: ServiceHolder, settings: ServeSettings, token: str | None = None,
               metrics: ServerMetrics | None = None) -> ASGIApp:
    """The ASGI application of one worker."""
    api = Api(holder, settings)
    routes = [
        Route("/v1/fetch", guarded(api.fetch), methods=["POST"]),
        Route("/v1/views/{name}", guarded(api.view), methods=["POST"]),
        Route("/v1/config", guarded(api.config), methods=["GET"]),
        Route("/healthz", guarded(api.healthz), methods=["GET"]),
        Route("/readyz", guarded(api.readyz), methods=["GET"]),
        Route("/metrics", guarded(api.metrics), methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: _not_found, HTTPException: _http_error})
    return Gatekeeper(app, token, metrics or ServerMetrics())
