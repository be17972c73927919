"""``FeatureClient``: the Python client of ``featuredao serve``, returning what the embedded service does.

    client = FeatureClient("http://127.0.0.1:8080", token=os.environ.get("FEATUREDAO_TOKEN"))
    result = client.fetch("u42", [17, 4, 99], scene="home")      # a FetchResult, as FeatureService.fetch
    result = await client.afetch("u42", [17, 4, 99])             # asyncio (one AsyncClient per client)

Connections are kept alive and reused (one ``httpx.Client`` and, once used, one ``httpx.AsyncClient``
per FeatureClient); every call has the client's own timeout. Errors are featuredao's own: the server's
400s as ``UsageError`` (``RequestRejected``, with the ``field`` at fault), ``UnknownView``,
``ArgumentTypeError`` or ``InvalidKeyError``; strict-mode failures as ``FetchError``; a server that is
down, late or overloaded as ``BackendUnavailable`` / ``BackendTimeout``; a refused token as
``BackendAuthError``. Needs the ``server`` extra (httpx, orjson).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx
import orjson

from featuredao.errors import (
    ArgumentTypeError,
    BackendAuthError,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    FetchError,
    InvalidKeyError,
    UnknownView,
    UsageError,
)
from featuredao.service import FetchResult
from featuredao.types import BatchResult, Degraded, Key, Reason

__all__ = ["FeatureClient", "RequestRejected"]


class RequestRejected(UsageError):
    """The server refused the request as the caller's mistake (HTTP 400 or 413); ``field`` names it."""

    def __init__(self, message: str, field: str | None = None, status: int = 400) -> None:
        super().__init__(message if field is None else f"{message} (field: {field})")
        self.field = field
        self.status = status


def _degraded(entries: Iterable[Mapping[str, Any]]) -> list[Degraded]:
    out = []
    for d in entries:
        try:
            reason = Reason(d.get("reason", "error"))
        except ValueError:
            reason = Reason.ERROR
        out.append(Degraded(str(d.get("view", "")), reason, str(d.get("detail", "")),
                            tuple(d.get("keys") or ()), d.get("feature")))
    return out


def _view_path(view: str) -> str:
    return f"/v1/views/{quote(view, safe='')}"


