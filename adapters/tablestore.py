"""The TableStore (OTS) adapter over the ``tablestore`` SDK: one wide row per key, BatchGetRow/BatchWriteRow.

Sequence views (a row per event, GetRange BACKWARD per key) are described in
``adapters._tablestore_sequence``.

Layout: the table's only primary-key column is the view's ``key`` (STRING for ``key_type`` "str",
INTEGER for "int"); every feature is an attribute column of the same name, one version kept
(``max_version=1`` on create and on every read). Encodings: int as INTEGER, float as DOUBLE, str as
STRING, bool as the native BOOLEAN type; lists have no TableStore type and are stored as compact JSON
text in a STRING column (``[1,2]``, ``["a","b"]``, floats written by Python's ``repr`` so they
round-trip exactly). A null feature is simply absent: every write is a whole-row put, so a feature
written as null disappears and reads give the view's default for it.

Reads send BatchGetRow requests of at most 100 rows (the service's limit), concurrently up to
``pool_size``; the key column is always requested so a row whose requested features are all null is
still found. Rows that fail inside a response are re-read ``row_retries`` times, then reported as
degraded rows. Request-level 5xx and throttling errors are retried by the SDK with a short policy
(``max_retries``, ``retry_delay_ms``); authentication failures are never retried.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import urllib3.exceptions as u3
from pydantic import Field, SecretStr, field_validator

from featuredao.config import StrictModel, View
from featuredao.dao import BaseDao, Capabilities, Source
from featuredao.errors import (
    BackendAuthError,
    BackendError,
    BackendQueryError,
    BackendTimeout,
    BackendUnavailable,
)
from featuredao.types import Key, RawRows, Row, RowFailure

from ._tablestore_sequence import TableStoreSequenceMixin


@contextmanager
def _without_codec_notices() -> Iterator[None]:
    """Quiet the SDK's notices that its native codec is missing (the pure-Python one is expected here): the
    "Native C++ encoder/decoder not available" warnings of its two codec loggers, dropped only while it is
    imported, and its ImportWarnings (seen under ``-W default``), ignored only when raised from SDK modules.
    Not catch_warnings(): restoring the filters would also undo those numpy (imported by the SDK) installs."""
    warnings.filterwarnings("ignore", category=ImportWarning, module=r"tablestore\.")
    loggers = [logging.getLogger(f"tablestore.{name}") for name in ("encoder", "decoder")]

    def keep(record: logging.LogRecord) -> bool:
        return "using Python implementation" not in record.getMessage()

    for logger in loggers:
        logger.addFilter(keep)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(keep)


with _without_codec_notices():
    import tablestore as ots
    from tablestore.retry import RetryPolicy, RetryUtil

BATCH_GET_MAX_ROWS = 100
BATCH_WRITE_MAX_ROWS = 200

# Benchmarks' hand-written baseline keeps one plain client per endpoint.
_raw_clients: dict[tuple[str, str, str | None], Any] = {}
_raw_lock = threading.Lock()

_AUTH_CODES = frozenset({"OTSAuthFailed", "OTSNoPermissionAccess", "OTSAccessDenied"})
_TIMEOUT_CODES = frozenset({"OTSTimeout"})
# Transient service states: worth a fallback or a later retry, not a fault in the query.
_UNAVAILABLE_CODES = frozenset({
    "OTSServerBusy", "OTSServerUnavailable", "OTSPartitionUnavailable", "OTSInternalServerError",
    "OTSNotEnoughCapacityUnit", "OTSQuotaExhausted", "OTSRowOperationConflict", "OTSTableNotReady",
    "OTSOperationThrottled", "OTSOperationConflict",
})
_MISSING_TABLE = "OTSObjectNotExist"


class TableStoreOptions(StrictModel):
    """Source options of the tablestore adapter."""

    endpoint: str
    """Instance endpoint URL, e.g. ``https://my-instance.cn-hangzhou.ots.aliyuncs.com``."""
    instance_name: str = Field(min_length=1)
    access_key_id: str = Field(min_length=1)
    access_key_secret: SecretStr
    """Give it as ``"${ENV_VAR}"``; it is only read when the client is created."""
    region: str | None = Field(default=None, min_length=1)
    """When set, requests are signed with the v4 scheme for this region (else v2)."""
    pool_size: int = Field(default=8, ge=1, le=256)
    """HTTP connections (OTSClient ``max_connection``); also how many requests of one read run at once."""
    batch_size: int = Field(default=BATCH_GET_MAX_ROWS, ge=1, le=BATCH_GET_MAX_ROWS)
    """Rows per BatchGetRow (and per BatchWriteRow); the service allows at most 100 per read."""
    socket_timeout_ms: int = Field(default=1000, gt=0)
    """Connect and read timeout of every HTTP request."""
    max_retries: int = Field(default=2, ge=0, le=10)
    """SDK retries of a request failing with 5xx or throttling (reads, and the idempotent puts)."""
    retry_delay_ms: float = Field(default=10.0, ge=0, le=10_000)
    """Delay before the first such retry; doubled for each next one, with jitter."""
    row_retries: int = Field(default=1, ge=0, le=3)
    """Re-reads (and re-writes) of rows that failed inside a batch response."""

    @field_validator("endpoint")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")) or len(v.split("://", 1)[1].strip("/")) == 0:
            raise ValueError("endpoint must be an http:// or https:// URL")
        return v.rstrip("/")


