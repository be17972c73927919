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

On a Redis Cluster (``"cluster": true``) keys go through :class:`~._redis_kv.ClusterRouter`: pipelines per
node, a breaker per node, a slot map that follows failovers, optional replica reads. A node that fails
costs only its own keys: ``read_partial`` lists them in ``failed`` and ``upsert`` raises
:class:`PartialWrite` after writing the rest.

``afetch`` reads table views of a standalone server on the event loop with redis-py's asyncio client, one
per running loop (:mod:`._redis_async`); cluster and sequence views read on threads.

Sequence views (``"kind": "sequence"``) keep one sorted set per key, scored by event time, each event a
msgpack array; ``key_template`` and ``ttl_s`` apply to them, the layout options do not (see
:mod:`._redis_sequence`).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import chain, repeat
from operator import itemgetter
from typing import Any, Literal
from urllib.parse import unquote

import msgpack  # type: ignore[import-untyped, unused-ignore]
import orjson
import redis
import redis.asyncio as aredis
import redis.exceptions as rexc
from pydantic import Field, SecretStr, field_validator, model_validator
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from featuredao.config import CircuitBreakerConfig, StrictModel, View
from featuredao.dao import Capabilities, Deadline, Source
from featuredao.errors import (
    BackendAuthError,
    BackendError,
    BackendQueryError,
    BackendTimeout,
    BackendUnavailable,
    Closed,
    ConfigError,
    FeatureDaoError,
    Overloaded,
)
from featuredao.types import BatchResult, FeatureValue, FinalRow, Key, RawRows, Row, RowFailure

from ._per_loop import PerLoop
from ._redis_async import async_clients
from ._redis_codecs import (
    _DECODE_ERRORS,
    _DECODERS,
    PackedRows,
    _convert_column,
    _csv_escape,
    _decode,
    _detail,
    _elements_are,
    _text,
    _text_converter,
    _TextStep,
)
from ._redis_exchange import BoundedConnection, BoundedPool, BoundedSSLConnection, exchange
from ._redis_kv import ClusterRouter, NodeFailures, RedisKeyValue, Routed, _Lost
from ._redis_sequence import RedisSequences

_HOST_PORT = re.compile(r"^[^\s:]+:\d{1,5}$")


class RedisOptions(StrictModel):
    """Source options of the redis adapter."""

    host: str = "127.0.0.1"
    port: int = Field(default=6379, ge=1, le=65535)
    db: int = Field(default=0, ge=0)
    cluster: bool = False
    startup_nodes: list[str] = Field(default_factory=list)
    """Cluster only: ``"host:port"`` seeds (default: host and port)."""
    username: SecretStr | None = None
    password: SecretStr | None = None
    pool_size: int = Field(default=8, ge=1, le=256)
    """Connections per server; also how many chunks of one read run concurrently."""
    batch_size: int = Field(default=100, ge=1, le=100_000)
    """Keys per pipeline (or per MGET)."""
    socket_timeout_ms: int = Field(default=1000, gt=0)
    connect_timeout_ms: int = Field(default=300, gt=0)
    pool_timeout_ms: int = Field(default=1000, ge=0)
    """How long a call waits for a free connection of the pool."""
    retries: int = Field(default=1, ge=0, le=5)
    """Immediate retries after a dropped connection (a stale pooled socket after a server restart)."""
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_verify: bool = True
    tls_check_hostname: bool = True
    read_from_replicas: bool = False
    """Cluster only: the keys of a master that fails, or whose node breaker is open, are read from one of
    its replicas (``READONLY``) instead of failing. Replicas copy their master asynchronously: such a
    value may be older than the master's (see the README)."""
    node_breaker: CircuitBreakerConfig = Field(
        default_factory=lambda: CircuitBreakerConfig(failure_threshold=2, reset_timeout_s=1.0))
    """Cluster only: each node's own breaker (an open node fails its keys fast and is probed in the
    background)."""
    slot_refresh_interval_ms: int = Field(default=200, ge=10, le=60_000)
    """Cluster only: the slot map is re-read at most this often (after a connection error, a timeout,
    MOVED/ASK or CLUSTERDOWN, and while a node's breaker is not closed)."""

    @model_validator(mode="after")
    def _cluster_settings(self) -> RedisOptions:
        if self.read_from_replicas and not self.cluster:
            raise ValueError("read_from_replicas applies to a cluster only (\"cluster\": true)")
        return self

    @field_validator("startup_nodes")
    @classmethod
    def _host_ports(cls, v: list[str]) -> list[str]:
        bad = [n for n in v if not _HOST_PORT.match(n)]
        if bad:
            raise ValueError(f"startup nodes must be 'host:port', got {bad}")
        return v


