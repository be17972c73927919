"""The TableStore adapter in the contract suite, against the project's local TableStore server."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from backends.base import ContractBackend
from featuredao.testing.tablestore import DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET, TableStoreServer

VARIANTS = [("tablestore", "tablestore")]

# One server for the whole session, started by the first test that needs it.
_servers: dict[str, TableStoreServer] = {}


def _server(request: pytest.FixtureRequest) -> TableStoreServer:
    server = _servers.get("local")
    if server is None:
        server = _servers["local"] = TableStoreServer("127.0.0.1").start()
        request.config.add_cleanup(server.stop)
        request.config.add_cleanup(_servers.clear)
    return server


def _closed_port() -> int:
    # A port the OS just handed out and nobody listens on: connecting is refused at once.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def source_config(endpoint: str, **extra: Any) -> dict[str, Any]:
    """A tablestore source config for the local server's default instance and credentials."""
    return {"type": "tablestore", "endpoint": endpoint, "instance_name": "featuredao",
            "access_key_id": DEFAULT_ACCESS_KEY_ID, "access_key_secret": DEFAULT_ACCESS_KEY_SECRET,
            "retry_delay_ms": 1, **extra}


def make(variant: str, request: pytest.FixtureRequest) -> ContractBackend:
    server = _server(request)
    # Connection refused is a network error, which the SDK never retries: this fails in milliseconds.
    unreachable = source_config(f"http://127.0.0.1:{_closed_port()}", socket_timeout_ms=500)
    return ContractBackend(source=source_config(server.endpoint), unreachable=unreachable,
                           table_prefix="contract_")
