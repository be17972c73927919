"""The clickhouse adapter in the contract suite, on a throwaway ClickHouse server."""

from __future__ import annotations

import pytest

from backends.base import ContractBackend, layout_lacks
from featuredao.testing.servers import ClickHouseServer, free_port

VARIANTS = [("clickhouse_wide", "clickhouse"), ("clickhouse_tall", "clickhouse")]
LACKS = layout_lacks("clickhouse")

_VIEW_OPTIONS = {
    "clickhouse_wide": {"layout": "wide"},
    "clickhouse_tall": {"layout": "tall", "event_time_column": "event_time"},
}


def make(variant: str, request: pytest.FixtureRequest) -> ContractBackend:
    server: ClickHouseServer = request.getfixturevalue("clickhouse_server")
    source = {"type": "clickhouse", "host": server.host, "port": server.port, "user": server.user,
              "password": server.password, "database": server.database}
    # Nothing listens on a port handed out by free_port and never bound.
    unreachable = {**source, "port": free_port(), "connect_timeout_ms": 1000}
    return ContractBackend(source=source, view_options=_VIEW_OPTIONS[variant], unreachable=unreachable,
                           table_prefix=f"c_{variant}_")
