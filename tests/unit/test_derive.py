"""Serve-time derived features: the spec validator and every op, on good and bad values."""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from featuredao.derive import OPS, DerivedConfig, compile, compute, load
from featuredao.errors import UsageError
from featuredao.types import FeatureType
from featuredao.validation import pydantic_issues

NAN, INF = math.nan, math.inf
NOW = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC, a Tuesday
ME = __name__  # this module, importable by the python op (pytest put tests/unit on sys.path)


def spec(op: str, **kw: Any) -> DerivedConfig:
    return DerivedConfig.model_validate({"name": "f", "entity": "item", "op": op, **kw})


def run(s: DerivedConfig, *columns: list[Any], now: float | None = NOW) -> tuple[list[Any], list[int]]:
    return compute(s, list(columns), now)


def same(got: list[Any], want: list[Any]) -> bool:
    """Equal, with NaN equal to NaN and exact types (1 is not 1.0)."""
    return len(got) == len(want) and all(
        type(g) is type(w) and (g == w or (g != g and w != w)) for g, w in zip(got, want, strict=True))


# Helpers for the python op.
def double(xs: list[Any]) -> list[Any]:
    return [None if x is None else x * 2 for x in xs]


def join(a: list[Any], b: list[Any]) -> list[str]:
    return [f"{x}-{y}" for x, y in zip(a, b, strict=True)]


def short(xs: list[Any]) -> list[Any]:
    return xs[:-1]


def boom(xs: list[Any]) -> list[Any]:
    raise RuntimeError("boom")


def not_a_list(xs: list[Any]) -> Any:
    return {i: x for i, x in enumerate(xs)}


def identity(xs: list[Any]) -> list[Any]:
    return xs


NOT_CALLABLE = 3


# ------------------------------------------------------------------------------------------- the spec

@pytest.mark.parametrize(("op", "kw", "want"), [
    ("log1p", {"input": "price"}, FeatureType.FLOAT),
    ("clip", {"input": "price", "max": 10}, FeatureType.FLOAT),
    ("ratio", {"inputs": ["clicks", "views"]}, FeatureType.FLOAT),
    ("bucketize", {"input": "age", "boundaries": [18, 30]}, FeatureType.INT),
    ("hash_bucket", {"input": "user.city", "buckets": 100}, FeatureType.INT),
    ("hour_of_day", {"input": "context.ts"}, FeatureType.INT),
    ("day_of_week", {"input": "context.ts"}, FeatureType.INT),
    ("days_since", {"input": "created_at"}, FeatureType.INT),
    ("cross", {"inputs": ["user.city", "category"]}, FeatureType.STR),
    ("in", {"inputs": ["category", "user.liked_categories"]}, FeatureType.BOOL),
    ("python", {"input": "x", "fn": "m:f", "type": "list[float]"}, FeatureType.LIST_FLOAT),
])
def test_output_type_inferred_or_declared(op: str, kw: dict[str, Any], want: FeatureType) -> None:
    s = spec(op, **kw)
    assert s.type is want and s.output_type is want
    # The dump states the type and validates back to an equal spec.
    dumped = s.model_dump(mode="json", exclude_none=True)
    assert dumped["type"] == want.value and DerivedConfig.model_validate(dumped) == s
    # The declared type may be given when it is the op's own.
    assert spec(op, **{**kw, "type": want.value}) == s


def test_ops_lists_every_op() -> None:
    assert set(OPS) == {"log1p", "clip", "bucketize", "hash_bucket", "cross", "ratio", "hour_of_day",
                        "day_of_week", "days_since", "in", "python"}


def test_spec_keeps_input_names_and_is_frozen() -> None:
    s = spec("cross", inputs=["user.city", "context.hour", "price"])
    assert s.input_names == ["user.city", "context.hour", "price"]
    assert spec("log1p", input="price").input_names == ["price"]
    with pytest.raises(ValidationError):
        s.op = "log1p"  # type: ignore[misc]


