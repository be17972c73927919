"""The MySQL/MariaDB change feed: the server's row-based binary log, read with ``mysql-replication``."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from abc import abstractmethod
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pymysql

from featuredao.config import View
from featuredao.dao import Change
from featuredao.errors import BackendAuthError, BackendError, BackendQueryError, FeatureDaoError

from ._mysql_pool import GRACE_S, Connection, close_quietly, error_code
from ._sql import SqlDao, SqlSource
from ._sql_dialect import SqlSourceOptions

# A privilege is missing; the dump cannot read the binlog (e.g. its file is gone); an unknown system
# variable (binlog_row_metadata before MariaDB 10.5 / MySQL 8.0.14); binary logging is off.
_ACCESS_DENIED = 1227
_FATAL_READING_BINLOG = 1236
_UNKNOWN_VARIABLE = 1193
_NO_BINLOG = 1381
_FEED_READ_S = 1.0
"""A change-feed read stops at the first transaction boundary after this long (the job reads on)."""
_HOLD_S = 5.0
"""How long a read's open binlog stream waits for the job's next chunk (the server drops an unread dump
after net_write_timeout, 60 s by default)."""


class FeedSource(SqlSource):
    """A SQL source that also tracks its binlog readers' connections (``_interrupt`` shuts them)."""

    options: SqlSourceOptions

    def __init__(self, name: str, options: SqlSourceOptions) -> None:
        super().__init__(name, options)
        self._feed_lock = threading.Lock()
        self._feed_conns: set[Connection] = set()

    def _track_feed(self, conn: Connection) -> None:
        with self._feed_lock:
            self._feed_conns.add(conn)

    def _untrack_feed(self, conn: Connection) -> None:
        with self._feed_lock:
            self._feed_conns.discard(conn)

    def _shut_feeds(self) -> None:
        """Shut the binlog readers' sockets: a read wakes up at once (KILL QUERY does not end it)."""
        with self._feed_lock:
            feeds = list(self._feed_conns)
        for conn in feeds:
            with contextlib.suppress(OSError, AttributeError):
                conn._sock.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]

    def _close_feeds(self) -> None:
        """Close the binlog streams a read held for the next chunk."""
        with self._feed_lock:
            feeds, self._feed_conns = list(self._feed_conns), set()
        for conn in feeds:
            close_quietly(conn)

    @abstractmethod
    def query(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Sequence[Any]]:
        """Run one statement as it is (no time-limit prefix: SHOW statements) and return its rows."""


def _binlog_position(value: Any) -> tuple[str, int, int] | None:
    """A feed position ``[binlog file, start of the transaction, change index]`` (None: the start)."""
    if not value:
        return None
    file, start, index = value
    return str(file), int(start), int(index)


class FeedGap(BackendQueryError):
    """The binary log no longer holds every change after the checkpoint: a new snapshot is needed.

    ``feed_gap`` tells the sync engine so (a job with ``"on_gap": "resnapshot"`` takes one).
    """

    feed_gap = True


class FeedBatch(list[Change]):
    """The changes of one feed read, and how far the read got.

    ``tail`` is a position at a transaction boundary at or after every change returned (None: none
    known), so a job can move its checkpoint past transactions of other tables; ``at_end`` is True when
    the read reached the end of the binary log; ``scanned`` counts the binlog events it parsed (its cost).
    """

    def __init__(self, changes: Iterable[Change], tail: Any, at_end: bool, scanned: int) -> None:
        super().__init__(changes)
        self.tail = tail
        self.at_end = at_end
        self.scanned = scanned


_PREFERRED_TLS: list[Any] = []


class _FeedConnection(Connection):
    """A binlog reader's connection: PyMySQL builds a new default (PREFERRED, unverified) TLS context for
    every connection, reading the system's CA store (~25 ms); a feed read opens two, so it is built once."""

    def _create_ssl_ctx(self, sslp: Any) -> Any:
        if sslp != {}:
            return super()._create_ssl_ctx(sslp)  # type: ignore[misc]
        if not _PREFERRED_TLS:
            _PREFERRED_TLS.append(super()._create_ssl_ctx(sslp))  # type: ignore[misc]
        return _PREFERRED_TLS[0]


