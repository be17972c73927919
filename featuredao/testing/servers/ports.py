"""Free TCP ports on 127.0.0.1 for throwaway servers: picked below the kernel's ephemeral range and
never handed out twice by this process, so concurrently started servers do not collide."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
from collections.abc import Sequence
from pathlib import Path

from featuredao.testing.servers.errors import ServerError

LOCALHOST = "127.0.0.1"

_port_lock = threading.Lock()
_issued_ports: set[int] = set()


def _port_range() -> tuple[int, int]:
    """Ports to hand out: below the kernel's ephemeral range, so that outgoing client
    sockets can never squat on a port a server wants to (re)bind."""
    low_ephemeral = 32768
    with contextlib.suppress(OSError, ValueError):
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        low_ephemeral = int(text.split()[0])
    if low_ephemeral < 12000:  # unusual kernel config: fall back to the top of the port space
        return 61000, 65535
    return 10000, low_ephemeral


def _port_bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOCALHOST, port))
        except OSError:
            return False
    return True


def _pick_ports(offsets: Sequence[int]) -> int:
    """Pick a base port ``p`` such that every ``p + offset`` is currently bindable."""
    low, high = _port_range()
    high -= max(offsets)
    rng = random.SystemRandom()
    with _port_lock:
        for _ in range(2000):
            port = rng.randrange(low, high)
            candidates = [port + off for off in offsets]
            if any(c in _issued_ports for c in candidates):
                continue
            if all(_port_bindable(c) for c in candidates):
                _issued_ports.update(candidates)
                return port
    raise ServerError(f"could not find a free TCP port in [{low}, {high}) on {LOCALHOST}")


def free_port() -> int:
    """Return a TCP port that is currently free on 127.0.0.1.

    Ports come from below the ephemeral range and are never handed out twice by
    this process, so concurrently started servers do not collide.
    """
    return _pick_ports((0,))
