"""The Source an adapter implements and the shared base class (the FeatureDao contract: ``feature_dao``).

An adapter supplies two small classes: a :class:`Source` (one configured connection pool) and a
:class:`BaseDao` subclass that implements ``_fetch_batch`` and ``_write_batch`` for one chunk.
Everything else (key normalisation, dedupe, chunking, concurrency, deadlines, error mapping,
coercion, realignment in input order) happens here, once.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Self

from pydantic import BaseModel

# Part of the adapter interface, defined in leaf modules.
from featuredao.capabilities import Capabilities as Capabilities
from featuredao.config import NoOptions, View
from featuredao.deadline import Deadline as Deadline
from featuredao.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    Closed,
    FeatureDaoError,
    Overloaded,
    Unsupported,
    UsageError,
)
from featuredao.feature_dao import FeatureDao as FeatureDao  # the contract, defined in its own room
from featuredao.keys import normalise, readable
from featuredao.keys import normaliser as normaliser  # where sync finds it
from featuredao.lifecycle import Gate, shut_down
from featuredao.ports import Change as Change
from featuredao.ports import KeyValueStore as KeyValueStore
from featuredao.ports import StateStore as StateStore
from featuredao.sequence import SequenceQuery, Sequencer
from featuredao.sequence_hooks import SequenceHooks
from featuredao.steps import Chunks as Chunks
from featuredao.steps import Fetch as Fetch
from featuredao.steps import ReadSteps, each_alone
from featuredao.steps import chunks_in_turn as chunks_in_turn
from featuredao.sync_hooks import SyncHooks
from featuredao.types import (
    COERCION_ERRORS,
    BatchResult,
    Coercion,
    CoercionError,
    Degraded,
    FeatureValue,
    FinalRow,
    Key,
    RawRows,
    Reason,
    Row,
    RowFailure,
    coercer,
    coercion_plan,
)

if TYPE_CHECKING:  # asyncio is imported where a loop runs: at import it costs start-up ~10%
    pass

log = logging.getLogger("featuredao")

ErrorMap = Sequence[tuple[type[BaseException], type[BackendError]]]


class _Operation:
    """``Source.operation``'s context (a class, not a generator: it is entered on every read)."""

    __slots__ = ("source", "view")

    def __init__(self, source: Source, view: str | None) -> None:
        self.source = source
        self.view = view

    def __enter__(self) -> None:
        self.source._gate.enter()

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        source = self.source
        source._gate.leave()
        if not isinstance(exc, Exception):  # no error, or one that is not the store's (KeyboardInterrupt)
            return
        if source._gate.closed and not isinstance(exc, Closed):
            # Interrupted (or its connection freed) by close(): say so, not "the store failed".
            raise Closed(f"source {source.name!r} was closed during the operation") from exc
        if isinstance(exc, FeatureDaoError):
            return
        mapped = source.translate(exc, self.view)
        if mapped is not exc:
            raise mapped from exc


