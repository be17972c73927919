"""Driver objects bound to one asyncio event loop (an asyncio client, an async pool): one per running loop.

redis-py's and psycopg's asyncio connections belong to the loop that opened them, so a source keeps one
object per loop. Each has a guard task on its loop that closes it when cancelled: ``asyncio.run`` cancels
every task of the loop when its main coroutine ends, and waits for them; a pool with tasks of its own
(psycopg_pool's workers survive a cancelled connection attempt) must be closed within that wait, or the
loop never ends. ``Source.close()`` cancels the guards too; an object of a loop that closed without
cancelling its tasks is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from featuredao.errors import Closed

log = logging.getLogger("featuredao")

T = TypeVar("T")


class _Entry(Generic[T]):
    """One loop's object and the generator that closes it when the loop shuts down."""

    __slots__ = ("closing", "guard", "value")

    def __init__(self, value: T) -> None:
        self.value = value
        self.guard: asyncio.Task[None] | None = None
        self.closing = False


class PerLoop(Generic[T]):
    """One ``T`` per running event loop, made on first use there and closed with the loop or the source."""

    def __init__(self, name: str, make: Callable[[], Awaitable[T]],
                 close: Callable[[T], Awaitable[None]]) -> None:
        self._name = name
        self._make = make
        self._close = close
        self._lock = threading.Lock()
        self._entries: dict[asyncio.AbstractEventLoop, _Entry[T]] = {}
        self._closed = False

    async def get(self) -> T:
        """The running loop's object (made on first use)."""
        loop = asyncio.get_running_loop()
        entry = self._entries.get(loop)
        if entry is not None:
            return entry.value
        value = await self._make()
        with self._lock:
            known = None if self._closed else self._entries.get(loop)
            if known is None and not self._closed:
                # Loops that closed without cancelling their tasks: their objects are dropped (their
                # sockets close when collected; nothing can run on a closed loop).
                for old in [lp for lp in self._entries if lp.is_closed()]:
                    del self._entries[old]
                entry = self._entries[loop] = _Entry(value)
                entry.guard = loop.create_task(self._guard(loop, entry), name=f"featuredao-{self._name}")
        if entry is None:
            await self._close(value)  # another task of this loop made one first, or the source closed
            if known is None:
                raise Closed(f"source {self._name!r} is closed")
            return known.value
        return value

    async def _guard(self, loop: asyncio.AbstractEventLoop, entry: _Entry[T]) -> None:
        try:
            await loop.create_future()  # until cancelled: the loop is ending, or the source closed
        finally:
            with self._lock:
                if self._entries.get(loop) is entry:
                    del self._entries[loop]
            await self._shut(entry)

    async def _shut(self, entry: _Entry[T]) -> None:
        if entry.closing:
            return
        entry.closing = True
        try:
            await self._close(entry.value)
        except Exception:  # best effort: the loop or its connections may be going away
            log.debug("closing an asyncio client of source %s failed", self._name, exc_info=True)

    def close(self) -> None:
        """Close every loop's object: on its own loop, without waiting (best effort); refuse new ones."""
        with self._lock:
            self._closed = True
            entries, self._entries = list(self._entries.items()), {}
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        for loop, entry in entries:
            guard = entry.guard
            if loop.is_closed() or guard is None:
                continue
            if loop is here:
                guard.cancel()
            else:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(guard.cancel)