class RedisViewOptions(StrictModel):
    """View options of the redis adapter: where a key lives and how its features are laid out."""

    key_template: str = "{table}:{key}"
    layout: Literal["hash", "string"] = "hash"
    encoding: Literal["msgpack", "json", "csv"] | None = None
    """String layout only (default msgpack)."""
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    """CSV encoding only: the character between ``name:value`` pairs."""
    ttl_s: int | None = Field(default=None, gt=0)
    """Expire written keys after this many seconds (refreshed by every upsert)."""

    @field_validator("key_template")
    @classmethod
    def _template(cls, v: str) -> str:
        rest = v.replace("{table}", "").replace("{key}", "", 1)
        if "{key}" not in v or "{" in rest or "}" in rest:
            raise ValueError("key_template needs exactly one {key} and may use {table}")
        return v

    @field_validator("delimiter")
    @classmethod
    def _delimiter(cls, v: str) -> str:
        if v in (":", "%"):
            raise ValueError("the delimiter cannot be ':' or '%'")
        return v

    @model_validator(mode="after")
    def _encoding_fits_layout(self) -> RedisViewOptions:
        if self.layout == "hash" and self.encoding is not None:
            raise ValueError("encoding applies to the string layout only")
        return self

    @property
    def format(self) -> str:
        """``hash``, ``msgpack``, ``json`` or ``csv``."""
        return "hash" if self.layout == "hash" else (self.encoding or "msgpack")


class RedisSource(Source):
    """One Redis server or cluster, with its connection pool(s)."""

    type_name = "redis"
    driver_modules = {"redis": "redis", "msgpack": "msgpack", "msgspec": "msgspec"}
    options_model = RedisOptions
    view_options_model = RedisViewOptions
    capabilities = Capabilities(create=False, key_value=True, delete=True, sequences=True, async_reads=True,
                                bounded_reads=True)
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


class PartialWrite(BackendUnavailable):
    """A write on a Redis Cluster reached some nodes and not others: the keys of the nodes that answered
    are written; ``failed`` lists the others (their node was down or failing fast), to be written again."""

    def __init__(self, message: str, *, failed: Sequence[Key], written: int, source: str | None = None,
                 view: str | None = None) -> None:
        super().__init__(message, source=source, view=view)
        self.failed = list(failed)
        self.written = written