class Source(ABC):
    """One configured connection to a store; owns the pool and builds a DAO per view."""

    type_name: ClassVar[str] = ""
    options_model: ClassVar[type[BaseModel]] = NoOptions
    view_options_model: ClassVar[type[BaseModel]] = NoOptions
    capabilities: ClassVar[Capabilities] = Capabilities()
    error_map: ClassVar[ErrorMap] = ()
    """(driver exception, featuredao exception) pairs, most specific first."""
    default_batch_size: ClassVar[int] = 1000
    driver_modules: ClassVar[Mapping[str, str]] = {}
    """The driver modules this adapter imports, by distribution name (recorded with benchmark results)."""
    close_timeout_s: ClassVar[float] = 0.5
    """How long ``close`` waits for interrupted work to end before it frees what is left idle."""

    def __init__(self, name: str, options: Any) -> None:
        self.name = name
        self.options = options
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._gate = Gate(f"source {name!r}")

    @abstractmethod
    def dao(self, view: View) -> BaseDao:
        """Build the DAO that serves ``view`` from this source."""

    @abstractmethod
    def ping(self) -> None:
        """Round-trip to the store; raise a mapped BackendError on failure."""

    def read_group(self, fetches: Sequence[Fetch], timeout_s: float | None) -> list[Chunks | Exception]:
        """Several views' fetches at once (``capabilities.grouped_reads``): per fetch its chunks' rows
        (or BackendUnavailable), or the error its read raises; called inside ``operation()``."""
        raise Unsupported(f"adapter {self.type_name!r} has no grouped reads")

    async def aread_group(self, fetches: Sequence[Fetch],
                          timeout_s: float | None) -> list[Chunks | Exception]:
        """``read_group`` with the driver's asyncio client (``grouped_reads`` and ``async_reads``); by
        default each view's chunks read as when it is read alone, concurrently."""
        return await each_alone(self, fetches, timeout_s)

    def operation(self, view: str | None = None) -> _Operation:
        """One unit of store work: refused after close, counted until it ends, driver errors mapped.

        The one place a driver exception becomes ours (``raise ... from`` the original).
        """
        return _Operation(self, view)

    @property
    def closed(self) -> bool:
        """True once ``close`` has begun: no more work is admitted."""
        return self._gate.closed

    def close(self) -> None:
        """Stop admitting work, interrupt what runs, wait for it (``close_timeout_s``), then free the pool.

        A connection is never freed under a running statement (closed when it comes back); idempotent.
        """
        shut_down(self._gate, f"source {self.name}", self._interrupt, self._free, self.close_timeout_s)

    def _free(self, all_ended: bool) -> None:
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=all_ended, cancel_futures=True)
        self._release()

    def _interrupt(self) -> None:  # noqa: B027 - optional hook
        """Make running statements end soon (``sqlite3`` interrupt, a server-side cancel); best effort."""

    def _release(self) -> None:  # noqa: B027 - optional hook
        """Free the pool's idle connections; borrowed ones are closed when they come back."""

    @property
    def batch_size(self) -> int:
        """Most keys sent to the store in one round trip."""
        return int(getattr(self.options, "batch_size", None) or self.default_batch_size)

    @property
    def concurrency(self) -> int:
        """How many chunks of one read may be in flight at once (the pool size)."""
        return int(getattr(self.options, "pool_size", None) or 1)

    def executor(self) -> ThreadPoolExecutor:
        """The thread pool that runs the chunks of one read concurrently."""
        with self._executor_lock:
            if self._gate.closed:
                raise Closed(f"source {self.name!r} is closed")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=self.concurrency,
                                                    thread_name_prefix=f"featuredao-{self.name}")
            return self._executor

    def state_store(self) -> StateStore:
        """Durable synchronization state in this source (adapters with ``capabilities.state``)."""
        raise Unsupported(f"adapter {self.type_name!r} cannot hold synchronization state")

    def key_value(self) -> KeyValueStore:
        """The shared key-value store of this source (adapters with ``capabilities.key_value``)."""
        raise Unsupported(f"adapter {self.type_name!r} offers no key-value store")

    def map_error(self, exc: BaseException) -> type[BackendError] | None:
        """The featuredao exception a driver exception stands for (None: not a store error)."""
        for driver_exc, ours in self.error_map:
            if isinstance(exc, driver_exc):
                return ours
        return None

    def translate(self, exc: BaseException, view: str | None = None) -> BaseException:
        """Turn a driver exception into ours (keeping featuredao exceptions as they are)."""
        if isinstance(exc, FeatureDaoError):
            return exc
        kind = self.map_error(exc)
        if kind is None:
            return exc
        return kind(self.error_detail(exc, kind, view), source=self.name, view=view)

    def error_detail(self, exc: BaseException, kind: type[BackendError], view: str | None) -> str:
        """The message of the featuredao exception that stands for ``exc`` (adapters refine it)."""
        # Driver messages may quote the statement but never contain our secrets: those live in
        # SecretStr options that are only read when connecting.
        text = str(exc).strip()
        return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def invalid_keys(view: str, key_type: str, shown: list[str]) -> Degraded:
    """The degraded entry for keys a view cannot accept (at most 20 of them shown)."""
    return Degraded(view, Reason.INVALID_KEY, f"{len(shown)} key(s) cannot be {key_type} keys of this view: "
                    "not read", tuple(shown[:20]))


