"""The MySQL/MariaDB adapter (pymysql): wide or tall tables, one ``IN (...)`` statement per chunk.

Tested on MariaDB 10.11. Where MySQL 8 differs, ``flavor`` selects the dialect:

* Every read carries a time limit the server enforces (the caller's time left, else
  ``read_timeout_ms``): MariaDB ``SET STATEMENT max_statement_time=<s> FOR SELECT ...``; MySQL 8 the
  optimizer hint ``SELECT /*+ MAX_EXECUTION_TIME(<ms>) */ ...`` (which MariaDB ignores as a comment).
  The socket also times out shortly after the limit, so a server that stops answering cannot hold a
  caller; such a connection is closed, never reused.
* Upserts use ``ON DUPLICATE KEY UPDATE c = VALUES(c)``: MySQL 8.0.20+ deprecates ``VALUES()`` (with
  a warning, still accepted) in favour of row aliases, which MariaDB does not have.
* MariaDB's JSON is LONGTEXT with a validity check and MySQL's JSON arrives as text: both are
  parsed by the core's list coercers.

pymysql has no pool, so this module has a small one: a LIFO of idle connections bounded by a
semaphore; a connection that failed below the SQL level is closed, never handed out again, and a
read that finds a pooled connection dead (server restarted) drops the idle ones and retries once.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import pymysql
import pymysql.converters
from pydantic import Field
from pymysql.constants import FIELD_TYPE

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
from featuredao.types import Key

from ._sql import MYSQL, SqlDao, SqlSource, SqlSourceOptions

if TYPE_CHECKING:
    Connection: TypeAlias = pymysql.connections.Connection[Any]  # generic only in the stubs
else:
    Connection = pymysql.connections.Connection

_GRACE_S = 0.25
"""How much longer than the server's statement limit the client waits on the socket."""
# max_statement_time (MariaDB), MAX_EXECUTION_TIME (MySQL), KILL QUERY, lock wait timeout.
_TIMEOUT_CODES = frozenset({1969, 3024, 1317, 1205})
_AUTH_CODES = frozenset({1044, 1045, 1698, 1251})
# Client-side codes (2000+) and server codes meaning "this connection is gone".
_GONE_CODES = frozenset({2002, 2003, 2006, 2013, 2055, 1040, 1053, 1927, 4031})

# DECIMAL arrives as float (features are floats), sparing a Decimal per value.
_CONVERSIONS = {**pymysql.converters.conversions, FIELD_TYPE.DECIMAL: float, FIELD_TYPE.NEWDECIMAL: float}


class MySQLOptions(SqlSourceOptions):
    """Source options of the mysql adapter."""

    port: int = Field(default=3306, ge=1, le=65535)
    flavor: Literal["mariadb", "mysql"] = "mariadb"
    """Which server-side statement time limit to use (see the module docstring)."""


def _code(exc: BaseException) -> int | None:
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def _connection_lost(exc: BaseException) -> bool:
    """A connection-level failure that is not a timeout (a stale pooled connection looks like this)."""
    if isinstance(exc, pymysql.err.InterfaceError):
        return True
    if not isinstance(exc, pymysql.err.OperationalError):
        return isinstance(exc, ConnectionError)
    return _code(exc) in _GONE_CODES and "timed out" not in str(exc)


def _reusable(exc: BaseException) -> bool:
    """The server answered with an error: the connection is still in step and can go back to the pool."""
    code = _code(exc)
    return isinstance(exc, pymysql.err.MySQLError) and code is not None and code < 2000 \
        and code not in _GONE_CODES


