"""The mysql adapter in the contract suite, on a throwaway MariaDB server."""

from __future__ import annotations

import pytest

from backends.base import ContractBackend, layout_backend, layout_lacks, layout_variants
from featuredao.testing.servers import MariaDbServer

VARIANTS = layout_variants("mysql")
LACKS = layout_lacks("mysql")


def make(variant: str, request: pytest.FixtureRequest) -> ContractBackend:
    server: MariaDbServer = request.getfixturevalue("mariadb_server")
    return layout_backend(variant, {
        "type": "mysql", "host": server.host, "port": server.port, "user": server.user,
        "password": server.password, "database": server.database, "flavor": "mariadb"})
