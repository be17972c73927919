"""Shared helpers of the CDC tests: a source table on a real MariaDB or PostgreSQL server, unrelated
changes that fill its binlog/WAL, a random writer, and comparisons of the source with a target."""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest
from synchelp import checkpoint, contents

from featuredao.testing.servers import MariaDbServer, PostgresServer


@contextlib.contextmanager
def _pg(server: Any) -> Iterator[Any]:
    with psycopg.connect(server.conninfo, autocommit=True) as conn, conn.cursor() as cur:
        yield cur


@contextlib.contextmanager
def _my(server: Any) -> Iterator[Any]:
    conn = pymysql.connect(host=server.host, port=server.port, user=server.user, password=server.password,
                           database=server.database, autocommit=True)
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        conn.close()


class Backend:
    """A source table (``self.table``) on a MariaDB (mysql adapter) or PostgreSQL (hologres) server."""

    def __init__(self, which: str, server: Any) -> None:
        self.which, self.server = which, server
        self.table = f"cdc{uuid.uuid4().hex[:12]}"
        self.q = '"' if which == "hologres" else "`"

    @property
    def slot(self) -> str:
        return f"featuredao_{self.table}"

    def source(self, **options: Any) -> dict[str, Any]:
        s = self.server
        if self.which == "hologres":
            return {"type": "hologres", "host": s.host, "port": s.port, "user": s.user,
                    "password": s.password, "database": s.dbname, "sslmode": "disable", **options}
        return {"type": "mysql", "host": s.host, "port": s.port, "user": s.user, "password": s.password,
                "database": s.database, **options}

    def cursor(self) -> AbstractContextManager[Any]:
        return _pg(self.server) if self.which == "hologres" else _my(self.server)

    def connect(self) -> Any:
        """A connection of its own, in transactions (commit or roll back yourself)."""
        s = self.server
        if self.which == "hologres":
            return psycopg.connect(s.conninfo)
        return pymysql.connect(host=s.host, port=s.port, user=s.user, password=s.password,
                               database=s.database, autocommit=False)

    def sql(self, text: str) -> str:
        return text.replace("{t}", f"{self.q}{self.table}{self.q}")

    def run(self, sql: str, params: Any = None) -> None:
        with self.cursor() as cur:
            cur.execute(self.sql(sql), params)

    def query(self, sql: str, params: Any = None) -> list[Any]:
        with self.cursor() as cur:
            cur.execute(self.sql(sql), params)
            return list(cur.fetchall())

    def tags(self, values: list[str]) -> Any:
        """A list[str] feature as the driver writes it (JSON text in MariaDB, text[] in PostgreSQL)."""
        return values if self.which == "hologres" else json.dumps(values)

    def keys(self) -> list[int]:
        return [int(r[0]) for r in self.query("SELECT id FROM {t} ORDER BY id")]

    def log_position(self) -> Any:
        """Where the binlog/WAL ends now: (file, position) or an LSN."""
        if self.which == "hologres":
            return int(self.query("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")[0][0])
        row = self.query("SHOW MASTER STATUS")[0]
        return [str(row[0]), int(row[1])]

    def log_bytes(self) -> int:
        """How much binlog (every file) or WAL the server has written."""
        if self.which == "hologres":
            return int(self.log_position())
        return sum(int(r[1]) for r in self.query("SHOW BINARY LOGS"))

    def slot_lsn(self) -> int | None:
        found = self.query("SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots "
                           "WHERE slot_name = %s", (self.slot,))
        return None if not found else int(found[0][0])

    def noise(self, megabytes: float, small_txns: int = 0) -> None:
        """Unrelated changes (another table): ``megabytes`` of bulk rows, then many small transactions."""
        noise = f"noise{self.table}"
        q = self.q
        text = "TEXT" if self.which == "hologres" else "LONGTEXT"
        with self.cursor() as cur:
            cur.execute(f"CREATE TABLE IF NOT EXISTS {q}{noise}{q} (id BIGINT PRIMARY KEY, pad {text})")
            start = self.log_bytes()
            cur.execute(f"SELECT COALESCE(MAX(id), -1) + 1 FROM {q}{noise}{q}")
            base = int(cur.fetchone()[0])
            while self.log_bytes() - start < megabytes * 1_000_000:
                values = ", ".join(f"({base + i}, '{'x' * 2000}')" for i in range(250))
                cur.execute(f"INSERT INTO {q}{noise}{q} (id, pad) VALUES {values}")
                base += 250
            for i in range(small_txns):
                cur.execute(f"UPDATE {q}{noise}{q} SET pad = %s WHERE id = %s", (f"n{i}", i % base))

    def drop(self) -> None:
        with contextlib.suppress(Exception), self.cursor() as cur:
            if self.which == "hologres":
                cur.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                            "WHERE slot_name = %s", (self.slot,))
            cur.execute(f"DROP TABLE IF EXISTS {self.q}{self.table}{self.q}")
            cur.execute(f"DROP TABLE IF EXISTS {self.q}noise{self.table}{self.q}")


BACKENDS = [pytest.param("mysql", marks=pytest.mark.mysql),
            pytest.param("hologres", marks=pytest.mark.hologres)]


def make_backend(request: pytest.FixtureRequest, which: str | None = None) -> Backend:
    which = which or request.param
    fixture = "mariadb_server" if which == "mysql" else "postgres_server"
    return Backend(which, request.getfixturevalue(fixture))


def own_server(which: str, **kwargs: Any) -> Any:
    """A throwaway server of this test's own (to stop, freeze or misconfigure)."""
    return (MariaDbServer if which == "mysql" else PostgresServer)(**kwargs).start()