class ConnectionPool:
    """A thread-safe pool: at most ``size`` connections, opened on demand, reused newest first."""

    def __init__(self, connect: Callable[[], Connection], size: int, name: str) -> None:
        self._connect = connect
        self._name = name
        self._idle: deque[Connection] = deque()
        self._busy: set[Connection] = set()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)
        self._closed = False

    @contextmanager
    def connection(self, timeout_s: float | None) -> Iterator[tuple[Connection, bool]]:
        """Borrow a connection and whether it is fresh; it is closed, not returned, after a broken call."""
        if not self._slots.acquire(timeout=None if timeout_s is None else max(timeout_s, 0.0)):
            raise Overloaded("no free connection of the pool in time", source=self._name)
        try:
            try:
                conn, fresh = self._idle.pop(), False
            except IndexError:
                conn, fresh = self._connect(), True
            with self._lock:
                self._busy.add(conn)
            try:
                yield conn, fresh
            except BaseException as exc:
                self._give_back(conn, _reusable(exc))
                raise
            self._give_back(conn, True)
        finally:
            self._slots.release()

    def _give_back(self, conn: Connection, reusable: bool) -> None:
        with self._lock:
            self._busy.discard(conn)
        if reusable and not self._closed and conn.open:
            self._idle.append(conn)
        else:
            _close_quietly(conn)

    def shut_sockets(self) -> None:
        """Shut the borrowed connections' sockets down (both directions): blocked readers wake up."""
        with self._lock:
            socks = [conn._sock for conn in self._busy]  # type: ignore[attr-defined]
        for sock in socks:
            with contextlib.suppress(OSError, AttributeError):
                sock.shutdown(socket.SHUT_RDWR)

    def busy_threads(self) -> list[int]:
        """Server thread ids of the connections now borrowed (to cancel their statements)."""
        with self._lock:
            return [conn.thread_id() for conn in self._busy]  # type: ignore[no-untyped-call]

    def clear(self) -> None:
        """Close every idle connection (after the server went away they are all dead)."""
        while True:
            try:
                conn = self._idle.pop()
            except IndexError:
                return
            _close_quietly(conn)

    def close(self) -> None:
        """Close idle connections now and borrowed ones when they come back."""
        self._closed = True
        self.clear()


def _close_quietly(conn: Connection) -> None:
    try:
        conn.close()
    except Exception:  # already closed or the socket is gone: nothing left to release
        conn._force_close()  # type: ignore[attr-defined]


