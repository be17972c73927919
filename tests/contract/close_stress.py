"""Run as a process: many threads use featuredao while another thread closes it; report what went wrong.

``python close_stress.py CONFIG MODE CYCLES`` with MODE one of fetch, read, upsert. Each cycle builds
the service or runtime anew, starts 8 threads calling it back to back, closes it after a random few
milliseconds, and checks that every thread ends (no hang), that the only exception is ``Closed``, and
that a call after close raises ``Closed``. A crash (SIGSEGV) shows as the process's exit status.
Prints one JSON object: {"cycles": n, "calls": n, "problems": [...]}.
"""

from __future__ import annotations

import faulthandler
import json
import random
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from featuredao import Closed, FeatureService, Overloaded, build

THREADS = 8


def _target(cfg: dict[str, Any], mode: str) -> tuple[Callable[[], object], Callable[[], None]]:
    views = [v["name"] for v in cfg["views"]]
    keys = [f"k{i}" for i in range(100)]
    if mode == "fetch":
        service = FeatureService.from_config(cfg)
        return (lambda: service.fetch(None, keys)), service.close
    runtime = build(cfg)
    dao = runtime.daos[views[0]]
    if mode == "read":
        return (lambda: dao.read(keys, timeout_s=1.0)), runtime.close
    rows = [(k, {"f_int": i, "f_float": i / 2}) for i, k in enumerate(keys[:20])]
    return (lambda: dao.upsert(rows)), runtime.close


def cycle(cfg: dict[str, Any], mode: str, problems: list[str], first: bool = False) -> int:
    call, close = _target(cfg, mode)
    calls = [0] * THREADS
    closed = threading.Event()

    def worker(n: int) -> None:
        while True:
            try:
                call()
                calls[n] += 1
            except Closed:
                if not closed.is_set():
                    problems.append("Closed raised before close() was called")
                return
            except Overloaded:  # 8 threads on a pool of 4: load, the documented answer to it
                continue
            except Exception as exc:
                problems.append(f"{type(exc).__name__}: {exc}")
                return
            if closed.is_set() and calls[n] > 10_000:
                problems.append("calls still succeed long after close()")
                return

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(THREADS)]
    for t in threads:
        t.start()
    if first:
        # The load runs at least once: a loaded machine may take longer than any cycle's few milliseconds
        # to open the first connections (the later cycles may close while they open).
        end = time.monotonic() + 30
        while sum(calls) == 0 and time.monotonic() < end and any(t.is_alive() for t in threads):
            time.sleep(0.005)
    time.sleep(random.uniform(0.01, 0.08))
    closed.set()
    close()
    close()  # idempotent
    for t in threads:
        t.join(timeout=20)
        if t.is_alive():
            problems.append("a worker thread hangs after close()")
            faulthandler.dump_traceback(sys.stderr)
            break
    try:
        call()
        problems.append("a call after close() did not raise Closed")
    except Closed:
        pass
    except Exception as exc:
        problems.append(f"a call after close() raised {type(exc).__name__}: {exc}")
    return sum(calls)


def seed(cfg: dict[str, Any]) -> None:
    """Create and fill every view here too (idempotent): an in-process store starts empty."""
    runtime = build(cfg)
    try:
        for dao in runtime.daos.values():
            dao.prepare()  # type: ignore[attr-defined]
            dao.upsert([(f"k{i}", {"f_int": i, "f_float": i / 4, "f_strs": ["a", "b"]})
                        for i in range(0, 100, 2)])
    finally:
        runtime.close()


def main() -> None:
    faulthandler.enable()
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    mode, cycles = sys.argv[2], int(sys.argv[3])
    seed(cfg)
    problems: list[str] = []
    calls = sum(cycle(cfg, mode, problems, first=n == 0) for n in range(cycles))
    print(json.dumps({"cycles": cycles, "calls": calls, "problems": problems[:20]}))


if __name__ == "__main__":
    main()
