"""Exceptions raised by featuredao.

Every driver exception is translated into one of these at the adapter boundary and raised
``from`` the original, so callers never need to import a driver to handle failures::

    FeatureDaoError
    ├── ConfigError                  invalid configuration (names each JSON path at fault)
    ├── Closed                       the service or source was closed; no work is admitted
    ├── BackendError                 a store failed; carries ``source`` and ``view``
    │   ├── BackendUnavailable       connection refused/reset, server down: worth a fallback
    │   │   ├── BackendTimeout       the store did not answer within the time left
    │   │   ├── CircuitOpen          failing fast: the source's breaker is open
    │   │   └── Overloaded           our own pool had no connection in time: load, not a store
    │   │                            failure (never counts toward the breaker)
    │   ├── BackendQueryError        the store rejected the query (missing table/column, bad type)
    │   └── BackendAuthError         the store rejected our credentials
    └── FetchError                   strict mode: a fetch had degraded parts
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from featuredao.types import Degraded, Reason


class FeatureDaoError(Exception):
    """Base class of every featuredao exception."""


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
