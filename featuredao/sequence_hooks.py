"""The sequence side of a DAO: events read per key, appended, typed (all optional).

``BaseDao`` mixes this in; an adapter with ``Capabilities.sequences`` overrides ``_fetch_events`` and
``_append_batch``, and ``BaseDao.read_partial`` hands a sequence view's chunks to ``_fetch_events``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from featuredao.errors import Unsupported, UsageError
from featuredao.sequence import Event, SequenceQuery, Sequencer
from featuredao.types import FeatureValue, Key

if TYPE_CHECKING:
    from featuredao.config import View


class SequenceHooks:
    """Public sequence operations over the adapter's hooks; the hooks raise ``Unsupported``."""

    if TYPE_CHECKING:  # provided by BaseDao
        view: View
        source: Any
        _sequencer: Sequencer | None
        _norm: Callable[[Any], Key]

        def _store_call(self, fn: Callable[..., Any], *args: Any) -> Any: ...
        def _unsupported(self, what: str) -> Unsupported: ...
        def _check_writable(self) -> None: ...

        @property
        def _batch_size(self) -> int: ...

    def _fetch_events(self, keys: list[Key], query: SequenceQuery,
                      timeout_s: float | None) -> Mapping[Key, Sequence[Event]]:
        """A sequence view's read of one chunk: per key, at most ``query.limit`` events of the window in the
        documented order (``featuredao.sequence.order_key``, highest first: newest first, ties included),
        as tuples in ``query``'s field order; keys without events may be left out."""
        raise self._unsupported("sequence")

    def _append_batch(self, events: list[tuple[Key, list[Event]]]) -> None:
        """Add one chunk of distinct keys' events (typed tuples in the sequence's field order)."""
        raise self._unsupported("sequence write")

    def sequence_query(self, as_of: float | None = None) -> SequenceQuery:
        """What this sequence view asks its store for a request at ``as_of`` (None: now)."""
        if self._sequencer is None:
            raise UsageError(f"view {self.view.name!r} is not a sequence view")
        return self._sequencer.query(as_of, self.source.capabilities.sequence_filters)

    def raw_sequence_reader(self) -> Callable[[list[Key], SequenceQuery], object] | None:
        """A sequence view's read written by hand with the raw driver (a benchmark baseline), if any:
        per key, the newest ``query.limit`` events of the window as one list per field."""
        return None

    def append(self, events: Iterable[tuple[Key, Mapping[str, FeatureValue]]]) -> int:
        """Add events to a sequence view, ``(key, {field: value})`` each, typed first; return the count."""
        if self._sequencer is None:
            raise UsageError(f"view {self.view.name!r} is a table view: write rows with upsert()")
        self._check_writable()
        grouped: dict[Key, list[Event]] = {}
        count = 0
        for key, values in events:
            grouped.setdefault(self._norm(key), []).append(self._sequencer.event(values))
            count += 1
        items = list(grouped.items())
        size = self._batch_size
        for i in range(0, len(items), size):
            self._store_call(self._append_batch, items[i:i + size])
        return count

    def sequencer_event(self, values: Mapping[str, Any]) -> Event:
        """One event of this sequence view, typed as ``append`` types it (raises CoercionError)."""
        if self._sequencer is None:
            raise UsageError(f"view {self.view.name!r} is a table view")
        return self._sequencer.event(values)