class _ShortRetry(RetryPolicy):  # type: ignore[misc]
    """The SDK's retry rules with a configured number of tries and short, doubling, jittered delays."""

    def __init__(self, max_retries: int, delay_s: float) -> None:
        self.max_retries = max_retries
        self.delay_s = delay_s

    def should_retry(self, retry_times: int, exception: Any, api_name: str) -> bool:
        if retry_times >= self.max_retries or exception.code in _AUTH_CODES:
            return False
        if RetryUtil.should_retry_no_matter_which_api(exception):
            return True
        # Our only write is an unconditional whole-row put, so repeating it is as safe as a read.
        repeatable = RetryUtil.is_repeatable_api(api_name) or api_name == "BatchWriteRow"
        return bool(repeatable and RetryUtil.should_retry_when_api_repeatable(retry_times, exception,
                                                                                api_name))

    def get_retry_delay(self, retry_times: int, exception: Any, api_name: str) -> float:
        limit: float = self.delay_s * 2.0 ** retry_times
        return limit * (0.5 + 0.5 * random.random())


def _kind_for_code(code: str | None, status: int | None) -> type[BackendError]:
    """The featuredao exception a TableStore error code (and HTTP status) stands for."""
    if code in _AUTH_CODES:
        return BackendAuthError
    if code in _TIMEOUT_CODES:
        return BackendTimeout
    if code in _UNAVAILABLE_CODES or (status is not None and status >= 500):
        return BackendUnavailable
    return BackendQueryError


