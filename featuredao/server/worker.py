"""One worker process of ``featuredao serve``: its own FeatureService behind uvicorn, on the shared port.

Started by the supervisor as ``python -m featuredao.server.worker --settings JSON --control-fd N``. The
control socket carries newline-delimited JSON both ways: the supervisor sends config snapshots
(``{"op": "config", "hash", "text"}``; the first one is the initial config), the worker answers
``ready``, ``reloaded`` or ``reload_failed``. The worker stops on SIGTERM/SIGINT (uvicorn's graceful
shutdown: stop accepting, finish what is in flight within the drain timeout) and when the supervisor
goes away (its end of the control socket closes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import uvicorn

from featuredao.errors import ConfigError
from featuredao.server.app import create_app
from featuredao.server.metrics import ServerMetrics
from featuredao.server.reload import (
    ConfigSnapshot,
    ServiceHolder,
    build_active,
    enter_config_dir,
    log_rejected,
)
from featuredao.server.settings import ServeSettings

log = logging.getLogger("featuredao.server")

EXIT_CONFIG = 3
"""A worker that could not build its first config exits with this code."""

LOG_FORMAT = "%(levelname)s %(name)s[%(process)d]: %(message)s"


def listen(settings: ServeSettings) -> socket.socket:
    """This worker's own listening socket: SO_REUSEPORT, so the kernel spreads connections over workers."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(settings.backlog)
    sock.set_inheritable(False)
    return sock


class Control:
    """The worker's end of the control socket: JSON lines in and out."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = b""

    def send(self, **message: Any) -> None:
        with contextlib.suppress(OSError):  # the supervisor is gone: the reader sees EOF, the worker stops
            self.sock.sendall(json.dumps(message).encode() + b"\n")

    def read_blocking(self, timeout_s: float) -> dict[str, Any] | None:
        """The next message, waiting at most ``timeout_s`` (None: EOF or no message in time)."""
        self.sock.settimeout(timeout_s)
        try:
            while b"\n" not in self._buffer:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    return None
                self._buffer += chunk
        except TimeoutError:
            return None
        finally:
            self.sock.settimeout(None)
        line, _, self._buffer = self._buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    def drain(self) -> list[dict[str, Any]] | None:
        """Messages available now without blocking (the socket is readable); None at EOF."""
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            return None
        self._buffer += chunk
        out = []
        while b"\n" in self._buffer:
            line, _, self._buffer = self._buffer.partition(b"\n")
            out.append(json.loads(line))
        return out


class Worker:
    """Builds the first service, serves, applies reloads, and closes everything on the way out."""

    def __init__(self, settings: ServeSettings, control: Control, sock: socket.socket | None) -> None:
        self.settings = settings
        self.control = control
        self.sock = sock
        self.server: uvicorn.Server | None = None
        self.holder: ServiceHolder | None = None
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def run(self) -> int:
        first = self.control.read_blocking(60.0)
        if first is None or first.get("op") != "config":
            log.error("worker %d: no config from the supervisor", os.getpid())
            return 1
        snapshot = ConfigSnapshot(self.settings.config_path, first["text"], first["hash"])
        enter_config_dir(self.settings.config_path)
        try:
            active = build_active(snapshot)
        except ConfigError as exc:
            log_rejected(snapshot.hash, exc, f"worker {os.getpid()}")
            return EXIT_CONFIG
        except Exception as exc:
            log.error("worker %d: cannot build config %s: %s: %s", os.getpid(), snapshot.hash,
                      type(exc).__name__, exc)
            return EXIT_CONFIG
        token = os.environ.get(self.settings.token_env) if self.settings.token_env else None
        if self.settings.token_env and not token:
            log.error("worker %d: the token variable %s is not set", os.getpid(), self.settings.token_env)
            active.service.close()
            return 1
        sock = self.sock or listen(self.settings)
        self.holder = ServiceHolder(active, self.settings.drain_timeout_s)
        app = create_app(self.holder, self.settings, token, ServerMetrics())
        config = uvicorn.Config(
            app, lifespan="off", access_log=False, log_config=None, server_header=False,
            timeout_graceful_shutdown=max(1, round(self.settings.drain_timeout_s)),
            backlog=self.settings.backlog, http=_http_impl(), timeout_keep_alive=30,
        )
        self.server = uvicorn.Server(config)
        # uvicorn re-raises the signal that stopped it once it has drained: a handler of ours then
        # makes that a no-op, so the worker closes its services and exits 0 instead of dying by it.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(self._serve(sock))
        return 0

    async def _serve(self, sock: socket.socket) -> None:
        assert self.server is not None and self.holder is not None
        loop = asyncio.get_running_loop()
        loop.add_reader(self.control.sock.fileno(), self._on_control)
        self.control.send(event="ready", pid=os.getpid(), config=self.holder.current.hash)
        try:
            await self.server.serve(sockets=[sock])
        finally:
            loop.remove_reader(self.control.sock.fileno())
            for task in list(self._tasks):
                task.cancel()
            await self.holder.aclose()

    def _on_control(self) -> None:
        assert self.server is not None
        try:
            messages = self.control.drain()
        except OSError:
            messages = None
        if messages is None:  # the supervisor is gone: stop as on SIGTERM
            asyncio.get_running_loop().remove_reader(self.control.sock.fileno())
            log.warning("worker %d: the supervisor went away; stopping", os.getpid())
            self.server.should_exit = True
            return
        for message in messages:
            if message.get("op") == "config":
                snapshot = ConfigSnapshot(self.settings.config_path, message["text"], message["hash"])
                task = asyncio.get_running_loop().create_task(self._reload(snapshot))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _reload(self, snapshot: ConfigSnapshot) -> None:
        assert self.holder is not None
        async with self._reload_lock:
            if snapshot.hash == self.holder.current.hash:
                self.control.send(event="reloaded", config=snapshot.hash)
                return
            try:
                # The running version hands its unchanged pools and L1 caches to the new one.
                current = self.holder.current
                active = await asyncio.get_running_loop().run_in_executor(
                    None, functools.partial(build_active, snapshot, previous=current))
            except ConfigError as exc:
                log_rejected(snapshot.hash, exc, f"worker {os.getpid()}")
                self.control.send(event="reload_failed", config=snapshot.hash, error=str(exc))
                return
            except Exception as exc:
                log.error("worker %d: cannot build config %s, the running one stays: %s: %s", os.getpid(),
                          snapshot.hash, type(exc).__name__, exc)
                self.control.send(event="reload_failed", config=snapshot.hash,
                                  error=f"{type(exc).__name__}: {exc}")
                return
            old = self.holder.swap(active)
            log.info("worker %d: now serving config %s (was %s)", os.getpid(), active.hash, old.hash)
            self.control.send(event="reloaded", config=snapshot.hash)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _http_impl() -> str:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "h11"
    return "httptools"


def main(argv: list[str] | None = None) -> None:
    """Entry point of a worker process (started by the supervisor, not by hand)."""
    parser = argparse.ArgumentParser(prog="featuredao-serve-worker")
    parser.add_argument("--settings", required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--listen-fd", type=int)
    args = parser.parse_args(argv)
    settings = ServeSettings.from_json(args.settings)
    logging.basicConfig(level=settings.log_level, format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("featuredao.server").setLevel(min(settings.log_level, logging.INFO))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads are the supervisor's: it sends the snapshot
    control = Control(socket.socket(fileno=args.control_fd))
    sock = None
    if args.listen_fd is not None:
        sock = socket.socket(fileno=args.listen_fd)
    sys.exit(Worker(settings, control, sock).run())


if __name__ == "__main__":
    main()
