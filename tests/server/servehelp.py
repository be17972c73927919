"""Helpers of the feature-server tests: a config with SQLite and Redis views, and a real server process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from featuredao import FeatureValue, build
from featuredao.testing.servers import RedisServer
from featuredao.testing.servers.ports import free_port

Rows = dict[str, FeatureValue]
USERS: dict[str, Rows] = {"u1": {"age": 31, "city": "paris"}, "u2": {"age": 45, "city": "lyon"}}
ITEMS: dict[int, Rows] = {i: {"price": float(i) + 0.5, "category": f"c{i % 3}", "tags": [f"t{i}"]}
                          for i in range(1, 21)}
STATS: dict[int, Rows] = {i: {"ctr": i / 100, "clicks": i * 10} for i in range(1, 21)}
SHOPS: dict[str, Rows] = {"s9": {"rating": 4.5}}


def config_doc(redis: RedisServer, *, extra_views: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """SQLite users, items and shops, a Redis (string/msgpack) view of item stats, context and scenes."""
    stats_table = f"stats_{uuid.uuid4().hex[:8]}"
    return {
        "sources": {
            "local": {"type": "sqlite", "path": "features.db"},
            "cache": {"type": "redis", "host": redis.host, "port": redis.port},
        },
        "views": [
            {"name": "users", "entity": "user", "source": "local", "table": "users", "key": "user_id",
             "features": {"age": "int", "city": "str"}, "defaults": {"age": 0}, "prefix": "u_"},
            {"name": "items", "entity": "item", "source": "local", "table": "items", "key": "item_id",
             "key_type": "int", "features": {"price": "float", "category": "str", "tags": "list[str]"},
             "defaults": {"price": 0.0}},
            {"name": "item_stats", "entity": "item", "source": "cache", "table": stats_table,
             "key": "item_id", "key_type": "int", "features": {"ctr": "float", "clicks": "int"},
             "defaults": {"ctr": 0.0, "clicks": 0}, "prefix": "s_",
             "options": {"layout": "string", "encoding": "msgpack"}},
            {"name": "shops", "entity": "shop", "source": "local", "table": "shops", "key": "shop_id",
             "features": {"rating": "float"}, "prefix": "shop_"},
            *extra_views,
        ],
        "context": {"hour": {"type": "int", "default": 0}, "device": {"type": "str", "default": "unknown"}},
        "scenes": {"home": {"views": ["users", "items"], "deadline_ms": 500},
                   "ranking": {"views": ["items", "item_stats"]}},
        "service": {"deadline_ms": 1000},
    }


def write_config(tmp: Path, doc: Mapping[str, Any], name: str = "featuredao.json") -> Path:
    """Write a config atomically (a rename: a watcher never sees half a file)."""
    path = tmp / name
    part = tmp / f".{name}.part"
    part.write_text(json.dumps(doc, indent=1))
    os.replace(part, path)
    return path


def seed(path: Path) -> None:
    """Create and fill every table of the config at ``path``."""
    runtime = build(path)
    try:
        daos = runtime.daos
        for dao in daos.values():
            dao.prepare()
        daos["users"].upsert(list(USERS.items()))
        daos["items"].upsert(list(ITEMS.items()))
        daos["item_stats"].upsert(list(STATS.items()))
        daos["shops"].upsert(list(SHOPS.items()))
    finally:
        runtime.close()


class Served:
    """A ``featuredao serve`` process on a free port of 127.0.0.1, its log in a file."""

    def __init__(self, config: Path, *args: str, env: Mapping[str, str] | None = None,
                 workers: int = 1) -> None:
        self.config = config
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = config.parent / f"serve-{self.port}.log"
        cmd = [sys.executable, "-m", "featuredao.cli", "serve", str(config), "--port", str(self.port),
               "--workers", str(workers), *args]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, cwd=config.parent)
        self.wait_healthy()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"featuredao serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"featuredao serve did not answer in {timeout_s} s:\n{self.log()}")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM, then the exit code (killed after ``timeout_s``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"featuredao serve did not stop in {timeout_s} s:\n{self.log()}") from None
        finally:
            self._log.close()
        return code


def wait_for(check: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll ``check`` until it holds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def worker_pids(url: str, expected: int, tries: int = 200) -> set[int]:
    """The pids of the workers answering on ``url`` (a new connection each time, spread by the kernel)."""
    seen: set[int] = set()
    for _ in range(tries):
        with httpx.Client(timeout=2.0) as client:
            seen.add(client.get(f"{url}/healthz").json()["worker"])
        if len(seen) >= expected:
            break
    return seen


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0.0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        head, _, rest = series.partition("{")
        if head != name:
            continue
        got = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p))
        if got == wanted:
            return float(value)
    return 0.0
