"""A gate that admits work until it is closed, counts what is in flight, and lets close wait for it.

Closing in the wrong order crashes drivers (SQLite frees a connection a statement still runs on), so
every owner of store resources closes the same way: refuse new work, interrupt what runs, wait for it
within a bound, and only then free anything.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from featuredao.errors import Closed


class Gate:
    """Admits work until closed; ``close`` waits (bounded) until the admitted work has left."""

    __slots__ = ("_cond", "_in_flight", "_what", "closed")

    def __init__(self, what: str) -> None:
        self._what = what
        self._cond = threading.Condition(threading.Lock())
        self._in_flight = 0
        self.closed = False

    def enter(self) -> None:
        """Admit one unit of work; raise Closed once the gate is closed."""
        with self._cond:
            if self.closed:
                raise Closed(f"{self._what} is closed")
            self._in_flight += 1

    def leave(self) -> None:
        """The admitted unit of work has ended."""
        with self._cond:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._cond.notify_all()

    @contextmanager
    def admit(self) -> Iterator[None]:
        """``enter`` for the duration of a block."""
        self.enter()
        try:
            yield
        finally:
            self.leave()

    def shut(self) -> bool:
        """Stop admitting work; True only for the first call (the one that must finish the close)."""
        with self._cond:
            first = not self.closed
            self.closed = True
            return first

    def drain(self, timeout_s: float) -> int:
        """Wait until nothing admitted is in flight, at most ``timeout_s``; return how much still is."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._in_flight > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._in_flight

    @property
    def in_flight(self) -> int:
        """Units of work admitted and not yet ended."""
        with self._cond:
            return self._in_flight