@pytest.mark.parametrize(("op", "kw", "message"), [
    ("log1p", {}, "op 'log1p' needs 'input'"),
    ("log1p", {"inputs": ["a"]}, "op 'log1p' takes one 'input', not 'inputs'"),
    ("log1p", {"input": "a", "inputs": ["b", "c"]}, "takes 'input' or 'inputs', not both"),
    ("cross", {"inputs": ["a"]}, "op 'cross' needs 'inputs' with at least 2 names (got 1)"),
    ("cross", {"input": "a"}, "op 'cross' needs 'inputs' with at least 2 names (got 'input')"),
    ("ratio", {"inputs": ["a", "b", "c"]},
     "op 'ratio' needs 'inputs' with exactly 2 names [numerator, denominator] (got 3)"),
    ("in", {"inputs": []}, "op 'in' needs 'inputs' with exactly 2 names [value, list_feature] (got 0)"),
    ("python", {"fn": "m:f", "type": "int"}, "op 'python' needs 'inputs' with at least 1 name (got 0)"),
    ("python", {"input": "x", "type": "int"}, "op 'python' needs 'fn'"),
    ("python", {"input": "x", "fn": "m:f"}, "op 'python' needs 'type' (the output type)"),
    ("python", {"input": "x", "fn": "math", "type": "int"}, "'fn' must be 'module:function' (got 'math')"),
    ("python", {"input": "x", "fn": "a b:c", "type": "int"}, "'fn' must be 'module:function'"),
    ("clip", {"input": "a"}, "op 'clip' needs 'min' and/or 'max'"),
    ("clip", {"input": "a", "min": 2, "max": 1}, "'min' (2.0) is greater than 'max' (1.0)"),
    ("bucketize", {"input": "a"}, "op 'bucketize' needs 'boundaries'"),
    ("bucketize", {"input": "a", "boundaries": []}, "'boundaries' needs at least one value"),
    ("bucketize", {"input": "a", "boundaries": [1, 1]}, "'boundaries' must be strictly increasing"),
    ("bucketize", {"input": "a", "boundaries": [0, 5, 3]}, "'boundaries' must be strictly increasing"),
    ("hash_bucket", {"input": "a"}, "op 'hash_bucket' needs 'buckets'"),
    ("log1p", {"input": "a", "min": 0}, "'min' is not a parameter of op 'log1p'"),
    ("clip", {"input": "a", "max": 1, "buckets": 3}, "'buckets' is not a parameter of op 'clip'"),
    ("cross", {"inputs": ["a", "b"], "fn": "m:f"}, "'fn' is not a parameter of op 'cross'"),
    ("log1p", {"input": "a", "type": "int"},
     "op 'log1p' produces float, not int: leave 'type' out or set it to 'float'"),
    ("bucketize", {"input": "a", "boundaries": [1], "default": "x"}, "'default' 'x' is not of type int"),
    ("in", {"inputs": ["a", "b"], "default": 1}, "'default' 1 is not of type bool"),
    ("python", {"input": "x", "fn": "m:f", "type": "list[int]", "default": [1, "a"]},
     "'default' [1, 'a'] is not of type list[int]"),
])
def test_validator_errors(op: str, kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        spec(op, **kw)
    errors = info.value.errors()
    assert len(errors) == 1 and errors[0]["loc"] == () and errors[0]["type"] == "derived_feature"
    assert message in errors[0]["msg"]


def test_validator_reports_every_problem_at_once_at_the_spec_path() -> None:
    with pytest.raises(ValidationError) as info:
        spec("ratio", inputs=["a"], min=1, default="x")
    (issue,) = pydantic_issues(info.value, ("derived", 2))
    assert issue.path == "$.derived[2]" and issue.value is None
    assert issue.message == (
        "op 'ratio' needs 'inputs' with exactly 2 names [numerator, denominator] (got 1); "
        "'min' is not a parameter of op 'ratio'; 'default' 'x' is not of type float")


@pytest.mark.parametrize(("kw", "loc"), [
    ({"op": "sqrt", "input": "a"}, ("op",)),
    ({"op": "log1p", "input": "a", "scale": 2}, ("scale",)),
    ({"op": "log1p", "input": ""}, ("input",)),
    ({"op": "cross", "inputs": ["a", ""]}, ("inputs", 1)),
    ({"op": "log1p", "input": "a", "name": "1bad"}, ("name",)),
    ({"op": "log1p", "input": "a", "entity": "user.x"}, ("entity",)),
    ({"op": "hash_bucket", "input": "a", "buckets": 0}, ("buckets",)),
    ({"op": "bucketize", "input": "a", "boundaries": [0, NAN]}, ("boundaries", 1)),
    ({"op": "clip", "input": "a", "max": INF}, ("max",)),
    ({"op": "python", "input": "a", "fn": "m:f", "type": "decimal"}, ("type",)),
])
def test_field_errors_point_at_the_field(kw: dict[str, Any], loc: tuple[Any, ...]) -> None:
    with pytest.raises(ValidationError) as info:
        DerivedConfig.model_validate({"name": "f", "entity": "item", **kw})
    assert [e["loc"] for e in info.value.errors()] == [loc]


# ------------------------------------------------------------------------------------------- the ops

def test_log1p() -> None:
    s = spec("log1p", input="x", default=-1.0)
    col = [0, 1, math.e - 1, -0.5, 1e308, INF, 2**60, -1, -2, None, "3", True, NAN, 10**400, [1]]
    out, failed = run(s, col)
    want = [0.0, math.log(2), 1.0, math.log1p(-0.5), math.log1p(1e308), INF, math.log1p(2**60)]
    assert same(out[:7], want)
    assert failed == list(range(7, 15)) and out[7:] == [-1.0] * 8


def test_clip() -> None:
    both = spec("clip", input="x", min=0, max=10)
    out, failed = run(both, [-5, 0, 3, 7.5, 10, 11, 10**400, -(10**400), -INF, INF, NAN, None, "5", False])
    assert same(out[:10], [0.0, 0.0, 3.0, 7.5, 10.0, 10.0, 10.0, 0.0, 0.0, 10.0])
    assert failed == [10, 11, 12, 13] and out[10:] == [None] * 4
    assert run(spec("clip", input="x", min=-1), [-3, 5, 10**400]) == ([-1.0, 5.0, None], [2])
    assert run(spec("clip", input="x", max=1.5, default=0), [-3, 5]) == ([-3.0, 1.5], [])


def test_bucketize() -> None:
    s = spec("bucketize", input="x", boundaries=[0, 10, 100], default=-1)
    col = [-5, -0.0, 0, 9.99, 10, 99, 100, 1e9, 10**400, -INF, INF, NAN, None, "5", True]
    out, failed = run(s, col)
    assert same(out, [0, 1, 1, 1, 2, 2, 3, 3, 3, 0, 3, -1, -1, -1, -1]) and failed == [11, 12, 13, 14]


def test_hash_bucket_values_are_pinned() -> None:
    # Hard-coded: a change of the hash (or of the canonical text) moves every bucket and must be seen.
    s = spec("hash_bucket", input="x", buckets=1000)
    col = ["a", "1", 1, 1.0, "café", "日本", True, "user_42", 10**20, -3, 0.1, ""]
    out, failed = run(s, col)
    assert out[:11] == [343, 910, 910, 98, 259, 370, 479, 569, 28, 601, 929] and failed == []
    big = spec("hash_bucket", input="x", buckets=2**32)
    assert run(big, ["a", "café", 10**20])[0] == [1533428271, 831707107, 3681396580]


def test_hash_bucket_canonical_text_and_failures() -> None:
    s = spec("hash_bucket", input="x", buckets=97)
    (a, b, c, d, e, f), _ = run(s, [1, "1", True, "true", False, "false"])
    assert a == b and c == d and e == f
    out, failed = run(s, [None, NAN, [1], "\ud800", 10**5000, b"a", "ok"])
    assert failed == [0, 1, 2, 3, 4, 5] and out[:6] == [None] * 6 and 0 <= out[6] < 97
    values = [f"id{i}" for i in range(2000)]
    out, _ = run(s, values)
    assert all(0 <= v < 97 for v in out) and len(set(out)) == 97
    assert run(spec("hash_bucket", input="x", buckets=1), ["a", 5]) == ([0, 0], [])


def test_hash_bucket_is_the_same_in_another_process() -> None:
    values = ["a", "café", "日本", "user_42", 7, 2.5, True]
    s = spec("hash_bucket", input="x", buckets=10_007)
    here, _ = run(s, values)
    code = ("import json, sys; from featuredao.derive import DerivedConfig, compute; "
            "s = DerivedConfig(name='f', entity='item', op='hash_bucket', input='x', buckets=10007); "
            "print(json.dumps(compute(s, [json.loads(sys.argv[1])])[0]))")
    root = Path(__file__).resolve().parents[2]
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(values)], capture_output=True,
                              text=True, env=env, cwd=root, timeout=60, check=True)
        assert json.loads(proc.stdout) == here