class Writer(threading.Thread):
    """Random changes to the source table for ``seconds``: inserts, several updates of one key in one
    transaction, updates across transactions, deletes, key changes, bursts of many rows, and unrelated
    changes to another table in between. Keys stay below ``self.next_key``. With ``at_least``, it goes on
    past ``seconds`` (up to a minute more) until each kind of change named there was made that often: how
    many changes fit in the time depends on the machine's load, what the test needs does not."""

    def __init__(self, backend: Backend, seconds: float, seed: int, first_key: int,
                 at_least: dict[str, int] | None = None) -> None:
        super().__init__(daemon=True, name="cdc-writer")
        self.b, self.seconds, self.rng = backend, seconds, random.Random(seed)
        self.at_least = at_least or {}
        self.next_key = first_key
        self.live: list[int] = []
        self.ops: dict[str, int] = {}
        self.error: BaseException | None = None
        self.version = 0

    def _row(self) -> tuple[Any, ...]:
        self.version += 1
        v, rng = self.version, self.rng
        tags = self.b.tags([f"t{rng.randrange(9)}", f"v{v}"])
        return (round(rng.uniform(0, 500), 2), tags, v, rng.random() < 0.5,
                None if rng.random() < 0.1 else f"name-{v}")

    def _insert(self, cur: Any) -> None:
        key = self.next_key
        self.next_key += 1
        cur.execute(self.b.sql("INSERT INTO {t} (id, price, tags, updated_at, flag, name) "
                               "VALUES (%s, %s, %s, %s, %s, %s)"), (key, *self._row()))
        self.live.append(key)

    def _update(self, cur: Any, key: int) -> None:
        price, tags, v, flag, name = self._row()
        cur.execute(self.b.sql("UPDATE {t} SET price = %s, tags = %s, updated_at = %s, flag = %s, name = %s "
                               "WHERE id = %s"), (price, tags, v, flag, name, key))

    def _pick(self) -> int | None:
        return self.rng.choice(self.live) if self.live else None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _run(self) -> None:
        conn = self.b.connect()
        end = time.monotonic() + self.seconds
        give_up = end + 60
        ops: list[tuple[str, Callable[[Any], None]]] = [
            ("insert", self._insert), ("update", self._op_update), ("multi_update", self._op_multi_update),
            ("delete", self._op_delete), ("key_change", self._op_key_change), ("burst", self._op_burst),
            ("range_update", self._op_range_update), ("noise", self._op_noise)]
        weights = [30, 25, 10, 12, 6, 2, 3, 12]
        try:
            while time.monotonic() < end or (self._short() and time.monotonic() < give_up):
                name, op = self.rng.choices(ops, weights)[0]
                with conn.cursor() as cur:
                    op(cur)
                conn.commit()
                self.ops[name] = self.ops.get(name, 0) + 1
                time.sleep(self.rng.choice((0, 0, 0.001, 0.005)))
        finally:
            conn.close()

    def _short(self) -> bool:
        """Is some kind of change still below its ``at_least``?"""
        return any(self.ops.get(name, 0) < n for name, n in self.at_least.items())

    def _op_update(self, cur: Any) -> None:
        key = self._pick()
        if key is not None:
            self._update(cur, key)

    def _op_multi_update(self, cur: Any) -> None:
        key = self._pick()
        if key is not None:
            for _ in range(self.rng.randint(2, 5)):  # one key, several times, one transaction
                self._update(cur, key)

    def _op_delete(self, cur: Any) -> None:
        key = self._pick()
        if key is not None:
            cur.execute(self.b.sql("DELETE FROM {t} WHERE id = %s"), (key,))
            self.live.remove(key)

    def _op_key_change(self, cur: Any) -> None:
        key = self._pick()
        if key is not None:
            new = self.next_key
            self.next_key += 1
            cur.execute(self.b.sql("UPDATE {t} SET id = %s WHERE id = %s"), (new, key))
            self.live.remove(key)
            self.live.append(new)

    def _op_burst(self, cur: Any) -> None:
        for _ in range(self.rng.randint(100, 300)):  # one big transaction
            if self.rng.random() < 0.6 or not self.live:
                self._insert(cur)
            else:
                self._update(cur, self.rng.choice(self.live))

    def _op_range_update(self, cur: Any) -> None:
        low = self.rng.randrange(max(self.next_key, 1))
        cur.execute(self.b.sql("UPDATE {t} SET price = price + 1, updated_at = updated_at + 1 "
                               "WHERE id BETWEEN %s AND %s"), (low, low + 20))

    def _op_noise(self, cur: Any) -> None:
        q = self.b.q
        cur.execute(f"UPDATE {q}noise{self.b.table}{q} SET pad = %s WHERE id = %s",
                    (f"w{self.version}", self.rng.randrange(250)))


def differing(path: Path, keys: list[int]) -> dict[int, tuple[Any, Any]]:
    """Keys whose row differs between the source view ``items`` and the target view ``copy``."""
    src = contents(path, "items", keys)
    dst = contents(path, "copy", keys)
    return {k: (src[k], dst[k]) for k in keys if src[k] != dst[k]}


def wait_for(predicate: Callable[[], Any], seconds: float, what: str, every: float = 0.05) -> Any:
    end = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not reached in {seconds:.0f}s")
        time.sleep(every)


def stream_checkpoint(state_db: Path, job: str = "cdc", target: str = "copy") -> dict[str, Any] | None:
    ck = checkpoint(state_db, job, target)
    return ck if ck is not None and ck.get("phase") == "stream" else None


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err
