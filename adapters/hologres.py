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

* Per-call time limits: ``SELECT set_config('statement_timeout', <ms>, true)`` is pipelined with the
  read in the same implicit transaction (one round trip; the limit reverts at the Sync). If an
  instance refuses it, set ``per_call_timeout: false``: the session limit ``read_timeout_ms`` (given
  at connect time) still cancels runaway statements on the server.
* ``prepare()`` creates a plain table. On Hologres a row-oriented table (``CALL
  set_table_property('<table>', 'orientation', 'row')``) serves key lookups best; create it
  yourself when that matters.
* A server that stops answering without closing the socket (hung, frozen) holds the calling thread
  until TCP gives up: libpq has no per-statement client timeout. The core's chunk deadline still
  returns control to the caller when a read is split over several chunks.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import re
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
from featuredao.dao import Capabilities, Change
from featuredao.errors import (
    BackendAuthError,
    BackendError,
    BackendQueryError,
    BackendTimeout,
    BackendUnavailable,
    Overloaded,
)

from ._sql import POSTGRES, SqlDao, SqlSource, SqlSourceOptions

_T = TypeVar("_T")
_SET_TIMEOUT = "SELECT set_config('statement_timeout', %s, true)"
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


class HologresSource(SqlSource):
    """One Hologres (or PostgreSQL) database reached through a psycopg_pool connection pool."""

    type_name = "hologres"
    driver_modules = {"psycopg": "psycopg"}
    options_model = HologresOptions
    dialect = POSTGRES
    capabilities = Capabilities(server_timeout=True, scan=True, changes=True, delete=True, change_feed=True,
                                state=True)
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
        self._busy: set[psycopg.Connection[Any]] = set()
        self._busy_lock = threading.Lock()
        n = options.pool_size
        # Nothing connects before the first read: open=False, opened in _pool_ready().
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            connection_class=self._connection_class(), kwargs=self._connect_kwargs, min_size=n,
            max_size=n, open=False, name=f"featuredao-{name}",
            # Give up retrying soon, so a read after an outage starts a fresh attempt at once.
            reconnect_timeout=max(5.0, 2 * options.connect_timeout_ms / 1000),
        )

    def _connect_kwargs(self) -> dict[str, Any]:
        # A callable: the password is read when connecting and never kept in the pool.
        o = self.options
        return {
            "host": o.host, "port": o.port, "dbname": o.database, "user": o.user,
            "password": o.password.get_secret_value(), "sslmode": o.sslmode,
            "application_name": o.application_name,
            "connect_timeout": max(1, round(o.connect_timeout_ms / 1000)),
            "options": f"-c statement_timeout={o.read_timeout_ms}", "autocommit": True,
            "prepare_threshold": o.prepare_threshold,
        }

    def _connection_class(self) -> type[psycopg.Connection[Any]]:
        source = self

        class RecordingConnection(psycopg.Connection[Any]):
            """Remembers how the pool's last connection attempt went, for fail-fast reads."""

            @classmethod
            def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
                try:
                    conn = super().connect(conninfo, **kwargs)
                except Exception as exc:
                    source._connect_error, source._healthy = exc, False
                    raise
                source._connect_error, source._healthy = None, True
                return conn

        return RecordingConnection

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
            left = deadline - time.monotonic()
            try:
                # Until a connection has worked, wait in short steps to fail fast on a refused one.
                conn = pool.getconn(timeout=max(left if self._healthy else min(left, _POLL_S), 0.001))
                break
            except PoolTimeout as exc:
                failed = self._connect_error
                if failed is not None:
                    kind = self.map_error(failed) or BackendUnavailable
                    raise kind(f"cannot connect: {type(failed).__name__}: {_first_line(failed)}",
                               source=self.name) from failed
                if time.monotonic() >= deadline:
                    raise Overloaded("no connection of the pool came free in time", source=self.name) \
                        from exc
        with self._busy_lock:
            self._busy.add(conn)
        try:
            yield conn
        finally:
            with self._busy_lock:
                self._busy.discard(conn)
            pool.putconn(conn)  # the pool discards a broken connection and opens a new one

    def _run(self, work: Callable[[psycopg.Connection[Any], float | None], _T],
             timeout_s: float | None) -> _T:
        """Run ``work`` on a pooled connection; retry once if a pooled connection was dead."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for attempt in (0, 1):
            left = None if deadline is None else deadline - time.monotonic()
            with self._connection(left) as conn:
                try:
                    return work(conn, left)
                except psycopg.OperationalError:
                    if attempt or not conn.broken:
                        raise
            # A pooled connection died (server restarted): drop the dead idle ones, try once more.
            self._pool.check()
        raise AssertionError("unreachable")  # pragma: no cover

    def fetch(self, sql: str, params: Sequence[Any], timeout_s: float | None) -> Sequence[Sequence[Any]]:
        per_call = self.options.per_call_timeout

        def work(conn: psycopg.Connection[Any], left: float | None) -> list[Any]:
            with conn.cursor(binary=True) as cur:
                if left is None or not per_call:
                    cur.execute(sql, params)
                    return cur.fetchall()
                # One round trip: the limit and the read share the pipeline's implicit transaction.
                with conn.pipeline():
                    conn.execute(_SET_TIMEOUT, (str(max(1, math.ceil(left * 1000))),))
                    cur.execute(sql, params)
                return cur.fetchall()

        return self._run(work, timeout_s)

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
            threading.Thread(target=_cancel, args=(conn,), daemon=True, name="featuredao-cancel").start()
            # And the socket is shut from our side, so a thread blocked reading it wakes up at once.
            with contextlib.suppress(OSError, psycopg.Error):
                _shut(conn.pgconn.socket)

    def _release(self) -> None:
        with self._open_lock:
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


class HologresDao(SqlDao):
    """A SQL view whose change feed is a logical replication slot decoded by wal2json (PostgreSQL).

    The slot (``featuredao_<table>``) is read with ``pg_logical_slot_peek_changes`` and advanced with
    ``pg_replication_slot_advance`` only when every target applied a whole transaction (``_ack_feed``),
    so changes are kept while a target is down. Positions are ``[commit LSN, index in the transaction,
    1 if it is the transaction's last change]``: commit order, the order a replica applies them. Each
    change is applied with the key's row as it is when read (absent: deleted), like the SQLite outbox.
    Hologres itself has no logical slots (it offers binlog subscription instead): there the feed fails
    at install, naming the missing function.
    """

    source: HologresSource

    @property
    def slot(self) -> str:
        """The replication slot of the view's table (lower case, at most 63 characters)."""
        name = re.sub(r"[^a-z0-9_]", "_", f"featuredao_{self.view.table.lower()}")
        return name[:63]

    def _tables_option(self) -> str:
        schema, _, table = self.view.table.rpartition(".")
        return f"{schema or '*'}.{table}"

    def _install_feed(self) -> None:
        self._wide_only("change feed")
        self.source.query("SELECT pg_create_logical_replication_slot(%s, 'wal2json') "
                          "WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = %s)",
                          (self.slot, self.slot))

    def _feed_position(self) -> Any:
        rows = self.source.query("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")
        return [int(rows[0][0]), 0, 1]

    def _ack_feed(self, position: Any) -> None:
        if not position:
            return
        lsn, _, last = position
        if not last:
            return  # the middle of a transaction: advancing would drop its rest; the next ack will do
        self.source.query("SELECT pg_replication_slot_advance(slot_name, %s::pg_lsn) "
                          "FROM pg_replication_slots "
                          "WHERE slot_name = %s AND confirmed_flush_lsn < %s::pg_lsn",
                          (_lsn(int(lsn)), self.slot, _lsn(int(lsn))))

    def _peek(self, upto: int) -> list[Any]:
        return self.source.query(
            "SELECT (lsn - '0/0'::pg_lsn)::bigint, data FROM pg_logical_slot_peek_changes("
            "%s, NULL, %s, 'format-version', '2', 'include-timestamp', '1', 'include-transaction', '1', "
            "'add-tables', %s, 'include-type-oids', '0', 'include-types', '0')",
            (self.slot, upto, self._tables_option()))

    def _feed_batch(self, after: Any, limit: int) -> list[Change]:
        start = None if not after else (int(after[0]), int(after[1]))
        key_col = self.view.key
        upto = 2 * limit + 64
        while True:
            rows = self._peek(upto)
            found: list[tuple[list[int], Any, float | None]] = []
            pending: list[Any] = []
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
                    ts = _timestamp(msg.get("timestamp"))
                    for i, k in enumerate(pending, start=1):
                        if start is None or (int(lsn), i) > start:
                            found.append(([int(lsn), i, int(i == len(pending))], k, ts))
                    pending = []
            if len(found) >= limit or len(rows) < upto:
                break
            upto *= 4
        found = found[:limit]
        norm = [self._norm(k) for _, k, _ in found]
        current = self.current_rows(list(dict.fromkeys(norm)))
        return [Change(pos, k, current.get(k), ts) for (pos, _, ts), k in zip(found, norm, strict=True)]
