"""The feature server under load: ``featuredao serve`` at fixed rates, 1 and 2 workers, against in-process.

One throwaway Redis holds a user view and an item view of 50 features each (string/msgpack layout, no
cache: every request reads Redis); every request is 1 user + 100 items (the same body, POST /v1/fetch).
For each worker count the server is first driven to saturation (``wrk``, 32 connections, no pause),
then at fixed rates (shares of that saturation) for p50/p99 at each. The same request through
``FeatureService.fetch`` in this process gives the HTTP layer's cost. Prints a markdown table, with
the server's CPU time per request (summed over its workers) and the machine's idle share during each
run: on a shared machine requests/s move with the neighbours, CPU per request much less.

Fixed rates: each connection waits a random pause (uniform, mean = connections / rate) before each
request, so the connections do not fire together (a rate limit that ticks every connection at the same
moment, as ``hey -q`` does, sends bursts whose queueing is not the server's latency).

Needs ``wrk`` (Debian package ``wrk``; installed with apt-get when missing, as root or through sudo).
Also measured: encoding the response body with ``json`` and with ``orjson`` (the reason for orjson), and
the machine's load average after every run (other work on a shared machine shows there). ``--out``
writes the results as markdown, ``--chart`` draws p50/p99 against requests/s (matplotlib).

    .venv/bin/python benchmarks/bench_serve.py [--duration 5] [--workers 1,2] [--shares 0.25,0.5,0.75]
        [--out FILE.md] [--chart FILE.png]

Everything runs on this machine (127.0.0.1): the load generator, Redis and the server share its cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from featuredao import FeatureService, build
from featuredao.server import usable_cores
from featuredao.testing.servers import RedisServer
from featuredao.testing.servers.ports import free_port

N_FEATURES = 50
ITEMS = 10_000
BATCH = 100
SATURATION_CONNECTIONS = 32
RATE_CONNECTIONS = 16


def features() -> dict[str, str]:
    kinds = ("float", "float", "float", "int", "str")
    return {f"f{i}": kinds[i % len(kinds)] for i in range(N_FEATURES)}


def config(host: str, port: int) -> dict[str, Any]:
    options = {"layout": "string", "encoding": "msgpack"}
    return {
        "sources": {"store": {"type": "redis", "host": host, "port": port, "pool_size": 16}},
        "views": [
            {"name": "user", "entity": "user", "source": "store", "table": "u", "key": "id",
             "features": features(), "prefix": "u_", "options": options, "timeout_ms": 200},
            {"name": "item", "entity": "item", "source": "store", "table": "i", "key": "id",
             "key_type": "int", "features": features(), "options": options, "timeout_ms": 200},
        ],
        "service": {"deadline_ms": 500, "max_in_flight": 256},
    }


def row(rng: random.Random) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, kind in features().items():
        out[name] = rng.random() if kind == "float" else rng.randrange(1000) if kind == "int" \
            else f"v{rng.randrange(50)}"
    return out


def seed(cfg: dict[str, Any]) -> None:
    runtime = build(cfg)
    try:
        rng = random.Random(7)
        runtime.daos["user"].upsert([("u1", row(rng))])
        for start in range(0, ITEMS, 2000):
            runtime.daos["item"].upsert((i, row(rng)) for i in range(start, min(ITEMS, start + 2000)))
    finally:
        runtime.close()


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "wrk"], check=True, env=env)
    found = shutil.which("wrk")
    if not found:
        sys.exit("wrk is not installed and could not be installed")
    return found


@dataclass
class Run:
    workers: int
    label: str
    target: float | None
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_ms: float
    """Server CPU (every worker) per request."""
    idle: float
    """The machine's idle share during the run."""
    load1: float = 0.0
    """The machine's 1-minute load average at the end of the run."""


