"""The Redis adapter's options: a source's (server or cluster, pool, TLS) and a view's (key, layout)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from featuredao.config import CircuitBreakerConfig, StrictModel

_HOST_PORT = re.compile(r"^[^\s:]+:\d{1,5}$")


class RedisOptions(StrictModel):
    """Source options of the redis adapter."""

    host: str = "127.0.0.1"
    port: int = Field(default=6379, ge=1, le=65535)
    db: int = Field(default=0, ge=0)
    cluster: bool = False
    startup_nodes: list[str] = Field(default_factory=list)
    """Cluster only: ``"host:port"`` seeds (default: host and port)."""
    username: SecretStr | None = None
    password: SecretStr | None = None
    pool_size: int = Field(default=8, ge=1, le=256)
    """Connections per server; also how many chunks of one read run concurrently."""
    batch_size: int = Field(default=100, ge=1, le=100_000)
    """Keys per pipeline (or per MGET)."""
    socket_timeout_ms: int = Field(default=1000, gt=0)
    connect_timeout_ms: int = Field(default=300, gt=0)
    pool_timeout_ms: int = Field(default=1000, ge=0)
    """How long a call waits for a free connection of the pool."""
    retries: int = Field(default=1, ge=0, le=5)
    """Immediate retries after a dropped connection (a stale pooled socket after a server restart)."""
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_verify: bool = True
    tls_check_hostname: bool = True
    read_from_replicas: bool = False
    """Cluster only: the keys of a master that fails, or whose node breaker is open, are read from one of
    its replicas (``READONLY``) instead of failing. Replicas copy their master asynchronously: such a
    value may be older than the master's (see the README)."""
    node_breaker: CircuitBreakerConfig = Field(
        default_factory=lambda: CircuitBreakerConfig(failure_threshold=2, reset_timeout_s=1.0))
    """Cluster only: each node's own breaker (an open node fails its keys fast and is probed in the
    background)."""
    slot_refresh_interval_ms: int = Field(default=200, ge=10, le=60_000)
    """Cluster only: the slot map is re-read at most this often (after a connection error, a timeout,
    MOVED/ASK or CLUSTERDOWN, and while a node's breaker is not closed)."""

    @model_validator(mode="after")
    def _cluster_settings(self) -> RedisOptions:
        if self.read_from_replicas and not self.cluster:
            raise ValueError("read_from_replicas applies to a cluster only (\"cluster\": true)")
        return self

    @field_validator("startup_nodes")
    @classmethod
    def _host_ports(cls, v: list[str]) -> list[str]:
        bad = [n for n in v if not _HOST_PORT.match(n)]
        if bad:
            raise ValueError(f"startup nodes must be 'host:port', got {bad}")
        return v


class RedisViewOptions(StrictModel):
    """View options of the redis adapter: where a key lives and how its features are laid out."""

    key_template: str = "{table}:{key}"
    layout: Literal["hash", "string"] = "hash"
    encoding: Literal["msgpack", "json", "csv"] | None = None
    """String layout only (default msgpack)."""
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    """CSV encoding only: the character between ``name:value`` pairs."""
    ttl_s: int | None = Field(default=None, gt=0)
    """Expire written keys after this many seconds (refreshed by every upsert)."""

    @field_validator("key_template")
    @classmethod
    def _template(cls, v: str) -> str:
        rest = v.replace("{table}", "").replace("{key}", "", 1)
        if "{key}" not in v or "{" in rest or "}" in rest:
            raise ValueError("key_template needs exactly one {key} and may use {table}")
        return v

    @field_validator("delimiter")
    @classmethod
    def _delimiter(cls, v: str) -> str:
        if v in (":", "%"):
            raise ValueError("the delimiter cannot be ':' or '%'")
        return v

    @model_validator(mode="after")
    def _encoding_fits_layout(self) -> RedisViewOptions:
        if self.layout == "hash" and self.encoding is not None:
            raise ValueError("encoding applies to the string layout only")
        return self

    @property
    def format(self) -> str:
        """``hash``, ``msgpack``, ``json`` or ``csv``."""
        return "hash" if self.layout == "hash" else (self.encoding or "msgpack")

