"""The HBase adapter in the contract suite, against the project's local HBase Thrift server.

Two variants: ``utf8`` cells over buffered transport + binary protocol (happybase's defaults) and
``binary`` cells over framed transport + compact protocol. Each server is started on first use, once per
session, and stopped by ``request.config.add_cleanup`` (a backend module is not a conftest, so it cannot
declare a session fixture; the server lives in-process, so this costs nothing).
"""

from __future__ import annotations

import socket

import pytest

from backends.base import ContractBackend
from featuredao.testing.hbase import HBaseThriftServer

VARIANTS = [("hbase_utf8", "hbase"), ("hbase_binary", "hbase")]
# Both: sequence reads pipeline Thrift calls, on buffered and on framed transports.
SEQUENCE_VARIANTS = ["hbase_utf8", "hbase_binary"]

_LAYOUT = {  # variant: (cell encoding, transport, protocol)
    "hbase_utf8": ("utf8", "buffered", "binary"),
    "hbase_binary": ("binary", "framed", "compact"),
}
_servers: dict[tuple[str, str], HBaseThriftServer] = {}


def _server(request: pytest.FixtureRequest, transport: str, protocol: str) -> HBaseThriftServer:
    server = _servers.get((transport, protocol))
    if server is None:
        server = HBaseThriftServer(transport=transport, protocol=protocol)
        try:
            server.start()
        except Exception as exc:
            pytest.fail(f"could not start the local HBase Thrift server: {type(exc).__name__}: {exc}",
                        pytrace=False)
        _servers[(transport, protocol)] = server
        request.config.add_cleanup(server.stop)
        request.config.add_cleanup(lambda: _servers.pop((transport, protocol), None))
    return server


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make(variant: str, request: pytest.FixtureRequest) -> ContractBackend:
    encoding, transport, protocol = _LAYOUT[variant]
    server = _server(request, transport, protocol)
    source = {"type": "hbase", "host": "127.0.0.1", "port": server.port, "transport": transport,
              "protocol": protocol}
    return ContractBackend(source=source, view_options={"encoding": encoding},
                           unreachable={**source, "port": _closed_port(), "timeout_ms": 2000},
                           table_prefix="hb" if encoding == "binary" else "hu")
