"""The hologres adapter in the contract suite, on a throwaway PostgreSQL server."""

from __future__ import annotations

import pytest

from backends.base import ContractBackend
from featuredao.testing.servers import PostgresServer, free_port

VARIANTS = [("hologres_wide", "hologres"), ("hologres_tall", "hologres")]

_VIEW_OPTIONS = {
    "hologres_wide": {"layout": "wide"},
    "hologres_tall": {"layout": "tall", "event_time_column": "event_time"},
}


def make(variant: str, request: pytest.FixtureRequest) -> ContractBackend:
    server: PostgresServer = request.getfixturevalue("postgres_server")
    source = {"type": "hologres", "host": server.host, "port": server.port, "user": server.user,
              "password": server.password, "database": server.dbname, "sslmode": "disable"}
    # Nothing listens on a port handed out by free_port and never bound.
    unreachable = {**source, "port": free_port(), "connect_timeout_ms": 1000}
    return ContractBackend(source=source, view_options=_VIEW_OPTIONS[variant], unreachable=unreachable,
                           table_prefix=f"c_{variant}_")
