"""``fetch`` reads one lane in the caller's thread when its reads are bounded by their time."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from fakes import FakeDao, make_view

from featuredao.config import ServiceConfig
from featuredao.deadline import Deadline
from featuredao.service import FeatureService
from featuredao.types import BatchResult, Key, Row


class BoundedDao(FakeDao):
    """A fake that says its reads end within their time, and records the thread each read ran on."""

    def __init__(self, name: str, rows: dict[Key, Row], barrier: threading.Barrier | None = None,
                 bounded: bool = True) -> None:
        super().__init__(make_view(name, "item", prefix=f"{name}_", timeout_ms=2000), rows)
        self.barrier = barrier
        self.bounded = bounded
        self.threads: list[threading.Thread] = []

    def bounded_reads(self) -> bool:
        return self.bounded

    def read_partial(self, keys: Sequence[Key], features: Sequence[str] | None = None, *,
                     timeout_s: float | None = None, as_of: float | None = None,
                     deadline: Deadline | None = None) -> BatchResult:
        self.threads.append(threading.current_thread())
        if self.barrier is not None:
            self.barrier.wait()  # BrokenBarrierError unless the other view is read at the same time
        return super().read_partial(keys, features, timeout_s=timeout_s, deadline=deadline)


def service(*daos: BoundedDao) -> FeatureService:
    return FeatureService({d.view.name: d for d in daos}, ServiceConfig(deadline_ms=2000))


def test_a_bounded_view_is_read_in_the_callers_thread() -> None:
    dao = BoundedDao("a", {"i1": {"a": 1, "b": "x"}})
    with service(dao) as svc:
        result = svc.fetch(None, ["i1"])
    assert result.items == [{"a_a": 1, "a_b": "x"}] and result.degraded == []
    assert dao.threads == [threading.current_thread()]


def test_an_unbounded_view_is_read_on_a_worker() -> None:
    dao = BoundedDao("a", {"i1": {"a": 1, "b": "x"}}, bounded=False)
    with service(dao) as svc:
        assert svc.fetch(None, ["i1"]).degraded == []
    assert dao.threads and dao.threads[0] is not threading.current_thread()


def test_with_several_views_the_caller_reads_one_while_workers_read_the_others() -> None:
    barrier = threading.Barrier(2, timeout=2)
    a = BoundedDao("a", {"i1": {"a": 1, "b": "x"}}, barrier)
    b = BoundedDao("b", {"i1": {"a": 2, "b": "y"}}, barrier)
    with service(a, b) as svc:
        result = svc.fetch(None, ["i1"])
    assert result.degraded == [] and not barrier.broken
    assert result.items == [{"a_a": 1, "a_b": "x", "b_a": 2, "b_b": "y"}]
    assert sorted(t is threading.current_thread() for t in a.threads + b.threads) == [False, True]


def test_afetch_never_reads_on_the_loops_thread() -> None:
    import asyncio

    dao = BoundedDao("a", {"i1": {"a": 1, "b": "x"}})

    async def main() -> threading.Thread:
        with service(dao) as svc:
            await svc.afetch(None, ["i1"])
        return threading.current_thread()

    loop_thread = asyncio.run(main())
    assert dao.threads and dao.threads[0] is not loop_thread


class LaneDao(FakeDao):
    """A fake on one shared lane of one connection: its views are read one after another on a worker."""

    def lane(self) -> tuple[str, int] | None:
        return "one-connection", 1


def test_a_late_view_leaves_the_views_queued_behind_it_to_be_read() -> None:
    late = LaneDao(make_view("v0", "item", prefix="v0_", timeout_ms=100), {"i1": {"a": 0, "b": "x"}},
                   delay=0.3)
    rest = [LaneDao(make_view(n, "item", prefix=f"{n}_", timeout_ms=2000), {"i1": {"a": i, "b": "y"}})
            for i, n in enumerate(("v1", "v2"), start=1)]
    with FeatureService({d.view.name: d for d in (late, *rest)}, ServiceConfig(deadline_ms=2000)) as svc:
        result = svc.fetch(None, ["i1"])
    assert [(d.view, d.reason.value) for d in result.degraded] == [("v0", "timeout")]
    assert result.items == [{"v0_a": -1, "v0_b": None, "v1_a": 1, "v1_b": "y", "v2_a": 2, "v2_b": "y"}]
