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
import datetime as dt
import json
import logging
import os
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, Self, TypeVar

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout
from pydantic import Field

from featuredao.config import View
from featuredao.dao import Capabilities, Change
from featuredao.errors import (
    BackendAuthError,
    BackendError,
    BackendQueryError,
    BackendTimeout,
    BackendUnavailable,
    Closed,
    Overloaded,
)

from ._pg_async import RESET_TIMEOUT as _RESET_TIMEOUT
from ._pg_async import SET_TIMEOUT as _SET_TIMEOUT
from ._pg_async import UNKNOWN as _UNKNOWN
from ._pg_async import AsyncReads, PgSource, async_pools, limit_ms, limit_statement
from ._sql import POSTGRES, SqlDao, SqlSource, SqlSourceOptions

_T = TypeVar("_T")
_FEED_READ_S = 1.0
"""A change-feed read that has made progress returns after about this long (the job reads on)."""
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
    driver_modules = {"psycopg": "psycopg"}
    options_model = HologresOptions
    dialect = POSTGRES
    capabilities = Capabilities(server_timeout=True, scan=True, changes=True, delete=True, change_feed=True,
                                state=True, sequences=True, sequence_filters=True, async_reads=True)
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
            raise kind(f"cannot connect: {type(failed).__name__}: {_first_line(failed)}",
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
        per_call = self.options.per_call_timeout

        def work(conn: psycopg.Connection[Any], left: float | None) -> list[Any]:
            want = limit_ms(left, per_call)
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

        return self._run(work, timeout_s, own_limit=True)

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
                # Workers stuck on a dead server are left to die with it: said once, here, not logged.
                pool_log = logging.getLogger("psycopg.pool")
                level = pool_log.level
                pool_log.setLevel(logging.ERROR)
                try:
                    self._pool.close(timeout=0.1)
                finally:
                    pool_log.setLevel(level)
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def _timestamp(text: Any) -> float | None:
    try:
        return dt.datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return None


_Found = tuple[list[int], Any, float | None]
"""A change found in the slot: its position, key and commit time."""


class FeedGap(BackendQueryError):
    """The slot no longer holds every change after the checkpoint: a new snapshot is needed.

    ``feed_gap`` tells the sync engine so (a job with ``"on_gap": "resnapshot"`` takes one).
    """

    feed_gap = True


class FeedBatch(list[Change]):
    """The changes of one feed read, and how far the read got.

    ``tail`` is a position at a transaction boundary at or after every change returned (None: none
    known), so a job can move its checkpoint, and the slot, past transactions of other tables;
    ``at_end`` is True when the read reached the end of what the slot holds; ``scanned`` counts the
    decoded rows it peeked (its cost).
    """

    def __init__(self, changes: Iterable[Change], tail: Any, at_end: bool, scanned: int) -> None:
        super().__init__(changes)
        self.tail = tail
        self.at_end = at_end
        self.scanned = scanned


class HologresDao(SqlDao):
    """A SQL view whose change feed is a logical replication slot decoded by wal2json (PostgreSQL).

    The slot (``featuredao_<table>``) is read with ``pg_logical_slot_peek_changes`` and advanced with
    ``pg_replication_slot_advance`` only when every target applied a whole transaction (``_ack_feed``),
    so changes are kept while a target is down. Positions are ``[commit LSN, index in the transaction,
    1 if it is the transaction's last change]``: commit order, the order a replica applies them. Each
    change is applied with the key's row as it is when read (absent: deleted), like the SQLite outbox.
    A read also returns the last commit it decoded (``FeedBatch.tail``), so transactions of other tables
    move the checkpoint and the slot on: the slot's WAL is released and never decoded twice. Changes a
    peek returned beyond the chunk (a peek returns whole transactions) serve the next chunks.
    Hologres itself has no logical slots (it offers binlog subscription instead): there the feed fails
    at install, naming the missing function.
    """

    source: HologresSource

    def __init__(self, source: HologresSource, view: View) -> None:
        super().__init__(source, view)
        self._held_lock = threading.Lock()
        # The changes a read found beyond its chunk: (the position it stopped at, the rest, tail, at_end).
        self._held: tuple[tuple[int, int], deque[_Found], list[int] | None, bool] | None = None

    @property
    def slot(self) -> str:
        """The replication slot of the view's table (lower case, at most 63 characters)."""
        name = re.sub(r"[^a-z0-9_]", "_", f"featuredao_{self.view.table.lower()}")
        return name[:63]

    def _tables_option(self) -> str:
        schema, _, table = self.view.table.rpartition(".")
        return f"{schema or '*'}.{table}"

    def _error(self, kind: type[BackendError], message: str) -> BackendError:
        return kind(f"change feed of view {self.view.name!r}: {message}", source=self.source.name,
                    view=self.view.name)

    def _feed_query(self, sql: str, params: Sequence[Any] = (), timeout_ms: int | None = None) -> list[Any]:
        """One statement of the change feed (optionally with its own time limit), on a pooled connection.

        Not retried here: a failure is the sync job's to report and retry (with backoff), and a statement
        interrupted by ``close`` ends the read at once.
        """
        with self.source._connection(None) as conn:
            if getattr(conn, "session_limit_ms", None) is not None:  # a read's limit: back to the default
                conn.execute(_RESET_TIMEOUT)
                conn.session_limit_ms = None  # type: ignore[attr-defined]
            if timeout_ms is None:
                with conn.cursor() as cur:
                    cur.execute(sql, params)
                    return cur.fetchall() if cur.description is not None else []
            with conn.transaction(), conn.cursor() as cur:  # the limit holds for this transaction only
                cur.execute(_SET_TIMEOUT, (str(timeout_ms),))
                cur.execute(sql, params)
                return cur.fetchall()

    def _plugin_error(self, exc: psycopg.Error) -> BackendError | None:
        """A clear error for a server that cannot decode with wal2json or hold one more slot."""
        sqlstate = exc.sqlstate or ""
        text = _first_line(exc)
        if sqlstate == "58P01" or "wal2json" in text:
            return self._error(BackendQueryError, f"the wal2json output plugin cannot be loaded ({text}): "
                               "install it on the server (e.g. the postgresql-<version>-wal2json package) "
                               "where dynamic_library_path finds it")
        if sqlstate == "55000" and "wal_level" in text:
            return self._error(BackendQueryError, f"{text}: set wal_level = logical in postgresql.conf "
                               "and restart the server")
        if sqlstate == "53400":
            return self._error(BackendQueryError, f"{text}: raise max_replication_slots (and "
                               "max_wal_senders) in postgresql.conf, or drop unused slots")
        if sqlstate == "42501":
            return self._error(BackendAuthError, f"{text}: ALTER ROLE {self.source.options.user} "
                               "WITH REPLICATION")
        return None

    # -- prerequisites ----------------------------------------------------------------------------
    def check_feed(self, position: Any) -> None:
        """Raise a clear error unless the server can serve the change feed (from ``position``, when given).

        Checked: ``wal_level=logical``, the REPLICATION attribute (or superuser), the slot's plugin, and,
        from a position, that the slot still exists, is not invalidated and was not advanced past it
        (``FeedGap`` if so). Whether wal2json loads is checked when the slot is created (``install_feed``).
        """
        self._store_call(self._check_feed, position)

    def _check_feed(self, position: Any) -> None:
        self._wide_only("change feed")
        rows = self._feed_query(
            "SELECT current_setting('wal_level'), r.rolsuper OR r.rolreplication, s.plugin, s.database, "
            "(s.confirmed_flush_lsn - '0/0'::pg_lsn)::bigint, to_jsonb(s) ->> 'wal_status', "
            "current_database() "
            "FROM pg_roles r LEFT JOIN pg_replication_slots s ON s.slot_name = %s "
            "WHERE r.rolname = current_user", (self.slot,))
        wal_level, replication, plugin, database, flushed, wal_status, here = rows[0]
        if wal_level != "logical":
            raise self._error(BackendQueryError, f"wal_level is {wal_level}, it must be logical: set "
                              "wal_level = logical in postgresql.conf (or ALTER SYSTEM SET wal_level = "
                              "logical) and restart the server")
        if not replication:
            user = self.source.options.user
            raise self._error(BackendAuthError, f"role {user!r} may not use replication slots (it has "
                              f"neither REPLICATION nor superuser): ALTER ROLE {user} WITH REPLICATION")
        if plugin is not None and database != here:
            raise self._error(BackendQueryError, f"replication slot {self.slot} belongs to database "
                              f"{database!r}, not {here!r}: slot names are server-wide; drop it or rename "
                              "the table")
        if plugin is not None and plugin != "wal2json":
            raise self._error(BackendQueryError, f"replication slot {self.slot} decodes with {plugin!r}, "
                              "not wal2json: drop it (SELECT pg_drop_replication_slot(...)) and start over")
        if not position:
            return
        lsn = int(position[0])
        if plugin is None:
            raise self._error(FeedGap, f"replication slot {self.slot} no longer exists (dropped), so the "
                              "changes since the checkpoint are lost and a new snapshot is needed")
        if wal_status == "lost":
            raise self._error(FeedGap, f"replication slot {self.slot} was invalidated (its WAL exceeded "
                              "max_slot_wal_keep_size), so the changes since the checkpoint are lost and a "
                              "new snapshot is needed")
        if flushed is not None and int(flushed) > lsn:
            raise self._error(FeedGap, f"replication slot {self.slot} was advanced to {_lsn(int(flushed))}, "
                              f"past the checkpoint ({_lsn(lsn)}; another consumer of the slot?), so "
                              "changes are lost and a new snapshot is needed")

    # -- the feed ---------------------------------------------------------------------------------
    def _install_feed(self) -> None:
        self._check_feed(None)
        # An invalidated slot cannot be read again: a new snapshot (on_gap: resnapshot) starts a new one.
        self._feed_query("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots s "
                          "WHERE slot_name = %s AND to_jsonb(s) ->> 'wal_status' = 'lost'", (self.slot,))
        try:
            self._feed_query("SELECT pg_create_logical_replication_slot(%s, 'wal2json') "
                              "WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = %s)",
                              (self.slot, self.slot))
        except psycopg.Error as exc:
            clear = self._plugin_error(exc)
            if clear is None:
                raise
            raise clear from exc

    def _feed_position(self) -> Any:
        rows = self._feed_query("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")
        return [int(rows[0][0]), 0, 1]

    def _ack_feed(self, position: Any) -> None:
        if not position:
            return
        lsn, _, last = position
        if not last:
            return  # the middle of a transaction: advancing would drop its rest; the next ack will do
        self._feed_query("SELECT pg_replication_slot_advance(slot_name, %s::pg_lsn) "
                          "FROM pg_replication_slots "
                          "WHERE slot_name = %s AND confirmed_flush_lsn < %s::pg_lsn",
                          (_lsn(int(lsn)), self.slot, _lsn(int(lsn))))

    def _peek(self, upto: int) -> list[Any]:
        sql = ("SELECT (lsn - '0/0'::pg_lsn)::bigint, data FROM pg_logical_slot_peek_changes("
               "%s, NULL, %s, 'format-version', '2', 'include-timestamp', '1', 'include-transaction', '1', "
               "'add-tables', %s, 'include-type-oids', '0', 'include-types', '0')")
        params = (self.slot, upto, self._tables_option())
        try:
            # Decoding a long stretch of WAL may take longer than a read: the feed's own time limit.
            return self._feed_query(sql, params, self.source.options.feed_timeout_ms)
        except psycopg.Error as exc:
            clear = self._plugin_error(exc)
            if clear is None:
                raise
            raise clear from exc

    def _feed_batch(self, after: Any, limit: int) -> list[Change]:
        start = None if not after else (int(after[0]), int(after[1]))
        with self._held_lock:
            held, self._held = self._held, None
        if held is not None and held[0] == start:
            # The rest of the last peek (a transaction larger than a chunk is decoded once, not per chunk).
            _, rest, tail, at_end = held
            found = [rest.popleft() for _ in range(min(limit, len(rest)))]
            if rest:
                self._hold(found, rest, tail, at_end)
                tail, at_end = None, False
            return self._changes(found, tail, at_end, 0)
        found, tail, at_end, scanned = self._read_slot(start, limit)
        if len(found) > limit:
            self._hold(found[:limit], deque(found[limit:]), tail, at_end)
            found, tail, at_end = found[:limit], None, False
        return self._changes(found, tail, at_end, scanned)

    def _hold(self, served: list[_Found], rest: deque[_Found], tail: list[int] | None, at_end: bool) -> None:
        last = served[-1][0]
        with self._held_lock:
            self._held = ((last[0], last[1]), rest, tail, at_end)

    def _changes(self, found: list[_Found], tail: list[int] | None, at_end: bool, scanned: int) -> FeedBatch:
        norm = [self._norm(k) for _, k, _ in found]
        current = self.current_rows(list(dict.fromkeys(norm)))
        changes = (Change(pos, k, current.get(k), ts) for (pos, _, ts), k in zip(found, norm, strict=True))
        return FeedBatch(changes, tail, at_end, scanned)

    def _read_slot(self, start: tuple[int, int] | None,
                   limit: int) -> tuple[list[_Found], list[int] | None, bool, int]:
        """Changes after ``start`` from the slot (at least ``limit`` unless it ends), the last commit
        passed and whether the slot's end was reached, and how many decoded rows that took."""
        key_col = self.view.key
        upto = 2 * limit + 64
        deadline = time.monotonic() + _FEED_READ_S
        scanned = 0
        while True:
            # The peek starts at the slot (the lowest position every target applied): rows up to this
            # reader's own position are skipped. Each peek decodes from the slot again, so the window
            # grows fourfold until it holds a chunk, the end, or (after _FEED_READ_S) some progress.
            rows = self._peek(upto)
            scanned += len(rows)
            at_end = len(rows) < upto
            found: list[_Found] = []
            pending: list[Any] = []
            tail: list[int] | None = None
            for lsn, data in rows:
                msg = json.loads(data)
                action = msg.get("action")
                if action == "B":
                    pending = []
                elif action in ("I", "U", "D"):
                    keys = []
                    for part in ("identity", "columns"):  # the old key (deletes, key changes), the new
                        for col in msg.get(part) or ():
                            if col.get("name") == key_col:
                                keys.append(col.get("value"))
                    pending.extend(dict.fromkeys(keys))
                elif action == "C":
                    commit, ts = int(lsn), _timestamp(msg.get("timestamp"))
                    for i, k in enumerate(pending, start=1):
                        if start is None or (commit, i) > start:
                            found.append(([commit, i, int(i == len(pending))], k, ts))
                    if start is None or (commit, len(pending)) > start:
                        tail = [commit, len(pending), 1]
                    pending = []
            if len(found) >= limit or at_end or (tail is not None and time.monotonic() >= deadline):
                return found, tail, at_end, scanned
            upto *= 4
