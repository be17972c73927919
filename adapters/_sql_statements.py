"""The statements of one SQL view (wide or tall layout), built once per projection, and the tall pivot."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from featuredao.config import View, quote_identifier
from featuredao.types import FeatureType, FinalRow, Key, RawRows, Row

from ._sql_dialect import Dialect, SqlViewOptions


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def encode_text(value: Any) -> str | None:
    """A feature value as the text a tall table stores (the core's coercers read it back)."""
    if value is None or type(value) is str:
        return value
    if type(value) is bool:
        return "true" if value else "false"
    if type(value) is float:
        return repr(value)  # shortest text that reads back to the same float
    if isinstance(value, list):
        return _json(value)
    return str(value)


def pivot_tall(rows: Sequence[Sequence[Any]], with_time: bool) -> dict[Any, dict[str, Any]]:
    """Rows of (key, feature, value[, event time]) as {key: {feature: value}}; the newest time wins."""
    out: dict[Any, dict[str, Any]] = {}
    if not with_time:
        for key, feature, value in rows:
            found = out.get(key)
            if found is None:
                out[key] = {feature: value}
            else:
                found[feature] = value
        return out
    newest: dict[tuple[Any, str], Any] = {}
    for key, feature, value, at in rows:
        slot = (key, feature)
        if slot in newest:
            seen = newest[slot]
            # A row without a time never beats one with a time; ties keep the first row read.
            if at is None or (seen is not None and at <= seen):
                continue
        newest[slot] = at
        found = out.get(key)
        if found is None:
            out[key] = {feature: value}
        else:
            found[feature] = value
    return out


# Per projection: the exact Python type of each column (the key last), and (index, element types) of lists.
_Exact = tuple[tuple[type[Any], ...], list[tuple[int, set[type[Any]]]]]


def _int_to_bool(value: Any) -> Any:
    # Only 0 and 1 are booleans; anything else is left for the core to reject (and report).
    return _BOOLS.get(value, value) if type(value) is int else value


_BOOLS = {0: False, 1: True}


def _json_list(value: Any) -> Any:
    # Text that is not JSON stays as it is: the core's coercion reports it.
    try:
        return json.loads(value)
    except (ValueError, TypeError):
        return value


def decode_key(key: Any) -> Any:
    """A key as the store returned it, bytes as text."""
    return bytes(key).decode() if isinstance(key, bytes | bytearray | memoryview) else key


class SqlStatements:
    """Every statement one view needs, built once per projection and reused."""

    def __init__(self, view: View, dialect: Dialect) -> None:
        self.view = view
        self.dialect = dialect
        opts: SqlViewOptions = view.options if isinstance(view.options, SqlViewOptions) else SqlViewOptions()
        self.options = opts
        self.tall = opts.layout == "tall"
        self.with_time = self.tall and opts.event_time_column is not None
        q = self.quote
        self.table = q(view.table)
        self.key = q(view.key)
        self._selects: dict[tuple[str, ...], str] = {}
        self._exacts: dict[tuple[str, ...], _Exact] = {}
        fields = list(view.features)
        if self.tall:
            self.feature_col = q(opts.feature_column)
            self.value_col = q(opts.value_column)
            self.time_col = q(opts.event_time_column) if opts.event_time_column else None
            cols = [self.key, self.feature_col, self.value_col]
            # With an event time every write adds a version (the time column defaults to "now").
            conflict = [self.key, self.feature_col, *([self.time_col] if self.time_col else [])]
            self.upsert_sql = self._insert(cols, conflict, [self.value_col])
        else:
            cols = [self.key, *(q(f) for f in fields)]
            self.upsert_sql = self._insert(cols, [self.key], cols[1:])
        self._json = {f for f, t in view.features.items() if t.is_list} if dialect.lists_as_json else set()

    def quote(self, name: str) -> str:
        """Quote a validated identifier for this dialect."""
        return quote_identifier(name, self.dialect.quote)

    def _insert(self, cols: list[str], conflict: list[str], update: list[str]) -> str:
        marks = ", ".join(["%s"] * len(cols))
        tail = self.dialect.upsert(", ".join(conflict), update)
        return f"INSERT INTO {self.table} ({', '.join(cols)}) VALUES ({marks}) {tail}"

    # -- reads -------------------------------------------------------------------------------
    def select(self, fields: list[str]) -> str:
        """The SELECT for one projection: parameters are (keys) for wide, (keys, features) for tall."""
        sql = self._selects.get(tuple(fields))
        if sql is None:
            d = self.dialect
            if self.tall:
                cols = [self.key, self.feature_col, self.value_col]
                if self.time_col:
                    cols.append(self.time_col)
                sql = (f"SELECT {', '.join(cols)} FROM {self.table} "
                       f"WHERE {d.in_keys(self.key)} AND {d.in_keys(self.feature_col)}")
            else:
                # The key goes last so rows zip with the feature names without slicing.
                cols = [*(self.quote(f) for f in fields), self.key]
                sql = f"SELECT {', '.join(cols)} FROM {self.table} WHERE {d.in_keys(self.key)}"
            self._selects[tuple(fields)] = sql
        return sql

    def params(self, keys: list[Key], fields: list[str]) -> tuple[Any, ...]:
        """The parameters of :meth:`select`."""
        bind = self.dialect.bind_list
        return (bind(keys), bind(fields)) if self.tall else (bind(keys),)

    def decode(self, rows: Sequence[Sequence[Any]], fields: list[str]) -> RawRows:
        """Rows as returned by :meth:`select` as {key: {feature: stored value}}."""
        if not rows:
            return {}
        if self.tall:
            out = pivot_tall(rows, self.with_time)
            if isinstance(rows[0][0], bytes | bytearray | memoryview):
                return {decode_key(k): v for k, v in out.items()}
            return out
        exact, lists = self._exact(fields)
        converters = self._converters(fields)
        found: dict[Any, dict[str, Any]] = {}
        for r in rows:
            if converters:
                r = list(r)
                for i, convert in converters:
                    if r[i] is not None:
                        r[i] = convert(r[i])
            # Column types compared in C (a NULL is NoneType, so it never matches); list elements
            # only for list features.
            final = tuple(map(type, r)) == exact
            if final:
                for i, allowed in lists:
                    if not set(map(type, r[i])) <= allowed:
                        final = False
            found[r[-1]] = FinalRow(zip(fields, r, strict=False)) if final \
                else dict(zip(fields, r, strict=False))
        if isinstance(rows[-1][-1], bytes | bytearray | memoryview):  # a binary key column
            return {decode_key(k): v for k, v in found.items()}
        return found

    def _converters(self, fields: list[str]) -> list[tuple[int, Callable[[Any], Any]]]:
        """Columns the store returns untyped (MySQL: booleans as 0/1, lists as JSON text)."""
        d, features = self.dialect, self.view.features
        out: list[tuple[int, Callable[[Any], Any]]] = []
        for i, f in enumerate(fields):
            if d.bools_as_int and features[f] is FeatureType.BOOL:
                out.append((i, _int_to_bool))
            elif d.lists_as_json and features[f].is_list:
                out.append((i, _json_list))
        return out

    def _exact(self, fields: list[str]) -> _Exact:
        found = self._exacts.get(tuple(fields))
        if found is None:
            types = [self.view.features[f] for f in fields]
            key_type = int if self.view.key_type == "int" else str
            found = ((*(t.python for t in types), key_type),
                     [(i, {t.element.python}) for i, t in enumerate(types) if t.is_list])
            self._exacts[tuple(fields)] = found
        return found

    # -- writes ------------------------------------------------------------------------------
    def upsert_params(self, rows: list[tuple[Key, Row]]) -> list[tuple[Any, ...]]:
        """Parameters of :attr:`upsert_sql`, one tuple per stored row."""
        fields = list(self.view.features)
        if self.tall:
            return [(key, f, encode_text(row.get(f))) for key, row in rows for f in fields]
        if not self._json:
            return [(key, *(row.get(f) for f in fields)) for key, row in rows]
        js = self._json
        out = []
        for key, row in rows:
            values = [row.get(f) for f in fields]
            out.append((key, *(_json(v) if v is not None and f in js else v
                               for f, v in zip(fields, values, strict=True))))
        return out

    # -- synchronization (wide layout) ------------------------------------------------------
    def scan_sql(self, first: bool) -> str:
        """Rows in key order after a key (parameters: [after,] limit): key first, then every feature."""
        cols = ", ".join([self.key, *(self.quote(f) for f in self.view.features)])
        where = "" if first else f"WHERE {self.key} > %s "
        return f"SELECT {cols} FROM {self.table} {where}ORDER BY {self.key} LIMIT %s"

    def changes_sql(self, watermark: str, first: bool) -> str:
        """Rows ordered by (watermark, key) strictly after a pair (parameters: [w, w, key,] limit)."""
        wm = self.quote(watermark)
        cols = ", ".join([wm, self.key, *(self.quote(f) for f in self.view.features)])
        where = f"WHERE {wm} IS NOT NULL"
        if not first:
            # Expanded rather than a row comparison: both servers use the (watermark, key) index for it.
            where += f" AND ({wm} > %s OR ({wm} = %s AND {self.key} > %s))"
        return f"SELECT {cols} FROM {self.table} {where} ORDER BY {wm}, {self.key} LIMIT %s"

    def delete_sql(self) -> str:
        """DELETE of a bound list of keys (one parameter)."""
        return f"DELETE FROM {self.table} WHERE {self.dialect.in_keys(self.key)}"

    def raw_row(self, values: Sequence[Any]) -> dict[str, Any]:
        """Feature values in view order as a dict of stored values (JSON lists and 0/1 booleans decoded)."""
        fields = list(self.view.features)
        row = dict(zip(fields, values, strict=True))
        for i, convert in self._converters(fields):
            f = fields[i]
            if row[f] is not None:
                row[f] = convert(row[f])
        return row

    def create_table(self) -> str:
        """CREATE TABLE IF NOT EXISTS for the view's layout."""
        d = self.dialect
        key = f"{self.key} {d.key_types[self.view.key_type]} NOT NULL"
        if self.tall:
            cols = [key, f"{self.feature_col} {d.name_type} NOT NULL", f"{self.value_col} {d.text_type}"]
            pk = [self.key, self.feature_col]
            if self.time_col:
                cols.append(f"{self.time_col} {d.time_type}")
                pk.append(self.time_col)
        else:
            cols = [key, *(f"{self.quote(f)} {d.types[t]}" for f, t in self.view.features.items())]
            pk = [self.key]
        body = ", ".join([*cols, f"PRIMARY KEY ({', '.join(pk)})"])
        return f"CREATE TABLE IF NOT EXISTS {self.table} ({body}){d.table_suffix}"