def test_cross() -> None:
    s = spec("cross", inputs=["a", "b"], default="?")
    a = ["sh", 1, 1.0, 1e20, True, False, "日本", "", -0.0, 10**30]
    b = ["x", 2, 0.1, -3, "y", None, "é", "", 1, "z"]
    out, failed = run(s, a, b)
    assert out == ["sh_x", "1_2", "1.0_0.1", "1e+20_-3", "true_y", "?", "日本_é", "_", "-0.0_1",
                   "1" + "0" * 30 + "_z"]
    assert failed == [5]
    three = spec("cross", inputs=["a", "b", "c"])
    assert run(three, ["a", None, "c", NAN], [1, 2, 3, 4], [True, True, [1], 5.5]) == (
        ["a_1_true", None, None, None], [1, 2, 3])


def test_ratio() -> None:
    s = spec("ratio", inputs=["clicks", "views"], default=0)
    num = [1, -1, 3, 0, 1, 0, None, 1, INF, 1e308, 10**400, "1", True, NAN]
    den = [2, 4, 1.5, 5, 0, 0, 0, None, INF, 1e-10, 1, 1, 1, 1]
    out, failed = run(s, num, den)
    # By zero: the default (a float, as the type says), and not a failure.
    assert same(out, [0.5, -0.25, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, INF, 0.0, 0.0, 0.0, 0.0])
    assert failed == [6, 7, 8, 10, 11, 12, 13]
    # No default: division by zero is a failure.
    assert run(spec("ratio", inputs=["a", "b"]), [1, 1, 2], [0, 0.0, 4]) == ([None, None, 0.5], [0, 1])


