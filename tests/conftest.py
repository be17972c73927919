"""Session-wide throwaway servers (see featuredao.testing.servers).

Each fixture starts its server lazily on first use and stops it at the end of the
session.  A server that cannot start makes the requesting tests fail (never skip)
with the reason, including the tail of the server's log.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

import pytest

from featuredao.testing.servers import (
    ClickHouseServer,
    MariaDbServer,
    PostgresServer,
    RedisCluster,
    RedisServer,
)


class _Startable(Protocol):
    def start(self) -> object: ...
    def stop(self) -> None: ...


_S = TypeVar("_S", bound=_Startable)


def _serve(factory: Callable[[], _S], what: str) -> Iterator[_S]:
    server = factory()
    try:
        server.start()
    except Exception as exc:
        server.stop()
        pytest.fail(f"could not start throwaway {what}: {type(exc).__name__}: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    yield from _serve(PostgresServer, "PostgreSQL server")


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[MariaDbServer]:
    yield from _serve(MariaDbServer, "MariaDB server")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    yield from _serve(RedisServer, "Redis server")


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis for one test that kills or freezes it: thawed, then stopped, whatever the test left."""
    for server in _serve(RedisServer, "Redis server"):
        try:
            yield server
        finally:
            if server.frozen:
                server.thaw()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    yield from _serve(RedisCluster, "Redis Cluster")


@pytest.fixture(scope="session")
def clickhouse_server() -> Iterator[ClickHouseServer]:
    yield from _serve(ClickHouseServer, "ClickHouse server")