class MySQLSource(SqlSource):
    """One MySQL/MariaDB database reached through a pool of pymysql connections."""

    type_name = "mysql"
    driver_modules = {"pymysql": "PyMySQL"}
    options_model = MySQLOptions
    dialect = MYSQL
    capabilities = Capabilities(server_timeout=True, scan=True, changes=True, delete=True, change_feed=True,
                                state=True)
    default_batch_size = 1000
    error_map = (
        (pymysql.err.InterfaceError, BackendUnavailable),
        (pymysql.err.MySQLError, BackendQueryError),
        (TimeoutError, BackendTimeout),
        (OSError, BackendUnavailable),
    )

    def __init__(self, name: str, options: MySQLOptions) -> None:
        super().__init__(name, options)
        self.options: MySQLOptions = options
        self._pool = ConnectionPool(self._connect, options.pool_size, name)  # connects on first use

    def _connect(self) -> Connection:
        o = self.options
        return pymysql.connect(
            host=o.host, port=o.port, user=o.user, password=o.password.get_secret_value(),
            database=o.database, charset="utf8mb4", autocommit=True, local_infile=False,
            connect_timeout=o.connect_timeout_ms / 1000, read_timeout=o.read_timeout_ms / 1000 + _GRACE_S,
            write_timeout=o.read_timeout_ms / 1000 + _GRACE_S, conv=_CONVERSIONS,
        )

    def _limited(self, sql: str, timeout_s: float) -> str:
        """The statement with a server-side time limit (never 0: that means "no limit")."""
        if self.options.flavor == "mariadb":
            return f"SET STATEMENT max_statement_time={max(timeout_s, 0.001):.3f} FOR {sql}"
        ms = max(int(timeout_s * 1000), 1)
        return f"SELECT /*+ MAX_EXECUTION_TIME({ms}) */ {sql.removeprefix('SELECT ')}"

    def _run(self, work: Callable[[Connection], Any], timeout_s: float | None) -> Any:
        """Run ``work`` on a pooled connection; retry once on a fresh one if a pooled one was dead."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for attempt in (0, 1):
            left = None if deadline is None else deadline - time.monotonic()
            fresh = True
            try:
                with self._pool.connection(left) as (conn, fresh):
                    if left is None:
                        return work(conn)
                    # The socket gives up a little after the server's own limit (a hung server).
                    conn._read_timeout = left + _GRACE_S  # type: ignore[attr-defined]
                    try:
                        return work(conn)
                    finally:
                        conn._read_timeout = self.options.read_timeout_ms / 1000 + _GRACE_S  # type: ignore[attr-defined]
            except Exception as exc:
                if attempt or fresh or not _connection_lost(exc):
                    raise
                self._pool.clear()
        raise AssertionError("unreachable")  # pragma: no cover

    def fetch(self, sql: str, params: Sequence[Any], timeout_s: float | None) -> Sequence[Sequence[Any]]:
        sql = self._limited(sql, self.options.read_timeout_ms / 1000 if timeout_s is None else timeout_s)

        def work(conn: Connection) -> Sequence[Sequence[Any]]:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                rows: Sequence[Sequence[Any]] = cur.fetchall()
                return rows

        rows: Sequence[Sequence[Any]] = self._run(work, timeout_s)
        return rows

    def write(self, sql: str, params: list[tuple[Any, ...]]) -> None:
        def work(conn: Connection) -> None:
            conn.begin()
            try:
                with conn.cursor() as cur:
                    cur.executemany(sql, params)  # one multi-row INSERT per ~1 MB
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

        self._run(work, None)

    def transaction(self, statements: Sequence[tuple[str, list[tuple[Any, ...]]]]) -> None:
        def work(conn: Connection) -> None:
            conn.begin()
            try:
                with conn.cursor() as cur:
                    for sql, params in statements:
                        cur.executemany(sql, params)
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

        self._run(work, None)

    def execute(self, sql: str) -> None:
        def work(conn: Connection) -> None:
            with conn.cursor() as cur:
                cur.execute(sql)

        self._run(work, None)

    def query(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Sequence[Any]]:
        """Run one statement as it is (no time-limit prefix: SHOW statements) and return its rows."""
        def work(conn: Connection) -> Sequence[Sequence[Any]]:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                rows: Sequence[Sequence[Any]] = cur.fetchall()
                return rows

        rows: Sequence[Sequence[Any]] = self._run(work, None)
        return rows

    def dao(self, view: View) -> MySQLDao:
        return MySQLDao(self, view)

    def raw_connect(self) -> Connection:
        return self._connect()

    def raw_rows(self, conn: Connection, sql: str, params: Sequence[Any]) -> Sequence[Sequence[Any]]:
        with conn.cursor() as cur:
            cur.execute(self._limited(sql, self.options.read_timeout_ms / 1000), params)
            rows: Sequence[Sequence[Any]] = cur.fetchall()
            return rows

    def ping(self) -> None:
        self.fetch("SELECT 1", (), self.options.read_timeout_ms / 1000)

    def map_error(self, exc: BaseException) -> type[BackendError] | None:
        code = _code(exc)
        if isinstance(exc, pymysql.err.MySQLError) and code is not None:
            if code in _TIMEOUT_CODES or (code == 2013 and "timed out" in str(exc)):
                return BackendTimeout
            if code in _AUTH_CODES:
                return BackendAuthError
            if code in _GONE_CODES or code >= 2000:
                return BackendUnavailable
        return super().map_error(exc)

    def _interrupt(self) -> None:
        threads = self._pool.busy_threads()
        if not threads:
            return
        # A frozen server would hold the KILL's own connection: sent from a daemon thread, not awaited;
        # the borrowed sockets are shut from our side so their readers wake up at once.
        threading.Thread(target=self._kill_queries, args=(threads,), daemon=True,
                         name="featuredao-kill-query").start()
        self._pool.shut_sockets()

    def _kill_queries(self, threads: list[int]) -> None:
        # A statement is cancelled from the owning side by a second session: KILL QUERY <thread id>.
        o = self.options
        try:
            conn = pymysql.connect(host=o.host, port=o.port, user=o.user,
                                   password=o.password.get_secret_value(), connect_timeout=1, read_timeout=1,
                                   write_timeout=1, autocommit=True)
        except (pymysql.err.MySQLError, OSError):  # the server is gone or frozen: closing goes on regardless
            return
        try:
            with conn.cursor() as cur:
                for thread_id in threads:
                    with contextlib.suppress(pymysql.err.MySQLError):  # the statement ended meanwhile
                        cur.execute(f"KILL QUERY {int(thread_id)}")
        except (pymysql.err.MySQLError, OSError):
            return
        finally:
            _close_quietly(conn)

    def _release(self) -> None:
        self._pool.close()


def _binlog_position(value: Any) -> tuple[str, int, int] | None:
    """A feed position ``[binlog file, start of the transaction, change index]`` (None: the start)."""
    if not value:
        return None
    file, start, index = value
    return str(file), int(start), int(index)


class MySQLDao(SqlDao):
    """A SQL view whose change feed is the server's row-based binary log (``mysql-replication``).

    Positions are ``[file, start of the transaction in it, index of the change within it]``: a reader
    resumes at the start of the transaction (its table maps come first there) and skips what it applied.
    Each change is applied with the key's row as it is when read (absent: deleted), like the SQLite
    outbox, so a replayed change never brings back an older row. The binary log is never trimmed by us
    (``_ack_feed`` is a no-op): the server's own expiry does that.
    """

    source: MySQLSource

    def _schema_table(self) -> tuple[str, str]:
        schema, _, table = self.view.table.rpartition(".")
        return schema or self.source.options.database, table

    def _install_feed(self) -> None:
        self._wide_only("change feed")
        rows = self.source.query("SELECT @@GLOBAL.binlog_format, @@GLOBAL.log_bin")
        if not rows or str(rows[0][0]).upper() != "ROW" or not int(rows[0][1]):
            raise self._unsupported("change feed (needs log_bin and binlog_format=ROW)")

    def _feed_position(self) -> Any:
        rows = self.source.query("SHOW MASTER STATUS")
        if not rows:
            raise self._unsupported("change feed (binary logging is off)")
        return [str(rows[0][0]), int(rows[0][1]), 0]

    def _ack_feed(self, position: Any) -> None:
        """Nothing to trim: the binary log expires on the server's schedule."""

    def _feed_batch(self, after: Any, limit: int) -> list[Change]:
        from pymysqlreplication import BinLogStreamReader
        from pymysqlreplication.event import MariadbGtidEvent, QueryEvent, XidEvent
        from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

        def connect(**kwargs: Any) -> pymysql.Connection[Any]:
            # mysql-replication opens its control connection with pymysql's deprecated ``db`` argument (a
            # DeprecationWarning per batch): the same connection, with that argument under its current name.
            if "db" in kwargs:
                kwargs["database"] = kwargs.pop("db")
            return pymysql.connect(**kwargs)

        start = _binlog_position(after)
        o = self.source.options
        schema, table = self._schema_table()
        settings = {"host": o.host, "port": o.port, "user": o.user, "password": o.password.get_secret_value(),
                    "connect_timeout": o.connect_timeout_ms / 1000}
        if start is None:
            first = self.source.query("SHOW BINARY LOGS")
            resume: dict[str, Any] = {"log_file": str(first[0][0]), "log_pos": 4} if first else {}
        else:
            resume = {"log_file": start[0], "log_pos": start[1]}
        stream = BinLogStreamReader(
            connection_settings=settings, server_id=random.randint(1 << 20, 1 << 30), blocking=False,
            # is_mariadb makes mysql-replication send an empty file name and position 4 (MariaDB then
            # streams from its first binlog on every read); the classic dump by file and position
            # works on both servers, and MariaDB's GTID events are parsed either way.
            resume_stream=True, is_mariadb=False,
            only_events=[MariadbGtidEvent, QueryEvent, XidEvent, WriteRowsEvent, UpdateRowsEvent,
                         DeleteRowsEvent],
            only_schemas=[schema], only_tables=[table], enable_logging=False, pymysql_wrapper=connect,
            **resume)
        found: list[tuple[tuple[str, int, int], Key, float]] = []
        key_col = self.view.key
        txn: tuple[str, int] | None = None
        index = 0
        try:
            for event in stream:
                if isinstance(event, MariadbGtidEvent) or (isinstance(event, QueryEvent)
                                                          and event.query.strip().upper() == "BEGIN"):
                    if isinstance(event, QueryEvent) and txn is not None and index == 0:
                        continue  # the BEGIN after a GTID event of the same transaction
                    txn, index = (stream.log_file, event.packet.log_pos - event.packet.event_size), 0
                    continue
                if isinstance(event, XidEvent):
                    txn = None  # committed: the next change starts a new transaction
                    continue
                if not isinstance(event, WriteRowsEvent | UpdateRowsEvent | DeleteRowsEvent):
                    continue
                if txn is None:  # a stream started in the middle of a transaction: only its own start
                    txn = (stream.log_file, event.packet.log_pos - event.packet.event_size)
                for r in event.rows:
                    keys = [r["before_values"][key_col], r["after_values"][key_col]] \
                        if isinstance(event, UpdateRowsEvent) else [r["values"][key_col]]
                    for k in dict.fromkeys(keys):  # a key change: the old key goes, the new one comes
                        index += 1
                        pos = (txn[0], txn[1], index)
                        if start is None or pos > start:
                            found.append((pos, k, float(event.timestamp)))
                if len(found) >= limit:
                    break
        finally:
            stream.close()
        found = found[:limit]
        norm = [self._norm(_key_text(k)) for _, k, _ in found]
        current = self.current_rows(list(dict.fromkeys(norm)))
        return [Change(list(pos), k, current.get(k), ts) for (pos, _, ts), k in zip(found, norm, strict=True)]


def _key_text(key: Any) -> Any:
    return key.decode() if isinstance(key, bytes) else key
