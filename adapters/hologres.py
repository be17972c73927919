"""The Hologres adapter (psycopg 3 + psycopg_pool): PostgreSQL wire protocol, tested on PostgreSQL 15.

Reads send one ``WHERE key = ANY(%s)`` statement per chunk: the key list is a single array
parameter, so the statement text is the same for every batch and psycopg prepares it on the server
after a few uses (``prepare_threshold``). Results come back in binary format.

What this relies on, all of which Hologres documents as supported: the extended query protocol
with server-side prepared statements and pipelining (one Sync per read), ``= ANY(array)``,
``INSERT ... ON CONFLICT DO UPDATE``, arrays of bigint/double precision/text (lists in wide tables),
``timestamptz`` with ``DEFAULT now()`` (tall tables with an event time), the ``statement_timeout``
setting (startup ``options`` and ``set_config``).

PostgreSQL-specific choices, noted for Hologres:

* Per-call time limits: a read runs with ``statement_timeout`` = the caller's time left (whole ms,
  rounded up). A connection remembers the limit it last set for its session
  (``SELECT set_config('statement_timeout', <ms>, false)``, pipelined with the read: one round trip);
  a read needing the same limit (the common case: a view's fixed timeout) sends its statement alone,
  which saves the pipeline's cost (about 0.15 ms a read). Any other work on the connection (writes,
  DDL, reads without a deadline) first returns it to the connect-time default (``RESET``), and a failed
  read forgets what it set (a failed transaction rolls the setting back). If an instance refuses
  ``set_config``, set ``per_call_timeout: false``: the session limit ``read_timeout_ms`` (given at
  connect time) still cancels runaway statements on the server.
* ``prepare()`` creates a plain table. On Hologres a row-oriented table (``CALL
  set_table_property('<table>', 'orientation', 'row')``) serves key lookups best; create it
  yourself when that matters.
* A server that stops answering without closing the socket (hung, frozen) holds the calling thread
  until TCP gives up: libpq has no per-statement client timeout. The core's chunk deadline still
  returns control to the caller when a read is split over several chunks.
* ``afetch`` reads on the event loop with psycopg's ``AsyncConnection`` (an ``AsyncConnectionPool`` per
  running loop, :mod:`._pg_async`): the same statement, session limit and decoding; the caller returns
  at its deadline, a frozen server or not, and the read it gave up ends by itself.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, Self, TypeVar

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout
from pydantic import Field

from featuredao.config import View
from featuredao.dao import Capabilities
from featuredao.errors import (
    BackendAuthError,
    BackendError,
    BackendQueryError,
    BackendTimeout,
    BackendUnavailable,
    Closed,
    Overloaded,
)

from ._hologres_feed import FeedBatch, FeedGap, SlotFeedDao, first_line
from ._pg_async import RESET_TIMEOUT as _RESET_TIMEOUT
from ._pg_async import UNKNOWN as _UNKNOWN
from ._pg_async import AsyncReads, PgSource, async_pools, limit_ms, limit_statement
from ._sql import SqlSource
from ._sql_dialect import POSTGRES, SqlSourceOptions

__all__ = ["FeedBatch", "FeedGap", "HologresDao", "HologresOptions", "HologresSource"]

_T = TypeVar("_T")
_POLL_S = 0.05
"""While the server refuses connections, how often a waiting read looks at the last connect error."""


class HologresOptions(SqlSourceOptions):
    """Source options of the hologres adapter."""

    port: int = Field(default=80, ge=1, le=65535)  # Hologres endpoints listen on 80
    batch_size: int = Field(default=600, ge=1, le=10000)
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = "prefer"
    application_name: str = Field(default="featuredao", pattern=r"^[A-Za-z0-9_.-]{1,63}$")
    per_call_timeout: bool = True
    """Cancel a read on the server when the caller's time runs out (see the module docstring)."""
    prepare_threshold: int | None = Field(default=5, ge=0)
    """Executions of a statement before psycopg prepares it on the server (null: never)."""
    options: str | None = Field(default=None, max_length=4096, pattern=r"^[^\x00\n\r]*$")
    """Session settings passed to libpq's ``options`` at connect time, e.g. ``"-c search_path=features
    -c work_mem=64MB"``; they come after the adapter's own ``-c statement_timeout=...`` and so win."""
    feed_timeout_ms: int = Field(default=60000, gt=0)
    """Longest one change-feed read (decoding the slot's WAL) may run, enforced on the server."""


