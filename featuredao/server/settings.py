"""What ``featuredao serve`` was told: one frozen record the supervisor hands to every worker as JSON."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from typing import Any


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class ServeSettings:
    """Settings of one ``featuredao serve``: where it listens, how many workers, its limits."""

    config_path: str
    """Absolute path of the JSON config (watched for changes)."""
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    reload_interval_s: float = 5.0
    """How often the config file's content hash is checked; 0: on SIGHUP only."""
    token_env: str | None = None
    """Name of the environment variable holding the bearer token (never the token itself)."""
    max_body_bytes: int = 1 << 20
    max_keys: int = 10_000
    """Most keys one request may carry (item ids, or a view's keys)."""
    drain_timeout_s: float = 10.0
    """On SIGTERM (and for a replaced config's service): how long requests in flight may take."""
    backlog: int = 2048
    log_level: int = logging.WARNING
    metrics_dir: str | None = None
    """prometheus_client's multiprocess directory, shared by the supervisor and its workers."""
    reuse_port: bool = True
    """Each worker binds its own SO_REUSEPORT socket (the kernel spreads connections); otherwise the
    workers share the supervisor's listening socket."""

    def to_json(self) -> str:
        """The settings as one JSON string (they hold no secret: the token stays in the environment)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServeSettings:
        """Settings written by ``to_json`` (unknown names are ignored)."""
        data: dict[str, Any] = json.loads(text)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
