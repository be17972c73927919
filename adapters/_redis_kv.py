"""The Redis adapter's key-value tier (the shared L2 cache), on a server's pool or a cluster's router."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import redis.exceptions as rexc

from featuredao.dao import Deadline, KeyValueStore

from ._redis_codecs import _detail
from ._redis_exchange import exchange
from ._redis_router import ClusterRouter, Commands
from ._redis_slots import NodeBreaker, Routed

__all__ = ["NodeBreaker", "RedisKeyValue"]  # NodeBreaker: importable from here as before the router moved

log = logging.getLogger("featuredao")

# L2 reads of a standalone server with a timeout run here: the caller waits at most its time left. The
# reply is read within it (``exchange``), but a frozen server still holds what comes before: a new
# connection's connect and AUTH (the socket timeouts), a checkout from a pool its stuck reads hold.
_l2_reads = ThreadPoolExecutor(max_workers=16, thread_name_prefix="featuredao-l2-read")


class RedisKeyValue(KeyValueStore):
    """The cache tier's operations on a Redis source's own pool, plus pub/sub for invalidation.

    On a cluster, reads, writes and deletes go through the source's :class:`ClusterRouter`: a node that
    is down costs its own keys only (they read as misses), never the whole batch.
    """

    def __init__(self, client: Callable[[], Any], cluster: bool,
                 router: Callable[[], ClusterRouter] | None = None) -> None:
        self._client = client
        self._cluster = cluster
        self._router = router

    def _pipeline(self) -> Any:
        # Without MULTI: in a cluster the pipeline is split per node, one round trip each.
        return self._client().pipeline(transaction=False)

    def _routed(self, keys: Sequence[str], commands: Commands, timeout_s: float | None,
                read: bool) -> Routed:
        assert self._router is not None
        deadline = None if timeout_s is None else time.perf_counter() + timeout_s
        return self._router().execute([k.encode() for k in keys], commands, deadline=deadline, read=read)

    @staticmethod
    def _raise_failures(routed: Routed, what: str) -> None:
        if routed.failures:
            parts = "; ".join(f"{addr}: {_detail(exc)}" for addr, (exc, _) in routed.failures.items())
            first = next(iter(routed.failures.values()))[0]
            raise rexc.ClusterError(f"{what}: {len(routed.failed)} key(s) not reached ({parts})") from first

    def get_many(self, keys: Sequence[str], timeout_s: float | None = None) -> list[bytes | None]:
        if not keys:
            return []
        if self._router is not None:
            # Keys of a failed node read as misses: the view reads them from its source.
            routed = self._routed(keys, [(("GET", k),) for k in keys], timeout_s, read=True)
            return [r[0] if r is not None and not isinstance(r[0], Exception) else None
                    for r in routed.replies]
        if self._cluster:
            pipe = self._pipeline()
            for k in keys:
                pipe.get(k)
            return list(pipe.execute())
        if timeout_s is None:
            return list(self._client().mget(keys))
        deadline = Deadline.after(timeout_s)
        try:
            reading = _l2_reads.submit(self._mget, keys, deadline)
        except RuntimeError:  # the interpreter is shutting down
            return self._mget(keys, deadline)
        try:
            return reading.result(timeout=deadline.remaining())
        except FutureTimeout:
            reading.cancel()
            raise rexc.TimeoutError(f"L2 read: no answer within {timeout_s * 1000:.0f} ms") from None

    def _mget(self, keys: Sequence[str], deadline: Deadline) -> list[bytes | None]:
        """MGET on one pooled connection, its reply awaited no longer than the deadline."""
        if deadline.expired:  # queued here past its caller's deadline: nobody waits for it
            raise rexc.TimeoutError("L2 read: no time left when it could start")
        # A reply cut short drops its connection, so no later command reads this one's late reply; a
        # stale pooled socket (a restarted server) is retried once.
        return list(exchange(self._client(), [("MGET", *keys)], deadline.remaining(), 1)[0])

    def set_many(self, items: Sequence[tuple[str, bytes, float]]) -> None:
        if not items:
            return
        if self._router is not None:
            commands = [(("SET", k, v, "PX", max(1, int(ttl * 1000))),) for k, v, ttl in items]
            self._raise_failures(self._routed([k for k, _, _ in items], commands, None, read=False),
                                 "L2 write")
            return
        pipe = self._pipeline()
        for key, value, ttl_s in items:
            pipe.set(key, value, px=max(1, int(ttl_s * 1000)))
        pipe.execute()

    def delete_many(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        if self._router is not None:
            self._raise_failures(self._routed(keys, [(("DEL", k),) for k in keys], None, read=False),
                                 "L2 delete")
            return
        pipe = self._pipeline()
        for key in keys:
            pipe.delete(key)
        pipe.execute()

    def publish(self, channel: str, message: bytes) -> None:
        self._client().publish(channel, message)

    def subscribe(self, channel: str, callback: Callable[[bytes], None]) -> Callable[[], None]:
        """Listen on a daemon thread that reconnects by itself, so a Redis that is down now is no error."""
        stop = threading.Event()
        ready = threading.Event()

        def listen() -> None:
            while not stop.is_set():
                pubsub = None
                try:
                    pubsub = self._client().pubsub(
                        ignore_subscribe_messages=True)
                    pubsub.subscribe(channel)
                    while not stop.is_set():
                        message = pubsub.get_message(timeout=0.2)
                        ready.set()
                        if message is not None and message.get("type") == "message":
                            callback(message["data"])
                except Exception as exc:
                    if stop.is_set():
                        break  # closing: the source's pool went away under us
                    log.warning("invalidation listener on %s: %s; reconnecting", channel,
                                _detail(exc))
                    stop.wait(1.0)
                finally:
                    if pubsub is not None:
                        pubsub.close()

        threading.Thread(target=listen, daemon=True, name=f"featuredao-sub-{channel}").start()
        ready.wait(1.0)  # usually subscribed by now; if Redis is down, go on and catch up later
        return stop.set
