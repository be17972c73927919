"""Bad keys cost the key, not the request: validation at the API, on the in-memory adapter (no server)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featuredao import (
    ArgumentTypeError,
    FeatureService,
    InvalidKeyError,
    Reason,
    UnknownView,
    UsageError,
    build,
)
from featuredao.keys import MAX_KEY_LENGTH, normaliser

_stores = itertools.count()
FEATURES = {"a": "int", "b": "str"}


def config(shared: str, **service: Any) -> dict[str, Any]:
    return {
        "sources": {"mem": {"type": "memory", "shared": shared}},
        "views": [
            {"name": "users", "entity": "user", "source": "mem", "table": "users", "key": "id",
             "features": FEATURES, "prefix": "u_", "timeout_ms": 5000},
            {"name": "items", "entity": "item", "source": "mem", "table": "items", "key": "id",
             "key_type": "int", "features": FEATURES, "defaults": {"a": -1}, "timeout_ms": 5000},
        ],
        # Generous: these tests are about keys; a loaded machine must not turn a read into a timeout.
        "service": {"deadline_ms": 5000, **service},
    }


@pytest.fixture
def service() -> Iterator[FeatureService]:
    cfg = config(f"keys{next(_stores)}")
    runtime = build(cfg)
    for dao in runtime.daos.values():
        dao.prepare()
    runtime.daos["users"].upsert([("u1", {"a": 7, "b": "x"})])
    runtime.daos["items"].upsert([(i, {"a": i, "b": f"i{i}"}) for i in range(10)])
    runtime.close()
    with FeatureService.from_config(cfg) as svc:
        yield svc


@pytest.mark.parametrize("bad", [None, 1.5, True, [1, 2], float("nan"), 10 ** 30, b"1", "abc", "1_000",
                                 float("inf"), {"a": 1}, (1,), 2 ** 63])
def test_a_bad_item_costs_that_item_only(service: FeatureService, bad: Any,
                                         caplog: pytest.LogCaptureFixture) -> None:
    result = service.fetch("u1", [1, bad, 2])
    assert result.items[0]["a"] == 1 and result.items[2]["a"] == 2
    assert result.items[1] == {"a": -1, "b": None}
    assert result.user == {"u_a": 7, "u_b": "x"}
    [entry] = result.degraded
    assert entry.view == "items" and entry.reason is Reason.INVALID_KEY and len(entry.keys) == 1
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) <= 1 and not any(r.exc_info for r in caplog.records)


def test_integral_floats_and_digit_strings_are_int_keys(service: FeatureService) -> None:
    result = service.fetch(None, [3.0, "4", " 5 "])
    assert [i["a"] for i in result.items] == [3, 4, 5] and result.degraded == []


def test_text_keys_longer_than_the_maximum_are_invalid(service: FeatureService) -> None:
    result = service.fetch("u" * (MAX_KEY_LENGTH + 1), [1])
    assert [d.reason for d in result.degraded] == [Reason.INVALID_KEY]
    assert result.items[0]["a"] == 1


def test_strict_mode_names_the_view_and_the_keys(service: FeatureService) -> None:
    with pytest.raises(InvalidKeyError, match="items") as info:
        service.fetch(None, [1, None], strict=True)
    assert info.value.keys == {"items": ["None"]}


def test_argument_shapes(service: FeatureService) -> None:
    with pytest.raises(ArgumentTypeError, match="not one str"):
        service.fetch(None, "123")  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError):
        service.fetch(None, b"12")  # type: ignore[arg-type]
    generated = service.fetch(None, (i for i in range(3)))
    assert [i["a"] for i in generated.items] == [0, 1, 2]
    for deadline in (float("nan"), -5, 0, "100", True):
        with pytest.raises(UsageError, match="deadline_ms"):
            service.fetch(None, [1], deadline_ms=deadline)  # type: ignore[arg-type]
    with pytest.raises(UnknownView, match="known: users, items"):
        service.read_view("nope", [1])
    assert service.read_view("items", [1, None, "x"]).rows[0] == {"a": 1, "b": "i1"}


def test_too_many_keys_is_a_usage_error() -> None:
    with FeatureService.from_config(config(f"keys{next(_stores)}", max_keys_per_request=5)) as svc, \
            pytest.raises(UsageError, match="max_keys_per_request"):
        svc.fetch(None, range(6))


def test_the_normalisers_refuse_what_cannot_be_a_key() -> None:
    to_int, to_str = normaliser("int"), normaliser("str")
    assert to_int("17") == 17 and to_int(17.0) == 17 and to_str(17) == "17" and to_str(b"ab") == "ab"
    for bad in (None, True, 1.5, math.nan, b"1", [1], 2 ** 64):
        with pytest.raises(UsageError):
            to_int(bad)
    for bad in (None, False, 1.5, b"\xff", ("a",), "x" * (MAX_KEY_LENGTH + 1)):
        with pytest.raises(UsageError):
            to_str(bad)


_any_value = st.one_of(
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70), st.floats(allow_nan=True), st.booleans(),
    st.none(), st.text(max_size=5), st.binary(max_size=3), st.lists(st.integers(), max_size=2),
    st.integers(min_value=0, max_value=12))


def _expected(key: Any) -> int | None:
    """What the items view answers for ``key``: the stored ``a``, -1 (missing), or None (invalid)."""
    try:
        k = normaliser("int")(key)
    except UsageError:
        return None
    return int(k) if isinstance(k, int) and 0 <= k < 10 else -1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keys=st.lists(_any_value, max_size=12))
def test_random_mixes_of_keys_never_raise_and_stay_in_place(service: FeatureService, keys: list[Any]) -> None:
    result = service.fetch(None, keys)
    expected = [_expected(k) for k in keys]
    assert [row["a"] for row in result.items] == [-1 if e is None else e for e in expected]
    invalid = sum(e is None for e in expected)
    listed = [d for d in result.degraded if d.reason is Reason.INVALID_KEY]
    assert (len(listed[0].keys) if listed else 0) == min(invalid, 20)
    view = service.read_view("items", keys)
    assert [r["a"] if r else -1 for r in view.rows] == [-1 if e is None else e for e in expected]