def script(tmp: Path, body: Path, pause_ms: float | None) -> Path:
    """A wrk script posting the body; with ``pause_ms``, a random pause (that mean) before each request."""
    lua = ['wrk.method = "POST"', 'wrk.headers["Content-Type"] = "application/json"',
           f'local f = io.open({json.dumps(str(body))}, "rb")', 'wrk.body = f:read("*a")', "f:close()"]
    if pause_ms is not None:
        lua += ["math.randomseed(os.time())",
                f"function delay() return math.random() * {2 * pause_ms:.3f} end"]
    path = tmp / f"wrk-{'paced' if pause_ms is not None else 'flat'}-{pause_ms or 0:.0f}.lua"
    path.write_text("\n".join(lua) + "\n")
    return path


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def wrk(binary: str, url: str, lua: Path, duration: float,
        connections: int) -> tuple[float, float, float, int]:
    """Requests/s, p50 and p99 in ms, and failed or non-2xx requests, from one wrk run."""
    threads = 1 if connections <= 16 else 2
    seconds = max(1, round(duration))
    out = subprocess.run([binary, "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
                          "--latency", "-s", str(lua), url],
                         capture_output=True, text=True, check=True).stdout

    def find(pattern: str) -> re.Match[str]:
        found = re.search(pattern, out)
        if found is None:
            raise SystemExit(f"unexpected wrk output:\n{out}")
        return found

    p50 = find(r"50%\s+([\d.]+)(us|ms|s|m)\b")
    p99 = find(r"99%\s+([\d.]+)(us|ms|s|m)\b")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non_2xx.group(1)) if non_2xx else 0
    return float(find(r"Requests/sec:\s+([\d.]+)").group(1)), _ms(*p50.groups()), _ms(*p99.groups()), errors


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total


def machine() -> tuple[int, int]:
    """(idle, total) jiffies of the whole machine."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return values[3] + values[4], sum(values)


def start_server(config_path: Path, workers: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "featuredao.cli", "serve", str(config_path), "--port",
                             str(port), "--workers", str(workers), "--reload-interval", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    sys.exit("featuredao serve did not start")


def measured(proc: subprocess.Popen[bytes], binary: str, url: str, lua: Path, duration: float,
             connections: int) -> tuple[float, float, float, int, float, float]:
    """One wrk run with the server's CPU per request and the machine's idle share around it."""
    workers = children(proc.pid)
    ticks0, (idle0, total0) = cpu_ticks(workers), machine()
    rps, p50, p99, errors = wrk(binary, url, lua, duration, connections)
    ticks1, (idle1, total1) = cpu_ticks(workers), machine()
    hz = os.sysconf("SC_CLK_TCK")
    cpu_ms = (ticks1 - ticks0) / hz * 1000 / max(1.0, rps * duration)
    return rps, p50, p99, errors, cpu_ms, (idle1 - idle0) / max(1, total1 - total0)


def encoding(cfg: dict[str, Any], body: dict[str, Any], rounds: int = 200) -> tuple[float, float]:
    """Median ms to encode the server's answer to the request with ``json`` and with ``orjson``."""
    import orjson

    from featuredao.server.protocol import fetch_body

    with FeatureService.from_config(cfg) as service:
        answer = fetch_body(service.fetch(body["user_id"], body["item_ids"]), "0" * 16)

    def median_ms(encode: Callable[[Any], bytes]) -> float:
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            encode(answer)
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000

    return median_ms(lambda a: json.dumps(a).encode()), median_ms(orjson.dumps)


def in_process(cfg: dict[str, Any], body: dict[str, Any], requests: int) -> tuple[float, float]:
    with FeatureService.from_config(cfg) as service:
        for _ in range(50):
            service.fetch(body["user_id"], body["item_ids"])
        times = []
        for _ in range(requests):
            started = time.perf_counter()
            result = service.fetch(body["user_id"], body["item_ids"])
            times.append(time.perf_counter() - started)
            assert not result.degraded, result.degraded
    times.sort()
    return statistics.median(times) * 1000, times[int(len(times) * 0.99)] * 1000


