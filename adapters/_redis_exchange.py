"""One round trip of a standalone Redis read, every reply read within the time the read has left.

redis-py's client reads replies with the socket timeout it was built with; a read that must give up at
its deadline (a frozen server) would hold its worker and its connection that long. Here the commands go
out on one pooled connection and each reply is read with ``read_response(timeout=...)``; a reply that is
late drops the connection (its stream is out of step), and the caller's time, not the socket's, bounds it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis
import redis.exceptions as rexc


def exchange(client: redis.Redis, commands: Sequence[tuple[Any, ...]], timeout_s: float | None,
             retries: int) -> list[Any]:
    """The replies of ``commands`` sent together; the first error reply is raised once all are read.

    A dropped connection before any reply (a stale pooled socket after a restart) is retried at once, at
    most ``retries`` times: reads are idempotent, and a timeout is never retried (it used the time up).
    """
    deadline = None if timeout_s is None else time.perf_counter() + timeout_s
    pool = client.connection_pool
    attempt = 0
    while True:
        conn: Any = pool.get_connection()
        replies: list[Any] = []
        try:
            conn.send_packed_command(conn.pack_commands(commands))
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
        for reply in replies:
            if isinstance(reply, rexc.ResponseError):
                raise reply
        return replies
