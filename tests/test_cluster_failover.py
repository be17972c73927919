"""Redis Cluster failover under a steady request stream, on a real 3-master + 3-replica cluster.

A master is SIGKILLed or frozen (SIGSTOP) while two threads fetch 100 random items every ~20 ms each
(deadline 100 ms). Every request must come back in time and never raise; no request may lose the keys
of the healthy masters; the source's breaker stays closed; and shortly after the cluster reports every
slot served again (the replica took over) every request is whole. With ``read_from_replicas`` the dead
master's keys are served during the window too (from its replica).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from featuredao.adapters.redis import PartialWrite
from redis.crc import key_slot

from featuredao import FeatureService, build
from featuredao.resilience import BreakerState
from featuredao.testing.servers import RedisCluster, RedisServer
from featuredao.types import Reason

# One rerun, and only here: each run is seconds of real failover timed against a 100 ms deadline on a shared
# 2-core machine, and a stall of the whole process has surfaced a new corner of the test's allowances in
# several CI runs (never a lost key of a request that still had time). A rerun shows in the summary ("R").
pytestmark = [pytest.mark.redis_cluster, pytest.mark.flaky(reruns=1, reruns_delay=2)]

NODE_TIMEOUT_MS = 1000
DEADLINE_MS = 100
LATE_S = DEADLINE_MS / 1000 + 0.3  # generous: a loaded 2-core machine; the point is "not seconds"
WHOLE_AFTER_OK_S = 1.0  # every request is whole this long after the cluster reports every slot served
N_ITEMS = 3000
BATCH = 100
FEATURES = {f"f{i}": "float" if i % 3 == 0 else "int" if i % 3 == 1 else "str" for i in range(10)}
TABLE = "items"


def row(i: int) -> dict[str, Any]:
    return {name: (i + n / 10 if kind == "float" else i + n if kind == "int" else f"v{i}-{n}")
            for n, (name, kind) in enumerate(FEATURES.items())}


@pytest.fixture(scope="module")
def whole_cluster() -> Iterator[RedisCluster]:
    # No full-coverage requirement: the healthy masters keep serving while a failed master's slots wait
    # for its replica (with the default, Redis itself refuses every key once the master is marked FAIL).
    server = RedisCluster(3, replicas=1, node_timeout_ms=NODE_TIMEOUT_MS, require_full_coverage=False)
    server.start()  # waits until every replica reports its link up
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def cluster(whole_cluster: RedisCluster) -> Iterator[RedisCluster]:
    """The module's cluster, whole: 3 masters each with a linked replica (healed after each test)."""
    whole_cluster.heal(timeout=30)
    # Gossip tells every node about a restarted master's new role a little after it relinks: wait for
    # the first node's view to show three masters with one replica each.
    deadline = time.monotonic() + 30
    while sorted(len(r) for r in whole_cluster.topology().values()) != [1, 1, 1]:
        assert time.monotonic() < deadline, whole_cluster.topology()
        time.sleep(0.1)
    yield whole_cluster
    whole_cluster.heal(timeout=30)


def config(cluster: RedisCluster, **source: Any) -> dict[str, Any]:
    nodes = [f"{h}:{p}" for h, p in cluster.startup_nodes]
    return {
        "sources": {"rc": {"type": "redis", "cluster": True, "startup_nodes": nodes, **source}},
        "views": [{"name": "items", "entity": "item", "source": "rc", "table": TABLE, "key": "id",
                   "key_type": "int", "features": FEATURES, "timeout_ms": DEADLINE_MS,
                   "options": {"layout": "string", "encoding": "msgpack"}}],
        "service": {"deadline_ms": DEADLINE_MS},
    }


def seed(cfg: dict[str, Any]) -> None:
    runtime = build(cfg)
    try:
        assert runtime.daos["items"].upsert((i, row(i)) for i in range(N_ITEMS)) == N_ITEMS
    finally:
        runtime.close()


def keys_of(cluster: RedisCluster, master: RedisServer, items: range = range(N_ITEMS)) -> set[int]:
    """The items whose slot ``master`` serves."""
    ranges = cluster.slot_ranges(master)
    return {i for i in items if any(a <= key_slot(f"{TABLE}:{i}".encode()) <= b for a, b in ranges)}


@dataclass
class Sample:
    started: float
    elapsed: float
    missing: set[int]
    degraded: list[Any]
    breaker: BreakerState
    error: BaseException | None = None


