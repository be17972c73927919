"""A real ``featuredao serve`` over time: hot reload, the token, SIGTERM drains, workers replaced."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from servehelp import Served, metric, wait_for, worker_pids, write_config

from featuredao import BackendAuthError, BackendTimeout
from featuredao.client import FeatureClient

pytestmark = [pytest.mark.serve, pytest.mark.redis]

REQUEST = {"user_id": "u1", "item_ids": [1, 2, 3]}
NEW_VIEW = {"name": "items_v2", "entity": "item", "source": "local", "table": "items", "key": "item_id",
            "key_type": "int", "features": {"price": "float"}, "prefix": "v2_"}


class Stream:
    """Threads sending fetches without pause until stopped; every answer's status and config hash."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url = url
        self.stop = threading.Event()
        self.statuses: Counter[int] = Counter()
        self.configs: Counter[str] = Counter()
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Stream:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(10)

    def _run(self) -> None:
        with httpx.Client(timeout=5.0) as client:
            while not self.stop.is_set():
                try:
                    r = client.post(f"{self.url}/v1/fetch", json=REQUEST)
                    config = r.json().get("config", "") if r.status_code == 200 else ""
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                with self._lock:
                    self.statuses[r.status_code] += 1
                    self.configs[config] += 1


def config_hash(url: str) -> str:
    answer: str = httpx.get(f"{url}/v1/config", timeout=5.0).json()["config"]
    return answer


def test_reload_swaps_a_valid_config_without_failing_a_request(seeded_config: Path) -> None:
    doc = json.loads(seeded_config.read_text())
    server = Served(seeded_config, "--reload-interval", "0.2", workers=2)
    try:
        old = config_hash(server.url)
        with Stream(server.url) as stream:
            time.sleep(0.3)
            write_config(seeded_config.parent, {**doc, "views": [*doc["views"], NEW_VIEW]})

            def every_worker_has_it() -> bool:
                return all("items_v2" in httpx.get(f"{server.url}/v1/config").json()["views"]
                           for _ in range(10))  # new connections: spread over both workers

            wait_for(every_worker_has_it, 10.0, "the new view in every worker")
            time.sleep(0.3)
        new = config_hash(server.url)
        assert new != old
        assert stream.errors == [] and set(stream.statuses) == {200}, (stream.statuses, stream.errors[:3])
        assert stream.configs[old] > 0 and stream.configs[new] > 0  # the stream ran across the swap
        fetched = httpx.post(f"{server.url}/v1/fetch", json=REQUEST).json()
        assert fetched["items"][0]["v2_price"] == 1.5

        def counted() -> bool:
            text = httpx.get(f"{server.url}/metrics").text
            return metric(text, "featuredao_config_reloads_total", outcome="ok") == 1

        wait_for(counted, 5.0, "the reload counted once")

        # An invalid config: every problem logged with its JSON path, the running config stays.
        broken = {**doc, "views": [*doc["views"], {**NEW_VIEW, "name": "broken", "source": "nowhere",
                                                    "features": {"price": "decimal"}}]}
        write_config(seeded_config.parent, broken)
        wait_for(lambda: "rejected" in server.log(), 5.0, "the invalid config rejected")
        log = server.log()
        assert "$.views[4].source" in log and "$.views[4].features.price" in log
        assert "Traceback" not in log
        for _ in range(10):
            r = httpx.post(f"{server.url}/v1/fetch", json=REQUEST)
            assert r.status_code == 200 and r.json()["config"] == new
        text = httpx.get(f"{server.url}/metrics").text
        assert metric(text, "featuredao_config_reloads_total", outcome="invalid") == 1
        time.sleep(0.5)  # polled again meanwhile: one rejection is logged (and counted) once
        assert server.log().count("rejected") == 1
    finally:
        write_config(seeded_config.parent, doc)
        assert server.stop() == 0, server.log()


def test_sighup_reloads_at_once(seeded_config: Path) -> None:
    doc = json.loads(seeded_config.read_text())
    server = Served(seeded_config, "--reload-interval", "0")
    try:
        old = config_hash(server.url)
        write_config(seeded_config.parent, {**doc, "views": [*doc["views"], NEW_VIEW]})
        time.sleep(0.4)
        assert config_hash(server.url) == old  # no polling
        server.signal(signal.SIGHUP)
        wait_for(lambda: config_hash(server.url) != old, 5.0, "the reload after SIGHUP")
        assert "items_v2" in httpx.get(f"{server.url}/v1/config").json()["views"]
    finally:
        write_config(seeded_config.parent, doc)
        assert server.stop() == 0, server.log()


