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


class _Opaque:
    """An object of no key-like type: hashable, with a repr, nothing else."""

    def __repr__(self) -> str:
        return "<opaque>"


_scalars = st.one_of(
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70), st.floats(allow_nan=True), st.booleans(),
    st.none(), st.text(max_size=5), st.binary(max_size=3), st.integers(min_value=0, max_value=12),
    st.sampled_from(["u1", b"u1", "7", " 3 ", 4.0, "x" * (MAX_KEY_LENGTH + 1), "\ud800"]))
# Every Python type a caller might pass: containers (hashable or not), and objects that are no key at all.
_any_value = st.one_of(
    _scalars, st.lists(_scalars, max_size=2), st.tuples(_scalars),
    st.dictionaries(st.text(max_size=2), _scalars, max_size=2), st.sets(st.integers(), max_size=2),
    st.frozensets(st.text(max_size=2), max_size=2), st.builds(bytearray, st.binary(max_size=2)),
    st.decimals(allow_nan=True), st.complex_numbers(max_magnitude=5), st.datetimes(), st.just(_Opaque()),
    st.just(object()), st.just(Reason.INVALID_KEY), st.just(range(3)))

_STORED: dict[str, dict[Any, int]] = {"int": {i: i for i in range(10)}, "str": {"u1": 7}}


def _expected(key: Any, key_type: str = "int") -> int | None:
    """What a view answers for ``key``: the stored ``a``, -1 (missing), or None (invalid)."""
    try:
        k = normaliser(key_type)(key)
    except UsageError:
        return None
    return _STORED[key_type].get(k, -1)


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
    # The same keys on a str-keyed view: read_view, and each one as the user of a fetch.
    texts = [_expected(k, "str") for k in keys]
    users = service.read_view("users", keys)
    assert [r["a"] if r else -1 for r in users.rows] == [-1 if e is None else e for e in texts]
    assert [d.reason for d in users.degraded] == ([Reason.INVALID_KEY] if None in texts else [])
    for key, want in zip(keys[:3], texts, strict=False):
        if key is None:
            continue  # no user: not a key
        one = service.fetch(key, [])
        assert one.user.get("u_a") == (None if want in (None, -1) else want)
        assert [d.reason for d in one.degraded] == ([Reason.INVALID_KEY] if want is None else [])


def test_one_str_or_bytes_is_not_a_sequence_of_keys(service: FeatureService) -> None:
    # A str is a Sequence[str] to a type checker: only the run time can tell one key from many.
    one: list[Any] = ["123", b"12", bytearray(b"1")]
    for keys in one:
        with pytest.raises(ArgumentTypeError, match="must be a sequence of keys, not one str or bytes"):
            service.read_view("items", keys)
    with pytest.raises(ArgumentTypeError, match=r"got 'u1'; one key is \[key\]"):
        service.read_view("users", "u1")
    assert service.read_view("users", ["u1"]).rows == [{"a": 7, "b": "x"}]
    assert [r["a"] if r else None for r in service.read_view("items", ("1", 2, "x")).rows] == [1, 2, None]


def test_afetch_costs_a_bad_key_only_and_checks_its_arguments(service: FeatureService,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    async def main() -> None:
        mixed: list[Any] = [1, None, {"a": 1}, 10 ** 30, 2]
        result = await service.afetch("u1", mixed)
        assert [i["a"] for i in result.items] == [1, -1, -1, -1, 2]
        [entry] = result.degraded
        assert entry.view == "items" and entry.reason is Reason.INVALID_KEY and len(entry.keys) == 3
        assert result.user == {"u_a": 7, "u_b": "x"}
        bad_user = await service.afetch(b"\xff", [3])  # type: ignore[arg-type]
        assert bad_user.user == {"u_a": None, "u_b": None} and bad_user.items[0]["a"] == 3
        assert [d.reason for d in bad_user.degraded] == [Reason.INVALID_KEY]
        with pytest.raises(InvalidKeyError, match="items"):
            await service.afetch(None, [1, True], strict=True)
        with pytest.raises(ArgumentTypeError, match="not one str"):
            await service.afetch(None, "123")
        with pytest.raises(UsageError, match="deadline_ms"):
            await service.afetch(None, [1], deadline_ms=float("nan"))

    asyncio.run(main())
    assert not any(r.exc_info for r in caplog.records)