@dataclass
class Stream:
    """Two threads fetching BATCH random items each every ~20 ms, recording every request."""

    service: FeatureService
    samples: list[Sample] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, seed: int) -> None:
        rng = random.Random(seed)
        assert self.service.runtime is not None
        breaker = self.service.runtime.breakers["rc"]
        while not self.stop.is_set():
            items = rng.sample(range(N_ITEMS), BATCH)
            started = time.monotonic()
            try:
                result = self.service.fetch(None, items)
            except BaseException as exc:  # recorded: the test fails on it
                self.samples.append(Sample(started, time.monotonic() - started, set(items), [],
                                           breaker.state, exc))
                continue
            elapsed = time.monotonic() - started
            missing = {i for i, got in zip(items, result.items, strict=True) if got != row(i)}
            self.samples.append(Sample(started, elapsed, missing, result.degraded, breaker.state))
            self.stop.wait(0.02)

    def start(self) -> None:
        self.threads = [threading.Thread(target=self.run, args=(n,), daemon=True) for n in range(2)]
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)


def out_of_time(s: Sample) -> bool:
    """A request that ran out of its whole deadline: the shared 2-core machine stalled the process (every
    node late at once), which the test tells from what the cluster did."""
    return s.elapsed >= DEADLINE_MS / 1000 * 0.95


