"""Two-level read-through cache (in-process L1, shared L2) that composes any FeatureDao.

The read path is batch-aware: L1 first, then one L2 round trip for the L1 misses, then one source batch
for what is left, reassembled in input order. Missing keys are cached too (negative caching), concurrent
reads of one key share one source read (coalescing), and expired entries can be served while one
background refresh runs (stale-while-revalidate) or when the source fails (stale-if-error).
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cachetools import LRUCache

from featuredao._background import flush_background as flush_background  # where callers find it
from featuredao._background import refreshes, writeback
from featuredao.config import CacheConfig
from featuredao.dao import FeatureDao, KeyValueStore, invalid_keys
from featuredao.deadline import Deadline
from featuredao.errors import BackendTimeout
from featuredao.keys import normalise, normaliser, readable
from featuredao.metrics import Metrics
from featuredao.steps import Chunks, Fetch, ReadSteps
from featuredao.types import BatchResult, Degraded, FeatureValue, Key, Reason, Row

if TYPE_CHECKING:  # asyncio is imported where a loop runs: at import it costs start-up ~10%
    import asyncio

log = logging.getLogger("featuredao")

CHANNEL = "featuredao:invalidate"


@dataclass(frozen=True, slots=True)
class Entry:
    """A cached row (None: known to be missing) and until when it is fresh, then usable as stale."""

    row: Row | None
    fresh_until: float
    keep_until: float


@dataclass(slots=True)
class _Outcome:
    rows: dict[Key, Row | None]
    failed: set[Key]
    error: BaseException | None
    degraded: list[Degraded]


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


@dataclass(slots=True)
class _Lookup:
    """One read's keys as the caches answered them, before the store is asked for ``pending``."""

    keys: list[Key]
    now: float
    found: dict[Key, Row | None] = field(default_factory=dict)
    stale: dict[Key, Entry] = field(default_factory=dict)
    degraded: list[Degraded] = field(default_factory=list)
    pending: list[Key] = field(default_factory=list)


def _packer() -> tuple[Callable[[Any], bytes], Callable[[bytes], Any]]:
    # msgpack: compact binary (a float is 9 bytes, not ~18 characters of JSON), keeps int/float/bool
    # apart so rows come back typed, and both directions run in C. It ships with the redis extra.
    import msgpack

    def pack(obj: Any) -> bytes:
        data: bytes = msgpack.packb(obj, use_bin_type=True)
        return data

    def unpack(data: bytes) -> Any:
        return msgpack.unpackb(data, raw=False)

    return pack, unpack


