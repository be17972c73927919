"""Gates and slots: how much work is admitted, and when it may no longer be.

A :class:`Gate` admits work until it is closed, counts what is in flight, and lets close wait for it;
:class:`Slots` bound how many requests run at once, shared by threads and coroutines.

Closing in the wrong order crashes drivers (SQLite frees a connection a statement still runs on), so
every owner of store resources closes the same way (:func:`shut_down`): refuse new work, interrupt what
runs, wait for it within a bound, and only then free anything. Owners close together
(:func:`close_together`): several frozen stores cost one bound, not one each.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING

from featuredao.deadline import Deadline
from featuredao.errors import Closed

if TYPE_CHECKING:  # asyncio is imported where a loop runs: at import it costs start-up ~10%
    import asyncio

log = logging.getLogger("featuredao")


class Gate:
    """Admits work until closed; ``close`` waits (bounded) until the admitted work has left."""

    __slots__ = ("_cond", "_in_flight", "_lock", "_what", "closed")

    def __init__(self, what: str) -> None:
        self._what = what
        # Entered on every read: the plain lock (a C call), the condition only where close waits on it.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._in_flight = 0
        self.closed = False

    def enter(self) -> None:
        """Admit one unit of work; raise Closed once the gate is closed."""
        with self._lock:
            if self.closed:
                raise Closed(f"{self._what} is closed")
            self._in_flight += 1

    def leave(self) -> None:
        """The admitted unit of work has ended."""
        with self._lock:
            self._in_flight -= 1
            if self._in_flight == 0 and self.closed:  # only drain() waits, and only once closed
                self._cond.notify_all()

    def admit(self) -> Gate:
        """``enter`` for the duration of a ``with`` block."""
        return self

    def __enter__(self) -> None:
        self.enter()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
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


def shut_down(gate: Gate, what: str, interrupt: Callable[[], None], free: Callable[[bool], None],
              timeout_s: float) -> None:
    """Refuse new work, interrupt what runs, wait for it at most ``timeout_s``, then ``free(all_ended)``.

    Only the first call does it (idempotent, thread-safe). Work that outlives the bound keeps what it
    holds: ``free`` is told, and frees only what is idle.
    """
    if not gate.shut():
        return
    try:
        interrupt()
    except Exception:  # interrupting is best effort: the wait below still bounds the close
        log.exception("interrupting the work of %s failed", what)
    left = gate.drain(timeout_s)
    if left:
        log.warning("%s: %d operation(s) still running after %.1f s; their connections are closed when "
                    "they end", what, left, timeout_s)
    free(not left)


def close_together(closers: Mapping[str, Callable[[], None]], timeout_s: float) -> list[str]:
    """Run every close at once, each on a daemon thread, and wait for them at most ``timeout_s`` in all.

    Returns the names still closing then: they end on their own (a pool's workers stuck on a frozen
    server), and nobody waits for them. A close that raises is logged; the others go on.
    """
    def run(name: str, close: Callable[[], None]) -> None:
        try:
            close()
        except Exception:  # closing must go on for the others
            log.exception("closing %s failed", name)

    threads = {name: threading.Thread(target=run, args=(name, close), daemon=True,
                                      name=f"featuredao-close-{name}") for name, close in closers.items()}
    for thread in threads.values():
        thread.start()
    deadline = Deadline.after(timeout_s)
    for thread in threads.values():
        thread.join(deadline.remaining())
    late = [name for name, thread in threads.items() if thread.is_alive()]
    if late:
        log.info("still closing after %.1f s, left to end on their own: %s", timeout_s, ", ".join(late))
    return late


class _Waiter:
    __slots__ = ("event", "future", "granted", "loop")

    def __init__(self, event: threading.Event | None = None, loop: asyncio.AbstractEventLoop | None = None,
                 future: asyncio.Future[None] | None = None) -> None:
        self.event = event
        self.loop = loop
        self.future = future
        self.granted = False

    def wake(self) -> None:
        if self.event is not None:
            self.event.set()
        elif self.loop is not None and self.future is not None:
            self.loop.call_soon_threadsafe(_resolve, self.future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Slots:
    """A counting semaphore that threads and coroutines share, first come first served.

    A thread waits on an event, a coroutine on a future of its own loop (the loop keeps running); a
    released slot goes straight to the oldest waiter, so no one polls and no one jumps the queue.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = size
        self._lock = threading.Lock()
        self._waiters: deque[_Waiter] = deque()

    def _take(self) -> bool:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    def acquire(self, timeout_s: float) -> bool:
        """Take a slot, waiting at most ``timeout_s``; False if none came free in time."""
        with self._lock:
            if self._take():
                return True
            waiter = _Waiter(event=threading.Event())
            self._waiters.append(waiter)
        assert waiter.event is not None
        waiter.event.wait(max(0.0, timeout_s))
        return self._settle(waiter)

    async def acquire_async(self, timeout_s: float) -> bool:
        """``acquire`` for a coroutine: the event loop runs on while it waits."""
        import asyncio
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._take():
                return True
            waiter = _Waiter(loop=loop, future=loop.create_future())
            self._waiters.append(waiter)
        assert waiter.future is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiter.future), max(0.0, timeout_s))
        return self._settle(waiter)

    def _settle(self, waiter: _Waiter) -> bool:
        with self._lock:
            if waiter.granted:
                return True
            self._waiters.remove(waiter)  # timed out before a slot reached it
            return False

    def release(self) -> None:
        """Give a slot back: to the oldest waiter if there is one."""
        with self._lock:
            if self._waiters:
                waiter = self._waiters.popleft()
                waiter.granted = True
                waiter.wake()
                return
            self._free += 1
