"""The embedded SQLite adapter in the contract suite."""

from __future__ import annotations

import pytest

from backends.base import ContractBackend

VARIANTS = [("sqlite", "sqlite")]


def make(variant: str, request: pytest.FixtureRequest) -> ContractBackend:
    tmp = request.getfixturevalue("tmp_path")
    # A file in a folder that does not exist cannot be opened: SQLite's "server unreachable".
    return ContractBackend(source={"type": "sqlite", "path": str(tmp / "contract.db")},
                           unreachable={"type": "sqlite", "path": str(tmp / "missing" / "x.db")})