def test_bearer_token_guards_every_route_but_healthz(seeded_config: Path) -> None:
    token = "tok-" + os.urandom(8).hex()
    server = Served(seeded_config, "--token-env", "FEATUREDAO_TEST_TOKEN",
                    env={"FEATUREDAO_TEST_TOKEN": token})
    try:
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        good = {"authorization": f"Bearer {token}"}
        for method, path, body in (("GET", "/readyz", None), ("GET", "/metrics", None),
                                   ("GET", "/v1/config", None), ("POST", "/v1/fetch", REQUEST),
                                   ("POST", "/v1/views/items", {"keys": [1]})):
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": token}):
                refused = httpx.request(method, f"{server.url}{path}", json=body, headers=headers)
                assert refused.status_code == 401, (path, headers)
                assert refused.headers["www-authenticate"].startswith("Bearer")
                assert token not in refused.text
            assert httpx.request(method, f"{server.url}{path}", json=body, headers=good).status_code == 200
        with FeatureClient(server.url, token=token) as client:
            assert client.fetch("u1", [1]).user == {"u_age": 31, "u_city": "paris"}
        with FeatureClient(server.url, token="wrong") as client, pytest.raises(BackendAuthError):
            client.fetch("u1", [1])
    finally:
        assert server.stop() == 0
        assert token not in server.log()


def slow_config(tmp: Path, latency_ms: int) -> Path:
    """A memory store answering each read after ``latency_ms``: requests stay in flight that long."""
    doc = {"sources": {"mem": {"type": "memory", "latency_ms": latency_ms},
                       "broken": {"type": "memory", "down": True}},
           "views": [{"name": "slow", "entity": "user", "source": "mem", "table": "t", "key": "id",
                      "features": {"a": "int"}, "timeout_ms": 5000}],
           "service": {"deadline_ms": 5000}}
    return write_config(tmp, doc, "slow.json")


def test_sigterm_drains_requests_in_flight(tmp_path: Path) -> None:
    server = Served(slow_config(tmp_path, 600), "--drain-timeout", "5")
    answers: list[tuple[int, float]] = []
    errors: list[str] = []

    def one() -> None:
        started = time.monotonic()
        try:
            r = httpx.post(f"{server.url}/v1/fetch", json={"user_id": "x"}, timeout=10.0)
            answers.append((r.status_code, time.monotonic() - started))
        except httpx.HTTPError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    ready = httpx.get(f"{server.url}/readyz", timeout=10.0)
    assert ready.status_code == 503 and ready.json()["not_ready"] == ["broken"]
    with FeatureClient(server.url, timeout_s=0.1) as client, pytest.raises(BackendTimeout):
        client.fetch("x")  # the client's own timeout, shorter than the server's answer
    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    server.signal(signal.SIGTERM)
    time.sleep(0.2)
    with pytest.raises(httpx.ConnectError):  # no longer accepting
        httpx.get(f"{server.url}/healthz", timeout=1.0)
    for t in threads:
        t.join(10)
    code = server.stop()
    assert errors == []
    assert [status for status, _ in answers] == [200] * 4
    assert all(elapsed >= 0.5 for _, elapsed in answers)  # they were in flight at SIGTERM
    assert code == 0, server.log()


def test_a_killed_worker_is_replaced_and_metrics_sum_over_workers(seeded_config: Path) -> None:
    server = Served(seeded_config, "--reload-interval", "0", workers=2)
    try:
        pids = worker_pids(server.url, 2)
        assert len(pids) == 2
        calls = 20
        for _ in range(calls):  # a new connection each: spread over both workers
            assert httpx.post(f"{server.url}/v1/fetch", json=REQUEST).status_code == 200
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not alive(victim), 5.0, "the killed worker gone")  # its socket closed with it
        for _ in range(20):  # the other worker serves meanwhile
            assert httpx.post(f"{server.url}/v1/fetch", json=REQUEST).status_code == 200
        calls += 20

        def replaced() -> bool:
            now = worker_pids(server.url, 2, tries=50)
            return len(now) == 2 and victim not in now

        wait_for(replaced, 15.0, "a new worker in place of the killed one")
        assert "exited with code -9; starting a new one" in server.log()
        # Counters are summed over every worker, the killed one included.
        text = httpx.get(f"{server.url}/metrics").text
        assert metric(text, "featuredao_http_requests_total", route="/v1/fetch", code="200") >= calls
    finally:
        assert server.stop() == 0, server.log()


def alive(pid: int) -> bool:
    """Running (not a zombie whose files the kernel has closed)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "featuredao.cli", "serve", *args], capture_output=True,
                          text=True, timeout=60)


def test_startup_errors_exit_with_a_message(tmp_path: Path, seeded_config: Path) -> None:
    bad = write_config(tmp_path, {"sources": {"s": {"type": "sqlite", "path": "x.db"}},
                                  "views": [{"name": "v", "entity": "user", "source": "t", "table": "t",
                                             "key": "k", "features": {"a": "decimal"}}]}, "bad.json")
    invalid = run_cli(str(bad), "--port", "0")
    assert invalid.returncode == 2
    assert "$.views[0].source" in invalid.stderr and "$.views[0].features.a" in invalid.stderr
    assert "Traceback" not in invalid.stderr

    no_token = run_cli(str(seeded_config), "--port", "0", "--token-env", "FEATUREDAO_UNSET_VAR")
    assert no_token.returncode == 2 and "FEATUREDAO_UNSET_VAR" in no_token.stderr

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        in_use = run_cli(str(seeded_config), "--port", str(port))
    assert in_use.returncode == 1 and "address already in use" in in_use.stderr
    assert "Traceback" not in in_use.stderr + no_token.stderr