def _first_line(exc: BaseException) -> str:
    text = str(exc.args[1] if len(exc.args) > 1 else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _BinlogReader:
    """One non-blocking binlog dump and where it is in the log: it serves a job's consecutive chunks.

    ``read`` returns up to ``limit`` changes after ``start``, the last transaction boundary it passed
    (``tail``) and whether the dump reached the log's end. Changes found beyond the limit (the rest of a
    row event) wait in ``pending`` for the next read.
    """

    def __init__(self, dao: BinlogFeedDao, file: str, pos: int, start: tuple[str, int, int] | None) -> None:
        self.dao = dao
        self.stream, self.conns = dao._stream(file, pos)
        self.events = iter(self.stream)
        self.start = start
        self.txn: tuple[str, int] | None = None
        self.index = 0
        self.pending: deque[tuple[tuple[str, int, int], Any, float]] = deque()
        self.scanned = 0

    def where(self) -> str:
        return f"{self.stream.log_file}:{self.stream.log_pos}"

    def close(self) -> None:
        self.dao._close_stream(self.stream, self.conns)

    def read(self, limit: int, deadline: float) -> tuple[list[tuple[tuple[str, int, int], Any, float]],
                                                         list[Any] | None, bool]:
        from pymysqlreplication.event import GtidEvent, MariadbGtidEvent, QueryEvent, XidEvent
        from pymysqlreplication.row_event import UpdateRowsEvent

        self.scanned = 0
        found: list[tuple[tuple[str, int, int], Any, float]] = []
        while self.pending and len(found) < limit:
            found.append(self.pending.popleft())
        if self.pending:
            return found, None, False
        stream, start, tail = self.stream, self.start, None
        for event in self.events:
            self.scanned += 1
            at = (str(stream.log_file), event.packet.log_pos - event.packet.event_size)
            if isinstance(event, GtidEvent | MariadbGtidEvent):
                self.txn, self.index = at, 0
                continue
            if isinstance(event, QueryEvent) and event.query.strip().upper() == "BEGIN":
                if self.txn is None:  # no GTID event before it (MySQL without GTIDs)
                    self.txn, self.index = at, 0
                continue
            if isinstance(event, XidEvent | QueryEvent):
                # A commit, or a statement that is its own transaction (DDL, non-transactional COMMIT).
                self.txn = None
                tail = [str(stream.log_file), int(stream.log_pos), 0]
                if len(found) >= limit or time.monotonic() >= deadline:
                    return found, tail, False
                continue
            if self.txn is None:  # a stream started in the middle of a transaction: only its own start
                self.txn = at
            for r in event.rows:
                keys = self.dao._row_keys(r, isinstance(event, UpdateRowsEvent), at)
                for k in dict.fromkeys(keys):  # a key change: the old key goes, the new one comes
                    self.index += 1
                    position = (self.txn[0], self.txn[1], self.index)
                    if start is None or position > start:
                        (found if len(found) < limit else self.pending).append(
                            (position, k, float(event.timestamp)))
            if len(found) >= limit:
                return found, tail, False
        if self.txn is None:
            tail = [str(stream.log_file), int(stream.log_pos), 0]
        return found, tail, True


class BinlogFeedDao(SqlDao):
    """A SQL view whose change feed is the server's row-based binary log (``mysql-replication``).

    Positions are ``[file, start of the transaction in it, index of the change within it]``: a reader
    resumes at the start of the transaction (its table maps come first there) and skips what it applied.
    A read streams the log without blocking from the checkpoint to its end (or for about
    ``_FEED_READ_S``, then stops at a transaction boundary), so it costs the events written since the
    checkpoint; it also returns the boundary it reached (``FeedBatch.tail``), so transactions of other
    tables move the checkpoint too and are never read again. A read that stopped at its chunk's limit
    keeps its stream for the next chunk (``_HOLD_S``), so a transaction larger than a chunk is read
    once. Each change is applied with the key's row as it is when read (absent: deleted), like the
    SQLite outbox, so a replayed change never brings back an older row. The binary log is never trimmed
    by us (``_ack_feed`` is a no-op): the server's own expiry does that, and a checkpoint whose file
    expired is a gap (``FeedGap``).
    """

    source: FeedSource

    def __init__(self, source: FeedSource, view: View) -> None:
        super().__init__(source, view)
        self._held_lock = threading.Lock()
        self._held: tuple[_BinlogReader, tuple[str, int, int] | None, float] | None = None

    def _schema_table(self) -> tuple[str, str]:
        schema, _, table = self.view.table.rpartition(".")
        return schema or self.source.options.database, table

    def _error(self, kind: type[BackendError], message: str) -> BackendError:
        return kind(f"change feed of view {self.view.name!r}: {message}", source=self.source.name,
                    view=self.view.name)

    # -- prerequisites ----------------------------------------------------------------------------
    def check_feed(self, position: Any) -> None:
        """Raise a clear error unless the server can serve the change feed (from ``position``, when given).

        Checked: ``log_bin``, ``binlog_format=ROW``, ``binlog_row_image`` FULL or NOBLOB,
        ``binlog_row_metadata=FULL``, the REPLICATION CLIENT (BINLOG MONITOR) and REPLICATION SLAVE
        privileges, and that the checkpoint's binlog file is still on the server (``FeedGap`` if not).
        """
        self._store_call(self._check_feed, position)

    def _check_feed(self, position: Any) -> None:
        self._wide_only("change feed")
        problems = self._setting_problems()
        if problems:
            raise self._error(BackendQueryError, "the server is not set up for it: " + "; ".join(problems))
        logs = self._binary_logs()
        start = _binlog_position(position)
        if start is not None:
            self._check_gap(start, logs)
        self._probe_dump(logs)

    def _setting_problems(self) -> list[str]:
        rows = self.source.query("SELECT @@GLOBAL.log_bin, @@GLOBAL.binlog_format, @@GLOBAL.binlog_row_image")
        log_bin, fmt, image = rows[0]
        problems = []
        if not int(log_bin):
            problems.append("binary logging is off: start the server with log_bin (e.g. log_bin = binlog "
                            "under [mysqld]; it cannot be switched on while the server runs)")
        if str(fmt).upper() != "ROW":
            problems.append(f"binlog_format is {fmt}, it must be ROW: SET GLOBAL binlog_format = 'ROW' "
                            "and binlog_format = ROW under [mysqld]")
        if str(image).upper() == "MINIMAL":
            problems.append(f"binlog_row_image is {image}, it must be FULL (or NOBLOB): SET GLOBAL "
                            "binlog_row_image = 'FULL' and binlog_row_image = FULL under [mysqld]")
        try:
            meta = self.source.query("SELECT @@GLOBAL.binlog_row_metadata")[0][0]
        except pymysql.err.MySQLError as exc:
            if error_code(exc) != _UNKNOWN_VARIABLE:
                raise
            problems.append("the server has no binlog_row_metadata setting (MariaDB 10.5 or MySQL 8.0.14 "
                            "and later have it): the binary log does not name the columns of its rows")
        else:
            if str(meta).upper() != "FULL":
                problems.append(f"binlog_row_metadata is {meta}, it must be FULL (so that the binary log "
                                "names the columns of its rows): SET GLOBAL binlog_row_metadata = 'FULL' "
                                "and binlog_row_metadata = FULL under [mysqld]")
        return problems

    def _binary_logs(self) -> list[tuple[str, int]]:
        """The server's binlog files and sizes, oldest first (needs REPLICATION CLIENT/BINLOG MONITOR)."""
        try:
            rows = self.source.query("SHOW BINARY LOGS")
        except pymysql.err.MySQLError as exc:
            if error_code(exc) == _ACCESS_DENIED:
                raise self._error(BackendAuthError, f"user {self.source.options.user!r} may not list the "
                                  f"binary logs ({_first_line(exc)}): GRANT REPLICATION CLIENT ON *.* TO "
                                  "it (MariaDB 10.5+ calls it BINLOG MONITOR)") from exc
            if error_code(exc) == _NO_BINLOG:
                raise self._error(BackendQueryError, "binary logging is off: start the server with "
                                  "log_bin") from exc
            raise
        return [(str(r[0]), int(r[1])) for r in rows]

    def _check_gap(self, start: tuple[str, int, int], logs: list[tuple[str, int]]) -> None:
        sizes = dict(logs)
        file, pos, _ = start
        if file not in sizes:
            oldest = logs[0][0] if logs else "none"
            raise self._error(FeedGap, f"the checkpoint's binlog file {file} ({file}:{pos}) is no longer on "
                              f"the server (oldest: {oldest}): it expired (binlog_expire_logs_seconds, "
                              "expire_logs_days) or was purged, so the changes since the checkpoint are "
                              "lost and a new snapshot is needed")
        if pos > sizes[file]:
            raise self._error(FeedGap, f"the checkpoint {file}:{pos} lies past the end of that file "
                              f"({sizes[file]} bytes): the binary log was reset, so a new snapshot is needed")

    def _probe_dump(self, logs: list[tuple[str, int]]) -> None:
        """Open a binlog dump at the end of the log: the server refuses it without REPLICATION SLAVE."""
        if not logs:
            return
        stream, conns = self._stream(*logs[-1])
        try:
            stream.fetchone()
        except pymysql.err.MySQLError as exc:
            if error_code(exc) == _ACCESS_DENIED:
                raise self._error(BackendAuthError, f"user {self.source.options.user!r} may not read the "
                                  f"binary log ({_first_line(exc)}): GRANT REPLICATION SLAVE ON *.* TO "
                                  "it") from exc
            raise
        finally:
            self._close_stream(stream, conns)

    # -- the feed ---------------------------------------------------------------------------------
    def _install_feed(self) -> None:
        self._check_feed(None)

    def _feed_position(self) -> Any:
        rows = self.source.query("SHOW MASTER STATUS")
        if not rows:
            raise self._error(BackendQueryError, "binary logging is off: start the server with log_bin")
        return [str(rows[0][0]), int(rows[0][1]), 0]

    def _ack_feed(self, position: Any) -> None:
        """Nothing to trim: the binary log expires on the server's schedule."""

    def _stream(self, file: str, pos: int) -> tuple[Any, list[Connection]]:
        """A non-blocking binlog reader from ``file:pos`` and the list its connections are recorded in."""
        from pymysqlreplication import BinLogStreamReader
        from pymysqlreplication.event import GtidEvent, MariadbGtidEvent, QueryEvent, XidEvent
        from pymysqlreplication.row_event import (
            DeleteRowsEvent,
            PartialUpdateRowsEvent,
            UpdateRowsEvent,
            WriteRowsEvent,
        )

        source = self.source
        conns: list[Connection] = []
        streams: list[bool] = []

        def connect(**kwargs: Any) -> Connection:
            # mysql-replication opens its control connection with pymysql's deprecated ``db`` argument (a
            # DeprecationWarning per batch): the same connection, with that argument under its current name.
            if "db" in kwargs:
                kwargs["database"] = kwargs.pop("db")
            control = kwargs.get("database") == "information_schema"
            if source.closed or (not control and streams):
                # mysql-replication reconnects silently when the stream drops (after a read timeout too):
                # refused, so the read fails, is reported and retried from its checkpoint.
                raise pymysql.err.OperationalError(2013, "the binary log stream was lost")
            if not control:
                streams.append(True)
            conn: Connection = _FeedConnection(defer_connect=True, **kwargs)
            conns.append(conn)
            # Tracked before the handshake: a frozen server's greeting is then awaited on a socket that
            # _interrupt can shut.
            source._track_feed(conn)
            conn.connect()
            return conn

        o = source.options
        settings = {"host": o.host, "port": o.port, "user": o.user, "password": o.password.get_secret_value(),
                    "connect_timeout": o.connect_timeout_ms / 1000,
                    "read_timeout": o.read_timeout_ms / 1000 + GRACE_S,
                    "write_timeout": o.read_timeout_ms / 1000 + GRACE_S}
        schema, table = self._schema_table()
        stream = BinLogStreamReader(
            connection_settings=settings, server_id=random.randint(1 << 20, 1 << 30), blocking=False,
            # is_mariadb makes mysql-replication send an empty file name and position 4 (MariaDB then
            # streams from its first binlog on every read); the classic dump by file and position
            # works on both servers, and MariaDB's GTID events are parsed either way.
            resume_stream=True, is_mariadb=False, log_file=file, log_pos=pos,
            only_events=[GtidEvent, MariadbGtidEvent, QueryEvent, XidEvent, WriteRowsEvent,
                         UpdateRowsEvent, PartialUpdateRowsEvent, DeleteRowsEvent],  # MySQL's partial JSON
            only_schemas=[schema], only_tables=[table], enable_logging=False, pymysql_wrapper=connect)
        return stream, conns

    def _close_stream(self, stream: Any, conns: list[Connection]) -> None:
        with contextlib.suppress(Exception):  # a connection already broken: closed below regardless
            stream.close()
        for conn in conns:
            self.source._untrack_feed(conn)
            if conn.open:
                close_quietly(conn)

    def _take_reader(self, start: tuple[str, int, int] | None) -> _BinlogReader | None:
        """The reader held by the last read if it stopped exactly at ``start`` (and not long ago)."""
        with self._held_lock:
            held, self._held = self._held, None
        if held is None:
            return None
        reader, expect, since = held
        if expect == start and time.monotonic() - since < _HOLD_S:
            return reader
        reader.close()
        return None

    def _feed_batch(self, after: Any, limit: int) -> list[Change]:
        start = _binlog_position(after)
        reader = self._take_reader(start)
        held = reader is not None
        while True:
            if reader is None:
                if start is None:
                    logs = self._binary_logs()
                    if not logs:
                        raise self._error(BackendQueryError, "binary logging is off: start the server with "
                                          "log_bin")
                    file, pos = logs[0][0], 4
                else:
                    file, pos = start[0], start[1]
                reader = _BinlogReader(self, file, pos, start)
            try:
                found, tail, at_end = reader.read(limit, time.monotonic() + _FEED_READ_S)
                break
            except FeatureDaoError:
                reader.close()
                raise
            except (pymysql.err.MySQLError, OSError) as exc:
                reader.close()
                if held and not self.source.closed:
                    reader, held = None, False  # a held stream went stale: read afresh, once
                    continue
                if error_code(exc) == _FATAL_READING_BINLOG and start is not None:
                    self._check_gap(start, self._binary_logs())  # the file is gone: say so
                raise
            except Exception as exc:  # mysql-replication failed to parse an event: a read error, not a crash
                reader.close()
                raise self._error(BackendQueryError, f"reading the binary log at {reader.where()} failed: "
                                  f"{type(exc).__name__}: {exc}") from exc
        scanned = reader.scanned
        if at_end:
            reader.close()
        else:
            # The next chunk of the same job starts where this one stopped: it goes on with this stream
            # (a transaction larger than a chunk is then read once, not once per chunk).
            ends = [p for p in ([*found[-1][0]] if found else None, tail) if p is not None]
            expect = max(tuple(p) for p in ends) if ends else start
            with self._held_lock:
                stale, self._held = self._held, (reader, expect, time.monotonic())
            if stale is not None:
                stale[0].close()
        norm = [self._norm(_key_text(k)) for _, k, _ in found]
        current = self.current_rows(list(dict.fromkeys(norm)))
        return FeedBatch((Change(list(pos), k, current.get(k), ts)
                          for (pos, _, ts), k in zip(found, norm, strict=True)), tail, at_end, scanned)

    def _row_keys(self, r: Mapping[str, Any], update: bool, at: tuple[str, int]) -> list[Any]:
        """The key(s) a row event touches: an update's before and after keys (a key change: both)."""
        key = self.view.key
        images = [r["before_values"], r["after_values"]] if update else [r["values"]]
        keys = []
        for i, values in enumerate(images):
            if key in values:
                keys.append(values[key])
                continue
            if any(name is None or str(name).startswith("UNKNOWN_COL") for name in values):
                schema, table = self._schema_table()
                raise self._error(FeedGap, f"the row event of {schema}.{table} at {at[0]}:{at[1]} carries no "
                                  "column names: it was written while binlog_row_metadata was not FULL, so "
                                  "its key cannot be read; set binlog_row_metadata = FULL (SET GLOBAL and "
                                  "under [mysqld]): the changes logged before cannot be read, so a new "
                                  "snapshot is needed")
            if i == 1 and keys:
                continue  # a minimal after image without the key: the key did not change
            raise self._error(BackendQueryError, f"the row event at {at[0]}:{at[1]} has no column {key!r} "
                              f"(columns: {', '.join(map(str, values))}): the view's key must be a column "
                              "of the table")
        return keys


def _key_text(key: Any) -> Any:
    return key.decode() if isinstance(key, bytes) else key
