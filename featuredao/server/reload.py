"""Hot reload: config snapshots (content and hash), and the swap of a worker's running FeatureService.

The supervisor reads the config file, hashes it and validates it; only a valid snapshot reaches the
workers, as its text, so every worker builds exactly what was validated even if the file changes again
meanwhile. A worker builds the new service in full off the event loop, then swaps it in at once: a
request holds the service it started on (:meth:`ServiceHolder.use`), and the old service is closed when
the last of them has left (or after the drain timeout, whichever comes first).

Every process of ``featuredao serve`` runs in the config file's directory, so relative paths in the
config resolve against it exactly as when the file itself is loaded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from featuredao import config as config_mod
from featuredao import factory
from featuredao.errors import ConfigError, ConfigIssue
from featuredao.metrics import Metrics
from featuredao.server.protocol import RequestShape
from featuredao.service import FeatureService

log = logging.getLogger("featuredao.server")


@dataclass(frozen=True, slots=True)
class ConfigSnapshot:
    """One version of the config file: its text and the hash that names it."""

    path: str
    text: str
    hash: str

    @classmethod
    def of(cls, path: str, data: bytes) -> ConfigSnapshot:
        return cls(path, data.decode("utf-8", errors="replace"), hashlib.sha256(data).hexdigest()[:16])


def read_snapshot(path: str) -> ConfigSnapshot:
    """The file as it is now; ConfigError if it cannot be read."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    return ConfigSnapshot.of(path, data)


def enter_config_dir(path: str) -> None:
    """Run in the config file's directory: relative paths in a snapshot then mean what they do in the file."""
    os.chdir(Path(path).resolve().parent)


def load_snapshot(snapshot: ConfigSnapshot) -> config_mod.Config:
    """Validate a snapshot (every problem at once, with its JSON path); needs ``enter_config_dir`` first."""
    try:
        doc = json.loads(snapshot.text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{snapshot.path}: not valid JSON: {exc.msg} at line {exc.lineno} "
                          f"column {exc.colno}") from None
    if not isinstance(doc, dict):
        raise ConfigError([ConfigIssue("$", "the configuration must be a JSON object")])
    return config_mod.load(doc)


def log_rejected(snapshot_hash: str, exc: ConfigError, what: str) -> None:
    """Every problem of a rejected config on its own line, with its JSON path; never a traceback."""
    n = len(exc.issues)
    log.error("%s: config %s rejected, the running one stays (%d problem%s)", what, snapshot_hash, n,
              "" if n == 1 else "s")
    for issue in exc.issues:
        log.error("  %s", issue)


@dataclass(eq=False)
class Active:
    """A built service and what the API needs to know about it."""

    service: FeatureService
    hash: str
    shape: RequestShape
    loaded_at: float = field(default_factory=time.time)
    in_flight: int = 0
    retired: bool = False
    closed: bool = False


def build_active(snapshot: ConfigSnapshot, *, warm_timeout_s: float = 1.0,
                 previous: Active | None = None) -> Active:
    """Load and build a snapshot in full, and ping every source once (connections ready before the swap).

    Blocking: call it on a thread. A store that does not answer is logged, not fatal: a down store is
    served as degraded, as in any running service. ``previous``: the running version, whose unchanged
    sources (pools) and served views (L1 caches) the new one takes over (``factory.build(previous=)``);
    closing the old service then frees only what the new one does not use.
    """
    config = load_snapshot(snapshot)
    metrics = Metrics()
    before = previous.service.runtime if previous is not None else None
    runtime = factory.build(config, metrics, previous=before)
    service = FeatureService(runtime.served, config.service, on_close=runtime.close, runtime=runtime,
                             metrics=metrics)
    if before is not None:
        kept = [n for n, source in runtime.sources.items() if before.sources.get(n) is source]
        log.info("config %s: source pools kept: %s; view caches kept: %s", snapshot.hash,
                 ", ".join(kept) or "none", ", ".join(sorted(runtime.kept)) or "none")
    try:
        shape = RequestShape.of(service)
        down = [h.source for h in service.health(warm_timeout_s) if not h.ok]
        if down:
            log.warning("config %s: sources not answering yet: %s", snapshot.hash, ", ".join(down))
    except BaseException:
        service.close()
        raise
    return Active(service, snapshot.hash, shape)


class ServiceHolder:
    """The active service of a worker; every method is called on the event loop's thread."""

    def __init__(self, active: Active, drain_timeout_s: float) -> None:
        self.current = active
        self.drain_timeout_s = drain_timeout_s
        self._closing: set[asyncio.Future[None]] = set()

    @contextmanager
    def use(self) -> Iterator[Active]:
        """Hold the active service for one request: a swap meanwhile does not close it under the request."""
        active = self.current
        active.in_flight += 1
        try:
            yield active
        finally:
            active.in_flight -= 1
            if active.retired and active.in_flight == 0:
                self._close(active)

    def swap(self, new: Active) -> Active:
        """Make ``new`` the active service; the old one closes once its requests have drained."""
        old, self.current = self.current, new
        old.retired = True
        if old.in_flight == 0:
            self._close(old)
        else:
            asyncio.get_running_loop().call_later(self.drain_timeout_s, self._close, old)
        return old

    def _close(self, active: Active) -> None:
        if active.closed:
            return
        active.closed = True
        if active.in_flight:
            log.warning("config %s: closing its service with %d request(s) still in flight after %.1f s",
                        active.hash, active.in_flight, self.drain_timeout_s)
        future = asyncio.get_running_loop().run_in_executor(None, active.service.close)
        self._closing.add(future)
        future.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """Close the active service and wait for every close under way."""
        self.current.retired = True
        self._close(self.current)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
