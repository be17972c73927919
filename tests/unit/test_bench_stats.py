"""featuredao bench: statistics against known inputs, key draws, the JSON schema, Ctrl-C in a phase."""

from __future__ import annotations

import random
import threading

import pytest

from featuredao.bench import report
from featuredao.bench.runner import (
    MISS_BASE,
    BenchParams,
    BenchResult,
    Measurement,
    _Phase,
    _run_phase,
    key_indices,
    request_keys,
)
from featuredao.bench.stats import LatencyStats
from featuredao.config import View
from featuredao.types import FeatureType, Key

# HdrHistogram with 3 significant digits: a recorded value is found within 0.1% of itself.
PRECISION = 1e-3


def close(actual: float, expected: float) -> bool:
    return abs(actual - expected) <= expected * PRECISION + 1e-9


def test_percentiles_of_a_uniform_distribution_within_hdr_precision() -> None:
    stats = LatencyStats()
    values = list(range(1, 10_001))  # 1 µs .. 10 ms, each once
    random.Random(7).shuffle(values)
    for v in values:
        stats.record(v)
    for pct, expected_us in ((50, 5000), (90, 9000), (99, 9900), (99.9, 9990)):
        assert close(stats.percentile_us(pct), expected_us), (pct, stats.percentile_us(pct))
    s = stats.summary(concurrency=1)
    assert close(s.p50_ms, 5.0) and close(s.p90_ms, 9.0) and close(s.p99_ms, 9.9) and close(s.p999_ms, 9.99)
    assert s.mean_ms == pytest.approx(5.0005)  # exact, not bucketed
    assert s.max_ms == pytest.approx(10.0)
    assert s.requests == 10_000 and s.keys == 10_000 and s.errors == 0


def test_a_long_tail_shows_in_p999_and_max_only() -> None:
    stats = LatencyStats()
    for _ in range(999):
        stats.record(1_000)  # 1 ms
    stats.record(250_000)  # one 250 ms outlier
    s = stats.summary(concurrency=1)
    assert close(s.p50_ms, 1.0) and close(s.p99_ms, 1.0) and close(s.p90_ms, 1.0)
    assert close(s.p999_ms, 1.0)  # 999 of 1000 values are 1 ms: the 99.9th percentile is still 1 ms
    assert s.max_ms == pytest.approx(250.0)
    assert s.mean_ms == pytest.approx((999 * 1.0 + 250.0) / 1000)


def test_throughput_is_concurrency_over_mean_latency() -> None:
    stats = LatencyStats()
    for _ in range(100):
        stats.record(10_000, keys=50)  # 10 ms, 50 keys per request
    s = stats.summary(concurrency=4)
    assert s.busy_s == pytest.approx(1.0)
    assert s.rps == pytest.approx(400.0)  # 4 threads x 100 requests / 1 s busy
    assert s.keys_per_s == pytest.approx(20_000.0)
    assert s.keys == 5000
    assert stats.summary(concurrency=1).rps == pytest.approx(100.0)


def test_errors_and_degraded_are_counted_not_timed() -> None:
    stats = LatencyStats()
    stats.record(100, keys=3, degraded=True)
    stats.record(300, keys=3)
    stats.record_error()
    s = stats.summary(1)
    assert (s.requests, s.keys, s.errors, s.degraded) == (2, 6, 1, 1)
    assert s.mean_ms == pytest.approx(0.2)


def test_merge_equals_recording_everything_in_one() -> None:
    one, a, b = LatencyStats(), LatencyStats(), LatencyStats()
    rng = random.Random(3)
    for i in range(2000):
        v = rng.expovariate(1 / 800) + 1
        one.record(v, 2)
        (a if i % 2 else b).record(v, 2)
    b.record_error()
    one.record_error()
    a.merge(b)
    merged, whole = a.summary(2).to_dict(), one.summary(2).to_dict()
    assert merged == pytest.approx(whole)  # float sums differ in the last bit only
    assert {k: merged[k] for k in ("requests", "keys", "errors", "p50_ms", "p99_ms", "max_ms")} == \
        {k: whole[k] for k in ("requests", "keys", "errors", "p50_ms", "p99_ms", "max_ms")}


def test_empty_and_out_of_range_values() -> None:
    empty = LatencyStats().summary(8)
    assert (empty.requests, empty.p50_ms, empty.mean_ms, empty.max_ms, empty.rps) == (0, 0.0, 0.0, 0.0, 0.0)
    stats = LatencyStats()
    stats.record(0.2)  # below 1 µs: counted as 1 µs in the histogram
    stats.record(120_000_000)  # 2 minutes: clamped to 60 s in the histogram, exact in max and mean
    assert stats.percentile_us(0) == pytest.approx(1, abs=0.01)
    assert close(stats.percentile_us(100), 60_000_000)
    assert stats.summary(1).max_ms == pytest.approx(120_000.0)


# -- keys ---------------------------------------------------------------------------------------------
def test_key_indices_hits_are_distinct_and_in_range() -> None:
    idx = key_indices(500, 1000, 1.0, random.Random(1))
    assert len(idx) == 500 and len(set(idx)) == 500 and all(0 <= i < 1000 for i in idx)
    # More keys than rows: drawn with replacement, still in range.
    idx = key_indices(50, 10, 1.0, random.Random(1))
    assert len(idx) == 50 and all(0 <= i < 10 for i in idx)


