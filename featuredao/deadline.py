"""One deadline per request: an absolute instant every layer below the entry point shares.

As httpx settles a request's timeouts once, at the top, and hands the same value down to the transport,
``fetch`` makes one :class:`Deadline` when it is entered and every layer under it (cache, resilience,
the batch work, the adapter call) asks it for the time left instead of restarting a relative timeout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Deadline:
    """An instant on ``time.perf_counter``'s clock that work must end by (``at`` None: no bound)."""

    at: float | None

    @classmethod
    def after(cls, seconds: float | None, *, start: float | None = None) -> Deadline:
        """The instant ``seconds`` after ``start`` (default: now); None seconds: no bound."""
        if seconds is None:
            return _NONE
        return cls((time.perf_counter() if start is None else start) + seconds)

    @classmethod
    def none(cls) -> Deadline:
        """No bound: ``remaining()`` is None and it never expires."""
        return _NONE

    @classmethod
    def of(cls, deadline: Deadline | None, timeout_s: float | None) -> Deadline:
        """A public read's one deadline: the one given, else ``timeout_s`` from now."""
        return deadline if deadline is not None else cls.after(timeout_s)

    def remaining(self) -> float | None:
        """Seconds left, never negative (None: no bound); what a driver call is given as its timeout."""
        return None if self.at is None else max(0.0, self.at - time.perf_counter())

    @property
    def expired(self) -> bool:
        """True once the instant has passed."""
        return self.at is not None and time.perf_counter() >= self.at

    def within(self, seconds: float | None) -> Deadline:
        """The earlier of this deadline and ``seconds`` from now (a share of the time, e.g. a primary's)."""
        if seconds is None:
            return self
        own = time.perf_counter() + seconds
        return self if self.at is not None and self.at <= own else Deadline(own)

    def __repr__(self) -> str:
        left = self.remaining()
        return "Deadline(none)" if left is None else f"Deadline({left * 1000:.1f} ms left)"


_NONE = Deadline(None)
