"""The embedded SQLite adapter in the contract suite."""

from __future__ import annotations

import contextlib
import sqlite3

import pytest

from backends.base import ContractBackend
from featuredao.dao import BaseDao

VARIANTS = [("sqlite", "sqlite")]


def make(variant: str, request: pytest.FixtureRequest) -> ContractBackend:
    tmp = request.getfixturevalue("tmp_path")
    # A file in a folder that does not exist cannot be opened: SQLite's "server unreachable".
    return ContractBackend(source={"type": "sqlite", "path": str(tmp / "contract.db")},
                           unreachable={"type": "sqlite", "path": str(tmp / "missing" / "x.db")})


def slow(dao: BaseDao) -> None:
    """The view's "table" is a SQL view counting to 10^9: any read scans it for many seconds."""
    cols = ", ".join(f'NULL AS "{f}"' for f in dao.view.features)
    with contextlib.closing(sqlite3.connect(dao.source.options.path)) as conn:
        conn.execute(f'CREATE VIEW "{dao.view.table}" AS WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL '
                     f"SELECT x + 1 FROM c WHERE x < 1000000000) "
                     f'SELECT CAST(x AS TEXT) AS "{dao.view.key}", {cols} FROM c')
