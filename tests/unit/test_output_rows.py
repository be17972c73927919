"""The request's output rows: one dict per row, renamed, defaults where a value is null or the row missing."""

from __future__ import annotations

from fakes import make_view

from featuredao.request import output_rows, shape
from featuredao.types import FinalRow


def test_typed_rows_are_renamed_in_their_order() -> None:
    view = make_view("v", prefix="p_")
    rows = [FinalRow(a=1, b="x"), FinalRow(a=2, b="y")]
    assert output_rows(shape(view), rows) == [{"p_a": 1, "p_b": "x"}, {"p_a": 2, "p_b": "y"}]
    assert output_rows(shape(make_view("v")), rows) == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]


def test_rows_never_share_a_dict_with_the_answer() -> None:
    rows = [FinalRow(a=1, b="x")]
    out = output_rows(shape(make_view("v")), rows)
    out[0]["a"] = 5  # derived features and callers write into the output: a cached row must not change
    assert rows[0]["a"] == 1


def test_missing_rows_and_nulls_get_defaults_beside_typed_rows() -> None:
    view = make_view("v", prefix="p_")  # defaults: a = -1
    rows = [FinalRow(a=1, b="x"), None, {"b": "z"}, {"a": None, "b": None}]
    assert output_rows(shape(view), rows) == [
        {"p_a": 1, "p_b": "x"}, {"p_a": -1, "p_b": None}, {"p_a": -1, "p_b": "z"}, {"p_a": -1, "p_b": None}]