def in_process_concurrent(cfg: dict[str, Any], body: dict[str, Any], requests: int,
                          concurrency: int) -> tuple[float, float]:
    """Requests/s of ``await afetch`` (plus the orjson encoding of the answer) with ``concurrency`` in
    flight on one event loop, and this process's CPU ms per request: what one worker does without HTTP
    (the CPU figure moves far less with the machine's other work than the rate does)."""
    import asyncio

    import orjson

    async def run(service: FeatureService) -> float:
        slots = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with slots:
                result = await service.afetch(body["user_id"], body["item_ids"])
                orjson.dumps({"user": result.user, "items": result.items})

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(requests)))
        return requests / (time.perf_counter() - started)

    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        pass
    with FeatureService.from_config(cfg) as service, asyncio.Runner(loop_factory=factory) as runner:
        runner.run(run(service))  # warm-up
        cpu = time.process_time()
        rate = runner.run(run(service))
        return rate, (time.process_time() - cpu) * 1000 / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--shares", default="0.25,0.5,0.75", help="fixed rates, as shares of saturation")
    parser.add_argument("--out", default=None, help="also write the results here (markdown)")
    parser.add_argument("--chart", default=None, help="draw p50/p99 against requests/s here (PNG)")
    args = parser.parse_args()
    binary = ensure_wrk()
    worker_counts = [int(w) for w in args.workers.split(",")]
    shares = [float(s) for s in args.shares.split(",")]

    runs: list[Run] = []
    tmp = Path(tempfile.mkdtemp(prefix="featuredao-bench-serve-"))
    with RedisServer() as redis_server:
        cfg = config(redis_server.host, redis_server.port)
        seed(cfg)
        config_path = tmp / "featuredao.json"
        config_path.write_text(json.dumps(cfg))
        rng = random.Random(3)
        request = {"user_id": "u1", "item_ids": rng.sample(range(ITEMS), BATCH)}
        body = tmp / "request.json"
        body.write_text(json.dumps(request))
        load_before = os.getloadavg()
        json_ms, orjson_ms = encoding(cfg, request)
        local_p50, local_p99 = in_process(cfg, request, 2000)
        local_async, local_cpu = in_process_concurrent(cfg, request, 2000, SATURATION_CONNECTIONS)
        flat = script(tmp, body, None)

        for workers in worker_counts:
            proc, url = start_server(config_path, workers)
            target_url = f"{url}/v1/fetch"
            try:
                check = httpx.post(target_url, json=request, timeout=5).json()
                assert len(check["items"]) == BATCH and not check["degraded"], check["degraded"]
                wrk(binary, target_url, flat, 2, SATURATION_CONNECTIONS)  # warm-up
                result = measured(proc, binary, target_url, flat, args.duration, SATURATION_CONNECTIONS)
                runs.append(Run(workers, f"saturation ({SATURATION_CONNECTIONS} conns)", None, *result,
                                os.getloadavg()[0]))
                saturation = result[0]
                for share in shares:
                    target = saturation * share
                    connections = max(2, min(RATE_CONNECTIONS, round(target / 25)))
                    paced = script(tmp, body, connections / target * 1000)
                    result = measured(proc, binary, target_url, paced, args.duration, connections)
                    runs.append(Run(workers, f"{share:.0%} of saturation ({connections} conns)", target,
                                    *result, os.getloadavg()[0]))
                    time.sleep(0.5)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    shutil.rmtree(tmp, ignore_errors=True)

    load_after = os.getloadavg()
    lines = report(runs, local_p50, local_p99, (local_async, local_cpu), (json_ms, orjson_ms), load_before,
                   load_after)
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    if args.chart:
        chart(runs, args.chart)


