"""The Hologres adapter's asyncio reads (psycopg's ``AsyncConnection``, an ``AsyncConnectionPool`` per
running event loop) and the session time limit both read paths set the same way.

A read runs in a task of its own that the caller waits for: when the caller is cancelled at its deadline,
the read is left to end by itself (its ``statement_timeout`` ends it on the server about then) and gives
its connection back in order. Cancelling psycopg's wait instead would make it ask the server to cancel and
wait for that, seconds on a frozen server, before the caller could go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol, Self

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ._per_loop import PerLoop

SET_TIMEOUT = "SELECT set_config('statement_timeout', %s, true)"
SET_SESSION_TIMEOUT = "SELECT set_config('statement_timeout', %s, false)"
RESET_TIMEOUT = "RESET statement_timeout"


class QuietStops(logging.Filter):
    """Drops psycopg_pool's "couldn't stop thread/task" for our pools' workers.

    Closing a source bounds its own wait and leaves workers stuck on a dead server to die with it;
    the source's close says so once. A filter (not a level set around each close) holds while several
    sources close at once, and leaves other pools' messages alone.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (text.startswith("couldn't stop") and "'featuredao-" in text)


logging.getLogger("psycopg.pool").addFilter(QuietStops())
UNKNOWN = -1
"""A connection's session limit after a failed read: set it again before relying on it."""


def limit_ms(left: float | None, per_call: bool) -> int | None:
    """The ``statement_timeout`` of a read with ``left`` seconds to go: whole ms, rounded up (None: the
    connect-time default)."""
    return None if left is None or not per_call else max(1, math.ceil(left * 1000))


def limit_statement(want: int | None) -> tuple[str, tuple[str, ...] | None]:
    """The statement that gives the session the limit ``want`` (None: back to the connect-time default)."""
    return (RESET_TIMEOUT, None) if want is None else (SET_SESSION_TIMEOUT, (str(want),))


class PgSource(Protocol):
    """What the asyncio reads use of ``HologresSource``."""

    name: str
    options: Any

    @property
    def closed(self) -> bool: ...
    def connected(self, error: BaseException | None) -> None: ...
    def getconn_wait(self, left: float) -> float: ...
    def no_connection(self, exc: BaseException, deadline: float) -> None: ...
    def busy(self, conn: Any, running: bool) -> None: ...

AsyncPool = AsyncConnectionPool[psycopg.AsyncConnection[Any]]


def async_pools(source: PgSource, connect_kwargs: Callable[[], dict[str, Any]],
                reconnect_timeout_s: float) -> PerLoop[AsyncPool]:
    """The per-loop asyncio pools of ``source``: ``pool_size`` connections each, made as the thread path's."""

    class RecordingAsyncConnection(psycopg.AsyncConnection[Any]):
        """Remembers how the pool's last connection attempt went, for fail-fast reads."""

        session_limit_ms: int | None = None
        """The ``statement_timeout`` a read set for the session (None: the connect-time default)."""
        made: weakref.WeakSet[psycopg.AsyncConnection[Any]]
        """The connections of this class's pool (one class per pool), closed with it."""

        @classmethod
        async def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
            try:
                conn = await super().connect(conninfo, **kwargs)
            except Exception as exc:
                source.connected(exc)
                raise
            source.connected(None)
            cls.made.add(conn)
            return conn

    async def make() -> AsyncPool:
        made = type("RecordingAsyncConnection", (RecordingAsyncConnection,), {"made": weakref.WeakSet()})
        # Connections are opened as reads need them (a loop may live for one request: asyncio.run).
        pool: AsyncPool = AsyncConnectionPool(
            connection_class=made, kwargs=connect_kwargs, min_size=0, max_size=source.options.pool_size,
            open=False, name=f"featuredao-{source.name}-asyncio", reconnect_timeout=reconnect_timeout_s)
        await pool.open(wait=False)
        return pool

    async def close(pool: AsyncPool) -> None:
        # Workers stuck on a dead server are left to die with it (QuietStops), as the thread path's are.
        # At the loop's end asyncio.run cancelled the pool's workers first, and the pool's wait for them
        # raises before it closes its idle connections: they are closed below.
        with contextlib.suppress(asyncio.CancelledError):
            await pool.close(timeout=0.1)
        for conn in list(getattr(pool.connection_class, "made", ())):
            await conn.close()

    return PerLoop(source.name, make, close)


class AsyncReads:
    """``HologresSource.fetch`` on the running loop."""

    def __init__(self, source: PgSource, pools: PerLoop[AsyncPool]) -> None:
        self._source = source
        self._pools = pools
        self._detached: set[asyncio.Future[Any]] = set()

    async def fetch(self, sql: str, params: Sequence[Any], timeout_s: float | None) -> list[Any]:
        """Run one read statement with the time limit ``timeout_s`` on the server; return its rows."""
        task = asyncio.ensure_future(self._fetch(sql, params, timeout_s))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self._detached.add(task)
            task.add_done_callback(self._forget)
            raise

    def close(self) -> None:
        """Close every loop's pool (best effort, without waiting)."""
        self._pools.close()

    def _forget(self, task: asyncio.Future[Any]) -> None:
        self._detached.discard(task)
        if not task.cancelled():
            task.exception()  # a detached read's failure was the caller's timeout: nobody waits for it

    async def _fetch(self, sql: str, params: Sequence[Any], timeout_s: float | None) -> list[Any]:
        source = self._source
        per_call = source.options.per_call_timeout
        pool = await self._pools.get()
        wait = source.options.connect_timeout_ms / 1000 if timeout_s is None else timeout_s
        started = time.monotonic()
        deadline = None if timeout_s is None else started + timeout_s
        for attempt in (0, 1):
            conn = await self._getconn(pool, started + wait)
            left = None if deadline is None else deadline - time.monotonic()
            want = limit_ms(left, per_call)
            source.busy(conn, True)
            try:
                async with conn.cursor(binary=True) as cur:
                    if getattr(conn, "session_limit_ms", None) == want:
                        await cur.execute(sql, params)  # the session already runs with this limit
                        return await cur.fetchall()
                    try:
                        # One round trip: the limit and the read share the pipeline's implicit transaction.
                        async with conn.pipeline():
                            await conn.execute(*limit_statement(want))
                            await cur.execute(sql, params)
                    except BaseException:
                        conn.session_limit_ms = UNKNOWN  # type: ignore[attr-defined]
                        raise
                    conn.session_limit_ms = want  # type: ignore[attr-defined]
                    return await cur.fetchall()
            except psycopg.OperationalError:
                if attempt or source.closed or not conn.broken:  # closing: no retry
                    raise
            finally:
                source.busy(conn, False)
                await pool.putconn(conn)  # the pool discards a broken connection and opens a new one
            # A pooled connection died (server restarted): drop the dead idle ones, try once more.
            await pool.check()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _getconn(self, pool: AsyncPool, deadline: float) -> psycopg.AsyncConnection[Any]:
        while True:
            try:
                return await pool.getconn(timeout=self._source.getconn_wait(deadline - time.monotonic()))
            except PoolTimeout as exc:
                self._source.no_connection(exc, deadline)