class CachedDao(FeatureDao):
    """L1 (cachetools, behind a lock) and optional L2 (a shared key-value store) in front of a DAO."""

    def __init__(self, inner: FeatureDao, config: CacheConfig, l2: KeyValueStore | None = None,
                 metrics: Metrics | None = None) -> None:
        self.inner = inner
        self.view = inner.view
        self.config = config
        self._metrics = metrics or Metrics.disabled()
        self._norm = normaliser(self.view.key_type)
        self._key_type: type[Key] = int if self.view.key_type == "int" else str
        self._lock = threading.Lock()
        # An LRU bounded by max_entries; each entry carries its own expiry (positive, negative and stale
        # windows differ), checked on read. A TLRUCache would do that check too, at six times the cost
        # of a lookup, and a 500-item request makes 500 of them.
        self._l1: LRUCache[Key, Entry] | None = None
        if config.l1 is not None:
            self._l1 = LRUCache(maxsize=config.l1.max_entries)
        self._inflight: dict[Key, Future[_Outcome]] = {}
        self._l2 = l2 if config.l2 is not None else None
        # Rows cached under an older feature list must not be read back as this one.
        schema = hashlib.sha1(repr(sorted((f, t.value) for f, t in self.view.features.items()))
                              .encode()).hexdigest()[:8]
        self._prefix = f"featuredao:{self.view.name}:{schema}:"
        self._stale_window = max(config.stale_while_revalidate_s, config.stale_if_error_s)
        self._l1_ttl = config.l1.ttl_s if config.l1 is not None else 0.0
        self._l2_ttl = config.l2.ttl_s if config.l2 is not None else 0.0
        self._origin = uuid.uuid4().hex
        self._refreshing: set[Key] = set()
        self._unsubscribe: Callable[[], None] | None = None
        if self._l2 is not None:
            self._pack, self._unpack = _packer()
            self._unsubscribe = self._l2.subscribe(f"{CHANNEL}:{self.view.name}", self._on_invalidate)

    # -- reading -------------------------------------------------------------------------
    def read_partial(self, keys: Sequence[Key], features: Sequence[str] | None = None, *,
                     timeout_s: float | None = None, as_of: float | None = None,
                     deadline: Deadline | None = None) -> BatchResult:
        """Like ``read``; keys neither cached nor served by the source stay in ``failed``."""
        started = time.perf_counter()
        deadline = Deadline.of(deadline, timeout_s)
        look = self._lookup(keys, deadline)
        outcome = self._load(look.pending, deadline, as_of) if look.pending else None
        return self._answer(look, outcome, features, started)

    def grouped(self) -> bool:
        """L1 only in front of a DAO that reads in a group."""
        return self._l2 is None and self.inner.grouped()

    def read_steps(self, keys: Sequence[Key], features: Sequence[str] | None = None, *,
                   as_of: float | None = None, deadline: Deadline) -> ReadSteps:
        """``read_partial`` as steps: L1 first, the misses fetched with the other views of the source."""
        started = time.perf_counter()
        look = self._lookup(keys, deadline)
        outcome = (yield from self._load_steps(look.pending, deadline, as_of)) if look.pending else None
        return self._answer(look, outcome, features, started)

    def native_async(self) -> bool:
        """L1 only (an L2 is read with its blocking client) in front of a DAO that reads on the loop."""
        return self._l2 is None and self.inner.native_async()

    def bounded_reads(self) -> bool:
        """L1 only (an L2 read is bounded by its own socket timeout) in front of a bounded DAO."""
        return self._l2 is None and self.inner.bounded_reads()

    async def aread_partial(self, keys: Sequence[Key], features: Sequence[str] | None = None, *,
                            timeout_s: float | None = None, as_of: float | None = None,
                            deadline: Deadline | None = None) -> BatchResult:
        """``read_partial`` on the loop, for an L1-only cache in front of a DAO that reads on the loop."""
        deadline = Deadline.of(deadline, timeout_s)
        if not self.native_async():
            return await super().aread_partial(keys, features, as_of=as_of, deadline=deadline)
        started = time.perf_counter()
        look = self._lookup(keys, deadline)
        outcome = await self._aload(look.pending, deadline, as_of) if look.pending else None
        return self._answer(look, outcome, features, started)

    def _lookup(self, keys: Sequence[Key], deadline: Deadline) -> _Lookup:
        """What L1 (and L2) hold, what they hold stale, and what must be read."""
        norm, invalid = normalise(keys, self._norm, self._key_type)
        unique = readable(norm)  # an invalid key is neither cached nor read: it is answered missing
        look = _Lookup(norm, time.time())
        if invalid:
            look.degraded.append(invalid_keys(self.view.name, self.view.key_type, invalid))
        now, found, stale = look.now, look.found, look.stale
        pending = self._from_l1(unique, now, found, stale)
        if pending and self._l2 is not None:
            pending = self._from_l2(pending, now, found, stale, deadline)
        if pending and self.config.stale_while_revalidate_s > 0:
            revalidate = [k for k in pending
                          if k in stale and now < stale[k].fresh_until + self.config.stale_while_revalidate_s]
            for k in revalidate:
                found[k] = stale[k].row
            if revalidate:
                self._metrics.cache(self.view.name, "l1", "stale", len(revalidate))
                self._refresh_later(revalidate)
                pending = [k for k in pending if k not in found]
        look.pending = pending
        return look

    def _answer(self, look: _Lookup, outcome: _Outcome | None, features: Sequence[str] | None,
                started: float) -> BatchResult:
        """The cached rows and what the store answered, stale rows where it failed and they may serve."""
        found, failed, error, degraded = look.found, [], None, look.degraded
        if outcome is not None:
            degraded.extend(outcome.degraded)
            for k in look.pending:
                if k in outcome.failed:
                    entry = look.stale.get(k)
                    if entry is not None and look.now < entry.fresh_until + self.config.stale_if_error_s:
                        found[k] = entry.row
                    else:
                        failed.append(k)
                else:
                    found[k] = outcome.rows.get(k)
            lost = set(failed)  # a set: with every key failed, a list made this loop quadratic
            served_stale = [k for k in look.pending if k in outcome.failed and k not in lost]
            if served_stale:
                degraded.append(Degraded(self.view.name, Reason.STALE,
                                         f"{len(served_stale)} stale row(s) served: {outcome.error}"))
            if failed:
                error = outcome.error
        rows = [self._project(found.get(k), features) for k in look.keys]
        return BatchResult(look.keys, rows, degraded, time.perf_counter() - started, failed, error)

    def peek(self, keys: Sequence[Key]) -> BatchResult | None:
        """Every key fresh in L1: the whole result at once, without blocking; otherwise None."""
        if self._l1 is None:
            return None
        norm, invalid = normalise(keys, self._norm, self._key_type)
        if invalid:
            return None  # read_partial reports them
        now = time.time()
        found: dict[Key, Row | None] = {}
        l1 = self._l1
        with self._lock:
            # Key by key, out at the first miss: a batch that is not whole in L1 costs a few lookups,
            # not one per key (read_partial then looks them up once, for real).
            for k in norm:
                if k not in found:
                    entry = l1.get(k)
                    if entry is None or entry.fresh_until <= now:
                        return None
                    found[k] = entry.row
        self._metrics.cache(self.view.name, "l1", "hit", len(found))
        return BatchResult(norm, [found[k] for k in norm])

    @staticmethod
    def _project(row: Row | None, features: Sequence[str] | None) -> Row | None:
        if row is None or features is None:
            return row
        return {f: row.get(f) for f in features}

    def _from_l1(self, keys: list[Key], now: float, found: dict[Key, Row | None],
                 stale: dict[Key, Entry]) -> list[Key]:
        if self._l1 is None:
            return keys
        pending = []
        with self._lock:
            for k in keys:
                entry = self._l1.get(k)
                if entry is not None and entry.fresh_until > now:
                    found[k] = entry.row
                else:
                    if entry is not None and entry.keep_until > now:
                        stale[k] = entry
                    pending.append(k)
        self._metrics.cache(self.view.name, "l1", "hit", len(keys) - len(pending))
        self._metrics.cache(self.view.name, "l1", "miss", len(pending))
        return pending

    def _from_l2(self, keys: list[Key], now: float, found: dict[Key, Row | None],
                 stale: dict[Key, Entry], deadline: Deadline) -> list[Key]:
        assert self._l2 is not None
        # At most half the time left: a frozen L2 must leave the source time to serve the misses.
        left = deadline.remaining()
        share = None if left is None else left / 2
        try:
            values = self._l2.get_many([self._prefix + str(k) for k in keys], share)
        except Exception as exc:  # an L2 failure never fails a request: bypass it
            log.warning("view %s: L2 cache unavailable, bypassed: %s", self.view.name, exc)
            self._metrics.cache(self.view.name, "l2", "error", len(keys))
            return keys
        pending = []
        fill = []
        for k, raw in zip(keys, values, strict=True):
            entry = self._decode(raw) if raw is not None else None
            if entry is not None and entry.fresh_until > now:
                found[k] = entry.row
                fill.append((k, entry))
            else:
                if entry is not None and (k not in stale or entry.keep_until > stale[k].keep_until):
                    stale[k] = entry
                pending.append(k)
        if fill and self._l1 is not None:
            with self._lock:
                for k, entry in fill:
                    # Fresh in L1 no longer than L1's own TTL allows.
                    local = self._entry(entry.row, now, self._l1_ttl)
                    self._l1[k] = local if local.fresh_until < entry.fresh_until else entry
        self._metrics.cache(self.view.name, "l2", "hit", len(keys) - len(pending))
        self._metrics.cache(self.view.name, "l2", "miss", len(pending))
        return pending

    def _decode(self, raw: bytes) -> Entry | None:
        try:
            stored_at, row = self._unpack(raw)
        except Exception:  # a foreign or corrupt value is a miss
            return None
        return self._entry(row, stored_at, self._l2_ttl)

    def _entry(self, row: Row | None, at: float, ttl: float) -> Entry:
        fresh = at + (self.config.negative_ttl_s if row is None else ttl)
        return Entry(row, fresh, fresh + self._stale_window)

    # -- the source, coalesced -----------------------------------------------------------
    def _load(self, keys: list[Key], deadline: Deadline, as_of: float | None = None) -> _Outcome:
        mine, waits, own = self._claim(keys)
        merged = _Outcome({}, set(), None, [])
        if mine:
            try:
                res = self.inner.read_partial(mine, None, as_of=as_of, deadline=deadline)
                merged = self._loaded(res, own)
            except BaseException as exc:
                own.set_exception(exc)
                raise
            finally:
                self._unclaim(mine, own)
        self._wait_shared(merged, waits, deadline)
        return merged

    def _load_steps(self, keys: list[Key], deadline: Deadline,
                    as_of: float | None) -> Generator[Fetch, Chunks, _Outcome]:
        """``_load`` as steps: the inner read's fetch goes out with the other views' of its source."""
        mine, waits, own = self._claim(keys)
        # Keys another request is loading are read again rather than waited for: the wait would hold
        # up every view of this round trip, which carries them at little cost.
        try:
            res = yield from self.inner.read_steps([*mine, *waits], None, as_of=as_of, deadline=deadline)
            return self._loaded(res, own)
        except GeneratorExit:
            self._given_up(own)
            raise
        except BaseException as exc:
            own.set_exception(exc)
            raise
        finally:
            self._unclaim(mine, own)

    def _given_up(self, own: Future[_Outcome]) -> None:
        # This request gave up (its deadline); the others waiting for these keys have not.
        own.set_exception(BackendTimeout("the read these keys waited for was given up", view=self.view.name))

    def _wait_shared(self, merged: _Outcome, waits: Mapping[Key, Future[_Outcome]],
                     deadline: Deadline) -> None:
        for k, fut in waits.items():
            try:  # a coalesced waiter waits for the shared read no longer than its own deadline
                self._shared(merged, k, fut.result(timeout=deadline.remaining()))
            except FutureTimeout:
                self._shared(merged, k, None)

    async def _aload(self, keys: list[Key], deadline: Deadline, as_of: float | None) -> _Outcome:
        """``_load`` on the loop: the inner read awaited, reads in flight elsewhere awaited too."""
        import asyncio
        mine, waits, own = self._claim(keys)
        merged = _Outcome({}, set(), None, [])
        if mine:
            try:
                res = await self.inner.aread_partial(mine, None, as_of=as_of, deadline=deadline)
                merged = self._loaded(res, own)
            except asyncio.CancelledError:
                self._given_up(own)
                raise
            except BaseException as exc:
                own.set_exception(exc)
                raise
            finally:
                self._unclaim(mine, own)
        for k, fut in waits.items():
            left = deadline.remaining()
            waiting: asyncio.Future[_Outcome] = asyncio.wrap_future(fut)
            # Read the outcome even if this request stops waiting first: an unread exception is logged.
            waiting.add_done_callback(_retrieved)
            try:
                theirs: _Outcome | None = await asyncio.wait_for(asyncio.shield(waiting), left)
            except (TimeoutError, BackendTimeout):
                theirs = None
            self._shared(merged, k, theirs)
        return merged

    def _claim(self, keys: list[Key]) -> tuple[list[Key], dict[Key, Future[_Outcome]], Future[_Outcome]]:
        """The keys this read loads (others wait for the read already loading them)."""
        mine: list[Key] = []
        waits: dict[Key, Future[_Outcome]] = {}
        own: Future[_Outcome] = Future()
        with self._lock:
            for k in keys:
                other = self._inflight.get(k)
                if other is None:
                    mine.append(k)
                    self._inflight[k] = own
                else:
                    waits[k] = other
        return mine, waits, own

    def _loaded(self, res: BatchResult, own: Future[_Outcome]) -> _Outcome:
        outcome = _Outcome(dict(zip(res.keys, res.rows, strict=True)), set(res.failed), res.error,
                           res.degraded)
        self._store({k: r for k, r in outcome.rows.items() if k not in outcome.failed})
        own.set_result(outcome)
        return outcome

    def _unclaim(self, mine: list[Key], own: Future[_Outcome]) -> None:
        with self._lock:
            for k in mine:
                if self._inflight.get(k) is own:
                    del self._inflight[k]

    def _shared(self, merged: _Outcome, k: Key, theirs: _Outcome | None) -> None:
        """Key ``k`` as the read that loaded it answered (None: it did not in time)."""
        if theirs is None:
            merged.failed.add(k)
            merged.error = merged.error or BackendTimeout("deadline passed waiting for a shared read",
                                                          view=self.view.name)
        elif k in theirs.failed:
            merged.failed.add(k)
            merged.error = merged.error or theirs.error
        else:
            merged.rows[k] = theirs.rows.get(k)

    def _store(self, rows: Mapping[Key, Row | None]) -> None:
        """Remember rows (and, with negative caching, missing keys) in L1 and L2."""
        now = time.time()
        if self.config.negative_ttl_s <= 0:
            rows = {k: r for k, r in rows.items() if r is not None}
        if not rows:
            return
        if self._l1 is not None:
            with self._lock:
                for k, row in rows.items():
                    self._l1[k] = self._entry(row, now, self._l1_ttl)
        if self._l2 is not None and self.config.l2 is not None:
            jitter = self.config.l2.ttl_jitter
            items = []
            for k, row in rows.items():
                # Jitter spreads the expiry of rows written together, so they don't all miss at once.
                ttl = self.config.negative_ttl_s if row is None else self._l2_ttl
                ttl = ttl * (1 + random.uniform(-jitter, jitter)) + self._stale_window
                items.append((self._prefix + str(k), self._pack([now, row]), ttl))
            if not writeback.submit(lambda: self._write_l2(items)):
                self._metrics.cache(self.view.name, "l2", "dropped", len(items))

    def _write_l2(self, items: list[tuple[str, bytes, float]]) -> None:
        assert self._l2 is not None
        try:
            self._l2.set_many(items)
        except Exception as exc:
            log.warning("view %s: L2 cache write failed: %s", self.view.name, exc)
            self._metrics.cache(self.view.name, "l2", "error", len(items))

    def _refresh_later(self, keys: list[Key]) -> None:
        with self._lock:
            # Queued or running: a key is refreshed once however many reads find it stale meanwhile.
            keys = [k for k in keys if k not in self._inflight and k not in self._refreshing]
            self._refreshing.update(keys)
        if keys:
            timeout = self.view.timeout_ms / 1000 * 10

            def refresh() -> None:
                try:
                    self._load(keys, Deadline.after(timeout))
                except Exception as exc:
                    log.warning("view %s: background refresh failed: %s", self.view.name, exc)
                finally:
                    with self._lock:
                        self._refreshing.difference_update(keys)

            if not refreshes.submit(refresh):
                with self._lock:
                    self._refreshing.difference_update(keys)
                self._metrics.cache(self.view.name, "l1", "refresh_dropped", len(keys))

    # -- invalidation --------------------------------------------------------------------
    def invalidate(self, keys: Iterable[Key]) -> None:
        """Drop keys from L1 and L2 and tell every other process to drop them from its L1."""
        norm = [self._norm(k) for k in keys]  # a key that cannot be one is the caller's error here
        self._drop_l1(norm)
        if self._l2 is not None:
            self._l2.delete_many([self._prefix + str(k) for k in norm])
            self._l2.publish(f"{CHANNEL}:{self.view.name}", self._pack([self._origin, norm]))

    def _drop_l1(self, keys: Iterable[Key]) -> None:
        if self._l1 is not None:
            with self._lock:
                for k in keys:
                    self._l1.pop(k, None)

    def _on_invalidate(self, message: bytes) -> None:
        try:
            _origin, keys = self._unpack(message)
            self._drop_l1(self._norm(k) for k in keys)
        except Exception as exc:
            log.warning("view %s: bad invalidation message: %s", self.view.name, exc)

    # -- the rest of the contract --------------------------------------------------------
    def upsert(self, rows: Iterable[tuple[Key, Mapping[str, FeatureValue]]]) -> int:
        """Write through to the store, then invalidate the written keys everywhere."""
        batch = list(rows)
        try:
            return self.inner.upsert(batch)
        finally:  # also after a partial write: the keys written before the failure must not stay cached
            self.invalidate(k for k, _ in batch)

    def append(self, events: Iterable[tuple[Key, Mapping[str, FeatureValue]]]) -> int:
        """Add events through to the store, then invalidate the keys' cached sequences everywhere."""
        batch = list(events)
        try:
            return self.inner.append(batch)
        finally:
            self.invalidate(k for k, _ in batch)

    def ping(self) -> None:
        """Ping the store behind the cache."""
        self.inner.ping()

    def lane(self) -> tuple[str, int] | None:
        """The store's lane: misses are read there."""
        return self.inner.lane()

    def close(self) -> None:
        """Stop listening for invalidations and close the store's DAO."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self.inner.close()

    def __repr__(self) -> str:
        return f"CachedDao({self.inner!r})"
