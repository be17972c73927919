"""The Redis adapter: hash or packed-string layouts, pipelined batches, standalone or Redis Cluster.

Layouts (view ``options``; every key is ``key_template`` with ``{table}`` and ``{key}`` filled in):

* ``"layout": "string", "encoding": "msgpack"`` (recommended for wide feature sets): one msgpack map
  ``{feature: value}`` per key, read with one ``MGET`` per chunk. Values keep their types (int, float
  as float64, str, bool, lists as arrays), so reading costs one C call per key and no per-value work.
* ``"layout": "string", "encoding": "json"``: one JSON object per key, same shape as msgpack.
* ``"layout": "string", "encoding": "csv"``: ``name:value`` pairs joined by ``delimiter`` (one
  character, default ``,``); values are text as in the hash layout, with ``%`` and the delimiter
  percent-escaped (``%25``, ``%2C``); a name ends at the first ``:``, so values may contain ``:``.
* ``"layout": "hash"``: one hash per key, one field per feature, read with ``HMGET`` in a pipeline.
  Field values are text: ints in decimal, floats as Python ``repr`` (round-trips exactly), bools as
  ``1``/``0``, strings as UTF-8, lists (embeddings) as compact JSON arrays.

In every layout a null feature is left out (an absent hash field, an absent map entry or pair), and
reads give the view's default for it. A hash row whose features are all null is deleted.

On a Redis Cluster (``"cluster": true``) keys go through :class:`~._redis_router.ClusterRouter`: pipelines per
node, a breaker per node, a slot map that follows failovers, optional replica reads. A node that fails
costs only its own keys: ``read_partial`` lists them in ``failed`` and ``upsert`` raises
:class:`PartialWrite` after writing the rest.

``afetch`` reads table views of a standalone server on the event loop with redis-py's asyncio client, one
per running loop (:mod:`._redis_async`); cluster and sequence views read on threads.

Sequence views (``"kind": "sequence"``) keep one sorted set per key, scored by event time, each event a
msgpack array; ``key_template`` and ``ttl_s`` apply to them, the layout options do not (see
:mod:`._redis_sequence`).

The rooms: options in :mod:`._redis_options`, keys, row decoding and write commands per layout in
:mod:`._redis_layout`, the per-node cluster paths and :class:`PartialWrite` in :mod:`._redis_cluster`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from itertools import islice
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]
import orjson
import redis
import redis.asyncio as aredis
import redis.exceptions as rexc
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from featuredao.config import View
from featuredao.dao import Capabilities, Chunks, Fetch, Source
from featuredao.errors import (
    BackendAuthError,
    BackendError,
    BackendQueryError,
    BackendTimeout,
    BackendUnavailable,
    Closed,
    Overloaded,
)
from featuredao.types import Key, RawRows, Row

from ._per_loop import PerLoop
from ._redis_async import async_clients
from ._redis_cluster import PartialWrite
from ._redis_codecs import _detail
from ._redis_exchange import BoundedConnection, BoundedPool, BoundedSSLConnection, exchange
from ._redis_kv import RedisKeyValue
from ._redis_options import RedisOptions, RedisViewOptions
from ._redis_router import ClusterRouter
from ._redis_sequence import RedisSequences

__all__ = ["PartialWrite", "RedisDao", "RedisOptions", "RedisSource", "RedisViewOptions"]


def _group_commands(fetches: Sequence[Fetch]) -> tuple[list[tuple[Any, ...]], list[int]]:
    """Every chunk's read commands in order, and how many each chunk sent."""
    commands: list[tuple[Any, ...]] = []
    sizes: list[int] = []
    for fetch in fetches:
        for chunk in fetch.chunks:
            sent = fetch.dao._read_commands(chunk, fetch.fields)
            sizes.append(len(sent))
            commands.extend(sent)
    return commands, sizes


