"""What an adapter can do: flags callers branch on, never the adapter's name."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an adapter can do; callers branch on these, never on the adapter's name."""

    write: bool = True
    """Has a write path (upsert)."""
    projection: bool = True
    """Reads only the requested features from the store."""
    server_timeout: bool = False
    """Cancels work on the server when the time left runs out."""
    concurrent_chunks: bool = True
    """Chunks of one read may run concurrently (the pool has several connections)."""
    create: bool = True
    """Can create the table or keyspace a view needs (``prepare``)."""
    key_value: bool = False
    """Offers a shared key-value store (``Source.key_value()``) that can hold the L2 cache."""
    scan: bool = False
    """Reads a view's rows in key order (``BaseDao.scan``): the source of a full sync."""
    changes: bool = False
    """Reads rows changed after a watermark (``BaseDao.changes``): the source of an incremental sync."""
    delete: bool = False
    """Deletes keys (``BaseDao.delete``)."""
    change_feed: bool = False
    """Records inserts, updates and deletes in a change feed (``BaseDao.feed``): the source of CDC."""
    state: bool = False
    """Holds durable synchronization state with atomic commits (``Source.state_store()``)."""
    sequences: bool = False
    """Reads sequence views: each key's newest events of a time window, newest first, ``limit`` at most
    (``BaseDao._fetch_events``), and appends events (``BaseDao._append_batch``)."""
    sequence_filters: bool = False
    """Applies a sequence's event-type and threshold filters in the store, so its limit counts events
    that pass them (otherwise the core filters ``scan_len`` events read per key)."""
    async_reads: bool = False
    """Reads with the driver's asyncio client (``BaseDao._afetch_batch``): ``afetch`` needs no thread."""
    bounded_reads: bool = False
    """Every wait of a table read (pool checkout, connect, each reply) ends within the time the read is
    given: ``fetch`` may run it in the caller's thread, since nothing but the time can hold it there."""
    grouped_reads: bool = False
    """Reads several views' chunks at once (``Source.read_group``): a request's views of this source
    cost one round trip (Redis: one pipeline) instead of one each."""