class FeatureClient:
    """A client of one ``featuredao serve`` (any of its workers: they share the port)."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 1.0, *,
                 max_connections: int = 100) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.config: str | None = None
        """The config hash the server answered the last fetch with."""
        headers = {"content-type": "application/json", "accept": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self._headers = headers
        self._limits = httpx.Limits(max_connections=max_connections,
                                    max_keepalive_connections=max_connections)
        self._sync: httpx.Client | None = None
        self._async: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        return f"FeatureClient({self.url!r}, timeout_s={self.timeout_s})"  # never the token

    # -- requests ----------------------------------------------------------------------------
    @staticmethod
    def _fetch_body(user_id: Key | None, item_ids: Iterable[Key], context: Mapping[str, Any] | None,
                    keys: Mapping[str, Key] | None, scene: str | None, deadline_ms: float | None,
                    strict: bool | None) -> tuple[list[Key], bytes]:
        if isinstance(item_ids, str | bytes | bytearray):
            raise ArgumentTypeError("item_ids must be a sequence of ids, not one str or bytes "
                                    f"(got {item_ids[:40]!r})")
        items = list(item_ids)
        body: dict[str, Any] = {"user_id": user_id, "item_ids": items}
        for name, value in (("context", context), ("keys", keys), ("scene", scene),
                            ("deadline_ms", deadline_ms), ("strict", strict)):
            if value is not None:
                body[name] = dict(value) if isinstance(value, Mapping) else value
        return items, orjson.dumps(body)

    def _result(self, response: httpx.Response, user_id: Key | None, items: list[Key]) -> FetchResult:
        doc = self._answer(response)
        self.config = doc.get("config")
        return FetchResult(user_id if user_id is not None else "", doc.get("user") or {}, items,
                           doc.get("items") or [], _degraded(doc.get("degraded") or ()),
                           response.elapsed.total_seconds(), doc.get("entities") or {},
                           doc.get("context") or {}, doc.get("missing") or {})

    def _batch(self, response: httpx.Response, keys: list[Key]) -> BatchResult:
        doc = self._answer(response)
        return BatchResult(keys, doc.get("rows") or [], _degraded(doc.get("degraded") or ()),
                           response.elapsed.total_seconds())

    def _answer(self, response: httpx.Response) -> dict[str, Any]:
        """The JSON answer of a 200; any other status as featuredao's exception."""
        try:
            doc = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            doc = None
        status = response.status_code
        if status == 200 and isinstance(doc, dict):
            return doc
        if not isinstance(doc, dict):
            raise BackendError(f"the feature server answered HTTP {status} without a JSON object",
                               source=self.url)
        message = str(doc.get("error", f"HTTP {status}"))
        kind = doc.get("kind")
        if status in (400, 413):
            if kind == "unknown_view":
                raise UnknownView(message)
            if kind == "argument_type":
                raise ArgumentTypeError(message)
            if kind == "invalid_key" and isinstance(doc.get("keys"), dict):
                raise InvalidKeyError({str(v): [str(k) for k in ks] for v, ks in doc["keys"].items()})
            raise RequestRejected(message, doc.get("field"), status)
        if status == 401:
            raise BackendAuthError("the feature server refused the token", source=self.url)
        if status == 503 and kind == "degraded":
            raise FetchError(_degraded(doc.get("degraded") or ()))
        if status == 503:
            raise BackendUnavailable(f"the feature server is unavailable: {message}", source=self.url)
        raise BackendError(f"the feature server answered HTTP {status}: {message}", source=self.url)

    def _failed(self, exc: httpx.HTTPError) -> BackendError:
        if isinstance(exc, httpx.TimeoutException):
            return BackendTimeout(f"no answer from the feature server within {self.timeout_s:.3f} s",
                                  source=self.url)
        return BackendUnavailable(f"cannot reach the feature server: {type(exc).__name__}: {exc}",
                                  source=self.url)

    # -- sync ------------------------------------------------------------------------------
    def _client(self) -> httpx.Client:
        if self._sync is None:
            self._sync = httpx.Client(base_url=self.url, headers=self._headers, timeout=self.timeout_s,
                                      limits=self._limits)
        return self._sync

    def _post(self, path: str, body: bytes) -> httpx.Response:
        try:
            return self._client().post(path, content=body)
        except httpx.HTTPError as exc:
            raise self._failed(exc) from exc

    def fetch(self, user_id: Key | None, item_ids: Iterable[Key] = (), *,
              context: Mapping[str, Any] | None = None, keys: Mapping[str, Key] | None = None,
              scene: str | None = None, deadline_ms: float | None = None,
              strict: bool | None = None) -> FetchResult:
        """``FeatureService.fetch`` over HTTP: the same arguments, the same FetchResult."""
        items, body = self._fetch_body(user_id, item_ids, context, keys, scene, deadline_ms, strict)
        return self._result(self._post("/v1/fetch", body), user_id, items)

    def read_view(self, view: str, keys: Sequence[Key], features: Sequence[str] | None = None, *,
                  deadline_ms: float | None = None) -> BatchResult:
        """One view's rows aligned with ``keys`` (None: missing), as ``FeatureService.read_view``."""
        wanted = list(keys)
        response = self._post(_view_path(view), self._view_body(wanted, features, deadline_ms))
        return self._batch(response, wanted)

    def server_config(self) -> dict[str, Any]:
        """``GET /v1/config``: the active config's hash, views, scenes and context."""
        try:
            return self._answer(self._client().get("/v1/config"))
        except httpx.HTTPError as exc:
            raise self._failed(exc) from exc

    @staticmethod
    def _view_body(keys: list[Key], features: Sequence[str] | None, deadline_ms: float | None) -> bytes:
        body: dict[str, Any] = {"keys": keys}
        if features is not None:
            body["features"] = list(features)
        if deadline_ms is not None:
            body["deadline_ms"] = deadline_ms
        return orjson.dumps(body)

    # -- async -----------------------------------------------------------------------------
    def _aclient(self) -> httpx.AsyncClient:
        if self._async is None:
            self._async = httpx.AsyncClient(base_url=self.url, headers=self._headers,
                                            timeout=self.timeout_s, limits=self._limits)
        return self._async

    async def _apost(self, path: str, body: bytes) -> httpx.Response:
        try:
            return await self._aclient().post(path, content=body)
        except httpx.HTTPError as exc:
            raise self._failed(exc) from exc

    async def afetch(self, user_id: Key | None, item_ids: Iterable[Key] = (), *,
                     context: Mapping[str, Any] | None = None, keys: Mapping[str, Key] | None = None,
                     scene: str | None = None, deadline_ms: float | None = None,
                     strict: bool | None = None) -> FetchResult:
        """``FeatureService.afetch`` over HTTP (asyncio; the client's AsyncClient is bound to one loop)."""
        items, body = self._fetch_body(user_id, item_ids, context, keys, scene, deadline_ms, strict)
        return self._result(await self._apost("/v1/fetch", body), user_id, items)

    async def aread_view(self, view: str, keys: Sequence[Key], features: Sequence[str] | None = None, *,
                         deadline_ms: float | None = None) -> BatchResult:
        """``read_view`` for asyncio."""
        wanted = list(keys)
        response = await self._apost(_view_path(view), self._view_body(wanted, features, deadline_ms))
        return self._batch(response, wanted)

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Close the sync client's connections (an AsyncClient needs ``await aclose()``)."""
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    async def aclose(self) -> None:
        """Close every connection, sync and async."""
        self.close()
        if self._async is not None:
            await self._async.aclose()
            self._async = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
