"""The hologres adapter in the contract suite, on a throwaway PostgreSQL server."""

from __future__ import annotations

import pytest

from backends.base import ContractBackend, layout_backend, layout_lacks, layout_variants
from featuredao.testing.servers import PostgresServer

VARIANTS = layout_variants("hologres")
LACKS = layout_lacks("hologres")


def make(variant: str, request: pytest.FixtureRequest) -> ContractBackend:
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return layout_backend(variant, {
        "type": "hologres", "host": server.host, "port": server.port, "user": server.user,
        "password": server.password, "database": server.dbname, "sslmode": "disable"})
