"""The Redis adapter's cluster paths: keys go to their nodes; a node that fails costs only its own keys."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, cast

import redis.exceptions as rexc

from featuredao.config import View
from featuredao.dao import Deadline, Source
from featuredao.errors import BackendError, BackendUnavailable, Closed, FeatureDaoError
from featuredao.types import BatchResult, FeatureValue, Key, RawRows

from ._redis_codecs import _detail
from ._redis_layout import RedisLayout
from ._redis_router import ClusterRouter
from ._redis_slots import Routed


class PartialWrite(BackendUnavailable):
    """A write on a Redis Cluster reached some nodes and not others: the keys of the nodes that answered
    are written; ``failed`` lists the others (their node was down or failing fast), to be written again."""

    def __init__(self, message: str, *, failed: Sequence[Key], written: int, source: str | None = None,
                 view: str | None = None) -> None:
        super().__init__(message, source=source, view=view)
        self.failed = list(failed)
        self.written = written


class _Lost:
    """Keys a cluster read or upsert could not serve, and why: what ``read_partial`` and ``upsert`` report
    for the nodes that failed while the others answered."""

    __slots__ = ("_lock", "detail", "error", "keys")

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the chunks of one read may report from several threads
        self.keys: list[Key] = []
        self.error: BackendError | None = None
        self.detail = ""
        """The first error's message without the source and view (they are said once)."""

    def add(self, keys: Iterable[Key], error: BackendError, detail: str) -> None:
        with self._lock:
            self.keys.extend(keys)
            if self.error is None:
                self.error, self.detail = error, detail


NodeFailures = Mapping[str, tuple[BaseException, list[Key]]]
"""Per cluster node (``host:port``): why it failed and the keys it failed."""


class _Server(Protocol):
    """What the Redis DAO uses of ``RedisSource`` (typed here without importing its module: no cycle)."""

    @property
    def is_cluster(self) -> bool: ...
    def client(self) -> Any: ...
    def router(self) -> ClusterRouter: ...


class RedisClusterPaths(RedisLayout):
    """Reads and writes of a view on a Redis Cluster, per node: the keys of a failed node go to a ``_Lost``.

    ``read_partial`` lists them in ``failed`` (the error names the node) and serves the others; ``upsert``
    writes the keys of the healthy nodes and raises :class:`PartialWrite` listing the rest.
    """

    def __init__(self, source: Source, view: View) -> None:
        super().__init__(source, view)
        # Where a cluster read or upsert puts the keys of the nodes that failed: set on the calling thread
        # by read_partial and upsert; a read's chunks (which may run on the source's threads) find it in
        # _reads by the identity of their key list, which lives as long as the read.
        self._local = threading.local()
        self._reads: dict[int, _Lost] = {}
        self._reads_lock = threading.Lock()

    @property
    def _server(self) -> _Server:
        return cast(_Server, self.source)

    def read_partial(self, keys: Sequence[Key], features: Sequence[str] | None = None, *,
                     timeout_s: float | None = None, as_of: float | None = None,
                     deadline: Deadline | None = None) -> BatchResult:
        """Like ``BaseDao.read_partial``; on a cluster, the keys of a node that failed are in ``failed``
        (``error`` names the node) while every other node's keys are served."""
        if not self._server.is_cluster:
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

    def _cluster_read(self, keys: list[Key], fields: list[str], deadline: float | None,
                      lost: _Lost | None) -> RawRows:
        """Read distinct keys from the nodes serving them. Keys of nodes that failed go to ``lost``, or,
        without one, fail the read."""
        router = self._server.router()
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

    # -- writes ----------------------------------------------------------------------------------------
    def upsert(self, rows: Iterable[tuple[Key, Mapping[str, FeatureValue]]]) -> int:
        """Write rows idempotently; on a cluster the keys of every node that answers are written, and
        :class:`PartialWrite` lists the keys of the nodes that did not (after every chunk was tried)."""
        if not self._server.is_cluster:
            return super().upsert(rows)
        count, lost = self._collect_lost(lambda: super(RedisClusterPaths, self).upsert(rows))
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

    def _cluster_write(self, keys: list[Key], rkeys: list[str],
                       commands: list[list[tuple[Any, ...]]]) -> None:
        """Each key's commands on the node serving it (not atomic across keys: a chunk spans nodes). Keys
        of failed nodes go to the upsert's ``_Lost``, or raise :class:`PartialWrite` (sync, deletes)."""
        routed = self._server.router().execute([rk.encode() for rk in rkeys], commands, deadline=None,
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

