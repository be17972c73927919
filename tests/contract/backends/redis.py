"""The Redis adapter in the contract suite: every layout, on a standalone server and on a 3-master cluster."""

from __future__ import annotations

from typing import Any

import pytest

from backends.base import ContractBackend
from featuredao.testing.servers import free_port

LAYOUTS: dict[str, dict[str, Any]] = {
    "hash": {"layout": "hash"},
    "json": {"layout": "string", "encoding": "json"},
    "csv": {"layout": "string", "encoding": "csv", "delimiter": ","},
    "msgpack": {"layout": "string", "encoding": "msgpack"},
}

VARIANTS = [(f"redis_{name}", "redis") for name in LAYOUTS] + \
    [(f"redis_cluster_{name}", "redis_cluster") for name in LAYOUTS]
# A cluster's reads go to each key's node on their own: its views are not read in one group.
LACKS = {f"redis_cluster_{name}": frozenset({"grouped_reads"}) for name in LAYOUTS}
# A sequence view's layout (a sorted set per key) does not depend on the table layouts: one variant each.
SEQUENCE_VARIANTS = ["redis_msgpack", "redis_cluster_msgpack"]


def make(variant: str, request: pytest.FixtureRequest) -> ContractBackend:
    layout = variant.rsplit("_", 1)[1]
    # Nothing listens on a fresh free port: connecting is refused at once.
    closed = f"127.0.0.1:{free_port()}"
    if variant.startswith("redis_cluster_"):
        cluster = request.getfixturevalue("redis_cluster")
        nodes = [f"{h}:{p}" for h, p in cluster.startup_nodes]
        source: dict[str, Any] = {"type": "redis", "cluster": True, "startup_nodes": nodes}
        unreachable: dict[str, Any] = {"type": "redis", "cluster": True, "startup_nodes": [closed],
                                       "connect_timeout_ms": 500}
    else:
        server = request.getfixturevalue("redis_server")
        source = {"type": "redis", "host": server.host, "port": server.port}
        if server.password:
            source["password"] = server.password
        host, port = closed.split(":")
        unreachable = {"type": "redis", "host": host, "port": int(port), "connect_timeout_ms": 500}
    return ContractBackend(source=source, view_options=dict(LAYOUTS[layout]), unreachable=unreachable,
                           table_prefix=f"contract_{layout}_")
