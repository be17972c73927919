"""Coercion of stored values to declared feature types."""

from __future__ import annotations

from decimal import Decimal

import pytest

from featuredao.types import CoercionError, FeatureType, coerce, fits


@pytest.mark.parametrize(("raw", "ftype", "want"), [
    ("42", FeatureType.INT, 42), (b"-7", FeatureType.INT, -7), (3.0, FeatureType.INT, 3),
    (Decimal("12.50"), FeatureType.FLOAT, 12.5), ("0.25", FeatureType.FLOAT, 0.25),
    (1, FeatureType.FLOAT, 1.0),
    (b"caf\xc3\xa9", FeatureType.STR, "café"), (5, FeatureType.STR, "5"),
    (1, FeatureType.BOOL, True), ("false", FeatureType.BOOL, False), (b"1", FeatureType.BOOL, True),
    ("[1, 2]", FeatureType.LIST_INT, [1, 2]), ((0.5, 1), FeatureType.LIST_FLOAT, [0.5, 1.0]),
    ('["a","b"]', FeatureType.LIST_STR, ["a", "b"]), ("", FeatureType.LIST_STR, []),
    (None, FeatureType.INT, None),
])
def test_coerce(raw: object, ftype: FeatureType, want: object) -> None:
    got = coerce(raw, ftype)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize(("raw", "ftype"), [
    ("abc", FeatureType.INT), (2.5, FeatureType.INT), ("x", FeatureType.FLOAT), ("maybe", FeatureType.BOOL),
    (7, FeatureType.BOOL), ("[1,", FeatureType.LIST_INT), ('{"a": 1}', FeatureType.LIST_STR),
    ({"a": 1}, FeatureType.STR), (b"\xff", FeatureType.STR),
])
def test_coerce_rejects(raw: object, ftype: FeatureType) -> None:
    with pytest.raises(CoercionError):
        coerce(raw, ftype)


def test_fits() -> None:
    assert fits(0, FeatureType.FLOAT) and fits([1, 2], FeatureType.LIST_INT)
    assert not fits(True, FeatureType.INT) and not fits("1", FeatureType.INT)
    assert not fits([1, "a"], FeatureType.LIST_INT) and not fits(1, FeatureType.BOOL)
