"""Sequence views on ClickHouse: a MergeTree of events ordered by ``(key, time)``, read with ``LIMIT n BY``.

Layout (what ``prepare`` creates): ``(key, field...)``, the sequence's fields as plain (not Nullable)
columns (the time field among them), ``ENGINE = MergeTree ORDER BY (key, time)``: a plain MergeTree
keeps every event (duplicates too; a ReplacingMergeTree would collapse events of one key and time).
Small index granules (1024 rows) keep a batch of point lookups from reading much beyond its keys.

One statement per chunk of keys: ``WHERE key IN (...)`` with the window and the pushed event-type and
threshold filters, ``ORDER BY time DESC, item DESC, other fields DESC LIMIT n BY key`` (the documented tie
order, so the limit boundary agrees with the core; strings compare as bytes, i.e. by code point). Checked
on 18.16: ``LIMIT n BY`` exists there, but reading in the table's order does not (``optimize_read_in_order``
came in 19.x), so the server sorts the window's events of the chunk's keys; the granules read are only
those of the keys (the primary key prefix). ``retain`` is not applied (18.16 has no TTL for rows: trim
with ``ALTER TABLE ... DELETE`` outside featuredao).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from featuredao.config import View, quote_identifier
from featuredao.sequence import Event, SequenceQuery
from featuredao.types import Key

_TYPES = {"int": "Int64", "float": "Float64", "str": "String"}


def _q(name: str) -> str:
    return quote_identifier(name, "`")


class ClickHouseSequenceDao:
    """The sequence part of a ClickHouse view (mixed into ``ClickHouseDao``)."""

    source: Any  # the ClickHouseSource, typed in ClickHouseDao (importing it here would make a cycle)
    view: View
    _sequence_sql: dict[tuple[Any, ...], str] | None = None

    def _sequence_statement(self, query: SequenceQuery) -> str:
        """The chunk's statement for this shape of query (parameters: keys, since, until, events, m0...)."""
        shape = (query.since is None, query.until is None, bool(query.events and query.event_field),
                 tuple(name for name, _ in query.minimum), query.limit)
        cache = self._sequence_sql
        if cache is None:
            cache = self._sequence_sql = {}
        sql = cache.get(shape)
        if sql is None:
            spec = self.view.sequence
            assert spec is not None
            ts = _q(spec.time_field)
            where = [f"{_q(self.view.key)} IN %(keys)s"]
            if query.since is not None:
                where.append(f"{ts} >= %(since)s")
            if query.until is not None:
                where.append(f"{ts} <= %(until)s")
            if query.events and query.event_field:
                where.append(f"{_q(query.event_field)} IN %(events)s")
            where.extend(f"{_q(name)} >= %(m{i})s" for i, (name, _) in enumerate(query.minimum))
            fields = list(spec.fields)
            rest = [f for f in fields if f not in (spec.time_field, spec.item_field)]
            order = ", ".join(f"{_q(f)} DESC" for f in
                              [spec.time_field, *([spec.item_field] if spec.item_field else []), *rest])
            # The limit is an int from the core, inlined: 18.16 has no server-side parameters.
            key = _q(self.view.key)
            sql = cache[shape] = (
                f"SELECT {key}, {', '.join(_q(f) for f in fields)} FROM {_q(self.view.table)} "
                f"WHERE {' AND '.join(where)} ORDER BY {order} LIMIT {int(query.limit)} BY {key}")
        return sql

    def _sequence_params(self, keys: Sequence[Key], query: SequenceQuery) -> dict[str, Any]:
        spec = self.view.sequence
        assert spec is not None
        params: dict[str, Any] = {"keys": tuple(keys)}
        whole = spec.fields[spec.time_field] == "int"
        if query.since is not None:
            # Whole bounds for an integer column: the same rows, compared without a cast.
            params["since"] = math.ceil(query.since) if whole else query.since
        if query.until is not None:
            params["until"] = math.floor(query.until) if whole else query.until
        if query.events and query.event_field:
            params["events"] = tuple(query.events)
        for i, (_, low) in enumerate(query.minimum):
            params[f"m{i}"] = low
        return params

    def _fetch_events(self, keys: list[Key], query: SequenceQuery,
                      timeout_s: float | None) -> Mapping[Key, Sequence[Event]]:
        rows = self.source.query(self._sequence_statement(query), self._sequence_params(keys, query),
                                 timeout_s)
        out: dict[Key, list[Event]] = {}
        for r in rows:
            found = out.get(r[0])
            if found is None:
                out[r[0]] = found = []
            found.append(r[1:])
        return out

    def _append_batch(self, events: list[tuple[Key, list[Event]]]) -> None:
        spec = self.view.sequence
        assert spec is not None
        cols = ", ".join([_q(self.view.key), *(_q(f) for f in spec.fields)])
        self.source.execute(f"INSERT INTO {_q(self.view.table)} ({cols}) VALUES",
                            [(key, *event) for key, added in events for event in added])

    def _prepare_sequence(self) -> None:
        spec = self.view.sequence
        assert spec is not None
        key_type = "Int64" if self.view.key_type == "int" else "String"
        cols = [f"{_q(self.view.key)} {key_type}", *(f"{_q(f)} {_TYPES[t]}" for f, t in spec.fields.items())]
        self.source.execute(f"CREATE TABLE IF NOT EXISTS {_q(self.view.table)} ({', '.join(cols)}) "
                            f"ENGINE = MergeTree ORDER BY ({_q(self.view.key)}, {_q(spec.time_field)}) "
                            "SETTINGS index_granularity = 1024")

    def raw_sequence_reader(self) -> Callable[[list[Key], SequenceQuery], object] | None:
        """clickhouse-driver by hand on a Client of its own: the same statement, lists per field."""
        spec = self.view.sequence
        if spec is None:
            return None
        client = self.source._client()  # a plain Client outside the pool
        fields = list(spec.fields)
        table = ".".join(f"`{part}`" for part in self.view.table.split("."))
        key, ts = f"`{self.view.key}`", f"`{spec.time_field}`"
        order = ", ".join(f"`{f}` DESC" for f in
                          [spec.time_field, *([spec.item_field] if spec.item_field else []),
                           *(f for f in fields if f not in (spec.time_field, spec.item_field))])
        cols = ", ".join(f"`{f}`" for f in fields)
        whole = spec.fields[spec.time_field] == "int"

        def read(keys: list[Key], query: SequenceQuery) -> object:
            where, params = [f"{key} IN %(keys)s"], dict[str, Any](keys=tuple(keys))
            if query.since is not None:
                where.append(f"{ts} >= %(since)s")
                params["since"] = math.ceil(query.since) if whole else query.since
            if query.until is not None:
                where.append(f"{ts} <= %(until)s")
                params["until"] = math.floor(query.until) if whole else query.until
            if query.events and query.event_field:
                where.append(f"`{query.event_field}` IN %(events)s")
                params["events"] = tuple(query.events)
            for i, (name, low) in enumerate(query.minimum):
                where.append(f"`{name}` >= %(m{i})s")
                params[f"m{i}"] = low
            sql = (f"SELECT {key}, {cols} FROM {table} WHERE {' AND '.join(where)} "
                   f"ORDER BY {order} LIMIT {query.limit} BY {key}")
            out: dict[Any, list[list[Any]]] = {}
            for r in client.execute(sql, params):
                lists = out.get(r[0])
                if lists is None:
                    out[r[0]] = lists = [[] for _ in fields]
                for values, v in zip(lists, r[1:], strict=True):
                    values.append(v)
            return [dict(zip(fields, out[k], strict=True)) if k in out else None for k in keys]

        return read