def test_hour_and_day_of_week_match_datetime_in_utc() -> None:
    hour, dow = spec("hour_of_day", input="t"), spec("day_of_week", input="t")
    stamps = [0, -1, 59.9, 3600 * 5 + 59, NOW, NOW + 0.5, 951_782_400, -62_135_596_800, 253_402_300_799,
              *range(-10 * 86400, 10 * 86400, 7777)]
    dates = [datetime.fromtimestamp(t, UTC) for t in stamps]
    assert run(hour, stamps) == ([d.hour for d in dates], [])
    assert run(dow, stamps) == ([d.weekday() for d in dates], [])
    assert run(hour, [NOW])[0] == [22] and run(dow, [NOW, 0])[0] == [1, 3]


def test_time_ops_reject_what_is_not_epoch_seconds() -> None:
    # Milliseconds (beyond year 9999 as seconds), non-numbers, NaN and infinities fail.
    bad = [NOW * 1000, 253_402_300_800, -62_135_596_801, None, "1700000000", True, NAN, INF, -INF, 10**400]
    for op in ("hour_of_day", "day_of_week", "days_since"):
        out, failed = run(spec(op, input="t", default=-1), bad)
        assert out == [-1] * len(bad) and failed == list(range(len(bad)))


def test_days_since() -> None:
    s = spec("days_since", input="t")
    col = [NOW, NOW - 1, NOW - 86399, NOW - 86400, NOW - 3 * 86400 - 5, NOW + 1, NOW + 86400, 0, int(NOW)]
    assert run(s, col, now=NOW) == ([0, 0, 0, 1, 3, -1, -1, 19675, 0], [])
    assert run(s, [time.time() - 2 * 86400 - 100], now=None) == ([2], [])


def test_in() -> None:
    s = spec("in", inputs=["v", "list"])
    v = ["a", "z", 1, 1.0, 2, True, True, "1", "a", None, "a", NAN, "é", [1]]
    lists = [["a", "b"], ["a"], [1, 2], [1], [], [1], [True], [1], None, ["a"], "abc", [NAN], ("é",), [[1]]]
    out, failed = run(s, v, lists)
    assert out == [True, False, True, True, False, False, True, False, None, None, None, None, True, None]
    assert failed == [8, 9, 10, 11, 13]


