"""The JSON of the HTTP API: request bodies checked field by field, results shaped for the wire.

Every problem with a request is an :class:`ApiError` naming the field at fault (``item_ids[3]``,
``context.hour``, ``scene``), so a ranker in any language learns what to fix from the answer alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from featuredao.errors import ArgumentTypeError, InvalidKeyError, UnknownView, UsageError
from featuredao.service import REQUEST_TIME, FeatureService, FetchResult
from featuredao.types import BatchResult, Key

FETCH_FIELDS = ("scene", "user_id", "item_ids", "keys", "context", "deadline_ms", "strict")
VIEW_FIELDS = ("keys", "features", "deadline_ms")


class ApiError(Exception):
    """A request the server refuses: HTTP status, message, the field at fault and a short kind."""

    def __init__(self, message: str, field: str | None = None, *, status: int = 400, kind: str = "usage",
                 extra: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = status
        self.kind = kind
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        """The JSON answer: ``{"error", "field", "kind", ...}``."""
        return {"error": self.message, "field": self.field, "kind": self.kind, **self.extra}


@dataclass(frozen=True, slots=True)
class RequestShape:
    """What the active service accepts: scenes, context names, entities, and each view's entity."""

    scenes: tuple[str, ...]
    context: tuple[str, ...]
    entities: tuple[str, ...]
    """Request-level entities other than ``user`` and ``item`` (the names ``keys`` takes)."""
    view_entity: dict[str, str]
    keyed_by_features: frozenset[str]
    """Views whose keys come from other views' features (``key_from``), not from the request."""

    @classmethod
    def of(cls, service: FeatureService) -> RequestShape:
        views = {name: service.view(name) for name in service.views()}
        entities = {views[name].entity for name in service.daos} - {"user", "item"}
        return cls(tuple(service.scenes), tuple(service.context_features), tuple(sorted(entities)),
                   {name: v.entity for name, v in views.items()},
                   frozenset(name for name, v in views.items() if v.key_from))


class FetchArgs(NamedTuple):
    """A checked ``POST /v1/fetch`` body, as ``FeatureService.afetch`` takes it."""

    user_id: Key | None
    item_ids: list[Key]
    keys: dict[str, Key] | None
    context: dict[str, Any] | None
    scene: str | None
    deadline_ms: float | None
    strict: bool | None


class ViewArgs(NamedTuple):
    """A checked ``POST /v1/views/{name}`` body."""

    keys: list[Key]
    features: list[str] | None
    timeout_s: float | None


def decode(body: bytes) -> dict[str, Any]:
    """The body as a JSON object (anything else is a 400 naming ``body``)."""
    if not body.strip():
        raise ApiError("the request body is empty: send a JSON object", "body")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(f"malformed JSON: {exc}", "body") from None
    if not isinstance(doc, dict):
        raise ApiError(f"the body must be a JSON object, not {_kind(doc)}", "body")
    return doc


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _is_key(value: Any) -> bool:
    """A JSON value of a type a key may have: text or a number (whether it fits a view is the view's
    business: a key that cannot be one is answered missing, or refused in strict mode)."""
    return isinstance(value, str | int | float) and not isinstance(value, bool)