class RedisSource(Source):
    """One Redis server or cluster, with its connection pool(s)."""

    type_name = "redis"
    driver_modules = {"redis": "redis", "msgpack": "msgpack", "msgspec": "msgspec"}
    options_model = RedisOptions
    view_options_model = RedisViewOptions
    capabilities = Capabilities(create=False, key_value=True, delete=True, sequences=True, async_reads=True,
                                bounded_reads=True, grouped_reads=True)
    default_batch_size = 100
    error_map = (
        (rexc.AuthenticationError, BackendAuthError),
        (rexc.AuthenticationWrongNumberOfArgsError, BackendAuthError),
        (rexc.AuthorizationError, BackendAuthError),
        (rexc.NoPermissionError, BackendAuthError),
        (rexc.TimeoutError, BackendTimeout),
        (TimeoutError, BackendTimeout),
        (rexc.ClusterDownError, BackendUnavailable),
        (rexc.TryAgainError, BackendUnavailable),
        (rexc.ReadOnlyError, BackendUnavailable),
        (rexc.ConnectionError, BackendUnavailable),
        (rexc.ClusterError, BackendUnavailable),
        # Raised when no startup node answers, and when a slot has no node.
        (rexc.RedisClusterException, BackendUnavailable),
        (rexc.ResponseError, BackendQueryError),
        (rexc.DataError, BackendQueryError),
        (rexc.RedisError, BackendUnavailable),
    )

    def __init__(self, name: str, options: RedisOptions) -> None:
        super().__init__(name, options)
        self._lock = threading.Lock()
        self._standalone: redis.Redis | None = None
        self._cluster: RedisCluster | None = None
        self._router: ClusterRouter | None = None
        self._async: PerLoop[aredis.Redis] | None = None

    def _common(self) -> dict[str, Any]:
        """Connection settings shared by the standalone pool and every cluster node."""
        opts: RedisOptions = self.options
        kwargs: dict[str, Any] = {
            "username": opts.username.get_secret_value() if opts.username else None,
            "password": opts.password.get_secret_value() if opts.password else None,
            "socket_timeout": opts.socket_timeout_ms / 1000,
            "socket_connect_timeout": opts.connect_timeout_ms / 1000,
            "socket_keepalive": True,
            # redis-py's pure-Python RESP2 parser reads an MGET reply about a third faster than its RESP3 one.
            "protocol": 2,
        }
        if opts.tls:
            kwargs.update(ssl_ca_certs=opts.tls_ca_file, ssl_certfile=opts.tls_cert_file,
                          ssl_keyfile=opts.tls_key_file,
                          ssl_cert_reqs="required" if opts.tls_verify else "none",
                          ssl_check_hostname=opts.tls_verify and opts.tls_check_hostname)
        return kwargs

    def read_group(self, fetches: Sequence[Fetch], timeout_s: float | None) -> list[Chunks | Exception]:
        """Every fetch's chunks in one pipelined round trip; a view whose command the server rejected
        (WRONGTYPE) fails alone."""
        client: Any = self.client()
        deadline = None if timeout_s is None else time.perf_counter() + timeout_s
        commands, sizes = _group_commands(fetches)
        replies = exchange(client, commands, timeout_s, self.options.retries, error_replies=True)
        return [answer if isinstance(answer, Exception) else
                [fetch.dao._read_rows(client, chunk, sent, fetch.fields, deadline)
                 for chunk, sent in zip(fetch.chunks, answer, strict=True)]
                for fetch, answer in zip(fetches, self._split(fetches, sizes, replies), strict=True)]

    async def aread_group(self, fetches: Sequence[Fetch],
                          timeout_s: float | None) -> list[Chunks | Exception]:
        """``read_group`` with the running loop's asyncio client: one pipelined round trip."""
        client = await self.aclient()
        commands, sizes = _group_commands(fetches)
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        replies = await pipe.execute(raise_on_error=False)
        out: list[Chunks | Exception] = []
        for fetch, answer in zip(fetches, self._split(fetches, sizes, replies), strict=True):
            if isinstance(answer, Exception):
                out.append(answer)
                continue
            out.append([await fetch.dao._aread_rows(client, chunk, sent, fetch.fields)
                        for chunk, sent in zip(fetch.chunks, answer, strict=True)])
        return out

    def _split(self, fetches: Sequence[Fetch], sizes: list[int],
               replies: list[Any]) -> list[list[list[Any]] | Exception]:
        """Per fetch, its chunks' replies, or the error of a command the server rejected."""
        stream = iter(replies)
        counts = iter(sizes)
        out: list[list[list[Any]] | Exception] = []
        for fetch in fetches:
            answers = [list(islice(stream, next(counts))) for _ in fetch.chunks]
            rejected = next((r for a in answers for r in a if isinstance(r, rexc.ResponseError)), None)
            if rejected is None:
                out.append(answers)
                continue
            try:
                fetch.dao._raise_wrongtype(rejected)
                raise self.translate(rejected, fetch.view) from rejected
            except Exception as exc:
                out.append(exc)
        return out

    def _retry(self) -> Retry:
        # Only dropped connections are retried, at once: a timeout already used up the caller's budget.
        return Retry(NoBackoff(), self.options.retries, supported_errors=(rexc.ConnectionError,))

    def _connection_kwargs(self) -> dict[str, Any]:
        """``_common`` for one server's own pool: the SSL class with TLS, no ``ssl_`` keys without."""
        kwargs = self._common()
        # No CLIENT SETINFO on connect: a handshake reply is read with the socket's timeout, so a new
        # connection to a stalled server would outlast the read's own time (and it costs a round trip).
        kwargs["driver_info"] = None
        kwargs["connection_class"] = BoundedSSLConnection if self.options.tls else BoundedConnection
        if not self.options.tls:
            kwargs = {k: v for k, v in kwargs.items() if not k.startswith("ssl_")}
        return kwargs

    def _node_client(self, host: str, port: int) -> redis.Redis:
        """One cluster node's client: its own pool of ``pool_size`` connections; a full pool is
        ``MaxConnectionsError`` at once (``Overloaded``), as it was with redis-py's cluster client."""
        pool = redis.ConnectionPool(host=host, port=port, max_connections=self.options.pool_size,
                                    retry=self._retry(), **self._connection_kwargs())
        return redis.Redis(connection_pool=pool)

    def router(self) -> ClusterRouter:
        """Cluster only: the per-node router reads, writes and the L2 tier go through (made on first use;
        it reads the slot map on its first batch)."""
        router = self._router
        if router is not None:
            return router
        opts: RedisOptions = self.options
        with self._lock:
            if self.closed:
                raise Closed(f"source {self.name!r} is closed")
            if self._router is None:
                seeds = opts.startup_nodes or [f"{opts.host}:{opts.port}"]
                self._router = ClusterRouter(
                    self.name, seeds, self._node_client, pool_size=opts.pool_size, batch_size=self.batch_size,
                    breaker=opts.node_breaker, refresh_interval_s=opts.slot_refresh_interval_ms / 1000,
                    read_from_replicas=opts.read_from_replicas)
            return self._router

    def node_breakers(self) -> dict[str, str]:
        """Cluster only: each node's breaker state by ``host:port`` (empty before the first read)."""
        router = self._router
        return router.breaker_states() if router is not None else {}

    def client(self) -> redis.Redis | RedisCluster:
        """The driver client, created on first use (a RedisCluster reads the slot map when created).

        On a cluster, only pub/sub (invalidation) uses it: keys go through :meth:`router`."""
        client = self._cluster or self._standalone
        if client is not None:
            return client
        opts: RedisOptions = self.options
        with self._lock:
            if self.closed:
                raise Closed(f"source {self.name!r} is closed")
            if opts.cluster:
                if self._cluster is None:
                    seeds = opts.startup_nodes or [f"{opts.host}:{opts.port}"]
                    hosts = [(h, int(p)) for h, p in (s.rsplit(":", 1) for s in seeds)]
                    nodes = [ClusterNode(h, p) for h, p in hosts]  # type: ignore[no-untyped-call]
                    self._cluster = RedisCluster(
                        startup_nodes=nodes, max_connections=opts.pool_size, retry=self._retry(),
                        require_full_coverage=True, ssl=opts.tls, **self._common())
                return self._cluster
            if self._standalone is None:
                pool = BoundedPool(  # type: ignore[no-untyped-call]
                    host=opts.host, port=opts.port, db=opts.db, max_connections=opts.pool_size,
                    timeout=opts.pool_timeout_ms / 1000, retry=self._retry(), **self._connection_kwargs())
                self._standalone = redis.Redis(connection_pool=pool)
            return self._standalone

    async def aclient(self) -> aredis.Redis:
        """Standalone only: the running loop's asyncio client (made on first use there)."""
        clients = self._async
        if clients is None:
            opts: RedisOptions = self.options
            with self._lock:
                if self.closed:
                    raise Closed(f"source {self.name!r} is closed")
                if self._async is None:
                    self._async = async_clients(
                        self.name, self._common, host=opts.host, port=opts.port, db=opts.db,
                        pool_size=opts.pool_size, pool_timeout_s=opts.pool_timeout_ms / 1000,
                        retries=opts.retries, tls=opts.tls)
                clients = self._async
        return await clients.get()

    @property
    def is_cluster(self) -> bool:
        """True when the source is a Redis Cluster."""
        return bool(self.options.cluster)

    def dao(self, view: View) -> RedisDao:
        return RedisDao(self, view)

    def key_value(self) -> RedisKeyValue:
        """This source as the shared (L2) cache tier."""
        return RedisKeyValue(self.client, self.is_cluster, self.router if self.is_cluster else None)

    def ping(self) -> None:
        if self.is_cluster:
            self.router().ping()  # every master serving slots answers
        else:
            self.client().ping()

    def map_error(self, exc: BaseException) -> type[BackendError] | None:
        # Our own pool had no connection (the standalone pool's wait ran out; a cluster node's pool is
        # at max_connections): load, not a failure of the store.
        # A cluster client re-reads the slot map after any connection error, and reports a full pool met
        # there as "cannot be connected", caused by the same MaxConnectionsError.
        if isinstance(exc, rexc.MaxConnectionsError) or \
                isinstance(exc.__cause__, rexc.MaxConnectionsError) or (
                isinstance(exc, rexc.ConnectionError) and str(exc) == "No connection available."):
            return Overloaded
        return super().map_error(exc)

    def error_detail(self, exc: BaseException, kind: type[BackendError], view: str | None) -> str:
        return f"{type(exc).__name__}: {_detail(exc)}"

    def _release(self) -> None:
        with self._lock:
            if self._async is not None:
                self._async.close()
                self._async = None
            if self._router is not None:
                self._router.close()
                self._router = None
            if self._cluster is not None:
                self._cluster.close()
                self._cluster = None
            if self._standalone is not None:
                self._standalone.connection_pool.disconnect()
                self._standalone.close()
                self._standalone = None


