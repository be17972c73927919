"""The subset of the HBase filter language the local server supports (``TScan.filterString``): a
parser that turns a filter string into a chain of row/cell transforms, with paging and an inclusive
stop row."""

from __future__ import annotations

import re
import struct
from collections.abc import Callable

from featuredao.testing.hbase.idl import _io_error, _text
from featuredao.testing.hbase.model import _Cell

_TOKEN_RE = re.compile(
    r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<op><=|>=|!=|=|<|>)|(?P<punct>[(),])|(?P<word>[A-Za-z_][A-Za-z0-9_]*|-?\d+))"
)
_OPS: dict[str, Callable[[int], bool]] = {
    "<": lambda c: c < 0,
    "<=": lambda c: c <= 0,
    "=": lambda c: c == 0,
    "!=": lambda c: c != 0,
    ">": lambda c: c > 0,
    ">=": lambda c: c >= 0,
}


def _unsupported_filter(message: str) -> Exception:
    return _io_error(f"IllegalArgumentException: {message}")


def _cmp(a: bytes, b: bytes) -> int:
    return (a > b) - (a < b)


def _make_comparator(op: str, spec: bytes) -> Callable[[bytes], bool]:
    """Return ``predicate(cell_bytes)`` for ``cell_bytes OP comparator``."""
    if op not in _OPS:
        raise _unsupported_filter(f"unknown compare operator {op!r}")
    test = _OPS[op]
    kind, sep, operand = spec.partition(b":")
    if not sep:
        raise _unsupported_filter(f"comparator {_text(spec)!r} needs a 'type:value' form")
    kind = kind.lower()
    if kind == b"binary":
        return lambda value: test(_cmp(value, operand))
    if kind == b"binaryprefix":
        return lambda value: test(_cmp(value[: len(operand)], operand))
    if kind in (b"substring", b"regexstring"):
        if op not in ("=", "!="):
            raise _unsupported_filter(f"{_text(kind)} comparator only supports = and !=")
        if kind == b"substring":
            needle = operand.lower()

            def matches(value: bytes) -> bool:
                return needle in value.lower()
        else:
            pattern = re.compile(operand)

            def matches(value: bytes) -> bool:
                return pattern.search(value) is not None

        return (lambda value: matches(value)) if op == "=" else (lambda value: not matches(value))
    raise _unsupported_filter(f"unsupported comparator type {_text(kind)!r}")


