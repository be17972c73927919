"""The synchronization hooks of a ClickHouse view (wide layout): scan by key windows, changes by watermark."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from featuredao.config import View
from featuredao.errors import Unsupported
from featuredao.types import Key

from ._clickhouse_table import Layout, q


class ClickHouseSyncDao:
    """The sync part of a ClickHouse view (mixed into ``ClickHouseDao``)."""

    source: Any  # the ClickHouseSource, typed in ClickHouseDao (importing it here would make a cycle)
    view: View
    _tall: bool
    _table: str
    _key: str
    # The last scan probe: (after, upper, distinct keys in order, their positions, reached the end).
    _probe: tuple[Key | None, Key | None, list[Key], dict[Key, int], bool] | None = None

    if TYPE_CHECKING:  # provided by ClickHouseDao and BaseDao
        def _layout(self, timeout_s: float | None) -> Layout: ...
        def _unsupported(self, what: str) -> Unsupported: ...

    def _wide_rows(self, layout: Layout, rows: list[Any], skip: int) -> list[tuple[Key, dict[str, Any]]]:
        """Rows of (prefix columns..., key, features..., [nulls]) as (key, stored values)."""
        fields = list(self.view.features)
        out = []
        for r in rows:
            got = dict(zip(fields, r[skip + 1:skip + 1 + len(fields)], strict=True))
            if layout.nulls is not None:
                for name in r[-1]:
                    if name in got:
                        got[name] = None
            out.append((r[skip], got))
        return out

    def _sync_select(self, layout: Layout, prefix: str, where: str, order: str) -> str:
        if self._tall:
            raise self._unsupported("scan (layout 'tall')")
        cols = [prefix, self._key, *(q(f) for f in self.view.features)]
        if layout.nulls is not None:
            cols.append(layout.nulls)
        return (f"SELECT {', '.join(c for c in cols if c)} FROM {self._table}{layout.final} {where} "
                f"ORDER BY {order} LIMIT %(limit)s")

    # Scans read key windows, never the rest of the table: 18.16 cannot stop a FINAL (or an ORDER BY key
    # LIMIT) early, so a keyset chunk of "key > after" read every later row again (quadratic in size). A
    # probe of the key column alone finds the bounds of the next windows of `limit` distinct keys; each
    # chunk then reads only its window's granules, and takes each key's newest version itself (LIMIT 1 BY
    # over key, version desc: FINAL's answer without FINAL's merge of the whole range).
    _PROBE_CHUNKS = 16

    def _scan_batch(self, after: Key | None, limit: int) -> list[tuple[Key, Mapping[str, Any]]]:
        return self._scan_windows(after, None, limit)

    def _scan_range_batch(self, after: Key | None, upper: Key,
                          limit: int) -> list[tuple[Key, Mapping[str, Any]]] | None:
        return self._scan_windows(after, upper, limit)

    def _split_points(self, n: int) -> list[Key] | None:
        if self._tall:
            raise self._unsupported("scan (layout 'tall')")
        count = self.source.query(f"SELECT uniqExact({self._key}) FROM {self._table}", {}, None)[0][0]
        sql = (f"SELECT {self._key} FROM {self._table} GROUP BY {self._key} ORDER BY {self._key} "
               "LIMIT 1 OFFSET %(at)s")
        points: list[Key] = []
        for i in range(1, n):
            at = (i * int(count)) // n - 1
            if at >= 0:
                points.extend(r[0] for r in self.source.query(sql, {"at": at}, None))
        return points

    def _scan_windows(self, after: Key | None, upper: Key | None,
                      limit: int) -> list[tuple[Key, Mapping[str, Any]]]:
        layout = self._layout(None)
        if self._tall:
            raise self._unsupported("scan (layout 'tall')")
        out: list[tuple[Key, Mapping[str, Any]]] = []
        while len(out) < limit:
            bound, last = self._window(after, upper, limit - len(out))
            top = upper if bound is None else bound
            conds = ([] if after is None else [f"{self._key} > %(after)s"]) + \
                ([] if top is None else [f"{self._key} <= %(top)s"])
            where = f"WHERE {' AND '.join(conds)} " if conds else ""
            cols = [self._key, *(q(f) for f in self.view.features)]
            if layout.nulls is not None:
                cols.append(layout.nulls)
            if layout.final and layout.version is not None:
                sql = (f"SELECT {', '.join(cols)} FROM {self._table} {where}"
                       f"ORDER BY {self._key}, {layout.version} DESC LIMIT 1 BY {self._key}")
            else:  # no version to order by: the engine's own FINAL (or none), bounded to the window
                sql = f"SELECT {', '.join(cols)} FROM {self._table}{layout.final} {where}ORDER BY {self._key}"
            rows = self.source.query(sql, {"after": after, "top": top}, None)
            out.extend(self._wide_rows(layout, rows, 0))
            if last:
                break
            after = bound
        return out

    def _window(self, after: Key | None, upper: Key | None, want: int) -> tuple[Key | None, bool]:
        """The bound of the window of the next ``want`` distinct keys after ``after`` (None: up to
        ``upper``), and whether it is the last window. Probed keys are cached: the next call starts at
        this bound, so one probe serves ``_PROBE_CHUNKS`` chunks."""
        cached = self._probe
        start = -1
        if cached is not None and cached[1] == upper:
            origin, _, keys, at, complete = cached
            start = 0 if after == origin else at.get(after, -2) + 1  # type: ignore[arg-type]
        if start < 0 or (len(keys) - start < want and not complete):
            probe = self._PROBE_CHUNKS * want
            conds = ([] if after is None else [f"{self._key} > %(after)s"]) + \
                ([] if upper is None else [f"{self._key} <= %(upper)s"])
            where = f"WHERE {' AND '.join(conds)} " if conds else ""
            sql = f"SELECT {self._key} FROM {self._table} {where}ORDER BY {self._key} LIMIT %(probe)s"
            raw = [r[0] for r in self.source.query(sql, {"after": after, "upper": upper, "probe": probe},
                                                   None)]
            keys = [k for i, k in enumerate(raw) if i == 0 or k != raw[i - 1]]
            at, complete, start = {k: i for i, k in enumerate(keys)}, len(raw) < probe, 0
            self._probe = (after, upper, keys, at, complete)
        left = len(keys) - start
        if left >= want:
            return keys[start + want - 1], False
        if complete:
            return None, True
        return keys[-1], False  # keys with many unmerged versions filled the probe: a short window

    def _changes_batch(self, column: str, after: tuple[Any, Key] | None,
                       limit: int) -> list[tuple[Any, Key, Mapping[str, Any]]]:
        layout = self._layout(None)
        wm = q(column)
        where = f"WHERE {wm} IS NOT NULL"
        if after is not None:
            where += f" AND ({wm} > %(w)s OR ({wm} = %(w)s AND {self._key} > %(after)s))"
        sql = self._sync_select(layout, wm, where, f"{wm}, {self._key}")
        params = {"limit": limit, "w": None if after is None else after[0],
                  "after": None if after is None else after[1]}
        rows = self.source.query(sql, params, None)
        return [(r[0], k, row) for r, (k, row) in zip(rows, self._wide_rows(layout, rows, 1), strict=True)]
