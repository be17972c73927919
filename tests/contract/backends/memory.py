"""The in-memory adapter in the contract suite: no server, every test in milliseconds."""

from __future__ import annotations

import pytest

from backends.base import ContractBackend
from featuredao.dao import BaseDao
from featuredao.memory import MemorySource

VARIANTS = [("memory", "memory")]


def make(variant: str, request: pytest.FixtureRequest) -> ContractBackend:
    # One shared store per process (tables are unique per test), so a process that builds several
    # runtimes over the same config sees one store, as with a server; "down" is the unreachable server.
    return ContractBackend(source={"type": "memory", "shared": "contract"},
                           unreachable={"type": "memory", "down": True})


def slow(dao: BaseDao) -> None:
    """Every round trip takes five seconds (cut at the deadline by the store itself)."""
    dao.prepare()
    assert isinstance(dao.source, MemorySource)
    dao.source.latency_s = 5.0