class RedisDao(RedisSequences):
    """Reads and writes one view's keys in its layout.

    On a cluster, keys are grouped per node and a node that fails fails only its own keys: ``read_partial``
    lists them in ``failed`` (the error names the node) and serves the others; ``upsert`` writes the
    keys of the healthy nodes and raises :class:`PartialWrite` listing the rest.
    """

    source: RedisSource
    options: RedisViewOptions

    def __init__(self, source: RedisSource, view: View) -> None:
        super().__init__(source, view)
        opts: RedisViewOptions = view.options if view.options is not None else RedisViewOptions()
        if view.sequence is not None and opts.model_fields_set & {"layout", "encoding", "delimiter"}:
            raise ConfigError(f"view {view.name!r}: a sequence view's events are a sorted set per key; "
                              "layout, encoding and delimiter do not apply (key_template and ttl_s do)")
        self.options = opts
        self._format = opts.format
        template = opts.key_template.replace("{table}", view.table)
        self._key_head, self._key_tail = template.split("{key}")
        self._fields_b = {f: f.encode() for f in view.features}
        # Per field list: converters of the text layouts, and the exact types of a typed row.
        self._converters: dict[tuple[str, ...], list[_TextStep]] = {}
        self._expected: dict[tuple[str, ...], tuple[list[type[Any]], list[tuple[str, type[Any]]]]] = {}
        self._packed: dict[tuple[str, ...], PackedRows] = {}
        # Where a cluster read or upsert puts the keys of the nodes that failed: set on the calling thread
        # by read_partial and upsert; a read's chunks (which may run on the source's threads) find it in
        # _reads by the identity of their key list, which lives as long as the read.
        self._local = threading.local()
        self._reads: dict[int, _Lost] = {}
        self._reads_lock = threading.Lock()

    # -- keys ------------------------------------------------------------------------------------------
    def _redis_keys(self, keys: Iterable[Key]) -> list[str]:
        head, tail = self._key_head, self._key_tail
        return [f"{head}{k}{tail}" for k in keys]

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

    def read_partial(self, keys: Sequence[Key], features: Sequence[str] | None = None, *,
                     timeout_s: float | None = None, as_of: float | None = None,
                     deadline: Deadline | None = None) -> BatchResult:
        """Like ``BaseDao.read_partial``; on a cluster, the keys of a node that failed are in ``failed``
        (``error`` names the node) while every other node's keys are served."""
        if not self.source.is_cluster:
            return super().read_partial(keys, features, timeout_s=timeout_s, as_of=as_of, deadline=deadline)
        lost = _Lost()
        self._local.lost = lost
        try:
            result = super().read_partial(keys, features, timeout_s=timeout_s, as_of=as_of, deadline=deadline)
        finally:
            self._local.lost = None
        if lost.keys:
            result.failed.extend(lost.keys)
            result.error = result.error or lost.error
        return result

    def _run_chunks(self, chunks: list[list[Key]], fields: list[str],
                    deadline: float | None) -> Iterator[RawRows | BackendUnavailable]:
        """BaseDao's, with each chunk tied to its read's ``_Lost`` (chunks may run on the source's threads),
        where ``_fetch_batch`` puts the keys of the cluster nodes that failed."""
        lost: _Lost | None = getattr(self._local, "lost", None)
        if lost is None:
            yield from super()._run_chunks(chunks, fields, deadline)
            return
        with self._reads_lock:
            self._reads.update((id(c), lost) for c in chunks)
        try:
            yield from super()._run_chunks(chunks, fields, deadline)
        finally:
            with self._reads_lock:
                for c in chunks:
                    self._reads.pop(id(c), None)

    def _fetch_batch(self, keys: list[Key], fields: list[str], timeout_s: float | None) -> RawRows:
        if self.source.is_cluster:
            deadline = None if timeout_s is None else time.perf_counter() + timeout_s
            # Without a _Lost (callers other than read_partial): all or nothing.
            return self._cluster_read(keys, fields, deadline, self._reads.get(id(keys)))
        rkeys = self._redis_keys(keys)
        client: Any = self.source.client()
        try:
            if self._format == "hash":
                return self._fetch_hash(client, keys, rkeys, fields, timeout_s)
            values = exchange(client, [("MGET", *rkeys)], timeout_s, self.source.options.retries)[0]
        except rexc.ResponseError as exc:
            self._raise_wrongtype(exc)
            raise
        return self._decode_strings(keys, values, fields)

    def native_async(self) -> bool:
        """Table views of a standalone server read on the loop; a cluster's per-node outcomes need threads."""
        return super().native_async() and not self.source.is_cluster

    def bounded_reads(self) -> bool:
        """Table views of a standalone server (every wait of ``exchange`` ends at the read's time)."""
        return super().bounded_reads() and not self.source.is_cluster

    async def _afetch_batch(self, keys: list[Key], fields: list[str], timeout_s: float | None) -> RawRows:
        rkeys = self._redis_keys(keys)
        client = await self.source.aclient()
        try:
            if self._format != "hash":
                values = await client.execute_command("MGET", *rkeys)  # type: ignore[no-untyped-call]
                return self._decode_strings(keys, values, fields)
            fields_b = [self._fields_b[f] for f in fields]
            pipe = client.pipeline(transaction=False)
            for rk in rkeys:
                pipe.execute_command("HMGET", rk, *fields_b)
            found_keys, found, unsure = self._hash_found(keys, await pipe.execute(), fields)
            answers: list[int] = []
            if unsure:
                pipe = client.pipeline(transaction=False)
                for rk in self._redis_keys(found_keys[i] for i in unsure):
                    pipe.execute_command("EXISTS", rk)
                answers = list(await pipe.execute())
            return self._hash_decode(found_keys, found, unsure, answers, fields)
        except rexc.ResponseError as exc:
            self._raise_wrongtype(exc)
            raise

    def _cluster_read(self, keys: list[Key], fields: list[str], deadline: float | None,
                      lost: _Lost | None) -> RawRows:
        """Read distinct keys from the nodes serving them. Keys of nodes that failed go to ``lost``, or,
        without one, fail the read."""
        router = self.source.router()
        encoded = [rk.encode() for rk in self._redis_keys(keys)]
        if self._format == "hash":
            fields_b = [self._fields_b[f] for f in fields]
            commands = [(("HMGET", rk, *fields_b),) for rk in encoded]
        else:
            commands = [(("GET", rk),) for rk in encoded]
        routed = router.execute(encoded, commands, deadline=deadline, read=True)
        failures = self._failed_keys(routed, keys)
        served: list[Key] = []
        values: list[Any] = []
        for key, reply in zip(keys, routed.replies, strict=True):
            if reply is not None:
                value = reply[0]
                if isinstance(value, rexc.ResponseError):
                    self._raise_wrongtype(value)
                    raise value
                served.append(key)
                values.append(value)
        if self._format != "hash":
            raw = self._decode_strings(served, values, fields)
        else:
            by_rkey = dict(zip(self._redis_keys(served), served, strict=True))
            unknown: list[Key] = []

            def exists(rkeys: list[str]) -> list[int]:
                checked = router.execute([rk.encode() for rk in rkeys], [(("EXISTS", rk),) for rk in rkeys],
                                         deadline=deadline, read=True)
                for addr, (exc, items) in checked.failures.items():
                    known = failures.setdefault(addr, (exc, []))
                    known[1].extend(by_rkey[rkeys[i]] for i in items)
                    unknown.extend(by_rkey[rkeys[i]] for i in items)
                return [r[0] if r is not None and isinstance(r[0], int) else 1 for r in checked.replies]

            raw = self._hash_rows(served, values, fields, exists)
            if unknown:
                dropped = set(unknown)
                raw = {k: v for k, v in raw.items() if k not in dropped}
        if failures:
            self._lose(failures, lost)
        return raw

    def _failed_keys(self, routed: Routed, keys: Sequence[Key]) -> dict[str, tuple[BaseException, list[Key]]]:
        return {addr: (exc, [keys[i] for i in items]) for addr, (exc, items) in routed.failures.items()}

    def _lose(self, failures: NodeFailures, lost: _Lost | None) -> None:
        """Record the keys of failed nodes in ``lost``, or raise (``Closed`` once the source closed)."""
        if self.source.closed:
            raise Closed(f"source {self.source.name!r} was closed during the operation")
        error, detail = self._node_error(failures)
        if lost is None:
            raise error
        lost.add((k for _, ks in failures.values() for k in ks), error, detail)

    def _node_error(self, failures: NodeFailures) -> tuple[BackendError, str]:
        """One error for the nodes that failed, naming each; its type is theirs when they agree."""
        kinds: set[type[BackendError]] = set()
        parts: list[str] = []
        cause: BaseException | None = None
        for addr, (exc, keys) in failures.items():
            if isinstance(exc, Closed):
                raise Closed(f"source {self.source.name!r} was closed during the operation") from exc
            if isinstance(exc, FeatureDaoError):  # the router's own: CircuitOpen, BackendTimeout
                kind: type[BackendError] | None = type(exc) if isinstance(exc, BackendError) else None
                text = str(exc)
            else:
                # A redirect that did not settle is the cluster moving slots: unavailable, not a bad query.
                kind = BackendUnavailable if isinstance(exc, rexc.AskError) else self.source.map_error(exc)
                text = f"cluster node {addr}: {type(exc).__name__}: {_detail(exc)}"
                cause = cause or exc
            if kind is None:
                raise exc  # not a store failure: a bug shows as itself
            if not issubclass(kind, BackendUnavailable):
                raise kind(text, source=self.source.name, view=self.view.name) from exc  # auth, query
            kinds.add(kind)
            parts.append(f"{text} ({len(keys)} key(s))")
        kind = kinds.pop() if len(kinds) == 1 else BackendUnavailable
        message = parts[0] if len(parts) == 1 else f"{len(parts)} cluster nodes failed: " + "; ".join(parts)
        error = kind(message, source=self.source.name, view=self.view.name)
        error.__cause__ = cause
        return error, message

    def _fetch_hash(self, client: Any, keys: list[Key], rkeys: list[str], fields: list[str],
                    timeout_s: float | None) -> RawRows:
        fields_b = [self._fields_b[f] for f in fields]
        deadline = None if timeout_s is None else time.perf_counter() + timeout_s
        retries = self.source.options.retries
        replies: list[list[bytes | None]] = exchange(client, [("HMGET", rk, *fields_b) for rk in rkeys],
                                                     timeout_s, retries)

        def exists(unsure: list[str]) -> list[int]:
            left = None if deadline is None else max(deadline - time.perf_counter(), 0.0)
            return exchange(client, [("EXISTS", rk) for rk in unsure], left, retries)

        return self._hash_rows(keys, replies, fields, exists)

    def _hash_rows(self, keys: list[Key], replies: list[list[bytes | None]], fields: list[str],
                   exists: Callable[[list[str]], list[int]]) -> RawRows:
        """Rows from the HMGET replies of ``keys``; ``exists`` answers EXISTS for the keys that need it."""
        found_keys, found, unsure = self._hash_found(keys, replies, fields)
        answers = exists(self._redis_keys(found_keys[i] for i in unsure)) if unsure else []
        return self._hash_decode(found_keys, found, unsure, answers, fields)

    def _hash_found(self, keys: list[Key], replies: list[list[bytes | None]],
                    fields: list[str]) -> tuple[list[Key], list[list[bytes | None]], list[int]]:
        """The keys with HMGET replies worth decoding, their replies, and the positions (in them) of the
        keys whose requested features are all null: only EXISTS tells those rows from missing keys."""
        width = len(fields)
        found_keys: list[Key] = []
        found: list[list[bytes | None]] = []
        unsure: list[int] = []
        for key, values in zip(keys, replies, strict=True):
            if values.count(None) != width:
                found_keys.append(key)
                found.append(values)
            elif width < len(self._all_fields):
                unsure.append(len(found_keys))
                found_keys.append(key)
                found.append(values)
        return found_keys, found, unsure

    def _hash_decode(self, found_keys: list[Key], found: list[list[bytes | None]], unsure: list[int],
                     answers: list[int], fields: list[str]) -> RawRows:
        """Rows from ``_hash_found``'s replies, the unsure keys that EXISTS ``answers`` 0 for left out."""
        if unsure:
            # One more round trip (EXISTS), for projections of sparse features only.
            gone = {i for i, n in zip(unsure, answers, strict=True) if not n}
            if gone:
                found_keys = [k for i, k in enumerate(found_keys) if i not in gone]
                found = [v for i, v in enumerate(found) if i not in gone]
        if not found:
            return {}
        columns = list(zip(*found, strict=True))
        converted = [_convert_column(list(col), conv, ftype)
                     for col, (_, conv, ftype) in zip(columns, self._text_plan(fields, True), strict=True)]
        rows = [dict(zip(fields, row, strict=True)) for row in zip(*converted, strict=True)]
        return self._typed(found_keys, rows, fields)

    def _decode_strings(self, keys: list[Key], values: list[bytes | None], fields: list[str]) -> RawRows:
        fmt = self._format
        found_keys = [k for k, v in zip(keys, values, strict=True) if v is not None]
        if not found_keys:
            return {}
        blobs = [v for v in values if v is not None]
        if fmt != "csv":
            typed = self._packed_rows(fields).rows(blobs)
            if typed is not None:
                return dict(zip(found_keys, typed, strict=True))
        decode = _DECODERS[fmt] if fmt != "csv" else self._csv_row
        try:
            decoded = list(map(decode, blobs))  # one C loop for msgpack and json
        except _DECODE_ERRORS:
            decoded = [self._decode_one(decode, blob) for blob in blobs]
        failures: dict[Key, Any] = {}
        if not all(type(row) is dict for row in decoded):
            for key, row in zip(found_keys, decoded, strict=True):
                if type(row) is not dict:
                    failures[key] = row if isinstance(row, RowFailure) else \
                        RowFailure(f"stored {fmt} value is not a map")
            found_keys = [k for k in found_keys if k not in failures]
            decoded = [row for row in decoded if type(row) is dict]
        if fmt == "csv" and decoded:
            converted = [_convert_column(list(map(dict.get, decoded, repeat(f))), conv, ftype)
                         for f, conv, ftype in self._text_plan(fields, False)]
            decoded = [dict(zip(fields, row, strict=True)) for row in zip(*converted, strict=True)]
        out = self._typed(found_keys, decoded, fields)
        if failures:
            out.update(failures)
        return out

    def _packed_rows(self, fields: list[str]) -> PackedRows:
        key = tuple(fields)
        packed = self._packed.get(key)
        if packed is None:
            packed = self._packed[key] = PackedRows(self._format, fields,
                                                    [self.view.features[f] for f in fields])
        return packed

    def _decode_one(self, decode: Callable[[bytes], Any], blob: bytes) -> Any:
        try:
            return decode(blob)
        except _DECODE_ERRORS as exc:
            return RowFailure(f"stored value is not {self._format}: {type(exc).__name__}")

    def _csv_row(self, value: bytes) -> dict[str, str]:
        text = value.decode()
        if not text:
            return {}
        pairs = text.split(self.options.delimiter)
        row: dict[str, str] = dict(map(str.split, pairs, repeat(":"), repeat(1)))
        if "%" in text:
            row = {k: unquote(v) if "%" in v else v for k, v in row.items()}
        return row

    def _text_plan(self, fields: list[str], raw_bytes: bool) -> list[_TextStep]:
        key = (str(raw_bytes), *fields)
        plan = self._converters.get(key)
        if plan is None:
            plan = [(f, _text_converter(self.view.features[f], raw_bytes), self.view.features[f])
                    for f in fields]
            self._converters[key] = plan
        return plan

    def _typed(self, keys: list[Key], rows: list[dict[str, Any]], fields: list[str]) -> dict[Key, Any]:
        """Mark the rows whose values all have their declared types, checked with C loops, as final.

        The core's per-value loop would cost about as much as decoding a msgpack value; rows that fail
        the check (nulls, ints stored for floats, text) go through it as usual.
        """
        expected = self._expected.get(tuple(fields))
        if expected is None:
            types = [self.view.features[f].python for f in fields]
            lists = [(f, self.view.features[f].element.python) for f in fields
                     if self.view.features[f].is_list]
            expected = self._expected[tuple(fields)] = (types, lists)
        types, lists = expected
        n = len(rows)
        first = list(rows[0]) if n else []
        # msgpack interns map keys and orjson caches them, so rows share key objects: comparing every row's
        # keys with the first row's is an identity check per key.
        if (n and first == fields and list(chain.from_iterable(rows)) == first * n
                and list(map(type, chain.from_iterable(map(dict.values, rows)))) == types * n
                and all(_elements_are(etype, map(itemgetter(f), rows)) for f, etype in lists)):
            return dict(zip(keys, map(FinalRow, rows), strict=True))
        out: dict[Key, Any] = {}
        for key, row in zip(keys, rows, strict=True):
            values = list(map(row.get, fields))
            if list(map(type, values)) == types and \
                    all(_elements_are(etype, [row[f]]) for f, etype in lists):
                out[key] = FinalRow(zip(fields, values, strict=True))
            else:
                out[key] = row
        return out

    def _raise_wrongtype(self, exc: rexc.ResponseError) -> None:
        """Name the view and layout, never the key: redis-py's message quotes the whole command."""
        if "WRONGTYPE" in str(exc):
            expects = "a sorted set (sequence view)" if self.view.sequence is not None else \
                f"the {self._format!r} layout expects"
            raise BackendQueryError(
                f"WRONGTYPE: keys of view {self.view.name!r} ({self.options.key_template!r}) hold another "
                f"Redis type than {expects}",
                source=self.source.name, view=self.view.name) from exc

    # -- writes ----------------------------------------------------------------------------------------
    def upsert(self, rows: Iterable[tuple[Key, Mapping[str, FeatureValue]]]) -> int:
        """Write rows idempotently; on a cluster the keys of every node that answers are written, and
        :class:`PartialWrite` lists the keys of the nodes that did not (after every chunk was tried)."""
        if not self.source.is_cluster:
            return super().upsert(rows)
        count, lost = self._collect_lost(lambda: super(RedisDao, self).upsert(rows))
        if lost.keys:
            raise self._partial_write(lost, count)
        return count

    def _collect_lost(self, write: Callable[[], int]) -> tuple[int, _Lost]:
        """Run a cluster write whose chunks put the keys of failed nodes in one ``_Lost`` (every chunk
        is tried), and return its count with them."""
        lost = _Lost()
        self._local.lost = lost
        try:
            count = write()
        finally:
            self._local.lost = None
        return count, lost

    def _partial_write(self, lost: _Lost, count: int, events_lost: int | None = None) -> PartialWrite:
        """The failure of a write of ``count`` keys (of ``count`` events, with ``events_lost`` given)."""
        if events_lost is None:
            message, written = f"{len(lost.keys)} of {count} key(s) not written", count - len(lost.keys)
        else:
            message = f"{len(lost.keys)} key(s) ({events_lost} of {count} event(s)) not written"
            written = count - events_lost
        failure = PartialWrite(f"{message}: {lost.detail}", failed=lost.keys, written=written,
                               source=self.source.name, view=self.view.name)
        failure.__cause__ = lost.error
        return failure

    def _commands(self, key: Key, row: Row) -> list[tuple[Any, ...]]:
        """The commands that write one whole row (all of one key, so one slot)."""
        rk = f"{self._key_head}{key}{self._key_tail}"
        ttl = self.options.ttl_s
        present = {f: v for f, v in row.items() if v is not None}
        if self._format == "hash":
            if not present:
                return [("DEL", rk)]
            commands: list[tuple[Any, ...]] = [
                ("HSET", rk, *chain.from_iterable((f, _text(v)) for f, v in present.items()))]
            nulls = [f for f, v in row.items() if v is None]
            if nulls:
                commands.append(("HDEL", rk, *nulls))
            if ttl:
                commands.append(("EXPIRE", rk, ttl))
            return commands
        if self._format == "msgpack":
            payload: bytes | str = msgpack.packb(present)
        elif self._format == "json":
            payload = orjson.dumps(present)
        else:
            delim = self.options.delimiter
            payload = delim.join(f"{f}:{_csv_escape(_decode(self._csv_text(v)), delim)}"
                                 for f, v in present.items())
        return [("SET", rk, payload, "EX", ttl)] if ttl else [("SET", rk, payload)]

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

    def _cluster_write(self, keys: list[Key], rkeys: list[str],
                       commands: list[list[tuple[Any, ...]]]) -> None:
        """Each key's commands on the node serving it (not atomic across keys: a chunk spans nodes). Keys
        of failed nodes go to the upsert's ``_Lost``, or raise :class:`PartialWrite` (sync, deletes)."""
        routed = self.source.router().execute([rk.encode() for rk in rkeys], commands, deadline=None,
                                              read=False)
        for reply in routed.replies:
            for value in reply or ():
                if isinstance(value, rexc.ResponseError):
                    self._raise_wrongtype(value)
                    raise value
        failures = self._failed_keys(routed, keys)
        if not failures:
            return
        lost: _Lost | None = getattr(self._local, "lost", None)
        if lost is not None:
            self._lose(failures, lost)
            return
        chunk = _Lost()
        self._lose(failures, chunk)
        raise self._partial_write(chunk, len(keys))

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

    @staticmethod
    def _csv_text(value: FeatureValue) -> str | bytes:
        text = _text(value)
        return text if isinstance(text, str | bytes) else str(text)