class TableStoreSource(Source):
    """One TableStore instance, reached through one OTSClient (created on first use) and its HTTP pool."""

    type_name = "tablestore"
    driver_modules = {"tablestore": "tablestore"}
    options_model = TableStoreOptions
    capabilities = Capabilities(sequences=True, sequence_filters=True)
    default_batch_size = BATCH_GET_MAX_ROWS

    def __init__(self, name: str, options: TableStoreOptions) -> None:
        super().__init__(name, options)
        self._lock = threading.Lock()
        self._client: Any = None
        self._tables: dict[str, str] = {}

    def client_kwargs(self) -> dict[str, Any]:
        """OTSClient's arguments from the options (the secret included: never log this)."""
        opts: TableStoreOptions = self.options
        kwargs: dict[str, Any] = {
            "end_point": opts.endpoint, "access_key_id": opts.access_key_id,
            "access_key_secret": opts.access_key_secret.get_secret_value(),
            "instance_name": opts.instance_name, "socket_timeout": opts.socket_timeout_ms / 1000,
            "max_connection": opts.pool_size,
            "retry_policy": _ShortRetry(opts.max_retries, opts.retry_delay_ms / 1000),
        }
        if opts.region is not None:
            kwargs["region"] = opts.region
        return kwargs

    def client(self) -> Any:
        """The OTSClient, created on first use (creating it does not connect either)."""
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = ots.OTSClient(**self.client_kwargs())
                client = self._client
        return client

    def dao(self, view: View) -> TableStoreDao:
        self._tables[view.name] = view.table
        return TableStoreDao(self, view)

    def ping(self) -> None:
        self.client().list_table()

    def map_error(self, exc: BaseException) -> type[BackendError] | None:
        if isinstance(exc, ots.OTSServiceError):
            return _kind_for_code(exc.code, exc.http_status)
        if isinstance(exc, ots.OTSClientError):
            status = exc.http_status
            if status == 403:
                return BackendAuthError
            if status is not None and status >= 500:
                return BackendUnavailable
            return BackendQueryError  # rejected by the SDK's own argument checks
        if isinstance(exc, u3.MaxRetryError):
            return BackendTimeout if isinstance(exc.reason, u3.TimeoutError) else BackendUnavailable
        if isinstance(exc, u3.TimeoutError | TimeoutError):
            return BackendTimeout
        if isinstance(exc, u3.HTTPError | OSError):
            return BackendUnavailable
        return None

    def error_detail(self, exc: BaseException, kind: type[BackendError], view: str | None) -> str:
        table = self._tables.get(view or "")
        if isinstance(exc, ots.OTSServiceError):
            detail = f"{exc.code}: {exc.message}"
            if exc.code == _MISSING_TABLE and table is not None:
                detail = f"table {table!r} does not exist ({detail})"
        else:
            text = str(exc).strip()
            detail = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
        if kind is BackendAuthError:
            detail = ("authentication failed: the access key id or secret was rejected "
                      f"(check access_key_id and access_key_secret) - {detail}")
        secret = self.options.access_key_secret.get_secret_value()
        if secret:
            # The service never echoes the secret; this guards against a proxy or a future SDK that does.
            detail = detail.replace(secret, "***")
        return detail

    def _release(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            # The sync OTSClient has no close(); its urllib3 PoolManager holds the sockets.
            pool = getattr(getattr(client, "connection", None), "pool", None)
            if pool is not None:
                pool.clear()


def _encode(value: Any) -> Any:
    """A feature value as a TableStore cell: lists as compact JSON text, scalars as they are."""
    if isinstance(value, list):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return value


class TableStoreDao(TableStoreSequenceMixin, BaseDao):
    """Reads and writes one view's table, 100 rows per request (a sequence view: see
    ``adapters._tablestore_sequence``)."""

    source: TableStoreSource

    def __init__(self, source: TableStoreSource, view: View) -> None:
        super().__init__(source, view)
        self._table = view.table
        self._key = view.key
        self._lists = {f for f, t in view.features.items() if t.is_list}
        if view.sequence is not None:
            self._sequence_layout()

    # -- reads -----------------------------------------------------------------------------
    def _batch_get(self, keys: list[Key], fields: list[str]) -> list[Any]:
        """One BatchGetRow: the response items in key order."""
        request = ots.BatchGetRowRequest()
        # The key column is asked for too: without it a row whose asked features are all null
        # comes back empty, like a missing row.
        request.add(ots.TableInBatchGetRowItem(
            self._table, [[(self._key, k)] for k in keys], columns_to_get=[self._key, *fields],
            max_version=1))
        response = self.source.client().batch_get_row(request)
        items = response.get_result_by_table(self._table) or []
        if len(items) != len(keys):
            raise BackendQueryError(f"BatchGetRow answered {len(items)} rows for {len(keys)} keys",
                                    source=self.source.name, view=self.view.name)
        return list(items)

    def _fetch_batch(self, keys: list[Key], fields: list[str], timeout_s: float | None) -> RawRows:
        deadline = None if timeout_s is None else time.perf_counter() + timeout_s
        out: dict[Key, Any] = {}
        pending = keys
        for attempt in range(self.source.options.row_retries + 1):
            failed: list[tuple[Key, str, str]] = []
            for key, item in zip(pending, self._batch_get(pending, fields), strict=True):
                if not item.is_ok:
                    failed.append((key, item.error_code or "", item.error_message or ""))
                elif item.row is not None:
                    out[key] = {name: value for name, value, *_ in item.row.attribute_columns or ()}
            if not failed:
                return out
            missing_table = [f for f in failed if f[1] == _MISSING_TABLE]
            if missing_table:
                # Services that report a missing table per row: the whole view is broken, not a row.
                raise BackendQueryError(
                    f"table {self._table!r} does not exist ({_MISSING_TABLE}: {missing_table[0][2]})",
                    source=self.source.name, view=self.view.name)
            pending = [key for key, _, _ in failed]
            last = attempt == self.source.options.row_retries
            if last or (deadline is not None and time.perf_counter() >= deadline):
                break
        for key, code, message in failed:
            out[key] = RowFailure(f"{code}: {message}".strip(": "))
        return out

    def _raw_client(self) -> Any:
        """The benchmark baseline's own plain client for this endpoint (no retries)."""
        kwargs = self.source.client_kwargs()
        kwargs["retry_policy"] = ots.NoRetryPolicy()
        ident = (kwargs["end_point"], kwargs["instance_name"], kwargs.get("region"))
        with _raw_lock:
            client = _raw_clients.get(ident)
            if client is None:
                client = _raw_clients[ident] = ots.OTSClient(**kwargs)
            return client

    def raw_reader(self) -> Callable[[list[Key], list[str]], object]:
        """OTSClient by hand: BatchGetRow per 100 keys in turn, JSON lists decoded, rows as dicts by key."""
        table, key = self._table, self._key
        lists = self._lists

        def read(keys: list[Key], fields: list[str]) -> object:
            client = self._raw_client()
            wanted = [f for f in fields if f in lists]
            out: dict[Key, dict[str, Any]] = {}
            for i in range(0, len(keys), BATCH_GET_MAX_ROWS):
                part = keys[i:i + BATCH_GET_MAX_ROWS]
                request = ots.BatchGetRowRequest()
                request.add(ots.TableInBatchGetRowItem(table, [[(key, k)] for k in part],
                                                       columns_to_get=[key, *fields], max_version=1))
                items = client.batch_get_row(request).get_result_by_table(table)
                for k, item in zip(part, items, strict=True):
                    if item.is_ok and item.row is not None:
                        cells = {c[0]: c[1] for c in item.row.attribute_columns}
                        row = {f: cells.get(f) for f in fields}
                        for f in wanted:
                            text = row[f]
                            if text is not None:
                                row[f] = json.loads(text)
                        out[k] = row
            return [out.get(k) for k in keys]

        return read

    # -- writes ----------------------------------------------------------------------------
    def _write_batch(self, rows: list[tuple[Key, Row]]) -> None:
        self._put_rows([(key, [(self._key, key)], [(f, _encode(v)) for f, v in row.items() if v is not None])
                        for key, row in rows])

    def _put_rows(self, rows: list[tuple[Key, list[tuple[str, Any]], list[tuple[str, Any]]]]) -> None:
        """Whole-row puts of ``(key, primary key, attribute columns)``, 200 per BatchWriteRow."""
        for i in range(0, len(rows), BATCH_WRITE_MAX_ROWS):
            self._write_part(rows[i:i + BATCH_WRITE_MAX_ROWS])

    def _write_part(self, rows: list[tuple[Key, list[tuple[str, Any]], list[tuple[str, Any]]]]) -> None:
        pending = rows
        for attempt in range(self.source.options.row_retries + 1):
            # IGNORE: a put replaces the whole row whether or not it exists (features left out vanish).
            condition = ots.Condition(ots.RowExistenceExpectation.IGNORE)
            items = [ots.PutRowItem(ots.Row(pk, attrs), condition) for _, pk, attrs in pending]
            request = ots.BatchWriteRowRequest()
            request.add(ots.TableInBatchWriteRowItem(self._table, items))
            results = self.source.client().batch_write_row(request).get_put_by_table(self._table)
            failed = [(pending[r.index], r) for r in results if not r.is_ok]
            if not failed:
                return
            codes = {r.error_code for _, r in failed}
            if _MISSING_TABLE in codes or attempt == self.source.options.row_retries:
                (key, _, _), first = failed[0]
                kind = _kind_for_code(first.error_code, None)
                what = (f"table {self._table!r} does not exist" if first.error_code == _MISSING_TABLE
                        else f"{len(failed)} of {len(rows)} rows were not written after {attempt + 1} "
                        f"attempt{'s' if attempt else ''}")
                raise kind(f"view {self.view.name!r}: BatchWriteRow to table {self._table!r}: {what} "
                           f"(first key {key!r}: {first.error_code}: {first.error_message})",
                           source=self.source.name, view=self.view.name)
            pending = [row for row, _ in failed]

    def _prepare(self) -> None:
        """Create the table with the view's key as its only primary-key column (a sequence view: its events
        table); one that exists already is fine."""
        if self.view.sequence is not None:
            self._prepare_sequence()
            return
        key_type = "INTEGER" if self.view.key_type == "int" else "STRING"
        meta = ots.TableMeta(self._table, [(self._key, key_type)])
        options = ots.TableOptions(time_to_live=-1, max_version=1)
        throughput = ots.ReservedThroughput(ots.CapacityUnit(0, 0))
        try:
            self.source.client().create_table(meta, options, throughput)
        except ots.OTSServiceError as exc:
            if exc.code != "OTSObjectAlreadyExist":
                raise