class _FilterChain:
    """A parsed filter string: row/cell transforms applied in order, plus paging."""

    def __init__(self, filter_string: bytes | str | None) -> None:
        # each step: (row, cells) -> cells, or None to drop the row
        self.steps: list[Callable[[bytes, list[_Cell]], list[_Cell] | None]] = []
        self.page_size: int | None = None
        # rows after which the scan ends (InclusiveStopFilter)
        self.stop_after: bytes | None = None
        if filter_string:
            raw = filter_string.encode("latin-1") if isinstance(filter_string, str) else filter_string
            self._parse(raw.decode("latin-1"))

    # -- parsing
    def _parse(self, text: str) -> None:
        tokens: list[tuple[str, str]] = []
        pos = 0
        stripped_len = len(text.rstrip())
        while pos < stripped_len:
            m = _TOKEN_RE.match(text, pos)
            if m is None or m.end() == pos:
                raise _unsupported_filter(f"cannot parse filter string at {text[pos:]!r}")
            kind = m.lastgroup or ""
            tokens.append((kind, m.group(kind)))
            pos = m.end()
        i = 0
        while True:
            if i >= len(tokens) or tokens[i][0] != "word":
                raise _unsupported_filter(f"expected a filter name in {text!r}")
            name = tokens[i][1]
            if i + 1 >= len(tokens) or tokens[i + 1] != ("punct", "("):
                raise _unsupported_filter(f"expected '(' after {name} in {text!r}")
            i += 2
            args: list[tuple[str, str]] = []
            while i < len(tokens) and tokens[i] != ("punct", ")"):
                if tokens[i] != ("punct", ","):
                    args.append(tokens[i])
                i += 1
            if i >= len(tokens):
                raise _unsupported_filter(f"missing ')' in {text!r}")
            i += 1
            self._add(name, args)
            if i == len(tokens):
                return
            if tokens[i] == ("word", "AND"):
                i += 1
                continue
            raise _unsupported_filter(
                f"only 'AND' combinations are supported by the local server, got {tokens[i][1]!r}"
            )

    @staticmethod
    def _bytes_arg(arg: tuple[str, str], name: str) -> bytes:
        kind, value = arg
        if kind != "str":
            raise _unsupported_filter(f"{name} expects quoted string arguments")
        return value[1:-1].replace("''", "'").encode("latin-1")

    @staticmethod
    def _int_arg(arg: tuple[str, str], name: str) -> int:
        kind, value = arg
        if kind != "word" or not value.lstrip("-").isdigit():
            raise _unsupported_filter(f"{name} expects an integer argument")
        return int(value)

    @staticmethod
    def _bool_arg(arg: tuple[str, str], name: str) -> bool:
        kind, value = arg
        if kind != "word" or value.lower() not in ("true", "false"):
            raise _unsupported_filter(f"{name} expects a boolean argument")
        return value.lower() == "true"

    def _add(self, name: str, args: list[tuple[str, str]]) -> None:
        def arity(*counts: int) -> None:
            if len(args) not in counts:
                raise _unsupported_filter(f"{name} takes {' or '.join(map(str, counts))} arguments")

        def op_arg(arg: tuple[str, str]) -> str:
            if arg[0] != "op":
                raise _unsupported_filter(f"{name} expects a compare operator")
            return arg[1]

        if name == "PrefixFilter":
            arity(1)
            prefix = self._bytes_arg(args[0], name)
            self.steps.append(lambda row, cells: cells if row.startswith(prefix) else None)
        elif name == "InclusiveStopFilter":
            arity(1)
            stop = self._bytes_arg(args[0], name)
            self.stop_after = stop
            self.steps.append(lambda row, cells: cells if row <= stop else None)
        elif name in ("RowFilter", "FamilyFilter", "QualifierFilter", "ValueFilter"):
            arity(2)
            pred = _make_comparator(op_arg(args[0]), self._bytes_arg(args[1], name))
            if name == "RowFilter":
                self.steps.append(lambda row, cells: cells if pred(row) else None)
            else:
                part: Callable[[_Cell], bytes] = {
                    "FamilyFilter": lambda c: c[0],
                    "QualifierFilter": lambda c: c[1],
                    "ValueFilter": lambda c: c[3],
                }[name]
                self.steps.append(lambda row, cells: [c for c in cells if pred(part(c))])
        elif name == "ColumnPrefixFilter":
            arity(1)
            prefix = self._bytes_arg(args[0], name)
            self.steps.append(lambda row, cells: [c for c in cells if c[1].startswith(prefix)])
        elif name == "MultipleColumnPrefixFilter":
            if not args:
                raise _unsupported_filter(f"{name} needs at least one prefix")
            prefixes = tuple(self._bytes_arg(a, name) for a in args)
            self.steps.append(lambda row, cells: [c for c in cells if c[1].startswith(prefixes)])
        elif name == "KeyOnlyFilter":
            arity(0, 1)
            len_as_value = self._bool_arg(args[0], name) if args else False

            def key_only(row: bytes, cells: list[_Cell]) -> list[_Cell]:
                return [
                    (f, q, ts, struct.pack(">i", len(v)) if len_as_value else b"") for f, q, ts, v in cells
                ]

            self.steps.append(key_only)
        elif name == "FirstKeyOnlyFilter":
            arity(0)
            self.steps.append(lambda row, cells: cells[:1])
        elif name == "ColumnCountGetFilter":
            arity(1)
            limit = self._int_arg(args[0], name)
            self.steps.append(lambda row, cells: cells[:limit])
        elif name == "PageFilter":
            arity(1)
            size = self._int_arg(args[0], name)
            self.page_size = size if self.page_size is None else min(size, self.page_size)
        elif name == "SingleColumnValueFilter":
            arity(4, 6)
            family = self._bytes_arg(args[0], name)
            qualifier = self._bytes_arg(args[1], name)
            pred = _make_comparator(op_arg(args[2]), self._bytes_arg(args[3], name))
            filter_if_missing = self._bool_arg(args[4], name) if len(args) == 6 else False

            def single_column_value(row: bytes, cells: list[_Cell]) -> list[_Cell] | None:
                for f, q, _ts, v in cells:
                    if f == family and q == qualifier:
                        return cells if pred(v) else None
                return None if filter_if_missing else cells

            self.steps.append(single_column_value)
        else:
            raise _unsupported_filter(f"filter {name!r} is not supported by the local HBase server")

    def apply(self, row: bytes, cells: list[_Cell]) -> list[_Cell] | None:
        current: list[_Cell] | None = cells
        for step in self.steps:
            if not current:
                return None
            current = step(row, current)
        return current or None
