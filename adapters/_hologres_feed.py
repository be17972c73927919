"""The Hologres/PostgreSQL change feed: a logical replication slot decoded by wal2json."""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg

from featuredao.config import View
from featuredao.dao import Change
from featuredao.errors import BackendAuthError, BackendError, BackendQueryError

from ._pg_async import RESET_TIMEOUT as _RESET_TIMEOUT
from ._pg_async import SET_TIMEOUT as _SET_TIMEOUT
from ._sql import SqlDao, SqlSource

_FEED_READ_S = 1.0
"""A change-feed read that has made progress returns after about this long (the job reads on)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (empty if it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def _timestamp(text: Any) -> float | None:
    try:
        return dt.datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return None


_Found = tuple[list[int], Any, float | None]
"""A change found in the slot: its position, key and commit time."""


class FeedGap(BackendQueryError):
    """The slot no longer holds every change after the checkpoint: a new snapshot is needed.

    ``feed_gap`` tells the sync engine so (a job with ``"on_gap": "resnapshot"`` takes one).
    """

    feed_gap = True


class FeedBatch(list[Change]):
    """The changes of one feed read, and how far the read got.

    ``tail`` is a position at a transaction boundary at or after every change returned (None: none
    known), so a job can move its checkpoint, and the slot, past transactions of other tables;
    ``at_end`` is True when the read reached the end of what the slot holds; ``scanned`` counts the
    decoded rows it peeked (its cost).
    """

    def __init__(self, changes: Iterable[Change], tail: Any, at_end: bool, scanned: int) -> None:
        super().__init__(changes)
        self.tail = tail
        self.at_end = at_end
        self.scanned = scanned


class SlotFeedDao(SqlDao):
    """A SQL view whose change feed is a logical replication slot decoded by wal2json (PostgreSQL).

    The slot (``featuredao_<table>``) is read with ``pg_logical_slot_peek_changes`` and advanced with
    ``pg_replication_slot_advance`` only when every target applied a whole transaction (``_ack_feed``),
    so changes are kept while a target is down. Positions are ``[commit LSN, index in the transaction,
    1 if it is the transaction's last change]``: commit order, the order a replica applies them. Each
    change is applied with the key's row as it is when read (absent: deleted), like the SQLite outbox.
    A read also returns the last commit it decoded (``FeedBatch.tail``), so transactions of other tables
    move the checkpoint and the slot on: the slot's WAL is released and never decoded twice. Changes a
    peek returned beyond the chunk (a peek returns whole transactions) serve the next chunks.
    Hologres itself has no logical slots (it offers binlog subscription instead): there the feed fails
    at install, naming the missing function.
    """

    source: Any  # the HologresSource, typed in HologresDao (importing it here would make a cycle)
    def __init__(self, source: SqlSource, view: View) -> None:
        super().__init__(source, view)
        self._held_lock = threading.Lock()
        # The changes a read found beyond its chunk: (the position it stopped at, the rest, tail, at_end).
        self._held: tuple[tuple[int, int], deque[_Found], list[int] | None, bool] | None = None

    @property
    def slot(self) -> str:
        """The replication slot of the view's table (lower case, at most 63 characters)."""
        name = re.sub(r"[^a-z0-9_]", "_", f"featuredao_{self.view.table.lower()}")
        return name[:63]

    def _tables_option(self) -> str:
        schema, _, table = self.view.table.rpartition(".")
        return f"{schema or '*'}.{table}"

    def _error(self, kind: type[BackendError], message: str) -> BackendError:
        return kind(f"change feed of view {self.view.name!r}: {message}", source=self.source.name,
                    view=self.view.name)

    def _feed_query(self, sql: str, params: Sequence[Any] = (), timeout_ms: int | None = None) -> list[Any]:
        """One statement of the change feed (optionally with its own time limit), on a pooled connection.

        Not retried here: a failure is the sync job's to report and retry (with backoff), and a statement
        interrupted by ``close`` ends the read at once.
        """
        with self.source._connection(None) as borrowed:
            conn: psycopg.Connection[Any] = borrowed
            if getattr(conn, "session_limit_ms", None) is not None:  # a read's limit: back to the default
                conn.execute(_RESET_TIMEOUT)
                conn.session_limit_ms = None  # type: ignore[attr-defined]
            if timeout_ms is None:
                with conn.cursor() as cur:
                    cur.execute(sql, params)
                    return cur.fetchall() if cur.description is not None else []
            with conn.transaction(), conn.cursor() as cur:  # the limit holds for this transaction only
                cur.execute(_SET_TIMEOUT, (str(timeout_ms),))
                cur.execute(sql, params)
                return cur.fetchall()

    def _plugin_error(self, exc: psycopg.Error) -> BackendError | None:
        """A clear error for a server that cannot decode with wal2json or hold one more slot."""
        sqlstate = exc.sqlstate or ""
        text = first_line(exc)
        if "may not be used as an output plugin" in text or "output_plugin_libraries" in str(exc):
            # Some (patched) builds allow only the output plugins listed in output_plugin_libraries
            # (by default pgoutput and test_decoding), superusers included.
            return self._error(BackendQueryError, f"the server does not allow wal2json as an output plugin "
                               f"({text}): add it to output_plugin_libraries in postgresql.conf (e.g. "
                               "output_plugin_libraries = 'pgoutput, test_decoding, wal2json') and reload "
                               "the configuration (SELECT pg_reload_conf())")
        if sqlstate == "58P01" or "wal2json" in text:
            return self._error(BackendQueryError, f"the wal2json output plugin cannot be loaded ({text}): "
                               "install it on the server (e.g. the postgresql-<version>-wal2json package) "
                               "where dynamic_library_path finds it (and, where the server has an "
                               "output_plugin_libraries setting, list wal2json in it)")
        if sqlstate == "55000" and "wal_level" in text:
            return self._error(BackendQueryError, f"{text}: set wal_level = logical in postgresql.conf "
                               "and restart the server")
        if sqlstate == "53400":
            return self._error(BackendQueryError, f"{text}: raise max_replication_slots (and "
                               "max_wal_senders) in postgresql.conf, or drop unused slots")
        if sqlstate == "42501":
            return self._error(BackendAuthError, f"{text}: ALTER ROLE {self.source.options.user} "
                               "WITH REPLICATION")
        return None

    # -- prerequisites ----------------------------------------------------------------------------
    def check_feed(self, position: Any) -> None:
        """Raise a clear error unless the server can serve the change feed (from ``position``, when given).

        Checked: ``wal_level=logical``, the REPLICATION attribute (or superuser), the slot's plugin, and,
        from a position, that the slot still exists, is not invalidated and was not advanced past it
        (``FeedGap`` if so). Whether wal2json loads is checked when the slot is created (``install_feed``).
        """
        self._store_call(self._check_feed, position)

    def _check_feed(self, position: Any) -> None:
        self._wide_only("change feed")
        rows = self._feed_query(
            "SELECT current_setting('wal_level'), r.rolsuper OR r.rolreplication, s.plugin, s.database, "
            "(s.confirmed_flush_lsn - '0/0'::pg_lsn)::bigint, to_jsonb(s) ->> 'wal_status', "
            "current_database() "
            "FROM pg_roles r LEFT JOIN pg_replication_slots s ON s.slot_name = %s "
            "WHERE r.rolname = current_user", (self.slot,))
        wal_level, replication, plugin, database, flushed, wal_status, here = rows[0]
        if wal_level != "logical":
            raise self._error(BackendQueryError, f"wal_level is {wal_level}, it must be logical: set "
                              "wal_level = logical in postgresql.conf (or ALTER SYSTEM SET wal_level = "
                              "logical) and restart the server")
        if not replication:
            user = self.source.options.user
            raise self._error(BackendAuthError, f"role {user!r} may not use replication slots (it has "
                              f"neither REPLICATION nor superuser): ALTER ROLE {user} WITH REPLICATION")
        if plugin is not None and database != here:
            raise self._error(BackendQueryError, f"replication slot {self.slot} belongs to database "
                              f"{database!r}, not {here!r}: slot names are server-wide; drop it or rename "
                              "the table")
        if plugin is not None and plugin != "wal2json":
            raise self._error(BackendQueryError, f"replication slot {self.slot} decodes with {plugin!r}, "
                              "not wal2json: drop it (SELECT pg_drop_replication_slot(...)) and start over")
        if not position:
            return
        lsn = int(position[0])
        if plugin is None:
            raise self._error(FeedGap, f"replication slot {self.slot} no longer exists (dropped), so the "
                              "changes since the checkpoint are lost and a new snapshot is needed")
        if wal_status == "lost":
            raise self._error(FeedGap, f"replication slot {self.slot} was invalidated (its WAL exceeded "
                              "max_slot_wal_keep_size), so the changes since the checkpoint are lost and a "
                              "new snapshot is needed")
        if flushed is not None and int(flushed) > lsn:
            raise self._error(FeedGap, f"replication slot {self.slot} was advanced to {_lsn(int(flushed))}, "
                              f"past the checkpoint ({_lsn(lsn)}; another consumer of the slot?), so "
                              "changes are lost and a new snapshot is needed")

    # -- the feed ---------------------------------------------------------------------------------
    def _install_feed(self) -> None:
        self._check_feed(None)
        # An invalidated slot cannot be read again: a new snapshot (on_gap: resnapshot) starts a new one.
        self._feed_query("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots s "
                          "WHERE slot_name = %s AND to_jsonb(s) ->> 'wal_status' = 'lost'", (self.slot,))
        try:
            self._feed_query("SELECT pg_create_logical_replication_slot(%s, 'wal2json') "
                              "WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = %s)",
                              (self.slot, self.slot))
        except psycopg.Error as exc:
            clear = self._plugin_error(exc)
            if clear is None:
                raise
            raise clear from exc

    def _feed_position(self) -> Any:
        rows = self._feed_query("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")
        return [int(rows[0][0]), 0, 1]

    def _ack_feed(self, position: Any) -> None:
        if not position:
            return
        lsn, _, last = position
        if not last:
            return  # the middle of a transaction: advancing would drop its rest; the next ack will do
        self._feed_query("SELECT pg_replication_slot_advance(slot_name, %s::pg_lsn) "
                          "FROM pg_replication_slots "
                          "WHERE slot_name = %s AND confirmed_flush_lsn < %s::pg_lsn",
                          (_lsn(int(lsn)), self.slot, _lsn(int(lsn))))

    def _peek(self, upto: int) -> list[Any]:
        sql = ("SELECT (lsn - '0/0'::pg_lsn)::bigint, data FROM pg_logical_slot_peek_changes("
               "%s, NULL, %s, 'format-version', '2', 'include-timestamp', '1', 'include-transaction', '1', "
               "'add-tables', %s, 'include-type-oids', '0', 'include-types', '0')")
        params = (self.slot, upto, self._tables_option())
        try:
            # Decoding a long stretch of WAL may take longer than a read: the feed's own time limit.
            return self._feed_query(sql, params, self.source.options.feed_timeout_ms)
        except psycopg.Error as exc:
            clear = self._plugin_error(exc)
            if clear is None:
                raise
            raise clear from exc

    def _feed_batch(self, after: Any, limit: int) -> list[Change]:
        start = None if not after else (int(after[0]), int(after[1]))
        with self._held_lock:
            held, self._held = self._held, None
        if held is not None and held[0] == start:
            # The rest of the last peek (a transaction larger than a chunk is decoded once, not per chunk).
            _, rest, tail, at_end = held
            found = [rest.popleft() for _ in range(min(limit, len(rest)))]
            if rest:
                self._hold(found, rest, tail, at_end)
                tail, at_end = None, False
            return self._changes(found, tail, at_end, 0)
        found, tail, at_end, scanned = self._read_slot(start, limit)
        if len(found) > limit:
            self._hold(found[:limit], deque(found[limit:]), tail, at_end)
            found, tail, at_end = found[:limit], None, False
        return self._changes(found, tail, at_end, scanned)

    def _hold(self, served: list[_Found], rest: deque[_Found], tail: list[int] | None, at_end: bool) -> None:
        last = served[-1][0]
        with self._held_lock:
            self._held = ((last[0], last[1]), rest, tail, at_end)

    def _changes(self, found: list[_Found], tail: list[int] | None, at_end: bool, scanned: int) -> FeedBatch:
        norm = [self._norm(k) for _, k, _ in found]
        current = self.current_rows(list(dict.fromkeys(norm)))
        changes = (Change(pos, k, current.get(k), ts) for (pos, _, ts), k in zip(found, norm, strict=True))
        return FeedBatch(changes, tail, at_end, scanned)

    def _read_slot(self, start: tuple[int, int] | None,
                   limit: int) -> tuple[list[_Found], list[int] | None, bool, int]:
        """Changes after ``start`` from the slot (at least ``limit`` unless it ends), the last commit
        passed and whether the slot's end was reached, and how many decoded rows that took."""
        key_col = self.view.key
        upto = 2 * limit + 64
        deadline = time.monotonic() + _FEED_READ_S
        scanned = 0
        while True:
            # The peek starts at the slot (the lowest position every target applied): rows up to this
            # reader's own position are skipped. Each peek decodes from the slot again, so the window
            # grows fourfold until it holds a chunk, the end, or (after _FEED_READ_S) some progress.
            rows = self._peek(upto)
            scanned += len(rows)
            at_end = len(rows) < upto
            found: list[_Found] = []
            pending: list[Any] = []
            tail: list[int] | None = None
            for lsn, data in rows:
                msg = json.loads(data)
                action = msg.get("action")
                if action == "B":
                    pending = []
                elif action in ("I", "U", "D"):
                    keys = []
                    for part in ("identity", "columns"):  # the old key (deletes, key changes), the new
                        for col in msg.get(part) or ():
                            if col.get("name") == key_col:
                                keys.append(col.get("value"))
                    pending.extend(dict.fromkeys(keys))
                elif action == "C":
                    commit, ts = int(lsn), _timestamp(msg.get("timestamp"))
                    for i, k in enumerate(pending, start=1):
                        if start is None or (commit, i) > start:
                            found.append(([commit, i, int(i == len(pending))], k, ts))
                    if start is None or (commit, len(pending)) > start:
                        tail = [commit, len(pending), 1]
                    pending = []
            if len(found) >= limit or at_end or (tail is not None and time.monotonic() >= deadline):
                return found, tail, at_end, scanned
            upto *= 4