class RedisDao(RedisSequences):
    """Reads and writes one view's keys in its layout.

    On a cluster, keys are grouped per node and a node that fails fails only its own keys: ``read_partial``
    lists them in ``failed`` (the error names the node) and serves the others; ``upsert`` writes the
    keys of the healthy nodes and raises :class:`PartialWrite` listing the rest (:mod:`._redis_cluster`).
    """

    source: RedisSource

    # -- reads -----------------------------------------------------------------------------------------
    def raw_reader(self) -> Callable[[list[Key], list[str]], object] | None:
        """redis-py by hand (standalone msgpack/json): one MGET, each value unpacked, rows in key order."""
        if self._format not in ("msgpack", "json") or self.source.is_cluster:
            return None
        unpack = msgpack.unpackb if self._format == "msgpack" else orjson.loads

        def read(keys: list[Key], fields: list[str]) -> object:
            values = self.source.client().mget(self._redis_keys(keys))
            out: list[dict[str, Any] | None] = []
            for blob in values:
                if blob is None:
                    out.append(None)
                else:
                    row = unpack(blob)
                    out.append({f: row.get(f) for f in fields})
            return out

        return read

    def _fetch_batch(self, keys: list[Key], fields: list[str], timeout_s: float | None) -> RawRows:
        if self.source.is_cluster:
            deadline = None if timeout_s is None else time.perf_counter() + timeout_s
            # Without a _Lost (callers other than read_partial): all or nothing.
            return self._cluster_read(keys, fields, deadline, self._reads.get(id(keys)))
        deadline = None if timeout_s is None else time.perf_counter() + timeout_s
        client: Any = self.source.client()
        try:
            replies = exchange(client, self._read_commands(keys, fields), timeout_s,
                               self.source.options.retries)
        except rexc.ResponseError as exc:
            self._raise_wrongtype(exc)
            raise
        return self._read_rows(client, keys, replies, fields, deadline)

    def _read_commands(self, keys: list[Key], fields: list[str]) -> list[tuple[Any, ...]]:
        """What one chunk's read sends: one MGET, or an HMGET per key."""
        rkeys = self._redis_keys(keys)
        if self._format != "hash":
            return [("MGET", *rkeys)]
        fields_b = [self._fields_b[f] for f in fields]
        return [("HMGET", rk, *fields_b) for rk in rkeys]

    def _read_rows(self, client: Any, keys: list[Key], replies: list[Any], fields: list[str],
                   deadline: float | None) -> RawRows:
        """One chunk's rows from the replies to ``_read_commands`` (a hash row of nulls asks EXISTS)."""
        if self._format != "hash":
            return self._decode_strings(keys, replies[0], fields)

        def exists(unsure: list[str]) -> list[int]:
            left = None if deadline is None else max(deadline - time.perf_counter(), 0.0)
            return exchange(client, [("EXISTS", rk) for rk in unsure], left, self.source.options.retries)

        return self._hash_rows(keys, replies, fields, exists)

    def native_async(self) -> bool:
        """Table views of a standalone server read on the loop; a cluster's per-node outcomes need threads."""
        return super().native_async() and not self.source.is_cluster

    def bounded_reads(self) -> bool:
        """Table views of a standalone server (every wait of ``exchange`` ends at the read's time)."""
        return super().bounded_reads() and not self.source.is_cluster

    def grouped(self) -> bool:
        """Table views of a standalone server (a cluster's reads go to each key's node)."""
        return super().grouped() and not self.source.is_cluster

    async def _afetch_batch(self, keys: list[Key], fields: list[str], timeout_s: float | None) -> RawRows:
        client = await self.source.aclient()
        commands = self._read_commands(keys, fields)
        try:
            if len(commands) == 1:  # one MGET: no pipeline around it
                replies = [await client.execute_command(*commands[0])]  # type: ignore[no-untyped-call]
            else:
                pipe = client.pipeline(transaction=False)
                for command in commands:
                    pipe.execute_command(*command)
                replies = await pipe.execute()
        except rexc.ResponseError as exc:
            self._raise_wrongtype(exc)
            raise
        return await self._aread_rows(client, keys, replies, fields)

    async def _aread_rows(self, client: Any, keys: list[Key], replies: list[Any],
                          fields: list[str]) -> RawRows:
        """``_read_rows`` with the asyncio client (a hash row of nulls asks EXISTS)."""
        if self._format != "hash":
            return self._decode_strings(keys, replies[0], fields)
        found_keys, found, unsure = self._hash_found(keys, replies, fields)
        answers: list[int] = []
        if unsure:
            pipe = client.pipeline(transaction=False)
            for rk in self._redis_keys(found_keys[i] for i in unsure):
                pipe.execute_command("EXISTS", rk)
            answers = list(await pipe.execute())
        return self._hash_decode(found_keys, found, unsure, answers, fields)

    # -- writes ----------------------------------------------------------------------------------------
    def _write_batch(self, rows: list[tuple[Key, Row]]) -> None:
        if self.source.is_cluster:
            keys = [k for k, _ in rows]
            self._cluster_write(keys, self._redis_keys(keys), [self._commands(k, row) for k, row in rows])
            return
        # MULTI makes a chunk atomic on one server.
        pipe = self.source.client().pipeline(transaction=True)
        for key, row in rows:
            for args in self._commands(key, row):
                pipe.execute_command(*args)
        try:
            pipe.execute()
        except rexc.ResponseError as exc:
            self._raise_wrongtype(exc)
            raise

    def _write_checked_batch(self, rows: list[tuple[Key, Row]]) -> None:
        """Bulk writes (sync): one MSET per chunk for packed strings without TTL on a standalone server."""
        if self._format not in ("msgpack", "json") or self.options.ttl_s or self.source.is_cluster:
            self._write_batch(rows)
            return
        pack = msgpack.packb if self._format == "msgpack" else orjson.dumps
        flat: list[Any] = []
        for rk, (_, row) in zip(self._redis_keys(k for k, _ in rows), rows, strict=True):
            flat.append(rk)
            flat.append(pack({f: v for f, v in row.items() if v is not None}))
        if flat:
            self.source.client().execute_command("MSET", *flat)  # type: ignore[no-untyped-call]

    def _delete_batch(self, keys: list[Key]) -> None:
        if self.source.is_cluster:
            rkeys = self._redis_keys(keys)
            self._cluster_write(keys, rkeys, [[("DEL", rk)] for rk in rkeys])
            return
        pipe = self.source.client().pipeline(transaction=True)
        for rk in self._redis_keys(keys):
            pipe.execute_command("DEL", rk)
        pipe.execute()