def report(runs: list[Run], local_p50: float, local_p99: float, local: tuple[float, float],
           encodings: tuple[float, float], load_before: tuple[float, float, float],
           load_after: tuple[float, float, float]) -> list[str]:
    """The results as markdown: the table, the targets met or missed, the HTTP cost, the load."""
    (local_async, local_cpu), (json_ms, orjson_ms) = local, encodings
    out = [f"1 user + {BATCH} items x {N_FEATURES} features (Redis string/msgpack, no cache); "
           f"{usable_cores()} cores shared by wrk, Redis, the server and the machine's other work. "
           f"Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in load_before)}; after: "
           f"{', '.join(f'{v:.2f}' for v in load_after)}.", "",
           "| workers | load | target req/s | req/s | p50 ms | p99 ms | errors | server CPU ms/req | idle "
           "| load avg 1m |",
           "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        shown = "-" if r.target is None else f"{r.target:.0f}"
        out.append(f"| {r.workers} | {r.label} | {shown} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
                   f"| {r.errors} | {r.cpu_ms:.2f} | {r.idle:.0%} | {r.load1:.1f} |")
    out.append(f"| in-process | `FeatureService.fetch`, one thread | - | {1000 / local_p50:.0f} "
               f"| {local_p50:.2f} | {local_p99:.2f} | 0 | - | - | - |")
    out.append(f"| in-process | `await afetch` + orjson, {SATURATION_CONNECTIONS} in flight on one loop | - "
               f"| {local_async:.0f} | - | - | 0 | {local_cpu:.2f} | - | - |")
    out.append("")
    sat = {r.workers: r.rps for r in runs if r.target is None}
    if 1 in sat and 2 in sat:
        ratio = sat[2] / sat[1]
        out.append(f"- 2 workers / 1 worker at saturation: {ratio:.2f}x (target >= 1.7x: "
                   f"{'met' if ratio >= 1.7 else 'missed'})")
    for r in runs:
        if r.target is not None and abs(r.target / sat.get(r.workers, r.target) - 0.5) < 1e-9:
            out.append(f"- p99 at half of saturation, {r.workers} worker(s): {r.p99_ms:.1f} ms "
                       f"(target < 10 ms: {'met' if r.p99_ms < 10 else 'missed'})")
    light = [r for r in runs if r.workers == 1 and r.target is not None]
    if light:
        out.append(f"- HTTP cost at the lightest rate (p50, 1 worker): {light[0].p50_ms - local_p50:.2f} ms "
                   f"over an in-process `fetch` ({local_p50:.2f} ms)")
    saturated = [r for r in runs if r.workers == 1 and r.target is None]
    if saturated:
        served = saturated[0].cpu_ms
        out.append(f"- CPU per request at saturation, 1 worker: {served:.2f} ms against {local_cpu:.2f} ms "
                   f"for `await afetch` + orjson in-process: HTTP (uvicorn, httptools) and Starlette add "
                   f"{served - local_cpu:.2f} ms ({(served - local_cpu) / served:.0%} of the worker's CPU)")
    out.append(f"- encoding the answer (median of 200): json {json_ms:.2f} ms, orjson {orjson_ms:.2f} ms "
               f"({json_ms / orjson_ms:.0f}x)")
    return out


def chart(runs: list[Run], path: str) -> None:
    """p50 and p99 against achieved requests/s, one line per worker count, the 10 ms target dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, workers in enumerate(sorted({r.workers for r in runs})):
        mine = sorted((r for r in runs if r.workers == workers), key=lambda r: r.rps)
        rps, color = [r.rps for r in mine], f"C{i}"
        ax.plot(rps, [r.p50_ms for r in mine], marker="o", color=color, label=f"{workers} worker(s) p50")
        ax.plot(rps, [r.p99_ms for r in mine], marker="s", linestyle=":", color=color,
                label=f"{workers} worker(s) p99")
    ax.axhline(10, color="grey", linestyle="--", label="p99 target (10 ms)")
    ax.set_yscale("log")
    ax.set_xlabel("requests/s")
    ax.set_ylabel("ms")
    ax.legend(fontsize=8)
    ax.set_title(f"featuredao serve: POST /v1/fetch, 1 user + {BATCH} items x {N_FEATURES} features (Redis)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
