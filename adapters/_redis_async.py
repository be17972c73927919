"""The Redis adapter's asyncio clients (redis-py's ``redis.asyncio``): one per running event loop.

Each client has the synchronous client's settings (server, credentials, TLS, db, socket and connect
timeouts, ``pool_size`` connections, a wait of ``pool_timeout_ms`` for a free one, RESP2, hiredis's reply
parser and command packer when installed) and serves standalone servers only: a cluster's per-node
outcomes stay on threads.

A command cancelled at its deadline leaves no reply behind: redis-py (5.0.1 and later) disconnects a
connection whose read is interrupted by any ``BaseException``, cancellation included, so the next
command on it reconnects instead of reading the late reply of another key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis.asyncio as aredis
import redis.exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.connection import HiredisRespSerializer
from redis.utils import HIREDIS_AVAILABLE

from ._per_loop import PerLoop

_PACKER = HiredisRespSerializer() if HIREDIS_AVAILABLE else None


class _Connection(aredis.Connection):
    """redis-py's asyncio connection, packing commands as its synchronous one does: in C with hiredis
    (its own packer is pure Python, a call per argument, on the loop)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        return _PACKER.pack(*args) if _PACKER is not None else super().pack_command(*args)


class _SSLConnection(aredis.SSLConnection):
    """``_Connection`` over TLS."""

    def pack_command(self, *args: Any) -> list[bytes]:
        return _PACKER.pack(*args) if _PACKER is not None else super().pack_command(*args)


def async_clients(name: str, settings: Callable[[], dict[str, Any]], *, host: str, port: int, db: int,
                  pool_size: int, pool_timeout_s: float, retries: int,
                  tls: bool) -> PerLoop[aredis.Redis]:
    """The per-loop asyncio clients of one standalone server; ``settings`` gives the shared socket, TLS
    and credential options (read when a loop first needs its client)."""

    async def make() -> aredis.Redis:
        kwargs = settings()
        if tls:
            kwargs["connection_class"] = _SSLConnection
        else:
            kwargs = {k: v for k, v in kwargs.items() if not k.startswith("ssl_")}
            kwargs["connection_class"] = _Connection
        # Only dropped connections are retried, at once: a timeout already used up the caller's budget.
        retry = Retry(NoBackoff(), retries, supported_errors=(rexc.ConnectionError,))
        pool = aredis.BlockingConnectionPool(host=host, port=port, db=db, max_connections=pool_size,
                                             timeout=pool_timeout_s, retry=retry, **kwargs)
        return aredis.Redis(connection_pool=pool)

    async def close(client: aredis.Redis) -> None:
        await client.aclose(close_connection_pool=True)

    return PerLoop(name, make, close)
