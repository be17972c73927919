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

pymysql has no pool, so ``_mysql_pool`` has a small one; a read that finds a pooled connection dead
(server restarted) drops the idle ones and retries once. The change feed (the binary log) is in
``_mysql_binlog``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import pymysql
import pymysql.converters
from pydantic import Field
from pymysql.constants import FIELD_TYPE

from featuredao.config import View
from featuredao.dao import Capabilities
from featuredao.errors import (
    BackendAuthError,
    BackendError,
    BackendQueryError,
    BackendTimeout,
    BackendUnavailable,
)

from ._mysql_binlog import BinlogFeedDao, FeedBatch, FeedGap, FeedSource
from ._mysql_pool import (
    GONE_CODES,
    GRACE_S,
    Connection,
    ConnectionPool,
    close_quietly,
    connection_lost,
    error_code,
    statement_error,
)
from ._sql_dialect import MYSQL, SqlSourceOptions

__all__ = ["ConnectionPool", "FeedBatch", "FeedGap", "MySQLDao", "MySQLOptions", "MySQLSource"]

_T = TypeVar("_T")

# max_statement_time (MariaDB), MAX_EXECUTION_TIME (MySQL), KILL QUERY, lock wait timeout.
_TIMEOUT_CODES = frozenset({1969, 3024, 1317, 1205})
_AUTH_CODES = frozenset({1044, 1045, 1698, 1251})

# DECIMAL arrives as float (features are floats), sparing a Decimal per value.
_CONVERSIONS = {**pymysql.converters.conversions, FIELD_TYPE.DECIMAL: float, FIELD_TYPE.NEWDECIMAL: float}


class MySQLOptions(SqlSourceOptions):
    """Source options of the mysql adapter."""

    port: int = Field(default=3306, ge=1, le=65535)
    flavor: Literal["mariadb", "mysql"] = "mariadb"
    """Which server-side statement time limit to use (see the module docstring)."""


class MySQLSource(FeedSource):
    """One MySQL/MariaDB database reached through a pool of pymysql connections."""

    type_name = "mysql"
    driver_modules = {"pymysql": "PyMySQL", "pymysqlreplication": "mysql-replication"}
    options_model = MySQLOptions
    dialect = MYSQL
    capabilities = Capabilities(server_timeout=True, scan=True, changes=True, delete=True, change_feed=True,
                                state=True, sequences=True, sequence_filters=True, grouped_reads=True)
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
            connect_timeout=o.connect_timeout_ms / 1000, read_timeout=o.read_timeout_ms / 1000 + GRACE_S,
            write_timeout=o.read_timeout_ms / 1000 + GRACE_S, conv=_CONVERSIONS,
        )

    def _limited(self, sql: str, timeout_s: float) -> str:
        """The statement with a server-side time limit (never 0: that means "no limit")."""
        if self.options.flavor == "mariadb":
            return f"SET STATEMENT max_statement_time={max(timeout_s, 0.001):.3f} FOR {sql}"
        ms = max(int(timeout_s * 1000), 1)
        if sql.startswith("("):  # a UNION of parenthesized parts (sequence reads): the hint needs a SELECT
            return f"SELECT /*+ MAX_EXECUTION_TIME({ms}) */ * FROM ({sql}) AS _limited"
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
                    conn._read_timeout = left + GRACE_S  # type: ignore[attr-defined]
                    try:
                        return work(conn)
                    finally:
                        conn._read_timeout = self.options.read_timeout_ms / 1000 + GRACE_S  # type: ignore[attr-defined]
            except Exception as exc:
                if attempt or fresh or self.closed or not connection_lost(exc):  # closing: no retry
                    raise
                self._pool.clear()
        raise AssertionError("unreachable")  # pragma: no cover

    def fetch(self, sql: str, params: Sequence[Any], timeout_s: float | None) -> Sequence[Sequence[Any]]:
        rows: Sequence[Sequence[Any]] = self._run(lambda conn: self._select(conn, sql, params, timeout_s),
                                                  timeout_s)
        return rows

    def _select(self, conn: Connection, sql: str, params: Sequence[Any],
                timeout_s: float | None) -> Sequence[Sequence[Any]]:
        """One read on ``conn`` with the server-side limit ``timeout_s`` (None: ``read_timeout_ms``)."""
        limit = self.options.read_timeout_ms / 1000 if timeout_s is None else timeout_s
        with conn.cursor() as cur:
            cur.execute(self._limited(sql, limit), params)
            rows: Sequence[Sequence[Any]] = cur.fetchall()
            return rows

    def _on_connection(self, work: Callable[[Connection], _T], timeout_s: float | None) -> _T:
        result: _T = self._run(work, timeout_s)
        return result

    def _statement_failed(self, exc: BaseException, conn: Connection) -> bool:
        return statement_error(exc)

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
        return self._select(conn, sql, params, None)

    def ping(self) -> None:
        self.fetch("SELECT 1", (), self.options.read_timeout_ms / 1000)

    def map_error(self, exc: BaseException) -> type[BackendError] | None:
        code = error_code(exc)
        if isinstance(exc, pymysql.err.MySQLError) and code is not None:
            if code in _TIMEOUT_CODES or (code == 2013 and "timed out" in str(exc)):
                return BackendTimeout
            if code in _AUTH_CODES:
                return BackendAuthError
            if code in GONE_CODES or code >= 2000:
                return BackendUnavailable
        return super().map_error(exc)

    def _interrupt(self) -> None:
        self._shut_feeds()
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
            close_quietly(conn)

    def _release(self) -> None:
        self._pool.close()
        with self._feed_lock:
            feeds, self._feed_conns = list(self._feed_conns), set()
        for conn in feeds:  # a binlog stream a read held for the next chunk
            close_quietly(conn)


class MySQLDao(BinlogFeedDao):
    """A SQL view whose change feed is the server's row-based binary log (see ``BinlogFeedDao``)."""

    source: MySQLSource