def test_key_indices_hit_ratio_mixes_in_missing_keys() -> None:
    assert all(i >= MISS_BASE for i in key_indices(100, 1000, 0.0, random.Random(2)))
    rng = random.Random(5)
    draws = [i for _ in range(200) for i in key_indices(10, 1000, 0.7, rng)]
    hits = sum(i < 1000 for i in draws) / len(draws)
    assert 0.65 < hits < 0.75
    # A fractional expected hit count is honoured on average, even at batch 1.
    ones = [key_indices(1, 1000, 0.25, rng)[0] < 1000 for _ in range(4000)]
    assert 0.2 < sum(ones) / len(ones) < 0.3


def _view(name: str, entity: str, key_type: str) -> View:
    return View(name, entity, "s", name, "id", key_type, {"x": FeatureType.INT}, {}, "", 50)


def test_request_keys_are_deterministic_and_the_same_rows_for_every_view() -> None:
    params = BenchParams(views=["a", "b"], rows=100, seed=9)
    ints, strs = _view("a", "item", "int"), _view("b", "item", "str")
    first = request_keys(ints, 20, params, "m", 3)
    assert first == request_keys(ints, 20, params, "m", 3)
    assert first != request_keys(ints, 20, params, "m", 4)
    assert [f"i{k}" for k in first] == request_keys(strs, 20, params, "m", 3)


# -- Ctrl-C ------------------------------------------------------------------------------------------
def test_ctrl_c_during_a_phase_keeps_what_was_measured() -> None:
    from concurrent.futures import ThreadPoolExecutor

    seen = threading.Event()

    def call(keys: list[Key]) -> bool:
        seen.set()
        return False

    phase = _Phase({"dao": call}, lambda t: [t], None, None, threading.Event(), [0, 0], {})

    def progress(done: float) -> None:
        if seen.is_set() and sum(phase.done) > 0:
            raise KeyboardInterrupt  # what the main thread gets on Ctrl-C

    with ThreadPoolExecutor(2) as pool:
        merged, _, interrupted = _run_phase(pool, 2, phase, progress)
    assert interrupted
    assert merged["dao"].count >= 1 and merged["dao"].count == sum(phase.done)


def test_a_failing_call_is_an_error_with_its_first_message() -> None:
    from concurrent.futures import ThreadPoolExecutor

    def call(keys: list[Key]) -> bool:
        raise RuntimeError("store says no")

    phase = _Phase({"raw": call}, lambda t: [t], 5, None, threading.Event(), [0], {})
    with ThreadPoolExecutor(1) as pool:
        merged, _, interrupted = _run_phase(pool, 1, phase, None)
    assert not interrupted and merged["raw"].errors == 5 and merged["raw"].count == 0
    assert phase.first_errors == {"raw": "RuntimeError: store says no"}


# -- the JSON schema ---------------------------------------------------------------------------------
def _result() -> BenchResult:
    stats = LatencyStats()
    for v in (100, 200, 300):
        stats.record(v, keys=10)
    params = BenchParams(views=["items"], batches=[10], concurrency=[1], requests=3, baseline=True)
    machine = {"cores": 2, "usable_cores": 2, "python": "CPython 3.11", "gil": True, "platform": "Linux",
               "adapters": ["sqlite"], "versions": {"featuredao": "0.1.0"}, "load_avg": [0.5, 0.4, 0.3]}
    result = BenchResult(params, machine, "c.json", "ab" * 32, "2024-01-01T00:00:00+00:00")
    for path, ratio in (("service", 1.5), ("dao", 1.2), ("raw", 1.0)):
        result.records.append(Measurement("items", "local", "sqlite", "item", 10, 1, "off", path, "call",
                                     stats.summary(1), 0.01, ratio, ratio))
    return result


def test_json_document_follows_schema_1() -> None:
    doc = report.to_json(_result())
    assert report.schema_problems(doc) == []
    assert doc["schema"] == 1 and isinstance(doc["config_hash"], str) and len(doc["config_hash"]) == 64
    assert {"cores", "python", "platform", "versions"} <= set(doc["machine"])
    rec = doc["records"][0]
    assert set(rec) == set(report.RECORD_FIELDS)
    for key in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "mean_ms", "max_ms", "rps", "keys_per_s"):
        assert isinstance(rec[key], float), key
    for key in ("batch", "concurrency", "requests", "keys", "errors", "degraded"):
        assert isinstance(rec[key], int) and not isinstance(rec[key], bool), key
    assert rec["path"] in ("service", "dao", "raw") and rec["cache"] in ("off", "cold", "warm")
    assert rec["ratio_to_raw"] == 1.5


def test_schema_check_catches_a_broken_record() -> None:
    doc = report.to_json(_result())
    doc["records"][0]["p50_ms"] = "fast"
    del doc["records"][1]["rps"]
    doc["records"][2]["path"] = "cached"
    problems = report.schema_problems(doc)
    assert any("records[0].p50_ms" in p for p in problems)
    assert any("records[1] keys differ" in p and "rps" in p for p in problems)
    assert any("records[2].path" in p for p in problems)


def test_markdown_states_the_gil_caveat_and_the_core_count() -> None:
    text = report.markdown(_result())
    assert "GIL" in text and "2 cores" in text
    assert "| items | 10 | 1 | off | service | 3 |" in text
    assert "1.50x" in text
