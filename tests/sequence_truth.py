"""Ground truth for sequence views: the reading rules in plain Python, and a read through the CLI.

A store's test loads events with its raw driver, reads them with ``featuredao fetch --json`` and compares
with :func:`expected` over the same events: newest first, ties by item then the other fields (highest
first), the window ``[request_time - window_s, request_time]``, event types, thresholds, dedupe, cap.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

FIELDS = {"item_id": "int", "event": "str", "ts": "int", "play_time": "float"}
SPEC: dict[str, Any] = {"time_field": "ts", "item_field": "item_id", "event_field": "event",
                        "fields": FIELDS, "max_len": 20, "window_s": 5000, "events": ["click", "buy"],
                        "min": {"play_time": 2.0}, "dedupe": "item_id"}


def events(seed: int, users: Sequence[str], per_user: int, now: int) -> dict[str, list[dict[str, Any]]]:
    """Random events per user (repeated items, equal times, every event type, times around the window)."""
    import random

    rng = random.Random(seed)
    out: dict[str, list[dict[str, Any]]] = {}
    for n, user in enumerate(users):
        count = 0 if n % 7 == 3 else rng.randint(1, per_user)
        out[user] = [{"item_id": rng.randint(1, 40), "event": rng.choice(["click", "buy", "view"]),
                      "ts": now - rng.randint(-50, 8000) // 3 * 3, "play_time": round(rng.uniform(0, 10), 2)}
                     for _ in range(count)]
    return out


def tied_user(now: int) -> list[dict[str, Any]]:
    """More window events at one time than a read's limit (4 x max_len of SPEC): the store's limit cuts
    inside the tie, so its order must be the core's (item, then event and play time, highest first)."""
    evs = [{"item_id": item, "event": ev, "ts": now - 30, "play_time": play}
           for item in range(1, 41) for ev, play in (("click", 2.5), ("buy", 9.0), ("click", 7.0))]
    return [*evs, {"item_id": 99, "event": "buy", "ts": now - 31, "play_time": 5.0}]


def expected(user_events: Sequence[Mapping[str, Any]], spec: Mapping[str, Any], request_time: float,
             prefix: str = "click_") -> dict[str, list[Any]]:
    """What a sequence view with ``spec`` answers for one user's events (empty lists: none kept)."""
    fields = list(spec["fields"])
    time_field, item = spec["time_field"], spec.get("item_field")
    since = request_time - spec["window_s"] if spec.get("window_s") else None
    kept = [e for e in user_events
            if (since is None or e[time_field] >= since) and e[time_field] <= request_time
            and (not spec.get("events") or e[spec["event_field"]] in spec["events"])
            and all(e[f] >= low for f, low in spec.get("min", {}).items())]
    order = [time_field, *([item] if item else []), *(f for f in fields if f not in (time_field, item))]
    kept.sort(key=lambda e: tuple(e[f] for f in order), reverse=True)
    if spec.get("dedupe"):
        seen: set[Any] = set()
        unique = []
        for e in kept:
            if e[spec["dedupe"]] not in seen:
                seen.add(e[spec["dedupe"]])
                unique.append(e)
        kept = unique
    kept = kept[:spec["max_len"]]
    return {prefix + f: [e[f] for e in kept] for f in fields}


def cli_fetch(config: Path, user: str, request_time: float) -> dict[str, Any]:
    """``featuredao fetch CONFIG --user USER --context request_time=T --json``, parsed."""
    done = subprocess.run([sys.executable, "-m", "featuredao", "fetch", str(config), "--user", user,
                           "--context", f"request_time={request_time}", "--json"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    return out


def distinct(evs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each identical event once (stores that hold an event once: Redis, HBase, TableStore)."""
    order = list(FIELDS)
    return [dict(zip(order, t, strict=True)) for t in dict.fromkeys(tuple(e[f] for f in order) for e in evs)]


def truth_config(folder: Path, name: str, source: Mapping[str, Any], view: Mapping[str, Any]) -> Path:
    """A config of one source and one sequence view, with deadlines far above a read's time: the truth
    checks what is read, on a machine that may be busy (a cold process connects first, too)."""
    path = folder / "seq.json"
    path.write_text(json.dumps({"sources": {name: dict(source)}, "service": {"deadline_ms": 10_000},
                                "views": [{**view, "timeout_ms": 10_000}]}), encoding="utf-8")
    return path


def assert_cli_matches(config: Path, by_user: Mapping[str, Sequence[Mapping[str, Any]]], now: float, *,
                       once: bool = False) -> None:
    """Every user read through the CLI equals :func:`expected` over its events (``once``: each identical
    event counted once); a user with none kept is listed missing."""
    for user, evs in by_user.items():
        got = cli_fetch(config, user, now)
        want = expected(distinct(evs) if once else evs, SPEC, now)
        assert {k: v for k, v in got["user"].items() if k.startswith("click_")} == want, (user, got)
        assert (user in got["missing"].get("click_seq", [])) == (not want["click_item_id"]), user
