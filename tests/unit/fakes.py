"""In-memory stand-ins for unit tests of the core (never used in adapter tests)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from featuredao.config import View
from featuredao.dao import FeatureDao, KeyValueStore
from featuredao.deadline import Deadline
from featuredao.errors import BackendError, BackendUnavailable
from featuredao.types import BatchResult, FeatureType, FeatureValue, Key, Row


def make_view(name: str = "v", entity: str = "item", prefix: str = "", timeout_ms: int = 200) -> View:
    return View(name, entity, "src", name, "id", "str", {"a": FeatureType.INT, "b": FeatureType.STR},
                {"a": -1}, prefix, timeout_ms)


class FakeDao(FeatureDao):
    """Serves rows from a dict; can sleep, fail every call, or fail given keys."""

    def __init__(self, view: View, rows: dict[Key, Row] | None = None, delay: float = 0.0,
                 error: BackendError | None = None, failing: set[Key] | None = None) -> None:
        self.view = view
        self.rows = rows if rows is not None else {}
        self.delay = delay
        self.error = error
        self.failing = failing or set()
        self.calls: list[list[Key]] = []
        self.release = threading.Event()
        self._lock = threading.Lock()

    def read_partial(self, keys: Sequence[Key], features: Sequence[str] | None = None, *,
                     timeout_s: float | None = None, as_of: float | None = None,
                     deadline: Deadline | None = None) -> BatchResult:
        with self._lock:
            self.calls.append(list(keys))
        if self.delay:
            self.release.wait(self.delay)
        if isinstance(self.error, BackendUnavailable):
            return BatchResult(list(keys), [None] * len(keys), failed=list(keys), error=self.error)
        if self.error is not None:
            raise self.error
        failed = [k for k in keys if k in self.failing]
        rows = [None if k in self.failing else self.rows.get(k) for k in keys]
        err = BackendUnavailable("these keys' shard is down", view=self.view.name) if failed else None
        return BatchResult(list(keys), rows, failed=failed, error=err)

    def upsert(self, rows: Iterable[tuple[Key, Mapping[str, FeatureValue]]]) -> int:
        n = 0
        for k, r in rows:
            self.rows[k] = dict(r)
            n += 1
        return n

    def ping(self) -> None:
        if self.error is not None:
            raise self.error


class MemoryKV(KeyValueStore):
    """A key-value store in a dict, with TTLs, pub/sub and an off switch."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[bytes, float]] = {}
        self.subscribers: dict[str, list[Callable[[bytes], None]]] = {}
        self.down = False
        self.gets = 0

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("kv down")

    def get_many(self, keys: Sequence[str], timeout_s: float | None = None) -> list[bytes | None]:
        self._check()
        self.gets += 1
        now = time.time()
        return [v if (e := self.data.get(k)) and (v := e[0]) and e[1] > now else None for k in keys]

    def set_many(self, items: Sequence[tuple[str, bytes, float]]) -> None:
        self._check()
        for k, v, ttl in items:
            self.data[k] = (v, time.time() + ttl)

    def delete_many(self, keys: Sequence[str]) -> None:
        self._check()
        for k in keys:
            self.data.pop(k, None)

    def publish(self, channel: str, message: bytes) -> None:
        self._check()
        for cb in self.subscribers.get(channel, []):
            cb(message)

    def subscribe(self, channel: str, callback: Callable[[bytes], None]) -> Callable[[], None]:
        self.subscribers.setdefault(channel, []).append(callback)
        return lambda: self.subscribers[channel].remove(callback)
