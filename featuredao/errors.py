"""Exceptions raised by featuredao, and the reasons a part of a result is degraded.

Every driver exception is translated into one of these at the adapter boundary (one context manager,
``Source.operation``) and raised ``from`` the original, so callers never need to import a driver to
handle failures. Every exception featuredao raises on purpose is a ``FeatureDaoError``::

    FeatureDaoError
    ├── UsageError (ValueError)      the caller asked for something the view cannot do
    │   ├── CoercionError            a value that cannot be turned into its declared type
    │   └── InvalidKeyError          strict mode: keys that cannot be keys of their view
    ├── ArgumentTypeError (TypeError)  an argument of the wrong kind
    ├── UnknownView (KeyError)       no view of that name
    ├── UnknownAdapter (LookupError) no adapter of that type installed
    ├── Unsupported (NotImplementedError)  the adapter lacks the capability
    ├── Closed                       the service or source was closed; no work is admitted
    ├── ConfigError                  invalid configuration (names each JSON path at fault)
    ├── BackendError                 a store failed; carries ``source`` and ``view``
    │   ├── BackendUnavailable       connection refused/reset, server down: worth a fallback
    │   │   ├── BackendTimeout       the store did not answer within the time left
    │   │   ├── CircuitOpen          failing fast: the source's breaker is open
    │   │   └── Overloaded           our own pool had no connection in time: load, not a store
    │   │                            failure (never counts toward the breaker)
    │   ├── BackendQueryError        the store rejected the query (missing table/column, bad type)
    │   └── BackendAuthError         the store rejected our credentials
    └── FetchError                   strict mode: a fetch had degraded parts

A leaf module: it imports nothing of featuredao.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class FeatureDaoError(Exception):
    """Base class of every featuredao exception."""


class UsageError(FeatureDaoError, ValueError):
    """The caller asked for something the view cannot give (an unknown feature, a bad argument)."""


class CoercionError(UsageError):
    """A value that cannot be turned into its declared type."""


class ArgumentTypeError(FeatureDaoError, TypeError):
    """An argument of the wrong kind (item ids given as one string, say)."""


class InvalidKeyError(UsageError):
    """Strict mode: keys that cannot be keys of their view (``keys`` by view, as shown)."""

    def __init__(self, keys: dict[str, list[str]]) -> None:
        self.keys = keys
        parts = "; ".join(f"view {view!r}: {', '.join(shown)}" for view, shown in keys.items())
        super().__init__(f"invalid keys: {parts}")


class UnknownView(FeatureDaoError, KeyError):
    """No view of that name is configured."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""  # KeyError would show the repr


class UnknownAdapter(FeatureDaoError, LookupError):
    """No adapter of that type is installed (or it cannot be imported)."""


class Unsupported(FeatureDaoError, NotImplementedError):
    """The adapter lacks the capability an operation needs."""


class Reason(StrEnum):
    """Why part of a result is degraded."""

    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"
    QUERY_ERROR = "query_error"
    CIRCUIT_OPEN = "circuit_open"
    OVERLOADED = "overloaded"
    CLOSED = "closed"
    COERCION = "coercion"
    INVALID_KEY = "invalid_key"
    DERIVE_ERROR = "derive_error"
    ROW_ERROR = "row_error"
    FALLBACK = "fallback"
    STALE = "stale"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Degraded:
    """One part of a result that was not served as stored: which view, why, and for which keys."""

    view: str
    reason: Reason
    detail: str = ""
    keys: tuple[str | int, ...] = ()
    """Keys (``featuredao.types.Key``) the entry is about; empty: every key of the view."""
    feature: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        out: dict[str, Any] = {"view": self.view, "reason": self.reason.value, "detail": self.detail}
        if self.keys:
            out["keys"] = list(self.keys)
        if self.feature is not None:
            out["feature"] = self.feature
        return out





@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a configuration: where it is, what was found, and what is wrong."""

    path: str
    message: str
    value: str | None = None

    def __str__(self) -> str:
        shown = "" if self.value is None else f" (got {self.value})"
        return f"{self.path}: {self.message}{shown}"


class Closed(FeatureDaoError):
    """The service or source was closed: it admits no more work."""


class ConfigError(FeatureDaoError):
    """The configuration is invalid; ``issues`` lists every problem found."""

    def __init__(self, issues: Sequence[ConfigIssue] | str) -> None:
        self.issues: list[ConfigIssue] = (
            [ConfigIssue("$", issues)] if isinstance(issues, str) else list(issues)
        )
        n = len(self.issues)
        head = f"invalid configuration ({n} problem{'s' if n != 1 else ''}):"
        super().__init__("\n".join([head, *(f"  - {i}" for i in self.issues)]))


class BackendError(FeatureDaoError):
    """A store failed to serve a request."""

    def __init__(self, message: str, *, source: str | None = None, view: str | None = None) -> None:
        self.source = source
        self.view = view
        where = ", ".join(f"{k}={v!r}" for k, v in (("source", source), ("view", view)) if v)
        super().__init__(f"{message} [{where}]" if where else message)


class BackendUnavailable(BackendError):
    """The store could not be reached or dropped the connection."""


class BackendTimeout(BackendUnavailable):
    """The store did not answer within the time left."""


class CircuitOpen(BackendUnavailable):
    """The source's circuit breaker is open; the call was not attempted."""


class Overloaded(BackendUnavailable):
    """No connection of featuredao's own pool came free in time: load, not a failure of the store."""


class BackendQueryError(BackendError):
    """The store rejected the query (missing table or column, type mismatch)."""


class BackendAuthError(BackendError):
    """The store rejected the credentials."""


class FetchError(FeatureDaoError):
    """Raised in strict mode when any part of a fetch was degraded."""

    def __init__(self, degraded: Sequence[Degraded]) -> None:
        self.degraded = list(degraded)
        parts = "; ".join(f"{d.view}: {d.reason.value} {d.detail}".strip() for d in self.degraded)
        super().__init__(f"fetch degraded: {parts}")


def reason_of(exc: BaseException) -> Reason:
    """What a degraded entry says about a part that failed with ``exc``."""
    for kind, reason in ((CircuitOpen, Reason.CIRCUIT_OPEN), (Overloaded, Reason.OVERLOADED),
                         (BackendTimeout, Reason.TIMEOUT), (BackendUnavailable, Reason.UNAVAILABLE),
                         (BackendQueryError, Reason.QUERY_ERROR), (Closed, Reason.CLOSED)):
        if isinstance(exc, kind):
            return reason
    return Reason.ERROR
