"""Throwaway real database servers for integration tests.

Every server runs in its own temporary directory, listens on a free port on
127.0.0.1 only and is torn down (process group killed, directory removed) by
:meth:`ServerProcess.stop`, by an ``atexit`` hook and - where possible - by the
kernel when the Python process that started it dies (``PR_SET_PDEATHSIG`` via
``setpriv``).

The package has no pytest dependency and no database-driver dependency: readiness
probes speak just enough of each wire protocol (PostgreSQL startup packet, MySQL
handshake, RESP, ClickHouse HTTP ``/ping``) to know the server accepts clients,
and one-time bootstrap SQL goes through the servers' own command line clients
(``psql``, ``mariadb``) or ClickHouse's HTTP interface.

Example::

    with PostgresServer() as pg:
        conn = psycopg.connect(pg.conninfo)
"""

from featuredao.testing.servers.clickhouse import ClickHouseServer
from featuredao.testing.servers.errors import MissingPackageError, ServerError, ServerStartError
from featuredao.testing.servers.mariadb import MariaDbServer
from featuredao.testing.servers.packages import PG_BINDIR, ensure_packages
from featuredao.testing.servers.ports import LOCALHOST, free_port
from featuredao.testing.servers.postgres import PostgresServer
from featuredao.testing.servers.process import ServerProcess
from featuredao.testing.servers.redis import RedisCluster, RedisServer

__all__ = [
    "LOCALHOST",
    "PG_BINDIR",
    "ClickHouseServer",
    "MariaDbServer",
    "MissingPackageError",
    "PostgresServer",
    "RedisCluster",
    "RedisServer",
    "ServerError",
    "ServerProcess",
    "ServerStartError",
    "ensure_packages",
    "free_port",
]