def wait_slots_ok(cluster: RedisCluster, victim: RedisServer, timeout: float = 20.0) -> float:
    """When every other node reports every slot served by a healthy master again (the failover is done)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cluster.slots_ok(exclude=[victim]) and victim not in cluster.topology():
            return time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"no failover within {timeout} s")


@dataclass
class Run:
    samples: list[Sample]
    fault_at: float
    ok_at: float
    victim: RedisServer
    victim_keys: set[int]
    node_breakers: dict[str, str]

    def whole_again_s(self) -> float:
        """From the cluster reporting every slot served to the first request of a whole run of them (a
        request that ran out of its whole deadline on a stalled machine does not end the run)."""
        late = [s for s in self.samples if s.missing and s.started > self.fault_at and not out_of_time(s)]
        last_lost = max((s.started for s in late), default=self.fault_at)
        return max(0.0, last_lost - self.ok_at)

    def report(self, name: str) -> str:
        """One line per 250 ms window: requests, values lost, slowest request."""
        lines = [f"{name}: fault at 0.00 s, cluster ok at {self.ok_at - self.fault_at:.2f} s, "
                 f"whole again {self.whole_again_s():.2f} s after that"]
        start = min(s.started for s in self.samples)
        window = 0.25
        for w in range(int((max(s.started for s in self.samples) - start) / window) + 1):
            part = [s for s in self.samples if start + w * window <= s.started < start + (w + 1) * window]
            if part:
                lines.append(f"  {start + w * window - self.fault_at:+6.2f} s: {len(part):3d} requests, "
                             f"{sum(len(s.missing) for s in part):4d} keys lost, "
                             f"slowest {max(s.elapsed for s in part) * 1000:5.0f} ms")
        return "\n".join(lines)


def run_fault(cluster: RedisCluster, fault: str, **source: Any) -> Run:
    """Stream requests, kill or freeze one master, stream on until shortly after the failover."""
    cfg = config(cluster, **source)
    seed(cfg)
    victim = list(cluster.topology())[1]
    victim_keys = keys_of(cluster, victim)
    assert 0 < len(victim_keys) < N_ITEMS
    with FeatureService.from_config(cfg) as service:
        service.fetch(None, list(range(BATCH)))  # connected, slot map read: the stream measures failover
        stream = Stream(service)
        stream.start()
        try:
            time.sleep(0.5)  # steady state first
            fault_at = time.monotonic()
            victim.kill() if fault == "kill" else victim.freeze()
            ok_at = wait_slots_ok(cluster, victim)
            time.sleep(WHOLE_AFTER_OK_S + 1.0)
        finally:
            stream.finish()
        assert service.runtime is not None
        source_obj: Any = service.runtime.sources["rc"]
        nodes = source_obj.node_breakers()
    run = Run(stream.samples, fault_at, ok_at, victim, victim_keys, nodes)
    print(run.report(fault + (" (replica reads)" if source.get("read_from_replicas") else "")))
    return run


def check_stream(run: Run) -> None:
    samples, victim = run.samples, run.victim
    assert len(samples) > 50
    errors = [s.error for s in samples if s.error is not None]
    assert not errors, errors[:3]
    late = [round(s.elapsed, 3) for s in samples if s.elapsed > LATE_S]
    assert not late, f"{len(late)} request(s) late: {late[:10]}"
    # The healthy masters' keys are never lost, whatever happens to the victim: a request that ran out of
    # its whole deadline (every node late at once: the shared 2-core machine stalled the process, not the
    # cluster) is the deadline's outcome; at most 2% of them, and no request that still had time.
    lost = [s for s in samples if s.missing - run.victim_keys]
    stalled = [s for s in lost if out_of_time(s)]
    assert len(lost) == len(stalled) and len(stalled) <= max(2, len(samples) // 50), \
        f"{len(lost)} request(s) lost keys of healthy masters ({len(stalled)} at their deadline)"
    # The whole cluster is never kept out by the source's breaker.
    assert all(s.breaker is BreakerState.CLOSED for s in samples)
    # What was lost is reported, naming the node.
    address = f"{victim.host}:{victim.port}"
    for s in samples:
        if s.missing:
            if out_of_time(s):
                # Out of the request's time: the view's timeout, or, when the dead node's own failure is
                # in the same answer, the nodes that ran out of time each named as such.
                assert any(d.reason is Reason.TIMEOUT or (d.reason is Reason.UNAVAILABLE and
                                                          "no answer within the time left" in d.detail)
                           for d in s.degraded), s.degraded
                continue
            reasons = (Reason.UNAVAILABLE, Reason.TIMEOUT, Reason.CIRCUIT_OPEN)
            assert any(address in d.detail and d.reason in reasons for d in s.degraded), s.degraded
    # Whole again shortly after the cluster reports every slot served (a stalled request, which lost the
    # healthy masters' keys too, is within the budget above).
    after = [s for s in samples if s.started > run.ok_at + WHOLE_AFTER_OK_S]
    assert len(after) > 10
    assert all(not s.missing and not s.degraded for s in after if not out_of_time(s)), \
        [len(s.missing) for s in after]
    assert run.whole_again_s() < WHOLE_AFTER_OK_S
    before = [s for s in samples if s.started + s.elapsed < run.fault_at]
    assert before and all(not s.missing or out_of_time(s) for s in before)
    # The dead node serves no slot any more: its breaker went with it, and every other one is closed.
    assert address not in run.node_breakers
    assert set(run.node_breakers.values()) <= {"closed"}


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_a_dead_master_costs_only_its_slots_until_its_replica_takes_over(cluster: RedisCluster,
                                                                          fault: str) -> None:
    run = run_fault(cluster, fault)
    check_stream(run)
    # Without replica reads the window costs the victim's keys, and only during the window.
    assert any(s.missing for s in run.samples if run.fault_at < s.started < run.ok_at)


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_replica_reads_serve_the_failed_masters_keys_during_the_window(cluster: RedisCluster,
                                                                        fault: str) -> None:
    run = run_fault(cluster, fault, read_from_replicas=True)
    check_stream(run)
    # A killed master's keys go to its replica at once (connection refused); a frozen one's once its
    # node breaker opened (two late reads): give that a short grace. A request the stalled machine ran
    # out of its whole deadline lost every node's keys, the healthy masters' too: check_stream budgets it.
    grace = 0.05 if fault == "kill" else 0.5
    window = [s for s in run.samples if s.started > run.fault_at + grace]
    stalled = [s for s in window if out_of_time(s) and s.missing - run.victim_keys]
    assert window and all(not s.missing or s in stalled for s in window), \
        [len(s.missing) for s in window if s.missing]


def test_writes_and_a_stale_slot_map_across_a_failover(cluster: RedisCluster) -> None:
    cfg = config(cluster)
    victim = next(iter(cluster.topology()))
    extra = range(N_ITEMS, N_ITEMS + 300)
    victim_keys = keys_of(cluster, victim, extra)
    assert 0 < len(victim_keys) < len(extra)
    runtime, stale = build(cfg), build(cfg)
    try:
        dao, stale_dao = runtime.daos["items"], stale.daos["items"]
        assert dao.read([0]).rows == stale_dao.read([0]).rows  # both have read the slot map now
        victim.kill()
        # Upsert: the healthy masters' keys are written, the dead one's are reported.
        with pytest.raises(PartialWrite) as info:
            dao.upsert((i, row(i)) for i in extra)
        assert set(info.value.failed) == victim_keys
        assert info.value.written == len(extra) - len(victim_keys)
        assert f"{victim.host}:{victim.port}" in str(info.value)
        result = dao.read_partial(list(extra), timeout_s=1.0)
        assert set(result.failed) == victim_keys
        assert all(got == row(i) for i, got in zip(extra, result.rows, strict=True) if i not in victim_keys)
        # Once the replica took over, the failed keys can be written again (the map follows by itself).
        ok_at = wait_slots_ok(cluster, victim)
        while True:
            try:
                dao.upsert((i, row(i)) for i in info.value.failed)
                break
            except PartialWrite:
                assert time.monotonic() < ok_at + WHOLE_AFTER_OK_S
                time.sleep(0.02)
        # The stale runtime was idle through all that: its map still sends the victim's slots to the dead
        # master. Back, the old master is a replica of its successor and answers MOVED: followed within
        # the read, and the map is read again in the background.
        victim.restart()
        cluster.wait_ready(30)
        router = stale.sources["rc"].router()  # type: ignore[attr-defined]
        refreshes = router.refreshes
        result = stale_dao.read_partial(list(extra), timeout_s=1.0)
        assert not result.failed and result.rows == [row(i) for i in extra]
        end = time.monotonic() + 2
        while router.refreshes == refreshes and time.monotonic() < end:
            time.sleep(0.02)
        assert router.refreshes > refreshes
        assert any(f"{victim.host}:{victim.port}" in reps for reps in router.slot_map().replicas.values())
    finally:
        runtime.close()
        stale.close()
