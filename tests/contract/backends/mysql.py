"""The mysql adapter in the contract suite, on a throwaway MariaDB server."""

from __future__ import annotations

import pytest

from backends.base import ContractBackend
from featuredao.testing.servers import MariaDbServer, free_port

VARIANTS = [("mysql_wide", "mysql"), ("mysql_tall", "mysql")]

_VIEW_OPTIONS = {
    "mysql_wide": {"layout": "wide"},
    "mysql_tall": {"layout": "tall", "event_time_column": "event_time"},
}


def make(variant: str, request: pytest.FixtureRequest) -> ContractBackend:
    server: MariaDbServer = request.getfixturevalue("mariadb_server")
    source = {"type": "mysql", "host": server.host, "port": server.port, "user": server.user,
              "password": server.password, "database": server.database, "flavor": "mariadb"}
    # Nothing listens on a port handed out by free_port and never bound.
    unreachable = {**source, "port": free_port(), "connect_timeout_ms": 1000}
    return ContractBackend(source=source, view_options=_VIEW_OPTIONS[variant], unreachable=unreachable,
                           table_prefix=f"c_{variant}_")
