"""One round trip of a standalone Redis read, every wait of it bounded by the time the read has left.

redis-py waits with the timeouts a pool was built with: the pool's checkout timeout, the socket's
connect and read timeouts. A read that must give up at its deadline (a frozen server, a full pool)
would hold its thread that long, so no caller could run it in its own thread. Here the commands go out
on one pooled connection and each reply is read with ``read_response(timeout=...)`` (a late reply drops
the connection: its stream is out of step); the checkout and the connect of a new connection wait at
most the same time left, through a per-thread bound the pool and its connections read as their timeout.
Only an AUTH handshake (a source with a password, on a new connection) still waits the socket timeout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import redis
import redis.exceptions as rexc

_bound = threading.local()
"""``left``: the time the calling thread's read has left (absent: no bound of its own)."""


def _within(configured: float | None) -> float | None:
    left: float | None = getattr(_bound, "left", None)
    if left is None:
        return configured
    return left if configured is None else min(configured, left)


class BoundedPool(redis.BlockingConnectionPool):
    """A blocking pool whose checkout waits at most the calling read's time left."""

    @property
    def timeout(self) -> float | None:
        """Read by ``get_connection`` as the checkout wait."""
        return _within(self._timeout)

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._timeout = value


class _BoundedConnect:
    """A connection whose connect waits at most the calling read's time left."""

    _socket_connect_timeout: float | None  # where redis-py's own property keeps it

    @property
    def socket_connect_timeout(self) -> float | None:
        """Read by ``_connect`` as the connect wait."""
        return _within(self._socket_connect_timeout)

    @socket_connect_timeout.setter
    def socket_connect_timeout(self, value: float | None) -> None:
        self._socket_connect_timeout = value


class BoundedConnection(_BoundedConnect, redis.Connection):
    """``redis.Connection`` with a bounded connect."""


class BoundedSSLConnection(_BoundedConnect, redis.SSLConnection):
    """``redis.SSLConnection`` with a bounded connect."""


def exchange(client: redis.Redis, commands: Sequence[tuple[Any, ...]], timeout_s: float | None,
             retries: int, *, error_replies: bool = False) -> list[Any]:
    """The replies of ``commands`` sent together; the first error reply is raised once all are read
    (``error_replies``: returned in its place, for a caller that sent several reads' commands).

    A dropped connection before any reply (a stale pooled socket after a restart) is retried at once, at
    most ``retries`` times: reads are idempotent, and a timeout is never retried (it used the time up).
    """
    deadline = None if timeout_s is None else time.perf_counter() + timeout_s
    pool = client.connection_pool
    attempt = 0
    while True:
        if deadline is not None:  # the checkout, and the reconnect of a dropped connection, wait no longer
            _bound.left = max(deadline - time.perf_counter(), 0.0)
        try:
            conn: Any = pool.get_connection()
        except BaseException:
            _bound.left = None
            raise
        replies: list[Any] = []
        try:
            try:
                if deadline is not None:
                    _bound.left = max(deadline - time.perf_counter(), 0.0)
                conn.send_packed_command(conn.pack_commands(commands))
            finally:
                _bound.left = None
            for _ in commands:
                try:
                    if deadline is None:
                        replies.append(conn.read_response())
                    else:
                        replies.append(conn.read_response(timeout=max(deadline - time.perf_counter(), 0.0)))
                except rexc.ResponseError as exc:  # read whole: the stream is still in step
                    replies.append(exc)
        except rexc.ConnectionError:
            conn.disconnect()
            if replies or attempt >= retries:
                raise
            attempt += 1
            continue
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
        if error_replies:
            return replies
        for reply in replies:
            if isinstance(reply, rexc.ResponseError):
                raise reply
        return replies
