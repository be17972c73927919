"""What a source may offer beyond reads and writes: a shared key-value tier, durable sync state, change feeds.

Adapters implement these (``Source.key_value()``, ``Source.state_store()``, ``BaseDao.feed``); the cache
and the sync engine use them without knowing the store.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from featuredao.types import Key


class KeyValueStore(ABC):
    """The few key-value operations the shared cache tier needs; an adapter such as Redis supplies it."""

    @abstractmethod
    def get_many(self, keys: Sequence[str], timeout_s: float | None = None) -> list[bytes | None]:
        """Values in key order, None where absent: one round trip per node."""

    @abstractmethod
    def set_many(self, items: Sequence[tuple[str, bytes, float]]) -> None:
        """Store (key, value, ttl seconds) triples, pipelined."""

    @abstractmethod
    def delete_many(self, keys: Sequence[str]) -> None:
        """Remove keys."""

    @abstractmethod
    def publish(self, channel: str, message: bytes) -> None:
        """Send a message to every subscriber of a channel."""

    @abstractmethod
    def subscribe(self, channel: str, callback: Callable[[bytes], None]) -> Callable[[], None]:
        """Call ``callback`` with each message on ``channel`` (from a background thread); return a stopper."""


class StateStore(ABC):
    """Durable synchronization state: JSON checkpoints and a registry of seen keys, committed atomically.

    A ``scope`` is a sync job, a ``group`` one of its targets; keys are stored as JSON text.
    """

    @abstractmethod
    def load(self, scope: str) -> dict[str, Any]:
        """Every checkpoint of a scope, by name (JSON values)."""

    @abstractmethod
    def commit(self, scope: str, values: Mapping[str, Any],
               seen: tuple[str, Sequence[str], int] | None = None,
               forget: tuple[str, Sequence[str]] | None = None) -> None:
        """In one transaction: store checkpoints, mark ``(group, keys, generation)`` seen, forget keys."""

    @abstractmethod
    def unseen(self, scope: str, group: str, generation: int, limit: int) -> list[str]:
        """Keys of a group last seen before ``generation`` (at most ``limit``)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the store holds (its source's pool is closed by its owner)."""


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of a change feed: its position, the key, the row now (None: deleted), when it happened."""

    position: Any
    key: Key
    row: Mapping[str, Any] | None
    ts: float | None = None
