"""Closing many owners at once: one bound for all of them, a failing close never stops the others."""

from __future__ import annotations

import threading
import time

import pytest

from featuredao.lifecycle import Gate, close_together, shut_down

MARGIN_S = 0.5  # scheduling slack on a loaded 2-core machine


def test_closes_run_at_once_and_the_caller_waits_one_bound() -> None:
    release = threading.Event()
    done: list[str] = []

    def slow(name: str) -> None:
        release.wait(5)
        done.append(name)

    started = time.monotonic()
    late = close_together({"a": lambda: slow("a"), "b": lambda: slow("b"), "quick": lambda: done.append("q")},
                          0.2)
    took = time.monotonic() - started
    assert sorted(late) == ["a", "b"]
    assert done == ["q"]
    assert took < 0.2 + MARGIN_S, took  # one bound, not one per slow close
    release.set()


def test_a_close_that_raises_is_logged_and_the_others_still_close(caplog: pytest.LogCaptureFixture) -> None:
    closed: list[str] = []

    def broken() -> None:
        raise RuntimeError("boom")

    assert close_together({"broken": broken, "fine": lambda: closed.append("fine")}, 1.0) == []
    assert closed == ["fine"]
    assert any("closing broken failed" in r.getMessage() for r in caplog.records)


def test_shut_down_frees_only_what_is_idle_when_work_outlives_the_bound() -> None:
    gate = Gate("thing")
    gate.enter()  # work that never ends in time
    interrupted: list[bool] = []
    freed: list[bool] = []
    shut_down(gate, "thing", lambda: interrupted.append(True), freed.append, 0.05)
    shut_down(gate, "thing", lambda: interrupted.append(True), freed.append, 0.05)  # idempotent
    assert interrupted == [True]
    assert freed == [False]  # told that work still runs
    assert gate.closed