class HologresSource(SqlSource):
    """One Hologres (or PostgreSQL) database reached through a psycopg_pool connection pool."""

    type_name = "hologres"
    driver_modules = {"psycopg": "psycopg", "psycopg_pool": "psycopg-pool"}
    options_model = HologresOptions
    dialect = POSTGRES
    capabilities = Capabilities(server_timeout=True, scan=True, changes=True, delete=True, change_feed=True,
                                state=True, sequences=True, sequence_filters=True, async_reads=True,
                                grouped_reads=True)
    default_batch_size = 600
    error_map = (
        (psycopg.errors.QueryCanceled, BackendTimeout),
        (PoolTimeout, BackendTimeout),
        (psycopg.errors.InvalidAuthorizationSpecification, BackendAuthError),
        (psycopg.errors.InvalidPassword, BackendAuthError),
        (psycopg.OperationalError, BackendUnavailable),
        (psycopg.InterfaceError, BackendUnavailable),
        (psycopg.Error, BackendQueryError),
    )

    def __init__(self, name: str, options: HologresOptions) -> None:
        super().__init__(name, options)
        self.options: HologresOptions = options
        self._open_lock = threading.Lock()
        self._opened = False
        # Set by every connection attempt of the pool: the last failure, None after a success.
        self._connect_error: BaseException | None = None
        self._healthy = False
        self._busy: set[Any] = set()  # borrowed connections, sync or asyncio
        self._busy_lock = threading.Lock()
        n = options.pool_size
        # Nothing connects before the first read: open=False, opened in _pool_ready().
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            connection_class=self._connection_class(), kwargs=self._connect_kwargs, min_size=n,
            max_size=n, open=False, name=f"featuredao-{name}",
            # Give up retrying soon, so a read after an outage starts a fresh attempt at once.
            reconnect_timeout=self._reconnect_timeout_s(),
        )
        self._async: AsyncReads | None = None

    def _reconnect_timeout_s(self) -> float:
        return max(5.0, 2 * self.options.connect_timeout_ms / 1000)

    def _connect_kwargs(self) -> dict[str, Any]:
        # A callable: the password is read when connecting and never kept in the pool.
        o = self.options
        return {
            "host": o.host, "port": o.port, "dbname": o.database, "user": o.user,
            "password": o.password.get_secret_value(), "sslmode": o.sslmode,
            "application_name": o.application_name,
            "connect_timeout": max(1, round(o.connect_timeout_ms / 1000)),
            "options": " ".join(filter(None, (f"-c statement_timeout={o.read_timeout_ms}", o.options))),
            "autocommit": True,
            "prepare_threshold": o.prepare_threshold,
        }

    def _connection_class(self) -> type[psycopg.Connection[Any]]:
        source = self

        class RecordingConnection(psycopg.Connection[Any]):
            """Remembers how the pool's last connection attempt went, for fail-fast reads."""

            session_limit_ms: int | None = None
            """The ``statement_timeout`` a read set for the session (None: the connect-time default)."""

            @classmethod
            def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
                try:
                    conn = super().connect(conninfo, **kwargs)
                except Exception as exc:
                    source.connected(exc)
                    raise
                source.connected(None)
                return conn

        return RecordingConnection

    def connected(self, error: BaseException | None) -> None:
        """Record how a connection attempt of a pool (sync or asyncio) went: ``error``, None if it worked."""
        self._connect_error, self._healthy = error, error is None

    def getconn_wait(self, left: float) -> float:
        """How long one wait for a pooled connection lasts, with ``left`` seconds to go: until a connection
        has worked, short steps, to fail fast on a refused one."""
        return max(left if self._healthy else min(left, _POLL_S), 0.001)

    def no_connection(self, exc: BaseException, deadline: float) -> None:
        """After a wait for a pooled connection ran out: raise why (the last connect error, or the deadline
        passed with every connection busy); return to wait again."""
        failed = self._connect_error
        if failed is not None:
            kind = self.map_error(failed) or BackendUnavailable
            raise kind(f"cannot connect: {type(failed).__name__}: {first_line(failed)}",
                       source=self.name) from failed
        if time.monotonic() >= deadline:
            raise Overloaded("no connection of the pool came free in time", source=self.name) from exc

    def busy(self, conn: Any, running: bool) -> None:
        """Track a borrowed connection (``close`` interrupts the statements running on them)."""
        with self._busy_lock:
            if running:
                self._busy.add(conn)
            else:
                self._busy.discard(conn)

    def _pool_ready(self) -> ConnectionPool[psycopg.Connection[Any]]:
        if not self._opened:
            with self._open_lock:
                if not self._opened:
                    self._pool.open(wait=False)
                    self._opened = True
        return self._pool

    @contextmanager
    def _connection(self, timeout_s: float | None) -> Iterator[psycopg.Connection[Any]]:
        pool = self._pool_ready()
        wait = self.options.connect_timeout_ms / 1000 if timeout_s is None else timeout_s
        deadline = time.monotonic() + wait
        while True:
            try:
                conn = pool.getconn(timeout=self.getconn_wait(deadline - time.monotonic()))
                break
            except PoolTimeout as exc:
                self.no_connection(exc, deadline)
        self.busy(conn, True)
        try:
            yield conn
        finally:
            self.busy(conn, False)
            pool.putconn(conn)  # the pool discards a broken connection and opens a new one

    def _run(self, work: Callable[[psycopg.Connection[Any], float | None], _T],
             timeout_s: float | None, own_limit: bool = False) -> _T:
        """Run ``work`` on a pooled connection; retry once if a pooled connection was dead. Unless ``work``
        sets its own limit, a session limit a read left on the connection is reset first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for attempt in (0, 1):
            left = None if deadline is None else deadline - time.monotonic()
            with self._connection(left) as conn:
                try:
                    if not own_limit and getattr(conn, "session_limit_ms", None) is not None:
                        conn.execute(_RESET_TIMEOUT)
                        conn.session_limit_ms = None  # type: ignore[attr-defined]
                    return work(conn, left)
                except psycopg.OperationalError:
                    if attempt or self.closed or not conn.broken:  # closing: no retry
                        raise
            # A pooled connection died (server restarted): drop the dead idle ones, try once more.
            self._pool.check()
        raise AssertionError("unreachable")  # pragma: no cover

    def fetch(self, sql: str, params: Sequence[Any], timeout_s: float | None) -> Sequence[Sequence[Any]]:
        return self._run(lambda conn, left: self._select(conn, sql, params, left), timeout_s, own_limit=True)

    def _select(self, conn: psycopg.Connection[Any], sql: str, params: Sequence[Any],
                timeout_s: float | None) -> list[Any]:
        """One read on ``conn`` with ``statement_timeout`` for ``timeout_s`` (see the module docstring)."""
        want = limit_ms(timeout_s, self.options.per_call_timeout)
        with conn.cursor(binary=True) as cur:
            if getattr(conn, "session_limit_ms", None) == want:
                cur.execute(sql, params)  # the session already runs with this limit
                return cur.fetchall()
            try:
                # One round trip: the limit and the read share the pipeline's implicit transaction.
                with conn.pipeline():
                    conn.execute(*limit_statement(want))
                    cur.execute(sql, params)
            except BaseException:
                # The failed transaction rolled the setting back (or not, if it failed later).
                conn.session_limit_ms = _UNKNOWN  # type: ignore[attr-defined]
                raise
            conn.session_limit_ms = want  # type: ignore[attr-defined]
            return cur.fetchall()

    def _on_connection(self, work: Callable[[psycopg.Connection[Any]], _T], timeout_s: float | None) -> _T:
        # Each statement sets its own limit (_select): no reset of the session limit first.
        return self._run(lambda conn, left: work(conn), timeout_s, own_limit=True)

    def _statement_failed(self, exc: BaseException, conn: psycopg.Connection[Any]) -> bool:
        # The server answered with an error and the session goes on: autocommit connections (the pool's,
        # _connect_kwargs) end the failed statement's implicit transaction with it, so nothing to roll back.
        return isinstance(exc, psycopg.Error) and exc.sqlstate is not None and not conn.broken

    async def afetch(self, sql: str, params: Sequence[Any],
                     timeout_s: float | None) -> Sequence[Sequence[Any]]:
        """``fetch`` on the running loop's asyncio pool (made on first use there)."""
        reads = self._async
        if reads is None:
            with self._open_lock:
                if self.closed:
                    raise Closed(f"source {self.name!r} is closed")
                if self._async is None:
                    source: PgSource = self
                    self._async = AsyncReads(source, async_pools(source, self._connect_kwargs,
                                                                 self._reconnect_timeout_s()))
                reads = self._async
        return await reads.fetch(sql, params, timeout_s)

    def write(self, sql: str, params: list[tuple[Any, ...]]) -> None:
        def work(conn: psycopg.Connection[Any], left: float | None) -> None:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(sql, params)  # pipelined by psycopg: one round trip per batch

        self._run(work, None)

    def transaction(self, statements: Sequence[tuple[str, list[tuple[Any, ...]]]]) -> None:
        def work(conn: psycopg.Connection[Any], left: float | None) -> None:
            with conn.transaction(), conn.cursor() as cur:
                for sql, params in statements:
                    cur.executemany(sql, params)

        self._run(work, None)

    def execute(self, sql: str) -> None:
        def work(conn: psycopg.Connection[Any], left: float | None) -> None:
            conn.execute(sql)

        self._run(work, None)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run one statement (text results) and return its rows."""
        def work(conn: psycopg.Connection[Any], left: float | None) -> list[Any]:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description is not None else []

        return self._run(work, None)

    def dao(self, view: View) -> HologresDao:
        return HologresDao(self, view)

    def raw_connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(**self._connect_kwargs())

    def raw_rows(self, conn: psycopg.Connection[Any], sql: str,
                 params: Sequence[Any]) -> Sequence[Sequence[Any]]:
        with conn.cursor(binary=True) as cur:
            cur.execute(sql, params)
            return cur.fetchall()

    def ping(self) -> None:
        self.fetch("SELECT 1", (), self.options.read_timeout_ms / 1000)

    def map_error(self, exc: BaseException) -> type[BackendError] | None:
        sqlstate = getattr(exc, "sqlstate", None) or ""
        if sqlstate.startswith("28") or (isinstance(exc, psycopg.OperationalError)
                                         and "password authentication failed" in str(exc)):
            return BackendAuthError
        return super().map_error(exc)

    def _interrupt(self) -> None:
        with self._busy_lock:
            busy = list(self._busy)
        # A cancel request is a connection of its own to the server; a frozen server never answers it,
        # so each is sent from a daemon thread and nobody waits for it (close() bounds its own wait).
        for conn in busy:
            if isinstance(conn, psycopg.Connection):  # an asyncio connection's socket is shut alone
                threading.Thread(target=_cancel, args=(conn,), daemon=True, name="featuredao-cancel").start()
            # And the socket is shut from our side, so a thread blocked reading it wakes up at once.
            with contextlib.suppress(OSError, psycopg.Error):
                _shut(conn.pgconn.socket)

    def _release(self) -> None:
        with self._open_lock:
            if self._async is not None:
                self._async.close()
                self._async = None
            if self._opened:
                # Workers stuck on a dead server are left to die with it (QuietStops drops the notice).
                self._pool.close(timeout=0.1)
                self._opened = False


def _shut(fd: int) -> None:
    """Shut a connected socket down for both directions without closing its descriptor (the driver does)."""
    sock = socket.socket(fileno=os.dup(fd))
    try:
        sock.shutdown(socket.SHUT_RDWR)
    finally:
        sock.close()


def _cancel(conn: psycopg.Connection[Any]) -> None:
    with contextlib.suppress(psycopg.Error):  # the statement may have ended meanwhile
        conn.cancel_safe(timeout=2.0)


class HologresDao(SlotFeedDao):
    """A SQL view whose change feed is a logical replication slot (see ``SlotFeedDao``)."""

    source: HologresSource
