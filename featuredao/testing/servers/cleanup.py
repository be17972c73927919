"""Cleaning up after the servers this process started: the live servers, which an ``atexit`` hook
stops, and the owner files that let a later session sweep temporary directories left behind by a
session that died without cleaning up."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import threading
from pathlib import Path
from typing import Protocol


class _Server(Protocol):
    """What the exit hook needs of a live server: a way to stop it."""

    def stop(self) -> None: ...


_live_lock = threading.Lock()
_live: dict[int, _Server] = {}


def _register(server: _Server) -> None:
    with _live_lock:
        _live[id(server)] = server


def _unregister(server: _Server) -> None:
    with _live_lock:
        _live.pop(id(server), None)


_OWNER_FILE = ".featuredao-owner"
_DIR_PREFIX = "featuredao-"
_swept: set[str] = set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rpartition(")")[2].split()[0] in ("Z", "X"):  # zombie: dead, just not reaped
            return False
    return True


def _write_owner(base: Path, server_pid: int | None) -> None:
    (base / _OWNER_FILE).write_text(f"{os.getpid()}\n{server_pid or 0}\n")


def _sweep_stale_dirs(parent: str) -> None:
    """Remove temp dirs left behind by sessions that died without cleaning up
    (e.g. SIGKILLed), once their owner and server processes are both gone."""
    with _live_lock:
        if parent in _swept:
            return
        _swept.add(parent)
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            if not entry.name.startswith(_DIR_PREFIX) or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                pids = [int(x) for x in Path(entry.path, _OWNER_FILE).read_text().split()]
            except (OSError, ValueError):
                continue
            if not any(pid > 0 and _pid_alive(pid) for pid in pids):
                shutil.rmtree(entry.path, ignore_errors=True)


@atexit.register
def _stop_all_servers() -> None:
    with _live_lock:
        servers = list(_live.values())
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()
