"""Redis Cluster failover as a request stream sees it: the share of keys served per 100 ms window.

The issue's setup: 3 masters + 3 replicas (``--node-timeout-ms``, default 2000, started with
``cluster-require-full-coverage no``), an item view (string/msgpack, 10 features) with ``"cluster":
true``, ``fetch`` of 100 random items every ~10 ms, ``service.deadline_ms`` 100. One master is SIGKILLed
(or frozen with SIGSTOP), with replica reads off and on. Per run: when the cluster reported every slot
served again, how long after that the stream was whole again, keys lost, slowest request; then one
table, one column per run, of the share of requested keys served per window (aligned at the fault).

    .venv/bin/python benchmarks/bench_failover.py [--faults kill,freeze] [--window-ms 100]
        [--node-timeout-ms 2000] [--after-s 1.5] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from featuredao import FeatureService, build
from featuredao.testing.servers import RedisCluster, RedisServer

FEATURES = {f"f{i}": "float" if i % 2 else "int" for i in range(10)}
ITEMS = 20_000
BATCH = 100
DEADLINE_MS = 100
PERIOD_S = 0.01


def config(cluster: RedisCluster, replicas: bool) -> dict[str, Any]:
    nodes = [f"{h}:{p}" for h, p in cluster.startup_nodes]
    return {
        "sources": {"rc": {"type": "redis", "cluster": True, "startup_nodes": nodes,
                           "read_from_replicas": replicas}},
        "views": [{"name": "items", "entity": "item", "source": "rc", "table": "items", "key": "id",
                   "key_type": "int", "features": FEATURES, "timeout_ms": DEADLINE_MS,
                   "options": {"layout": "string", "encoding": "msgpack"}}],
        "service": {"deadline_ms": DEADLINE_MS},
    }


def seed(cfg: dict[str, Any]) -> None:
    runtime = build(cfg)
    try:
        for start in range(0, ITEMS, 5000):
            runtime.daos["items"].upsert((i, {f: i for f in FEATURES}) for i in range(start, start + 5000))
    finally:
        runtime.close()


Sample = tuple[float, float, int, int]
"""started, elapsed, keys asked, keys served"""


@dataclass
class Run:
    name: str
    fault_at: float
    ok_at: float
    samples: list[Sample]

    def whole_after_ok(self) -> float:
        lost = [t for t, _, asked, served in self.samples if served < asked and t > self.fault_at]
        return max(0.0, max(lost, default=self.fault_at) - self.ok_at)


def stream(service: FeatureService, samples: list[Sample], stop: threading.Event) -> None:
    rng = random.Random(7)
    while not stop.is_set():
        items = rng.sample(range(ITEMS), BATCH)
        started = time.monotonic()
        result = service.fetch(None, items)
        elapsed = time.monotonic() - started
        served = sum(1 for i, got in zip(items, result.items, strict=True) if got["f0"] == i)
        samples.append((started, elapsed, BATCH, served))
        stop.wait(max(0.0, PERIOD_S - elapsed))


def failover(cluster: RedisCluster, victim: RedisServer, timeout: float = 30.0) -> float:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cluster.slots_ok(exclude=[victim]) and victim not in cluster.topology():
            return time.monotonic()
        time.sleep(0.02)
    raise RuntimeError("no failover")


def one_run(cluster: RedisCluster, fault: str, replicas: bool, after_s: float) -> Run:
    cfg = config(cluster, replicas)
    seed(cfg)
    victim = list(cluster.topology())[1]
    samples: list[Sample] = []
    stop = threading.Event()
    with FeatureService.from_config(cfg) as service:
        worker = threading.Thread(target=stream, args=(service, samples, stop), daemon=True)
        worker.start()
        time.sleep(0.5)
        fault_at = time.monotonic()
        victim.kill() if fault == "kill" else victim.freeze()
        ok_at = failover(cluster, victim)
        time.sleep(after_s)
        stop.set()
        worker.join(5)
    cluster.heal(timeout=60)
    return Run(f"{fault}, replica reads {'on' if replicas else 'off'}", fault_at, ok_at, samples)


def report(runs: list[Run], window_s: float, node_timeout_ms: int) -> str:
    lines = [f"# Redis Cluster failover: share of keys served per {window_s * 1000:.0f} ms window", "",
             f"3 masters + 3 replicas, cluster-node-timeout {node_timeout_ms} ms, "
             "cluster-require-full-coverage no; item view string/msgpack, 10 features; fetch of "
             f"{BATCH} random items every ~{PERIOD_S * 1000:.0f} ms, deadline {DEADLINE_MS} ms; "
             f"{os.cpu_count()} cores.", "",
             "| run | cluster ok after fault | whole again after ok | keys lost | requests | slowest |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        lost = sum(asked - served for _, _, asked, served in r.samples)
        slowest = max(e for _, e, _, _ in r.samples)
        lines.append(f"| {r.name} | {r.ok_at - r.fault_at:.2f} s | {r.whole_after_ok():.2f} s | {lost} | "
                     f"{len(r.samples)} | {slowest * 1000:.0f} ms |")
    lines += ["", "Share of requested keys served, per window (t = 0: the fault; `ok`: the window in which "
              "the cluster reported every slot served again):", "",
              "| t (s) | " + " | ".join(r.name for r in runs) + " |",
              "| ---: | " + " | ".join("---:" for _ in runs) + " |"]
    first = -0.3
    last = max(r.ok_at - r.fault_at for r in runs) + max(r.whole_after_ok() for r in runs) + 0.5
    t = first
    while t < last:
        cells = []
        for r in runs:
            part = [(a, s) for st, _, a, s in r.samples if t <= st - r.fault_at < t + window_s]
            share = f"{100 * sum(s for _, s in part) / sum(a for a, _ in part):.0f}%" if part else "-"
            if t <= r.ok_at - r.fault_at < t + window_s:
                share += " ok"
            cells.append(share)
        lines.append(f"| {t:+.1f} | " + " | ".join(cells) + " |")
        t = round(t + window_s, 6)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", default="kill,freeze")
    parser.add_argument("--window-ms", type=int, default=100)
    parser.add_argument("--node-timeout-ms", type=int, default=2000)
    parser.add_argument("--after-s", type=float, default=1.5)
    parser.add_argument("--out")
    args = parser.parse_args()
    cluster = RedisCluster(3, replicas=1, node_timeout_ms=args.node_timeout_ms, require_full_coverage=False)
    cluster.start()
    runs: list[Run] = []
    try:
        for fault in args.faults.split(","):
            for replicas in (False, True):
                run = one_run(cluster, fault, replicas, args.after_s)
                runs.append(run)
                print(f"{run.name}: cluster ok {run.ok_at - run.fault_at:.2f} s after the fault, "
                      f"whole again {run.whole_after_ok():.2f} s after that", flush=True)
    finally:
        cluster.stop()
    text = report(runs, args.window_ms / 1000, args.node_timeout_ms)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