def _unknown_fields(doc: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    for name in doc:
        if name not in allowed:
            raise ApiError(f"unknown field {name!r}; allowed: {', '.join(allowed)}", name)


def _keys(value: Any, field: str, max_keys: int, *, required: bool = False) -> list[Key]:
    if value is None:
        if required:
            raise ApiError(f"{field} is required: an array of keys", field)
        return []
    if not isinstance(value, list):
        raise ApiError(f"{field} must be an array of keys, not {_kind(value)}", field)
    if len(value) > max_keys:
        raise ApiError(f"{len(value)} keys is more than the limit of {max_keys} per request", field)
    for i, key in enumerate(value):
        if not _is_key(key):
            raise ApiError(f"a key must be a string or a number, not {_kind(key)}", f"{field}[{i}]")
    return value


def _deadline(value: Any, field: str = "deadline_ms") -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value <= 0:
        raise ApiError(f"{field} must be a positive number of milliseconds", field)
    return float(value)


def _known(names: tuple[str, ...], none: str) -> str:
    return ", ".join(names) or none


def parse_fetch(doc: Mapping[str, Any], shape: RequestShape, max_keys: int) -> FetchArgs:
    """Check a fetch body against the active config; raise ApiError naming the first field at fault."""
    _unknown_fields(doc, FETCH_FIELDS)
    scene = doc.get("scene")
    if scene is not None:
        if not isinstance(scene, str):
            raise ApiError(f"scene must be a string, not {_kind(scene)}", "scene")
        if scene not in shape.scenes:
            raise ApiError(f"unknown scene {scene!r}; known: {_known(shape.scenes, 'none configured')}",
                           "scene")
    user_id = doc.get("user_id")
    if user_id is not None and not _is_key(user_id):
        raise ApiError(f"user_id must be a string or a number, not {_kind(user_id)}", "user_id")
    item_ids = _keys(doc.get("item_ids"), "item_ids", max_keys)
    keys = doc.get("keys")
    if keys is not None:
        if not isinstance(keys, dict):
            raise ApiError(f"keys must be an object of entity -> key, not {_kind(keys)}", "keys")
        for entity, key in keys.items():
            if entity not in shape.entities:
                raise ApiError(f"no view serves entity {entity!r}; entities: "
                               f"{_known(shape.entities, 'none')}", f"keys.{entity}")
            if not _is_key(key):
                raise ApiError(f"a key must be a string or a number, not {_kind(key)}", f"keys.{entity}")
    context = doc.get("context")
    if context is not None:
        if not isinstance(context, dict):
            raise ApiError(f"context must be an object of name -> value, not {_kind(context)}", "context")
        for name, value in context.items():
            if name == REQUEST_TIME and name not in shape.context:
                # Always accepted (where sequence windows end): epoch seconds.
                if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                    raise ApiError(f"request_time must be epoch seconds (a number), not {_kind(value)}",
                                   f"context.{name}")
            elif name not in shape.context:
                raise ApiError(f"unknown context feature {name!r}; known: "
                               f"{_known(shape.context, 'none declared')}", f"context.{name}")
    strict = doc.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ApiError(f"strict must be true or false, not {_kind(strict)}", "strict")
    return FetchArgs(user_id, item_ids, keys, context, scene, _deadline(doc.get("deadline_ms")), strict)


def parse_view(doc: Mapping[str, Any], max_keys: int) -> ViewArgs:
    """Check a view-read body: ``keys`` (required), ``features`` and ``deadline_ms`` (optional)."""
    _unknown_fields(doc, VIEW_FIELDS)
    keys = _keys(doc.get("keys"), "keys", max_keys, required=True)
    features = doc.get("features")
    if features is not None:
        if not isinstance(features, list):
            raise ApiError(f"features must be an array of names, not {_kind(features)}", "features")
        for i, name in enumerate(features):
            if not isinstance(name, str):
                raise ApiError(f"a feature name must be a string, not {_kind(name)}", f"features[{i}]")
    deadline = _deadline(doc.get("deadline_ms"))
    return ViewArgs(keys, features, None if deadline is None else deadline / 1000.0)


def caller_error(exc: UsageError | ArgumentTypeError | UnknownView, shape: RequestShape,
                 *, view: str | None = None) -> ApiError:
    """A caller's error the service raised, as a 400 naming the field (the checks above catch most)."""
    if isinstance(exc, InvalidKeyError):
        fields = {_key_field(name, shape) for name in exc.keys}
        field = fields.pop() if len(fields) == 1 else None
        return ApiError(str(exc), field, kind="invalid_key", extra={"keys": exc.keys})
    if isinstance(exc, UnknownView):
        return ApiError(str(exc), "view", kind="unknown_view")
    if isinstance(exc, ArgumentTypeError):
        return ApiError(str(exc), None, kind="argument_type")
    text = str(exc)
    if view is not None:
        return ApiError(text, "features" if "feature" in text else "keys")
    field = next((name for words, name in _SERVICE_CHECKS if words in text), None)
    return ApiError(text, field)


_SERVICE_CHECKS = (("unknown scene", "scene"), ("unknown context", "context"), ("deadline_ms", "deadline_ms"),
                   ("unknown entities", "keys"), ("item ids", "item_ids"))
"""FeatureService's own argument checks, by words of their messages: ``parse_fetch`` catches these
first, and this names the field should one get through (a lower ``max_keys_per_request``, say)."""


def _key_field(view: str, shape: RequestShape) -> str | None:
    """Where the keys of a view came from in the request (None: from stored features)."""
    if view in shape.keyed_by_features:
        return None
    entity = shape.view_entity.get(view)
    if entity == "user":
        return "user_id"
    if entity == "item":
        return "item_ids"
    return None if entity is None else f"keys.{entity}"


def fetch_body(result: FetchResult, config: str) -> dict[str, Any]:
    """A FetchResult for the wire: items as a list aligned with the request's item_ids."""
    out: dict[str, Any] = {"user": result.user, "items": result.items}
    if result.entities:
        out["entities"] = result.entities
    if result.context:
        out["context"] = result.context
    out["degraded"] = [d.to_dict() for d in result.degraded]
    out["missing"] = result.missing
    out["config"] = config
    return out


def view_body(batch: BatchResult, config: str) -> dict[str, Any]:
    """One view's rows aligned with the keys asked (null: missing), and what was degraded."""
    return {"rows": batch.rows, "degraded": [d.to_dict() for d in batch.degraded], "config": config}
