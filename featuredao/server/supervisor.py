"""The supervisor of ``featuredao serve``: N worker processes on one port, config reloads, drains.

* **Workers.** Each worker is its own process (``featuredao.server.worker``) with its own FeatureService
  and event loop, listening on the same host and port through its own ``SO_REUSEPORT`` socket: the
  kernel spreads new connections over the workers' sockets, so no worker grabs a burst of them for
  itself. (Where SO_REUSEPORT is missing, the workers share the supervisor's listening socket.) A worker
  that dies is replaced (after a short back-off if it keeps dying young).
* **Reloads.** Every ``reload_interval_s`` (and at once on SIGHUP) the supervisor hashes the config file;
  a changed file is validated here (every problem logged with its JSON path, once per version, counted
  ``featuredao_config_reloads_total{outcome="invalid"}``), and a valid one is sent to every worker, which
  builds it in full and swaps it in (``outcome="ok"`` once all have, ``"failed"`` if one could not:
  then the workers that took it go back to the previous version, so all serve the same one). New
  workers start from the last version every worker could build, whatever the file holds at that moment.
* **Stopping.** SIGTERM or SIGINT: every worker stops accepting, finishes what is in flight (at most the
  drain timeout), closes its services and exits; the supervisor exits 0 once they all have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from featuredao.errors import ConfigError, UsageError
from featuredao.server import metrics as server_metrics
from featuredao.server.metrics import ServerMetrics, forget_process
from featuredao.server.reload import (
    ConfigSnapshot,
    enter_config_dir,
    load_snapshot,
    log_rejected,
    read_snapshot,
)
from featuredao.server.settings import ServeSettings

log = logging.getLogger("featuredao.server")

START_TIMEOUT_S = 60.0
YOUNG_S = 5.0
"""A worker that dies younger than this is restarted after a growing back-off (0.5 s doubling to 10 s)."""


class ServeError(Exception):
    """The server could not start (port taken, a worker could not start)."""


@dataclass(eq=False)
class WorkerProcess:
    slot: int
    proc: subprocess.Popen[bytes]
    control: socket.socket
    started: float = field(default_factory=time.monotonic)
    ready: bool = False
    config: str | None = None
    buffer: bytes = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # it died: its EOF is handled by the loop
            self.control.sendall(json.dumps(message).encode() + b"\n")


@dataclass
class PendingReload:
    snapshot: ConfigSnapshot
    previous: ConfigSnapshot
    waiting: set[int]
    failed: list[int] = field(default_factory=list)


def check_port(host: str, port: int) -> int:
    """Fail early when the address is taken (SO_REUSEPORT or not); return the port (0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise ServeError(f"cannot listen on {host}:{port}: {reason}") from None
        bound: int = probe.getsockname()[1]
        return bound


class Supervisor:
    """Starts and keeps the workers, watches the config, and stops everything on SIGTERM."""

    def __init__(self, settings: ServeSettings, snapshot: ConfigSnapshot) -> None:
        self.settings = settings
        self.snapshot = snapshot
        """The last valid config: what every new worker starts from."""
        self.rejected: str | None = None
        self.workers: dict[int, WorkerProcess] = {}
        self.restart_at: dict[int, float] = {}
        self.backoff: dict[int, float] = {}
        self.pending: PendingReload | None = None
        self.stopping = False
        self.reload_now = False
        self.metrics = ServerMetrics()
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self.listener: socket.socket | None = None

    # -- workers ---------------------------------------------------------------------------
    def _spawn(self, slot: int) -> WorkerProcess:
        ours, theirs = socket.socketpair()
        fds = [theirs.fileno()]
        args = [sys.executable, "-m", "featuredao.server.worker", "--settings", self.settings.to_json(),
                "--control-fd", str(theirs.fileno())]
        if self.listener is not None:
            fds.append(self.listener.fileno())
            args += ["--listen-fd", str(self.listener.fileno())]
        try:
            proc = subprocess.Popen(args, pass_fds=fds, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        worker = WorkerProcess(slot, proc, ours)
        worker.send({"op": "config", "hash": self.snapshot.hash, "text": self.snapshot.text})
        self.workers[slot] = worker
        self.selector.register(ours, selectors.EVENT_READ, worker)
        log.debug("worker %d started (pid %d)", slot, proc.pid)
        return worker

    def _reap(self, worker: WorkerProcess) -> int:
        """The worker's control socket closed: wait for its exit and forget it."""
        self.selector.unregister(worker.control)
        worker.control.close()
        try:
            code = worker.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            code = worker.proc.wait()
        del self.workers[worker.slot]
        forget_process(worker.pid)
        if self.pending is not None and worker.slot in self.pending.waiting:
            self.pending.waiting.discard(worker.slot)
            self._settle_reload()
        return code

    def _on_message(self, worker: WorkerProcess, message: dict[str, Any]) -> None:
        event = message.get("event")
        if event == "ready":
            worker.ready = True
            worker.config = message.get("config")
        elif event in ("reloaded", "reload_failed"):
            if event == "reloaded":
                worker.config = message.get("config")
            pending = self.pending
            if pending is not None and message.get("config") == pending.snapshot.hash:
                pending.waiting.discard(worker.slot)
                if event == "reload_failed":
                    pending.failed.append(worker.pid)
                self._settle_reload()

    def _read(self, worker: WorkerProcess) -> bool:
        """Handle what the worker said; False when its control socket closed (it is gone)."""
        try:
            chunk = worker.control.recv(1 << 16)
        except OSError:
            chunk = b""
        if not chunk:
            return False
        worker.buffer += chunk
        while b"\n" in worker.buffer:
            line, _, worker.buffer = worker.buffer.partition(b"\n")
            try:
                self._on_message(worker, json.loads(line))
            except ValueError:
                log.warning("worker %d sent an unreadable message", worker.pid)
        return True

    def _start_all(self) -> None:
        for slot in range(self.settings.workers):
            self._spawn(slot)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(w.ready for w in self.workers.values()) or len(self.workers) < self.settings.workers:
            if self.stopping:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServeError(f"workers did not start within {START_TIMEOUT_S:.0f} s")
            for key, _ in self.selector.select(timeout=left):
                if key.fileobj is self._wake_r:
                    self._drain_wakeups()
                    continue
                worker: WorkerProcess = key.data
                if not self._read(worker):
                    code = self._reap(worker)
                    raise ServeError(f"a worker could not start (exit code {code}); see the log above")

    def _on_exit(self, worker: WorkerProcess) -> None:
        code = self._reap(worker)
        if self.stopping:
            return
        young = time.monotonic() - worker.started < YOUNG_S
        delay = min(10.0, self.backoff.get(worker.slot, 0.25) * 2) if young else 0.0
        self.backoff[worker.slot] = delay if young else 0.25
        log.warning("worker %d (pid %d) exited with code %s; starting a new one%s", worker.slot, worker.pid,
                    code, f" in {delay:.1f} s" if delay else "")
        self.restart_at[worker.slot] = time.monotonic() + delay

    # -- reloads ---------------------------------------------------------------------------
    def check_config(self) -> None:
        """Hash the file; validate a new version and send it to every worker."""
        try:
            snapshot = read_snapshot(self.settings.config_path)
        except ConfigError as exc:
            key = f"unreadable:{exc}"
            if key != self.rejected:
                self.rejected = key
                log_rejected("(unreadable)", exc, "reload")
                self.metrics.reload("invalid")
            return
        if snapshot.hash == self.snapshot.hash or snapshot.hash == self.rejected:
            return
        if self.pending is not None and self.pending.snapshot.hash == snapshot.hash:
            return
        try:
            load_snapshot(snapshot)
        except ConfigError as exc:
            self.rejected = snapshot.hash
            log_rejected(snapshot.hash, exc, "reload")
            self.metrics.reload("invalid")
            return
        self.rejected = None
        previous, self.snapshot = self.snapshot, snapshot
        log.info("config changed (%s -> %s): reloading %d worker(s)", previous.hash, snapshot.hash,
                 len(self.workers))
        if self.pending is not None:  # a newer version supersedes one still being built
            self._count(self.pending, superseded=True)
        self.pending = PendingReload(snapshot, previous, set(self.workers))
        for worker in self.workers.values():
            worker.send({"op": "config", "hash": snapshot.hash, "text": snapshot.text})
        self._settle_reload()

    def _settle_reload(self) -> None:
        pending = self.pending
        if pending is None or pending.waiting:
            return
        self.pending = None
        self._count(pending)

    def _count(self, pending: PendingReload, *, superseded: bool = False) -> None:
        if pending.failed:
            self.metrics.reload("failed")
            log.error("config %s could not be built by worker(s) %s (see above); they keep the previous one",
                      pending.snapshot.hash, ", ".join(map(str, pending.failed)))
            if superseded:
                return  # every worker is being sent the newer version
            # Every worker serves one version: those that took this one go back to the previous one (their
            # unchanged pools and caches carried back), new workers start from it, and the file is not
            # retried until it changes again.
            self.snapshot = pending.previous
            self.rejected = pending.snapshot.hash
            took = [w for w in self.workers.values() if w.config == pending.snapshot.hash]
            for worker in took:
                worker.send({"op": "config", "hash": pending.previous.hash, "text": pending.previous.text})
            if took:
                log.warning("worker(s) %s go back to config %s", ", ".join(str(w.pid) for w in took),
                            pending.previous.hash)
        else:
            self.metrics.reload("ok")
            log.info("config %s active in every worker", pending.snapshot.hash)

    # -- signals and the main loop -------------------------------------------------------------
    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self.reload_now = True
        elif not self.stopping:
            self.stopping = True
            log.warning("%s: draining (at most %.0f s)", signal.Signals(signum).name,
                        self.settings.drain_timeout_s)

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; 0 when every worker drained and exited cleanly."""
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        old_wakeup = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        handlers = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        self.metrics.declare_reloads()
        try:
            if not self.settings.reuse_port:
                self._listen_shared()
            try:
                self._start_all()
            except ServeError:
                self._stop()
                raise
            if not self.stopping:
                log.warning("featuredao serve: http://%s:%d, %d worker(s), config %s",
                            _url_host(self.settings.host), self.settings.port, self.settings.workers,
                            self.snapshot.hash)
                self._loop()
            return self._stop()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            if self.listener is not None:
                self.listener.close()

    def _listen_shared(self) -> None:
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.settings.host, self.settings.port))
        sock.listen(self.settings.backlog)
        self.listener = sock

    def _loop(self) -> None:
        interval = self.settings.reload_interval_s
        next_check = time.monotonic() + interval if interval > 0 else float("inf")
        while not self.stopping:
            now = time.monotonic()
            if self.reload_now or now >= next_check:
                self.reload_now = False
                self.check_config()
                next_check = now + interval if interval > 0 else float("inf")
            for slot, due in list(self.restart_at.items()):
                if now >= due:
                    del self.restart_at[slot]
                    self._spawn(slot)
            wake = min([next_check, *self.restart_at.values()])
            for key, _ in self.selector.select(timeout=max(0.0, min(wake - time.monotonic(), 60.0))):
                if key.fileobj is self._wake_r:
                    self._drain_wakeups()
                elif not self._read(key.data):
                    self._on_exit(key.data)

    def _stop(self) -> int:
        """Send SIGTERM to every worker, wait for them (bounded), kill what is left."""
        self.stopping = True
        for worker in self.workers.values():
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.drain_timeout_s + 5.0
        clean = True
        for worker in list(self.workers.values()):
            try:
                code = worker.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d (pid %d) did not stop in time: killed", worker.slot, worker.pid)
                worker.proc.kill()
                code = worker.proc.wait()
            if code != 0:
                clean = False
                log.warning("worker %d (pid %d) exited with code %s", worker.slot, worker.pid, code)
            self.selector.unregister(worker.control)
            worker.control.close()
            del self.workers[worker.slot]
        log.warning("featuredao serve stopped")
        return 0 if clean else 1


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def serve(settings: ServeSettings) -> int:
    """Run ``featuredao serve``: validate the config, check the port, start and keep the workers.

    Raises ConfigError (an invalid config: every problem with its path), UsageError (the token's
    variable is not set) or ServeError (the port is taken) before anything listens; returns the exit
    code once stopped.
    """
    own_dir = None
    if not os.environ.get(server_metrics.ENV):
        # Before prometheus_client is imported, here and in every worker (they inherit the environment).
        own_dir = tempfile.mkdtemp(prefix="featuredao-serve-metrics-")
        os.environ[server_metrics.ENV] = own_dir
    try:
        enter_config_dir(settings.config_path)
        snapshot = read_snapshot(settings.config_path)
        load_snapshot(snapshot)
        if settings.token_env and not os.environ.get(settings.token_env):
            raise UsageError(f"--token-env {settings.token_env}: that environment variable is not set "
                             "or empty")
        port = check_port(settings.host, settings.port)
        reuse_port = settings.reuse_port and hasattr(socket, "SO_REUSEPORT") \
            and sys.platform.startswith("linux")
        settings = dataclasses.replace(settings, port=port, reuse_port=reuse_port,
                                       metrics_dir=os.environ[server_metrics.ENV],
                                       log_level=logging.getLogger().getEffectiveLevel())
        return Supervisor(settings, snapshot).run()
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
            os.environ.pop(server_metrics.ENV, None)