class BaseDao(SequenceHooks, SyncHooks, FeatureDao):
    """Shared batch logic; a backend implements ``_fetch_batch`` and ``_write_batch`` for one chunk."""

    source: Source

    def __init__(self, source: Source, view: View) -> None:
        self.source = source
        self.view = view
        self._norm = normaliser(view.key_type)
        self._key_type: type[Any] = int if view.key_type == "int" else str
        self._all_fields = list(view.features)
        self._plans: dict[tuple[str, ...], tuple[Coercion, ...]] = {}
        self._sequencer = Sequencer(view) if view.sequence is not None else None

    # -- per-backend hooks ---------------------------------------------------------------
    @abstractmethod
    def _fetch_batch(self, keys: list[Key], fields: list[str], timeout_s: float | None) -> RawRows:
        """Read one chunk of distinct keys: raw stored values by key, absent keys left out."""

    def _write_batch(self, rows: list[tuple[Key, Row]]) -> None:
        """Write one chunk of distinct keys (whole rows, already coerced)."""
        raise self._unsupported("write")

    async def _afetch_batch(self, keys: list[Key], fields: list[str], timeout_s: float | None) -> RawRows:
        """``_fetch_batch`` with the driver's asyncio client (adapters with ``capabilities.async_reads``)."""
        raise self._unsupported("asyncio read")

    def prepare(self) -> None:
        """Create the table or keyspace the view needs, if the store has such a thing."""
        self._store_call(self._prepare)

    def _prepare(self) -> None:
        """The adapter's part of ``prepare`` (nothing to create by default)."""

    def lane(self) -> tuple[str, int] | None:
        """Reads share the source's pool: ``pool_size`` at once."""
        return self.source.name, self.source.concurrency

    def raw_reader(self) -> Callable[[list[Key], list[str]], object] | None:
        """The same read written by hand with the raw driver (a benchmark baseline), if any."""
        return None

    @property
    def _batch_size(self) -> int:
        return max(1, self.source.batch_size)

    def _check_writable(self) -> None:
        if not self.source.capabilities.write:
            raise self._unsupported("write")

    def _unsupported(self, what: str) -> Unsupported:
        return Unsupported(f"view {self.view.name!r}: adapter {self.source.type_name!r} has no {what} "
                           "support")

    def _store_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self.source.operation(self.view.name):
            return fn(*args)

    # -- the shared work -----------------------------------------------------------------
    def read_partial(self, keys: Sequence[Key], features: Sequence[str] | None = None, *,
                     timeout_s: float | None = None, as_of: float | None = None,
                     deadline: Deadline | None = None) -> BatchResult:
        """Like ``read``, but chunks whose store was unavailable leave their keys in ``result.failed``."""
        started = time.perf_counter()
        at = Deadline.of(deadline, timeout_s).at
        result, unique, fields = self._plan(keys, features, as_of)
        if not unique:
            return result  # no round trip for an empty batch
        chunks = self._chunks(unique)
        return self._assemble(result, unique, fields, chunks, self._run_chunks(chunks, fields, at), started)

    def grouped(self) -> bool:
        """Table views of adapters with ``capabilities.grouped_reads``."""
        return self.source.capabilities.grouped_reads and self._sequencer is None

    def read_steps(self, keys: Sequence[Key], features: Sequence[str] | None = None, *,
                   as_of: float | None = None, deadline: Deadline) -> ReadSteps:
        """``read_partial`` as steps: the chunks go to the source's ``read_group`` with other views'."""
        started = time.perf_counter()
        result, unique, fields = self._plan(keys, features, as_of)
        if not unique:
            return result
        chunks = self._chunks(unique)
        parts = yield Fetch(self.source, self, self.view.name, chunks, fields, deadline.at)
        return self._assemble(result, unique, fields, chunks, parts, started)

    def native_async(self) -> bool:
        """Table views of adapters with ``capabilities.async_reads`` read on the loop."""
        return self.source.capabilities.async_reads and self._sequencer is None

    def bounded_reads(self) -> bool:
        """Table views of adapters with ``capabilities.bounded_reads``."""
        return self.source.capabilities.bounded_reads and self._sequencer is None

    async def aread_partial(self, keys: Sequence[Key], features: Sequence[str] | None = None, *,
                            timeout_s: float | None = None, as_of: float | None = None,
                            deadline: Deadline | None = None) -> BatchResult:
        """``read_partial`` with the driver's asyncio client: chunks concurrently, no thread."""
        import asyncio
        deadline = Deadline.of(deadline, timeout_s)
        if not self.native_async():
            return await super().aread_partial(keys, features, as_of=as_of, deadline=deadline)
        started = time.perf_counter()
        result, unique, fields = self._plan(keys, features, as_of)
        if not unique:
            return result
        chunks = self._chunks(unique)
        outcomes = await asyncio.gather(*(self._acall(c, fields, deadline) for c in chunks),
                                        return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, BackendUnavailable):
                raise outcome  # as the thread path: only an unavailable store is a partial answer
        parts: list[RawRows | BackendUnavailable] = [o for o in outcomes if not isinstance(o, BaseException)
                                                     or isinstance(o, BackendUnavailable)]
        return self._assemble(result, unique, fields, chunks, parts, started)

    async def _acall(self, keys: list[Key], fields: list[str], deadline: Deadline) -> RawRows:
        import asyncio
        with self.source.operation(self.view.name):
            try:
                left = deadline.remaining()
                return await asyncio.wait_for(self._afetch_batch(keys, fields, left), left)
            except TimeoutError:
                raise self._timeout() from None

    def _chunks(self, unique: list[Key]) -> list[list[Key]]:
        size = max(1, self.source.batch_size)
        return [unique[i:i + size] for i in range(0, len(unique), size)]

    def _plan(self, keys: Sequence[Key], features: Sequence[str] | None,
              as_of: float | None) -> tuple[BatchResult, list[Key], list[str]]:
        """The answer to fill (keys normalised, invalid ones reported), the distinct keys to read, the
        fields (a sequence view's query)."""
        norm, invalid = normalise(keys, self._norm, self._key_type)
        fields = self._fields(features)
        if self._sequencer is not None:
            # The query travels as the chunks' field list: it is that list, plus the window and limit.
            fields = self.sequence_query(as_of)
        result = BatchResult(norm, [None] * len(norm))
        if invalid:
            result.degraded.append(invalid_keys(self.view.name, self.view.key_type, invalid))
        # A key the view cannot accept is never sent to the store: it is answered missing.
        return result, readable(norm), fields

    def _assemble(self, result: BatchResult, unique: list[Key], fields: list[str], chunks: list[list[Key]],
                  parts: Iterable[RawRows | BackendUnavailable], started: float) -> BatchResult:
        """Each chunk's raw rows coerced into the answer, in input order; failed chunks' keys listed."""
        raw: dict[Key, Any] = {}
        for chunk, part in zip(chunks, parts, strict=True):
            if isinstance(part, BackendUnavailable):
                result.failed.extend(chunk)
                result.error = result.error or part
            else:
                raw.update(part)
        plan = self._coercions(fields)
        rows: dict[Key, Row | None] = {}
        for key in unique:
            found = raw.get(key)
            if found is None:
                continue
            if type(found) is FinalRow:
                rows[key] = found
                continue
            if isinstance(found, RowFailure):
                result.degraded.append(Degraded(self.view.name, Reason.ROW_ERROR, found.reason, (key,)))
                continue
            rows[key] = self._coerce_row(key, found, plan, result.degraded)
        result.rows = [rows.get(k) for k in result.keys]
        result.elapsed_s = time.perf_counter() - started
        return result

    def _timeout(self) -> BackendTimeout:
        return BackendTimeout("deadline passed before the store answered", source=self.source.name,
                              view=self.view.name)

    def _run_chunks(self, chunks: list[list[Key]], fields: list[str],
                    deadline: float | None) -> Iterator[RawRows | BackendUnavailable]:
        """Each chunk's rows, or the BackendUnavailable it failed with; other errors propagate."""
        left = Deadline(deadline).remaining  # deadline: the read's Deadline.at (a float, as adapters see it)
        if len(chunks) == 1 or not self.source.capabilities.concurrent_chunks or \
                self.source.concurrency <= 1:
            failure: BackendUnavailable | None = None
            for i, chunk in enumerate(chunks):
                remaining = left()
                # Out of time after a chunk was read: the store was slow (before any, _call says why).
                if failure is None and i and remaining is not None and remaining <= 0:
                    failure = self._timeout()
                if failure is not None:
                    yield failure  # don't keep knocking on a store that just failed
                    continue
                try:
                    yield self._call(chunk, fields, remaining)
                except BackendUnavailable as exc:
                    failure = exc
                    yield exc
            return
        pool = self.source.executor()
        try:
            # The time left is taken when a chunk starts: time it queued on the pool counts.
            futures: list[Future[RawRows]] = [pool.submit(lambda c: self._call(c, fields, left()), c)
                                              for c in chunks]
        except RuntimeError as exc:  # the executor was shut down between the check and the submit
            raise Closed(f"source {self.source.name!r} is closed") from exc
        try:
            for fut in futures:
                remaining = left()
                try:
                    yield fut.result(timeout=remaining)
                except FutureTimeout:
                    yield self._timeout()
                except BackendUnavailable as exc:
                    yield exc
                except CancelledError as exc:  # close() cancelled the chunks still queued
                    raise Closed(f"source {self.source.name!r} is closed") from exc
        finally:
            for fut in futures:
                fut.cancel()

    def _call(self, keys: list[Key], fields: list[str], timeout_s: float | None) -> RawRows:
        if timeout_s is not None and timeout_s <= 0:
            # The time went while the read queued behind others of this process: load, not the store.
            raise Overloaded("no time left when the read could start", source=self.source.name,
                             view=self.view.name)
        with self.source.operation(self.view.name):
            if type(fields) is SequenceQuery and self._sequencer is not None:
                return self._sequencer.finish(self._fetch_events(keys, fields, timeout_s), fields)
            return self._fetch_batch(keys, fields, timeout_s)

    def _fields(self, features: Sequence[str] | None) -> list[str]:
        if features is None:
            return self._all_fields
        unknown = [f for f in features if f not in self.view.features]
        if unknown:
            raise UsageError(f"view {self.view.name!r}: unknown features {unknown}")
        return list(dict.fromkeys(features))

    def _coercions(self, fields: list[str]) -> tuple[Coercion, ...]:
        plan = self._plans.get(tuple(fields))
        if plan is None:
            features = self.view.features
            plan = self._plans[tuple(fields)] = coercion_plan({f: features[f] for f in fields},
                                                              self.view.defaults)
        return plan

    def _coerce_row(self, key: Key, raw: Mapping[str, Any],
                    plan: tuple[Coercion, ...], degraded: list[Degraded]) -> Row:
        row: Row = {}
        for name, exact, convert, _, default in plan:
            value = raw.get(name)
            if value is None:
                row[name] = default
            elif type(value) is exact:
                row[name] = value
            else:
                try:
                    row[name] = convert(value)
                except COERCION_ERRORS as exc:
                    log.warning("view %s key %r feature %s: cannot coerce stored value: %s",
                                self.view.name, key, name, exc)
                    degraded.append(Degraded(self.view.name, Reason.COERCION, str(exc), (key,), name))
                    row[name] = default
        return row

    def upsert(self, rows: Iterable[tuple[Key, Mapping[str, FeatureValue]]]) -> int:
        """Write rows idempotently (whole rows: absent features are written as null); return the count."""
        if self._sequencer is not None:
            raise UsageError(f"view {self.view.name!r} is a sequence view: add events with append()")
        self._check_writable()
        prepared: dict[Key, Row] = {}
        for key, values in rows:
            prepared[self._norm(key)] = self._check_row(key, values)  # later duplicates win
        items = list(prepared.items())
        size = self._batch_size
        for i in range(0, len(items), size):
            self._store_call(self._write_batch, items[i:i + size])
        return len(items)

    def _check_row(self, key: Key, values: Mapping[str, FeatureValue]) -> Row:
        unknown = set(values) - set(self.view.features)
        if unknown:
            raise CoercionError(f"view {self.view.name!r} key {key!r}: unknown features {sorted(unknown)}")
        row: Row = {}
        for name, ftype in self.view.features.items():
            value = values.get(name)
            if value is None:
                row[name] = None
                continue
            try:
                row[name] = coercer(ftype)(value)
            except (CoercionError, TypeError, ValueError) as exc:
                raise CoercionError(f"view {self.view.name!r} key {key!r} feature {name!r}: {exc}") \
                    from exc
        return row

    def ping(self) -> None:
        """Round-trip to the store."""
        self._store_call(self.source.ping)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(view={self.view.name!r}, source={self.source.name!r})"