def test_python_op() -> None:
    s = spec("python", input="x", fn=f"{ME}:double", type="float", default=-1.0)
    out, failed = run(s, [1, 2.5, None, "a", 10**400, True])
    # Ints widen to float (True * 2 is the int 2); None, text ("aa") and an int beyond float fail.
    assert same(out, [2.0, 5.0, -1.0, -1.0, -1.0, 2.0]) and failed == [2, 3, 4]
    two = spec("python", inputs=["a", "b"], fn=f"{ME}:join", type="str")
    assert run(two, ["x", "y"], [1, None]) == (["x-1", "y-None"], [])


def test_python_op_checks_each_value_against_the_type() -> None:
    ints = spec("python", input="x", fn=f"{ME}:identity", type="list[int]", default=[])
    out, failed = run(ints, [[1, 2], [1, "a"], None, [], (1,), [True]])
    assert out == [[1, 2], [], [], [], [], []] and failed == [1, 2, 4, 5]
    floats = spec("python", input="x", fn=f"{ME}:identity", type="list[float]")
    out, failed = run(floats, [[1, 2.5], ["a"]])
    assert same(out[0], [1.0, 2.5]) and failed == [1]
    boolean = spec("python", input="x", fn=f"{ME}:identity", type="bool")
    assert run(boolean, [True, 1, NAN]) == ([True, None, None], [1, 2])


@pytest.mark.parametrize("fn", ["short", "boom", "not_a_list"])
def test_python_op_fails_every_index_on_a_bad_call(fn: str) -> None:
    s = spec("python", input="x", fn=f"{ME}:{fn}", type="int", default=0)
    assert run(s, [1, 2, 3]) == ([0, 0, 0], [0, 1, 2])


def test_python_function_is_loaded_once_and_bad_names_raise() -> None:
    assert load(f"{ME}:double") is load(f"{ME}:double") is double
    assert load("os.path:join") is os.path.join
    for fn in ("no_such_module_xyz:f", f"{ME}:missing", f"{ME}:NOT_CALLABLE"):
        with pytest.raises(UsageError, match="derived-feature function"):
            compile(spec("python", input="x", fn=fn, type="int"))


def test_empty_columns() -> None:
    for s, n in [(spec("log1p", input="x"), 1), (spec("cross", inputs=["a", "b", "c"]), 3),
                 (spec("python", input="x", fn=f"{ME}:double", type="int"), 1),
                 (spec("python", input="x", fn=f"{ME}:boom", type="int"), 1)]:
        assert compute(s, [[] for _ in range(n)]) == ([], [])


def test_compute_rejects_columns_that_do_not_match_the_inputs() -> None:
    s = spec("ratio", inputs=["a", "b"])
    with pytest.raises(UsageError, match=r"takes 2 column\(s\) \(a, b\), got 1"):
        compute(s, [[1]])
    with pytest.raises(UsageError, match=r"columns of different lengths \[2, 1\]"):
        compute(s, [[1, 2], [1]])


def test_compile_is_cached_per_spec_object() -> None:
    s = spec("clip", input="x", max=1)
    assert compile(s) is compile(s)
    # An equal spec or a changed copy compiles on its own, so a copy never runs its original's parameters.
    twin, changed = spec("clip", input="x", max=1), s.model_copy(update={"max": 5.0})
    assert compile(twin) is not compile(s)
    assert compute(changed, [[3]]) == ([3.0], []) and compute(s, [[3]]) == ([1.0], [])
    assert s == twin  # compiling leaves no trace in the spec (equality, dumps)


def test_compile_cache_entries_leave_with_their_spec() -> None:
    from featuredao import derive

    specs = [spec("log1p", input="x") for _ in range(50)]
    for s in specs:
        compile(s)
    ids = {id(s) for s in specs}
    assert ids <= derive._COMPILED.keys()
    del specs, s
    gc.collect()
    assert not ids & derive._COMPILED.keys()
