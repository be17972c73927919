"""The Redis adapter's key-value tier: the shared (L2) cache's operations and pub/sub invalidation."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from featuredao.dao import KeyValueStore

from ._redis_codecs import _detail

log = logging.getLogger("featuredao")


class RedisKeyValue(KeyValueStore):
    """The cache tier's operations on a Redis source's own pool, plus pub/sub for invalidation."""

    def __init__(self, client: Callable[[], Any], cluster: bool) -> None:
        self._client = client
        self._cluster = cluster

    def _pipeline(self) -> Any:
        # Without MULTI: in a cluster the pipeline is split per node, one round trip each.
        return self._client().pipeline(transaction=False)

    def get_many(self, keys: Sequence[str], timeout_s: float | None = None) -> list[bytes | None]:
        if not keys:
            return []
        if self._cluster:
            pipe = self._pipeline()
            for k in keys:
                pipe.get(k)
            return list(pipe.execute())
        return list(self._client().mget(keys))

    def set_many(self, items: Sequence[tuple[str, bytes, float]]) -> None:
        if not items:
            return
        pipe = self._pipeline()
        for key, value, ttl_s in items:
            pipe.set(key, value, px=max(1, int(ttl_s * 1000)))
        pipe.execute()

    def delete_many(self, keys: Sequence[str]) -> None:
        if not keys:
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
