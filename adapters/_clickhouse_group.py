"""A ClickHouse source's grouped reads: each fetch of a request's views, read on the group's one Client.

``ClickHouseSource.read_group`` borrows one Client of the pool for the whole group and hands each fetch
here with a ``Query`` that runs on that Client. Every chunk's statement is the one its DAO's
``_fetch_batch`` sends (``ClickHouseDao.read_chunk``: the first use's table inspection included), limited
by the time the group has left, on the server (``max_execution_time``) and from the client (Cancel), as
any read.

A statement the server refuses (a view's missing table, code 60) fails that view's read alone. The
driver closes its socket after any server exception and connects again on the Client's next query, so
the next fetch runs on the same borrowed Client over a fresh connection, within the group's time. An
error of the connection itself (refused, reset, a socket timeout) fails the whole group.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from clickhouse_driver import errors as ch_errors

from featuredao.dao import Chunks, Fetch, Source, chunks_in_turn
from featuredao.errors import (
    BackendQueryError,
    BackendTimeout,
    FeatureDaoError,
    Overloaded,
)
from featuredao.types import Key, RawRows

from ._clickhouse_table import Query

Borrow = Callable[[float | None], AbstractContextManager[Any]]
"""The pool's ``client``: one Client, waited for at most that long."""
SelectOn = Callable[[Any, str, dict[str, Any] | None, float], list[Any] | None]
"""``ClickHouseSource._select_on``: one SELECT on a Client by a deadline; None when cancelled then."""


def read_on_one_client(source: Source, borrow: Borrow, select_on: SelectOn, fetches: Sequence[Fetch],
                       timeout_s: float | None) -> list[Chunks | Exception]:
    """``read_group``: one borrow for every fetch; a read without a deadline limits each statement by the
    source's ``read_timeout_ms``, as read alone."""
    default: float = source.options.read_timeout_ms / 1000
    until = None if timeout_s is None else time.perf_counter() + timeout_s
    try:
        with borrow(default if timeout_s is None else timeout_s) as client:

            def on_client(sql: str, params: dict[str, Any] | None, limit: float | None) -> list[Any]:
                limit = default if limit is None else limit
                rows = select_on(client, sql, params, time.perf_counter() + limit)
                if rows is None:  # cancelled at its deadline, the Client kept (drained or to reconnect)
                    raise BackendTimeout(f"query cancelled after {limit:.3f}s", source=source.name)
                return rows

            return [read_fetch(source, on_client, fetch, until) for fetch in fetches]
    except Overloaded as exc:
        # No Client of our own pool in time: each read fails as this process's load (not as the store's
        # timeout, which a late answer of chunks would become), as when it waits alone.
        return [Overloaded(str(exc), source=source.name, view=f.view) for f in fetches]


def read_fetch(source: Source, query: Query, fetch: Fetch, until: float | None) -> Chunks | Exception:
    """One fetch's chunks on the group's Client, as its DAO's ``_fetch_batch`` reads each
    (``chunks_in_turn``); ``until`` is the group's deadline (``time.perf_counter``)."""
    dao: Any = fetch.dao

    def read_chunk(keys: list[Key], left: float | None) -> RawRows:
        rows: RawRows = dao.read_chunk(query, keys, fetch.fields, left)
        return rows

    return chunks_in_turn(source, fetch, until, read_chunk, lambda exc: _refused(source, exc))


def _refused(source: Source, exc: Exception) -> bool:
    """Whether the server (or the driver, before sending) refused one statement, and the Client can run the
    next: not a connection's error."""
    if isinstance(exc, FeatureDaoError | ch_errors.ServerException):
        return True  # ours (a cancel at the deadline, a layout the view cannot use), or the server's answer
    return source.map_error(exc) is BackendQueryError
