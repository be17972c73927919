"""Fixtures of the feature-server tests: a seeded config (SQLite + Redis) and a running server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from servehelp import Served, config_doc, seed, write_config

from featuredao.testing.servers import RedisServer


@pytest.fixture(scope="module")
def seeded_config(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Path:
    """A config of SQLite and Redis views, its tables filled."""
    tmp = tmp_path_factory.mktemp("serve")
    path = write_config(tmp, config_doc(redis_server))
    seed(path)
    return path


@pytest.fixture(scope="module")
def api_server(seeded_config: Path) -> Iterator[Served]:
    """One worker, no token, small limits (50 keys, 4 KiB bodies), no reload polling."""
    server = Served(seeded_config, "--reload-interval", "0", "--max-keys", "50", "--max-body-bytes", "4096")
    yield server
    code = server.stop()
    assert code == 0, server.log()
    assert "Traceback" not in server.log()
