"""Column conditions and filters of the local TableStore server: evaluation of the SDK's ``Filter``
protobufs (single and composite column conditions, regex value transfer rules) against a row's
cells, and column pagination."""

from __future__ import annotations

import re
from typing import Any

import tablestore.protobuf.table_store_filter_pb2 as filter_pb

from featuredao.testing.tablestore import plainbuffer as pbuf
from featuredao.testing.tablestore.errors import _param_invalid
from featuredao.testing.tablestore.model import Versions
from featuredao.testing.tablestore.plainbuffer import ColumnValue


def _compare(comparator: int, actual: ColumnValue, expected: ColumnValue) -> bool:
    def kind(v: ColumnValue) -> str:
        if isinstance(v, bool):
            return "bool"
        if isinstance(v, int | float):
            return "num"
        return "str" if isinstance(v, str) else "bytes"

    if kind(actual) != kind(expected):
        return bool(comparator == filter_pb.CT_NOT_EQUAL)
    a: Any = actual
    e: Any = expected
    if comparator == filter_pb.CT_EQUAL:
        return bool(a == e)
    if comparator == filter_pb.CT_NOT_EQUAL:
        return bool(a != e)
    if comparator == filter_pb.CT_GREATER_THAN:
        return bool(a > e)
    if comparator == filter_pb.CT_GREATER_EQUAL:
        return bool(a >= e)
    if comparator == filter_pb.CT_LESS_THAN:
        return bool(a < e)
    if comparator == filter_pb.CT_LESS_EQUAL:
        return bool(a <= e)
    raise _param_invalid(f"Unsupported comparator: {comparator}")


def _transfer(value: ColumnValue, rule: Any) -> ColumnValue | None:
    if not isinstance(value, str):
        return None
    try:
        match = re.search(rule.regex, value)
    except re.error as exc:
        raise _param_invalid(f"Invalid regex in column condition: {exc}") from exc
    if match is None:
        return None
    text = match.group(1) if match.groups() else match.group(0)
    cast = rule.cast_type if rule.HasField("cast_type") else filter_pb.VT_STRING
    try:
        if cast == filter_pb.VT_INTEGER:
            return int(text)
        if cast == filter_pb.VT_DOUBLE:
            return float(text)
    except ValueError:
        return None
    return text


def _eval_filter(raw: bytes, columns: dict[str, Versions]) -> bool:
    flt = filter_pb.Filter()
    try:
        flt.ParseFromString(raw)
    except Exception as exc:
        raise _param_invalid(f"Invalid filter: {exc}") from exc
    if flt.type == filter_pb.FT_SINGLE_COLUMN_VALUE:
        single = filter_pb.SingleColumnValueFilter()
        single.ParseFromString(flt.filter)
        versions = columns.get(single.column_name, [])
        if single.latest_version_only:
            versions = versions[:1]
        if single.comparator == filter_pb.CT_EXIST:
            return bool(versions)
        if single.comparator == filter_pb.CT_NOT_EXIST:
            return not versions
        try:
            expected = pbuf.decode_column_value(single.column_value)
        except pbuf.PlainBufferError as exc:
            raise _param_invalid(f"Invalid column condition value: {exc}") from exc
        values: list[ColumnValue] = []
        for _, value in versions:
            if single.HasField("value_trans_rule"):
                transferred = _transfer(value, single.value_trans_rule)
                if transferred is not None:
                    values.append(transferred)
            else:
                values.append(value)
        if not values:
            return not single.filter_if_missing
        return any(_compare(single.comparator, v, expected) for v in values)
    if flt.type == filter_pb.FT_COMPOSITE_COLUMN_VALUE:
        comp = filter_pb.CompositeColumnValueFilter()
        comp.ParseFromString(flt.filter)
        results = [_eval_filter(sub.SerializeToString(), columns) for sub in comp.sub_filters]
        if comp.combinator == filter_pb.LO_NOT:
            if len(results) != 1:
                raise _param_invalid("NOT condition must have exactly one sub condition.")
            return not results[0]
        if comp.combinator == filter_pb.LO_AND:
            return all(results)
        return any(results)
    if flt.type == filter_pb.FT_COLUMN_PAGINATION:
        return True
    raise _param_invalid(f"Unsupported filter type: {flt.type}")


def _pagination(raw: bytes) -> tuple[int, int] | None:
    flt = filter_pb.Filter()
    flt.ParseFromString(raw)
    if flt.type != filter_pb.FT_COLUMN_PAGINATION:
        return None
    page = filter_pb.ColumnPaginationFilter()
    page.ParseFromString(flt.filter)
    return page.offset, page.limit
