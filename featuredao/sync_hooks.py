"""The synchronization side of a DAO: scan, changes by watermark, delete, change feeds (all optional).

``BaseDao`` mixes this in; an adapter overrides the ``_..._batch`` hooks its capabilities promise
(``Capabilities.scan/changes/delete/change_feed``), and the sync engine calls the public methods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from featuredao.errors import Unsupported
from featuredao.ports import Change
from featuredao.types import Key, RawRows, Row


class SyncHooks:
    """Public sync operations, each mapped through the source's operation; hooks raise ``Unsupported``."""

    if TYPE_CHECKING:  # provided by BaseDao
        _norm: Callable[[Any], Key]
        _all_fields: list[str]

        def _store_call(self, fn: Callable[..., Any], *args: Any) -> Any: ...
        def _unsupported(self, what: str) -> Unsupported: ...
        def _call(self, keys: list[Key], fields: list[str], timeout_s: float | None) -> RawRows: ...
        def _write_batch(self, rows: list[tuple[Key, Row]]) -> None: ...
        def _check_writable(self) -> None: ...

        @property
        def _batch_size(self) -> int: ...

    # -- synchronization hooks (optional; see Capabilities.scan/changes/delete/change_feed) ---------
    def _scan_batch(self, after: Key | None, limit: int) -> list[tuple[Key, Mapping[str, Any]]]:
        """Up to ``limit`` rows with keys greater than ``after``, in key order: raw stored values."""
        raise self._unsupported("scan")

    def _changes_batch(self, column: str, after: tuple[Any, Key] | None,
                       limit: int) -> list[tuple[Any, Key, Mapping[str, Any]]]:
        """Up to ``limit`` (watermark, key, raw row) with (watermark, key) greater than ``after``, in that
        order; rows whose watermark is null are never returned."""
        raise self._unsupported("changes")

    def _delete_batch(self, keys: list[Key]) -> None:
        """Delete one chunk of distinct keys (absent keys are no error)."""
        raise self._unsupported("delete")

    def _install_feed(self) -> None:
        """Start recording changes of the view's table (idempotent)."""
        raise self._unsupported("change feed")

    def _feed_batch(self, after: Any, limit: int) -> list[Change]:
        """Up to ``limit`` changes after position ``after`` (None: from the start), in position order."""
        raise self._unsupported("change feed")

    def _feed_position(self) -> Any:
        """The position of the newest change recorded so far (None: nothing recorded)."""
        raise self._unsupported("change feed")

    def _ack_feed(self, position: Any) -> None:
        """Every consumer has applied the changes up to ``position``: the feed may drop them."""
        raise self._unsupported("change feed")

    # -- key ranges (optional: without them the core cuts and samples in Python, in the keys' natural order)
    def _split_points(self, n: int) -> list[Key] | None:
        """Up to ``n - 1`` stored keys splitting the keys into ``n`` ranges of about equal size, in scan
        order (None: the adapter cannot tell, so the caller samples a scan)."""
        return None

    def _scan_range_batch(self, after: Key | None, upper: Key,
                          limit: int) -> list[tuple[Key, Mapping[str, Any]]] | None:
        """``_scan_batch`` with keys also at most ``upper`` (None: not offered)."""
        return None

    def _changes_range_batch(self, column: str, after: tuple[Any, Key] | None, lower: Key | None,
                             upper: Key | None,
                             limit: int) -> list[tuple[Any, Key, Mapping[str, Any]]] | None:
        """``_changes_batch`` with keys in ``(lower, upper]`` (None bounds: open; None: not offered)."""
        return None

    def split_points(self, n: int) -> list[Key] | None:
        """Keys splitting the stored keys into ``n`` ranges (None: the adapter cannot tell)."""
        points: list[Key] | None = self._store_call(self._split_points, n)
        return points

    def scan(self, after: Key | None, limit: int,
             upper: Key | None = None) -> list[tuple[Key, Mapping[str, Any]]]:
        """Rows in key order with keys strictly greater than ``after`` (and at most ``upper``): raw stored
        values, every feature."""
        start = None if after is None else self._norm(after)
        rows: list[tuple[Key, Mapping[str, Any]]] | None = None
        if upper is not None:
            top = self._norm(upper)
            rows = self._store_call(self._scan_range_batch, start, top, limit)
            if rows is None:
                # Keys come in order: the first one past the bound ends the range (a short chunk).
                got = self._store_call(self._scan_batch, start, limit)
                cut = next((i for i, (k, _) in enumerate(got) if k > top), len(got))
                rows = got[:cut]
            return rows
        rows = self._store_call(self._scan_batch, start, limit)
        assert rows is not None
        return rows

    def changes(self, column: str, after: tuple[Any, Key] | None, limit: int, lower: Key | None = None,
                upper: Key | None = None) -> list[tuple[Any, Key, Mapping[str, Any]]]:
        """Rows ordered by (watermark ``column``, key), strictly after ``after``: ties are never skipped;
        with bounds, only keys in ``(lower, upper]``."""
        cursor = None if after is None else (after[0], self._norm(after[1]))
        rows: list[tuple[Any, Key, Mapping[str, Any]]] | None
        if lower is None and upper is None:
            rows = self._store_call(self._changes_batch, column, cursor, limit)
            assert rows is not None
            return rows
        low = None if lower is None else self._norm(lower)
        top = None if upper is None else self._norm(upper)
        rows = self._store_call(self._changes_range_batch, column, cursor, low, top, limit)
        if rows is not None:
            return rows
        # Filtered here: read on past rows of other ranges until the chunk is full or the source ends.
        out: list[tuple[Any, Key, Mapping[str, Any]]] = []
        while True:
            got: list[tuple[Any, Key, Mapping[str, Any]]] = self._store_call(self._changes_batch, column,
                                                                            cursor, limit)
            out.extend(r for r in got if (low is None or r[1] > low)  # type: ignore[operator]
                       and (top is None or r[1] <= top))  # type: ignore[operator]
            if len(out) >= limit or len(got) < limit:
                return out[:limit]
            cursor = (got[-1][0], got[-1][1])

    def delete(self, keys: Iterable[Key]) -> int:
        """Delete keys (absent ones are no error); return how many were asked for."""
        unique = list(dict.fromkeys(self._norm(k) for k in keys))
        size = self._batch_size
        for i in range(0, len(unique), size):
            self._store_call(self._delete_batch, unique[i:i + size])
        return len(unique)

    def lookup(self, keys: Sequence[Key]) -> RawRows:
        """Raw stored values of every feature of distinct keys (no coercion, no defaults)."""
        unique = list(dict.fromkeys(self._norm(k) for k in keys))
        return self._call(unique, self._all_fields, None) if unique else {}

    def write_checked(self, rows: Sequence[tuple[Key, Row]]) -> int:
        """Upsert rows already normalised and coerced to the view's types (one entry per key)."""
        self._check_writable()
        size = self._batch_size
        for i in range(0, len(rows), size):
            self._store_call(self._write_checked_batch, list(rows[i:i + size]))
        return len(rows)

    def _write_checked_batch(self, rows: list[tuple[Key, Row]]) -> None:
        """Write one chunk for ``write_checked`` (an adapter may offer a faster bulk path)."""
        self._write_batch(rows)

    def install_feed(self) -> None:
        """Start recording the table's changes (idempotent)."""
        self._store_call(self._install_feed)

    def feed(self, after: Any, limit: int) -> list[Change]:
        """Changes after ``after`` in position order; a deleted key comes with ``row=None``."""
        changes: list[Change] = self._store_call(self._feed_batch, after, limit)
        return changes

    def feed_position(self) -> Any:
        """The newest position of the change feed (None when empty)."""
        return self._store_call(self._feed_position)

    def ack_feed(self, position: Any) -> None:
        """Every consumer applied the changes up to ``position``."""
        self._store_call(self._ack_feed, position)
