"""Smoke tests of the throwaway server harness, using the real client libraries over TCP."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
import pymysql
import pymysql.cursors
import pytest
import redis
import redis.cluster
from clickhouse_driver import Client as ClickHouseClient
from clickhouse_driver import errors as ch_errors

from featuredao.testing.servers import (
    ClickHouseServer,
    MariaDbServer,
    PostgresServer,
    RedisCluster,
    RedisServer,
    ServerProcess,
    ServerStartError,
    ensure_packages,
    free_port,
)

pytestmark = pytest.mark.servers


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@contextmanager
def _frozen(server: ServerProcess) -> Iterator[None]:
    server.freeze()
    try:
        yield
    finally:
        server.thaw()


def _assert_times_out(call: Callable[[], object], exc_types: tuple[type[BaseException], ...]) -> None:
    started = time.monotonic()
    with pytest.raises(exc_types):
        call()
    assert time.monotonic() - started < 15


def _ensure_running(server: ServerProcess) -> None:
    """Leave a shared session server usable even if a fault test failed half-way."""
    if server.frozen:
        server.thaw()
    if not server.running:
        server.restart()


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- generic


def test_free_port_is_bindable_and_unique() -> None:
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_ensure_packages_is_a_noop_when_installed() -> None:
    started = time.monotonic()
    ensure_packages("redis-server", "redis-tools")
    assert time.monotonic() - started < 5


def test_start_failure_raises_with_log_tail() -> None:
    server = RedisServer(extra_args=["--no-such-directive", "x"], startup_timeout=10)
    with pytest.raises(ServerStartError) as info:
        server.start()
    message = str(info.value)
    assert "exited with code" in message
    assert "no-such-directive" in message  # redis' own complaint, from its log
    assert not server.running
    assert server.pid is None


def test_auto_port_taken_before_start_is_repicked() -> None:
    server = RedisServer()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", server.port))
        squatter.listen()
        taken = server.port
        with server:
            assert server.port != taken
            assert _redis(server.host, server.port).ping()


def test_explicit_port_conflict_fails_clearly() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(ServerStartError, match=r"(?i)address already in use"):
            RedisServer(port=port, startup_timeout=10).start()


# -------------------------------------------------------------------------- postgres


def _pg_connect(server: PostgresServer, **kwargs: object) -> psycopg.Connection[tuple[object, ...]]:
    params: dict[str, object] = {
        "host": server.host,
        "port": server.port,
        "user": server.user,
        "password": server.password,
        "dbname": server.dbname,
        "connect_timeout": 5,
    }
    params.update(kwargs)
    return psycopg.connect(**params)  # type: ignore[arg-type]


def test_postgres_roundtrip(postgres_server: PostgresServer) -> None:
    table = _unique("t")
    with psycopg.connect(postgres_server.conninfo, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (k int PRIMARY KEY, v text)")
        conn.execute(f"INSERT INTO {table} VALUES (%s, %s), (%s, %s)", (1, "a", 2, "b"))
        rows = conn.execute(f"SELECT k, v FROM {table} ORDER BY k").fetchall()
        assert rows == [(1, "a"), (2, "b")]
        user, db, superuser = conn.execute(
            "SELECT current_user, current_database(), rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone() or (None, None, None)
        assert (user, db, superuser) == ("featuredao", "featuredao", True)
        assert conn.info.server_version // 10000 == 15
    with psycopg.connect(postgres_server.dsn) as conn:
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (2,)


def test_postgres_password_matters(postgres_server: PostgresServer) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _pg_connect(postgres_server, password="wrong-password")
    with pytest.raises(psycopg.OperationalError):
        _pg_connect(postgres_server, password="")


def test_postgres_logical_decoding_config(postgres_server: PostgresServer) -> None:
    with _pg_connect(postgres_server, autocommit=True) as conn:
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('wal_level', 'max_replication_slots', 'max_wal_senders', 'listen_addresses', 'fsync')"
            ).fetchall()
        )
        assert settings == {
            "wal_level": "logical",
            "max_replication_slots": "10",
            "max_wal_senders": "10",
            "listen_addresses": "127.0.0.1",
            "fsync": "off",
        }
        # wal2json (installed with the server) really decodes changes.
        table, slot = _unique("cdc"), _unique("slot")
        conn.execute(f"CREATE TABLE {table} (k int PRIMARY KEY, v text)")
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (slot,))
        try:
            conn.execute(f"INSERT INTO {table} VALUES (1, 'x')")
            changes = conn.execute(
                "SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL)", (slot,)
            ).fetchall()
            assert any(table in str(row[0]) and "insert" in str(row[0]) for row in changes), changes
        finally:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))


def test_postgres_restart_keeps_data(postgres_server: PostgresServer) -> None:
    table = _unique("r")
    with _pg_connect(postgres_server, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} AS SELECT 42 AS answer")
    port, pid = postgres_server.port, postgres_server.pid
    try:
        postgres_server.restart()
        assert postgres_server.port == port
        assert postgres_server.pid not in (None, pid)
        with _pg_connect(postgres_server) as conn:
            assert conn.execute(f"SELECT answer FROM {table}").fetchone() == (42,)
    finally:
        _ensure_running(postgres_server)


def test_postgres_kill_and_restart(postgres_server: PostgresServer) -> None:
    table = _unique("k")
    with _pg_connect(postgres_server, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} AS SELECT 7 AS seven")
    try:
        postgres_server.kill()
        assert not postgres_server.running
        assert not _port_open(postgres_server.host, postgres_server.port)
        with pytest.raises(psycopg.OperationalError):
            _pg_connect(postgres_server, connect_timeout=2)
        postgres_server.restart()
        with _pg_connect(postgres_server) as conn:  # crash recovery keeps committed data
            assert conn.execute(f"SELECT seven FROM {table}").fetchone() == (7,)
    finally:
        _ensure_running(postgres_server)


def test_postgres_freeze_and_thaw(postgres_server: PostgresServer) -> None:
    try:
        with _frozen(postgres_server):
            _assert_times_out(
                lambda: _pg_connect(postgres_server, connect_timeout=2), (psycopg.OperationalError,)
            )
        with _pg_connect(postgres_server) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        _ensure_running(postgres_server)


# --------------------------------------------------------------------------- mariadb


def _my_connect(
    server: MariaDbServer,
    *,
    user: str | None = None,
    password: str | None = None,
    connect_timeout: float = 5,
    read_timeout: float | None = None,
    write_timeout: float | None = None,
) -> pymysql.connections.Connection[pymysql.cursors.Cursor]:
    return pymysql.connect(
        host=server.host,
        port=server.port,
        user=server.user if user is None else user,
        password=server.password if password is None else password,
        database=server.database,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        write_timeout=write_timeout,
        autocommit=True,
    )


def _my_scalar(conn: pymysql.connections.Connection[pymysql.cursors.Cursor], sql: str) -> object:
    with conn.cursor() as cur:
        cur.execute(sql)
        row = cur.fetchone()
    assert row is not None
    return row[0]


def test_mariadb_roundtrip(mariadb_server: MariaDbServer) -> None:
    table = _unique("t")
    conn = _my_connect(mariadb_server)
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE TABLE {table} (k INT PRIMARY KEY, v VARCHAR(20)) ENGINE=InnoDB")
            cur.executemany(f"INSERT INTO {table} VALUES (%s, %s)", [(1, "a"), (2, "b")])
            cur.execute(f"SELECT k, v FROM {table} ORDER BY k")
            assert cur.fetchall() == ((1, "a"), (2, "b"))
        assert "MariaDB" in str(_my_scalar(conn, "SELECT VERSION()"))
        assert _my_scalar(conn, "SELECT DATABASE()") == "featuredao"
    finally:
        conn.close()


def test_mariadb_password_matters(mariadb_server: MariaDbServer) -> None:
    with pytest.raises(pymysql.err.OperationalError) as info:
        _my_connect(mariadb_server, password="wrong-password")
    assert info.value.args[0] == 1045  # access denied
    with pytest.raises(pymysql.err.OperationalError):
        _my_connect(mariadb_server, user="root", password="")  # root is socket-only


def test_mariadb_binlog_config(mariadb_server: MariaDbServer) -> None:
    conn = _my_connect(mariadb_server)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SHOW GLOBAL VARIABLES WHERE Variable_name IN "
                "('binlog_format', 'log_bin', 'server_id', 'binlog_row_image', 'bind_address')"
            )
            variables = dict(cur.fetchall())
            assert variables == {
                "binlog_format": "ROW",
                "log_bin": "ON",
                "server_id": "1",
                "binlog_row_image": "FULL",
                "bind_address": "127.0.0.1",
            }
            cur.execute("SHOW MASTER STATUS")  # needs REPLICATION CLIENT / BINLOG MONITOR
            status = cur.fetchone()
            assert status is not None and str(status[0]).startswith("binlog.")
            cur.execute("SHOW GRANTS")
            grants = " ".join(str(row[0]) for row in cur.fetchall())
            assert "ALL PRIVILEGES ON *.*" in grants
    finally:
        conn.close()


def test_mariadb_restart_keeps_data(mariadb_server: MariaDbServer) -> None:
    table = _unique("r")
    conn = _my_connect(mariadb_server)
    with conn.cursor() as cur:
        cur.execute(f"CREATE TABLE {table} (answer INT) ENGINE=InnoDB")
        cur.execute(f"INSERT INTO {table} VALUES (42)")
    conn.close()
    port, pid = mariadb_server.port, mariadb_server.pid
    try:
        mariadb_server.restart()
        assert mariadb_server.port == port
        assert mariadb_server.pid not in (None, pid)
        conn = _my_connect(mariadb_server)
        assert _my_scalar(conn, f"SELECT answer FROM {table}") == 42
        conn.close()
    finally:
        _ensure_running(mariadb_server)


def test_mariadb_kill_and_restart(mariadb_server: MariaDbServer) -> None:
    table = _unique("k")
    conn = _my_connect(mariadb_server)
    with conn.cursor() as cur:
        cur.execute(f"CREATE TABLE {table} (seven INT) ENGINE=InnoDB")
        cur.execute(f"INSERT INTO {table} VALUES (7)")
    conn.close()
    try:
        mariadb_server.kill()
        assert not mariadb_server.running
        with pytest.raises(pymysql.err.OperationalError):
            _my_connect(mariadb_server, connect_timeout=2)
        mariadb_server.restart()
        conn = _my_connect(mariadb_server)  # InnoDB crash recovery keeps committed data
        assert _my_scalar(conn, f"SELECT seven FROM {table}") == 7
        conn.close()
    finally:
        _ensure_running(mariadb_server)


def test_mariadb_freeze_and_thaw(mariadb_server: MariaDbServer) -> None:
    conn = _my_connect(mariadb_server, read_timeout=1, write_timeout=1)
    try:
        with _frozen(mariadb_server):
            _assert_times_out(lambda: _my_scalar(conn, "SELECT 1"), (pymysql.err.OperationalError,))
            _assert_times_out(
                # pymysql's connect_timeout only covers the TCP connect, which the kernel
                # completes for a frozen server; read_timeout bounds waiting for the greeting.
                lambda: _my_connect(mariadb_server, connect_timeout=1, read_timeout=1),
                (pymysql.err.OperationalError,),
            )
        conn2 = _my_connect(mariadb_server)
        assert _my_scalar(conn2, "SELECT 1") == 1
        conn2.close()
    finally:
        conn.close()
        _ensure_running(mariadb_server)


# ----------------------------------------------------------------------------- redis


def _redis(host: str, port: int, **kwargs: object) -> redis.Redis:
    # retry=None: redis-py >= 6 retries (with backoff) by default, which only slows
    # down the failure cases below.
    return redis.Redis(host=host, port=port, retry=None, **kwargs)  # type: ignore[arg-type]


def test_redis_roundtrip(redis_server: RedisServer) -> None:
    client = _redis(redis_server.host, redis_server.port, socket_timeout=5)
    key = _unique("k")
    client.set(key, b"value")
    assert client.get(key) == b"value"
    assert redis.Redis.from_url(redis_server.url).get(key) == b"value"
    config = client.config_get("save")
    assert config["save"] == ""
    assert client.config_get("bind")["bind"] == "127.0.0.1"


def test_redis_password_matters() -> None:
    with RedisServer(password="s3cret") as server:
        assert server.url == f"redis://:s3cret@127.0.0.1:{server.port}/0"
        with pytest.raises(redis.exceptions.AuthenticationError):
            _redis(server.host, server.port).ping()
        with pytest.raises(redis.exceptions.AuthenticationError):
            _redis(server.host, server.port, password="wrong").ping()
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        assert client.get("k") == b"v"
    assert not server.running


def test_redis_kill_and_restart(redis_server: RedisServer) -> None:
    client = _redis(redis_server.host, redis_server.port, socket_timeout=2)
    assert client.ping()
    try:
        redis_server.kill()
        with pytest.raises(redis.exceptions.ConnectionError):
            _redis(redis_server.host, redis_server.port, socket_timeout=2).ping()
        redis_server.restart()
        fresh = _redis(redis_server.host, redis_server.port, socket_timeout=2)
        assert fresh.ping()
        fresh.set("after-restart", 1)
        assert fresh.get("after-restart") == b"1"
    finally:
        _ensure_running(redis_server)


def test_redis_freeze_and_thaw(redis_server: RedisServer) -> None:
    client = _redis(redis_server.host, redis_server.port, socket_timeout=0.5, socket_connect_timeout=2)
    assert client.ping()
    try:
        with _frozen(redis_server):
            _assert_times_out(client.ping, (redis.exceptions.TimeoutError,))
        assert client.ping()
    finally:
        _ensure_running(redis_server)


# --------------------------------------------------------------------- redis cluster


def _cluster_client(cluster: RedisCluster) -> redis.cluster.RedisCluster:
    nodes = [redis.cluster.ClusterNode(host, port) for host, port in cluster.startup_nodes]
    return redis.cluster.RedisCluster(startup_nodes=nodes, socket_timeout=5)


def test_redis_cluster_roundtrip(redis_cluster: RedisCluster) -> None:
    assert len(redis_cluster.startup_nodes) == 3
    client = _cluster_client(redis_cluster)
    try:
        keys = [_unique("key") for _ in range(60)]
        for i, key in enumerate(keys):
            client.set(key, i)
        assert [int(client.get(key)) for key in keys] == list(range(60))
        assert len(client.get_primaries()) == 3
        assert client.get_replicas() == []
        # keys really are spread over all three masters
        for node in redis_cluster.nodes:
            single = _redis(node.host, node.port)
            assert single.dbsize() > 0
            assert single.cluster("INFO")["cluster_state"] == "ok"
    finally:
        client.close()


def test_redis_cluster_node_kill_and_restart(redis_cluster: RedisCluster) -> None:
    node = redis_cluster.nodes[1]
    try:
        node.kill()
        node.restart()
        redis_cluster.wait_ready(timeout=30)
        client = _cluster_client(redis_cluster)
        try:
            for i in range(30):
                client.set(f"after-kill-{i}", i)
            assert [int(client.get(f"after-kill-{i}")) for i in range(30)] == list(range(30))
        finally:
            client.close()
    finally:
        if not node.running:
            node.restart()
        redis_cluster.wait_ready(timeout=30)


# ------------------------------------------------------------------------ clickhouse


def _ch_client(server: ClickHouseServer, **kwargs: object) -> ClickHouseClient:
    params: dict[str, object] = {
        "host": server.host,
        "port": server.port,
        "user": server.user,
        "password": server.password,
        "database": server.database,
        "connect_timeout": 5,
        "send_receive_timeout": 30,
    }
    params.update(kwargs)
    return ClickHouseClient(**params)


def _debian_clickhouse_version() -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "clickhouse-server"], capture_output=True, text=True
    )
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else None


def test_clickhouse_roundtrip(clickhouse_server: ClickHouseServer) -> None:
    client = _ch_client(clickhouse_server)
    table = _unique("t")
    try:
        client.execute(f"CREATE TABLE {table} (k UInt64, v String) ENGINE = MergeTree() ORDER BY k")
        client.execute(f"INSERT INTO {table} (k, v) VALUES", [(1, "a"), (2, "b")])
        assert client.execute(f"SELECT k, v FROM {table} ORDER BY k") == [(1, "a"), (2, "b")]
        assert client.execute("SELECT currentDatabase()") == [("featuredao",)]
        # the passwordless default user works too (HTTP and native)
        assert clickhouse_server.http_query("SELECT 1").strip() == "1"
        default = _ch_client(clickhouse_server, user="default", password="")
        assert default.execute(f"SELECT count() FROM featuredao.{table}") == [(2,)]
        default.disconnect()
    finally:
        client.disconnect()


def test_clickhouse_version(clickhouse_server: ClickHouseServer) -> None:
    client = _ch_client(clickhouse_server)
    ((version,),) = client.execute("SELECT version()")
    client.disconnect()
    debian = _debian_clickhouse_version()
    if debian is not None and debian.startswith("18.16"):
        assert version.startswith("18.16."), version


def test_clickhouse_password_matters(clickhouse_server: ClickHouseServer) -> None:
    client = _ch_client(clickhouse_server, password="wrong-password")
    with pytest.raises(ch_errors.ServerException) as info:
        client.execute("SELECT 1")
    assert info.value.code in (193, 516)  # WRONG_PASSWORD (old) / AUTHENTICATION_FAILED (new)
    client.disconnect()


def test_clickhouse_kill_and_restart(clickhouse_server: ClickHouseServer) -> None:
    client = _ch_client(clickhouse_server)
    table = _unique("k")
    client.execute(f"CREATE TABLE {table} (k UInt64) ENGINE = MergeTree() ORDER BY k")
    client.execute(f"INSERT INTO {table} (k) VALUES", [(7,)])
    client.disconnect()
    port = clickhouse_server.port
    try:
        clickhouse_server.kill()
        with pytest.raises((ch_errors.NetworkError, ch_errors.SocketTimeoutError)):
            _ch_client(clickhouse_server, connect_timeout=2).execute("SELECT 1")
        clickhouse_server.restart()
        assert clickhouse_server.port == port
        client = _ch_client(clickhouse_server)
        assert client.execute(f"SELECT k FROM {table}") == [(7,)]
        client.disconnect()
    finally:
        _ensure_running(clickhouse_server)


def test_clickhouse_freeze_and_thaw(clickhouse_server: ClickHouseServer) -> None:
    try:
        with _frozen(clickhouse_server):
            frozen_client = _ch_client(clickhouse_server, connect_timeout=1, send_receive_timeout=1)
            _assert_times_out(
                lambda: frozen_client.execute("SELECT 1"),
                # depending on where it blocks, the driver raises its own errors or a bare timeout
                (ch_errors.SocketTimeoutError, ch_errors.NetworkError, TimeoutError),
            )
            frozen_client.disconnect()
        client = _ch_client(clickhouse_server)
        assert client.execute("SELECT 1") == [(1,)]
        client.disconnect()
    finally:
        _ensure_running(clickhouse_server)
