"""The parts of the Redis Cluster router: the slot map, one routed batch's outcomes, a node's breaker."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from featuredao.config import CircuitBreakerConfig

log = logging.getLogger("featuredao")

HASH_SLOTS = 16384


class SlotMap:
    """Which master serves each hash slot, and the master's replicas, as one node of the cluster said."""

    __slots__ = ("owner", "replicas")

    def __init__(self, owner: list[str | None], replicas: dict[str, tuple[str, ...]]) -> None:
        self.owner = owner
        """Per slot: the ``host:port`` of its master (None: no node serves it)."""
        self.replicas = replicas
        """Per master: its replicas (the ones the cluster does not consider failed)."""

    @classmethod
    def parse(cls, reply: Any, default_host: str) -> SlotMap:
        """Build the map from one node's ``CLUSTER NODES`` view.

        ``CLUSTER NODES`` rather than ``CLUSTER SLOTS``: the latter leaves out a replica until the cluster
        has gossiped its replication offset (seconds after it linked), which is exactly when a young
        cluster may need it. Replicas flagged ``fail`` are left out; migrating slots stay with their
        owner (a key already moved answers ``ASK``).
        """
        text = reply.decode() if isinstance(reply, bytes) else str(reply)
        owner: list[str | None] = [None] * HASH_SLOTS
        address: dict[str, str] = {}
        replicas_of: dict[str, list[str]] = {}
        for line in text.splitlines():
            parts = line.split()
            if len(parts) < 8:
                continue
            node_id, where, flags, master_id = parts[0], parts[1], set(parts[2].split(",")), parts[3]
            if "noaddr" in flags or "handshake" in flags:
                continue
            host, _, port = where.split("@", 1)[0].split(",", 1)[0].rpartition(":")
            if not port.isdigit() or port == "0":
                continue  # a node that does not know its own address yet
            addr = f"{host or default_host}:{int(port)}"
            address[node_id] = addr
            if "slave" in flags and "fail" not in flags and master_id != "-":
                replicas_of.setdefault(master_id, []).append(addr)
            if "master" in flags:
                for item in parts[8:]:
                    if item.startswith("["):
                        continue  # [slot->-node] / [slot-<-node]: migrating or importing
                    first, _, last = item.partition("-")
                    lo, hi = int(first), int(last or first)
                    owner[lo:hi + 1] = [addr] * (hi - lo + 1)
        replicas = {address[m]: tuple(sorted(reps)) for m, reps in replicas_of.items() if m in address}
        return cls(owner, replicas)

    @property
    def masters(self) -> set[str]:
        """Every node that serves slots."""
        return {a for a in self.owner if a is not None}

    def nodes(self) -> set[str]:
        """Every node the map names: masters and their replicas."""
        return self.masters | {r for reps in self.replicas.values() for r in reps}

    def slots_of(self, addr: str) -> int:
        """How many slots ``addr`` serves."""
        return self.owner.count(addr)


class Routed:
    """What one routed batch gave: per item its replies, or the node that failed it and why."""

    __slots__ = ("failures", "replies")

    def __init__(self, n: int) -> None:
        self.replies: list[list[Any] | None] = [None] * n
        """Per item: the replies of its commands (error replies other than redirects included), or None
        when it failed."""
        self.failures: dict[str, tuple[BaseException, list[int]]] = {}
        """Per node that failed items: the first error (a driver exception, or our own: ``CircuitOpen``
        for a node failing fast, ``BackendTimeout`` for one that did not answer in time, ``Overloaded``
        under ``"(none)"`` when no time was left to send anything, ``Closed``) and the items."""

    def fail(self, addr: str, error: BaseException, items: Iterable[int]) -> None:
        entry = self.failures.get(addr)
        if entry is None:
            entry = self.failures[addr] = (error, [])
        entry[1].extend(items)

    @property
    def failed(self) -> list[int]:
        """Every failed item."""
        return [i for _, items in self.failures.values() for i in items]


class NodeBreaker:
    """One cluster node's circuit breaker: opens after ``failure_threshold`` consecutive failures; while
    open, requests skip the node (its keys fail fast or go to a replica); once ``reset_timeout_s`` has
    passed, one background probe may go (:meth:`probe_due`), and any answer closes it again."""

    def __init__(self, name: str, config: CircuitBreakerConfig) -> None:
        self.name = name
        self.config = config
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def closed(self) -> bool:
        """May requests use the node?"""
        return self._opened_at is None or not self.config.enabled

    @property
    def state(self) -> str:
        """``closed``, ``open``, or ``half_open`` (open, and its reset timeout has passed)."""
        opened = self._opened_at
        if opened is None:
            return "closed"
        return "half_open" if time.monotonic() - opened >= self.config.reset_timeout_s else "open"

    def probe_due(self) -> bool:
        """True (once, until the probe's outcome is recorded) when an open node may be probed."""
        with self._lock:
            if self._opened_at is None or self._probing or \
                    time.monotonic() - self._opened_at < self.config.reset_timeout_s:
                return False
            self._probing = True
            return True

    def success(self) -> None:
        """The node answered."""
        with self._lock:
            self._failures = 0
            self._probing = False
            if self._opened_at is not None:
                self._opened_at = None
                log.warning("%s: circuit closed again", self.name)

    def failure(self) -> None:
        """The node refused, dropped the connection, or did not answer in time."""
        with self._lock:
            self._failures += 1
            self._probing = False
            if self._opened_at is not None:
                self._opened_at = time.monotonic()  # a failed probe: wait another reset timeout
            elif self._failures >= self.config.failure_threshold and self.config.enabled:
                self._opened_at = time.monotonic()
                log.warning("%s: circuit opened after %d consecutive failures", self.name, self._failures)

    def release(self) -> None:
        """A call that told nothing about the node (cancelled, our own pool full)."""
        with self._lock:
            self._probing = False

