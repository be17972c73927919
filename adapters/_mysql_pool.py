"""The MySQL adapter's connection pool: pymysql has none, so this is a small one.

A LIFO of idle connections bounded by a semaphore; a connection that failed below the SQL level is
closed, never handed out again.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeAlias

import pymysql

from featuredao.errors import Overloaded

if TYPE_CHECKING:
    Connection: TypeAlias = pymysql.connections.Connection[Any]  # generic only in the stubs
else:
    Connection = pymysql.connections.Connection

GRACE_S = 0.25
"""How much longer than the server's statement limit the client waits on the socket."""
# Client-side codes (2000+) and server codes meaning "this connection is gone".
GONE_CODES = frozenset({2002, 2003, 2006, 2013, 2055, 1040, 1053, 1927, 4031})


def error_code(exc: BaseException) -> int | None:
    """The MySQL error number of a pymysql exception (None: it has none)."""
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def connection_lost(exc: BaseException) -> bool:
    """A connection-level failure that is not a timeout (a stale pooled connection looks like this)."""
    if isinstance(exc, pymysql.err.InterfaceError):
        return True
    if not isinstance(exc, pymysql.err.OperationalError):
        return isinstance(exc, ConnectionError)
    return error_code(exc) in GONE_CODES and "timed out" not in str(exc)


def statement_error(exc: BaseException) -> bool:
    """The server answered with an error: the connection is still in step, fit for the next statement."""
    code = error_code(exc)
    return isinstance(exc, pymysql.err.MySQLError) and code is not None and code < 2000 \
        and code not in GONE_CODES


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
                self._give_back(conn, statement_error(exc))
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
            close_quietly(conn)

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
            close_quietly(conn)

    def close(self) -> None:
        """Close idle connections now and borrowed ones when they come back."""
        self._closed = True
        self.clear()


def close_quietly(conn: Connection) -> None:
    """Close ``conn``, forcing its socket shut if the polite close fails."""
    try:
        conn.close()
    except Exception:  # already closed or the socket is gone: nothing left to release
        conn._force_close()  # type: ignore[attr-defined]
