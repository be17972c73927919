"""How the service reads a stage: L1 first, lanes per source on workers, the caller's thread, the loop."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from typing import TYPE_CHECKING

from featuredao.deadline import Deadline
from featuredao.errors import Closed, Overloaded, reason_of
from featuredao.lifecycle import Gate
from featuredao.metrics import Metrics
from featuredao.request import Part
from featuredao.resilience import served_some
from featuredao.steps import adrive, drive
from featuredao.types import BatchResult, Degraded, Reason

Queue = list[tuple[Part, "Future[BatchResult]"]]
"""Parts one worker (or the caller's thread) reads, with the futures their request waits on."""

if TYPE_CHECKING:  # asyncio is imported where a loop runs: at import it costs start-up ~10%
    import asyncio


class ServiceReads:
    """The read side of :class:`~featuredao.service.FeatureService` (a mixin: the service owns the state)."""

    _pool: ThreadPoolExecutor
    _gate: Gate
    _metrics: Metrics
    max_in_flight: int

    def _start(self, tasks: list[Part], deadline: Deadline, *,
               inline: bool = False) -> list[Future[BatchResult]]:
        """Answer from L1 at once where it holds every key; read the rest on workers, lane by lane.

        Views of one source share its pool: at most ``pool_size`` of them run at once, the others
        queue on the same workers (each one's time counted from when it starts, capped by the
        deadline) instead of timing out in the pool and counting as a failure of the store.
        With ``inline``, the caller's thread reads one lane itself when every read of it is bounded by
        its time (``bounded_reads``): the workers only fan out, and a one-view request needs none.
        """
        futures: list[Future[BatchResult]] = [Future() for _ in tasks]
        lanes: dict[object, list[list[tuple[Part, Future[BatchResult]]]]] = {}
        together: dict[str, list[tuple[Part, Future[BatchResult]]]] = {}
        for task, fut in zip(tasks, futures, strict=True):
            started = time.perf_counter()
            hit = task.dao.peek(task.keys)
            if hit is not None:
                self._metrics.read(task.view.name, time.perf_counter() - started, len(task.keys), hit.found)
                fut.set_result(hit)
                continue
            lane = task.dao.lane()
            if lane is not None and task.dao.grouped():
                together.setdefault(lane[0], []).append((task, fut))
            else:
                _enqueue(lanes, task, fut, lane)
        runs: list[tuple[Callable[[Queue, Deadline], None], Queue]] = []
        for members in together.values():
            # The views of one source read together: one round trip for all. A lone view too, where its
            # reads are bounded (the caller's thread may run it): its chunks then share one round trip
            # instead of queueing for the GIL on the source's threads.
            if len(members) > 1 or members[0][0].dao.bounded_reads():
                runs.append((self._run_group, members))
            else:
                _enqueue(lanes, *members[0], members[0][0].dao.lane())
        runs += [(self._run_lane, queue) for group in lanes.values() for queue in group]
        mine = next((r for r in reversed(runs) if all(t.dao.bounded_reads() for t, _ in r[1])), None) \
            if inline else None
        for run in runs:
            if run is not mine:
                self._submit(*run, deadline)
        if mine is not None:
            try:
                mine[0](mine[1], deadline)
            except Closed:
                self._fail(mine[1])  # closed meanwhile: its reads answer Closed, as on a worker
        return futures

    def _shed(self, tasks: list[Part]) -> list[BatchResult | BaseException | None]:
        """Too many requests in flight: what L1 holds at once, defaults for the rest, no store read."""
        out: list[BatchResult | BaseException | None] = []
        shed = Overloaded(f"shed: {self.max_in_flight} requests already in flight")
        for task in tasks:
            hit = task.dao.peek(task.keys)
            if hit is None:
                self._metrics.error(task.view.name, Reason.OVERLOADED.value)
            out.append(hit if hit is not None else shed)
        return out

    def _submit(self, run: Callable[[Queue, Deadline], None], queue: Queue, deadline: Deadline) -> None:
        try:
            worker = self._pool.submit(run, queue, deadline)
        except RuntimeError:  # shut down by close() meanwhile
            worker = None
        if worker is None or worker.cancelled():
            self._fail(queue)
            return
        # Whatever ended the lane (cancelled by close, refused by a closed gate), nobody waits in vain.
        worker.add_done_callback(lambda _: self._fail(queue))

    @staticmethod
    def _fail(queue: Queue) -> None:
        for _, fut in queue:
            _settle(fut, error=Closed("the service was closed"))

    def _run_lane(self, queue: Queue, deadline: Deadline) -> None:
        with self._gate.admit():
            for task, fut in queue:
                if fut.done():
                    continue  # the request stopped waiting for it before it started
                try:
                    # Its own timeout counts from when its read starts, never past the request's deadline.
                    result = self._read(task, deadline.within(task.timeout_s))
                except BaseException as exc:  # handed to the waiting request
                    _settle(fut, error=exc)
                else:
                    _settle(fut, result)

    def _run_group(self, queue: Queue, deadline: Deadline) -> None:
        """Views of one source read together (``featuredao.steps``): their fetches share round trips."""
        with self._gate.admit():
            live = [(task, fut) for task, fut in queue if not fut.done()]
            started = time.perf_counter()
            reads = [task.dao.read_steps(task.keys, as_of=task.as_of,
                                         deadline=deadline.within(task.timeout_s)) for task, _ in live]
            for (task, fut), outcome in zip(live, drive(reads), strict=True):
                try:
                    result = self._finished(task, outcome, started)
                except BaseException as exc:  # handed to the waiting request
                    _settle(fut, error=exc)
                else:
                    _settle(fut, result)

    async def _arun_group(self, queue: list[tuple[Part, asyncio.Future[BatchResult]]],
                          deadline: Deadline) -> None:
        """``_run_group`` on the loop: the views' fetches go to the source's ``aread_group`` at once."""
        started = time.perf_counter()
        reads = [task.dao.read_steps(task.keys, as_of=task.as_of, deadline=deadline.within(task.timeout_s))
                 for task, _ in queue]
        try:
            outcomes = await adrive(reads)
        except BaseException as exc:  # cancelled (the request, or close): nobody waits in vain
            for _, fut in queue:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else Closed("the read was stopped"))
            raise
        for (task, fut), outcome in zip(queue, outcomes, strict=True):
            if fut.done():
                continue  # the request stopped waiting for it
            try:
                fut.set_result(self._finished(task, outcome, started))
            except Exception as exc:
                fut.set_exception(exc)

    def _finished(self, task: Part, outcome: BatchResult | Exception, started: float) -> BatchResult:
        """A grouped read's outcome as its request takes it: checked and counted, or its error raised."""
        if not isinstance(outcome, BatchResult):
            self._metrics.error(task.view.name, reason_of(outcome).value)
            raise outcome
        return self._checked(task, outcome, started)

    def _read(self, task: Part, deadline: Deadline) -> BatchResult:
        started = time.perf_counter()
        try:
            result = task.dao.read_partial(task.keys, as_of=task.as_of, deadline=deadline)
        except Exception as exc:
            self._metrics.error(task.view.name, reason_of(exc).value)
            raise
        return self._checked(task, result, started)

    async def _aread(self, task: Part, deadline: Deadline) -> BatchResult:
        """``_read`` on the loop, for a DAO that reads with the driver's asyncio client."""
        started = time.perf_counter()
        try:
            # As on a worker: its own timeout counts from when the loop starts it, capped by the deadline.
            result = await task.dao.aread_partial(task.keys, as_of=task.as_of,
                                                  deadline=deadline.within(task.timeout_s))
        except Exception as exc:
            self._metrics.error(task.view.name, reason_of(exc).value)
            raise
        return self._checked(task, result, started)

    def _checked(self, task: Part, result: BatchResult, started: float) -> BatchResult:
        """A read's answer, or its error when nothing was served; counted in metrics."""
        if result.error is not None:
            if not served_some(result):
                # Nothing served: the whole view degrades, with its reason.
                self._metrics.error(task.view.name, reason_of(result.error).value)
                raise result.error
            # Served in part (a dead cluster node's keys failed, the others' not): the failed keys are
            # missing with a degraded entry, the rest is served.
            result.degraded.append(Degraded(task.view.name, reason_of(result.error),
                                            f"{len(result.failed)} key(s) not served: {result.error}",
                                            tuple(result.failed[:20])))
        self._metrics.read(task.view.name, time.perf_counter() - started, len(task.keys), result.found)
        return result

    @staticmethod
    def _wait_s(task: Part, started: float, budget: float, admitted: float) -> float:
        """How much longer to wait for a task; a small grace lets the adapter's own deadline fire first.

        A task that starts at once may take its own timeout from when the request was admitted (time
        spent waiting for a slot is not its fault), never past the request's deadline.
        """
        deadline = started + budget * 1.1 + 0.002
        own = admitted + task.timeout_s * 1.1 + 0.002 if task.first else deadline
        return min(own, deadline) - time.perf_counter()

    def _astart(self, parts: list[Part], deadline: Deadline) -> list[asyncio.Future[BatchResult]]:
        """Parts whose DAO reads on the loop run as tasks (L1 answers at once); the rest on threads."""
        import asyncio
        native = {id(p) for p in parts if p.dao.native_async()}
        threaded = iter(self._start([p for p in parts if id(p) not in native], deadline))
        loop = asyncio.get_running_loop()
        out: list[asyncio.Future[BatchResult] | None] = []
        together: dict[str, list[int]] = {}
        for part in parts:
            if id(part) not in native:
                out.append(asyncio.wrap_future(next(threaded)))
                continue
            started = time.perf_counter()
            hit = part.dao.peek(part.keys)
            if hit is not None:
                self._metrics.read(part.view.name, time.perf_counter() - started, len(part.keys), hit.found)
                done: asyncio.Future[BatchResult] = loop.create_future()
                done.set_result(hit)
                out.append(done)
            elif (lane := part.dao.lane()) is not None and part.dao.grouped():
                together.setdefault(lane[0], []).append(len(out))
                out.append(None)  # below: read with the other views of its source, or alone
            else:
                out.append(asyncio.ensure_future(self._aread(part, deadline)))
        for members in together.values():
            if len(members) == 1:
                out[members[0]] = asyncio.ensure_future(self._aread(parts[members[0]], deadline))
                continue
            queue = [(parts[i], loop.create_future()) for i in members]  # one round trip, as in fetch
            for i, (_, fut) in zip(members, queue, strict=True):
                out[i] = fut
            asyncio.ensure_future(self._arun_group(queue, deadline)).add_done_callback(_retrieved)
        return [fut for fut in out if fut is not None]


def _retrieved(task: asyncio.Future[None]) -> None:
    """Read a finished group task's outcome: its error reached the request through the parts' futures."""
    if not task.cancelled():
        task.exception()


def _enqueue(lanes: dict[object, list[Queue]], task: Part, fut: Future[BatchResult],
             lane: tuple[str, int] | None) -> None:
    """A part into its lane: a queue of its own while the lane has room, else behind others."""
    if lane is None:
        lanes[id(task)] = [[(task, fut)]]
        return
    group = lanes.setdefault(lane[0], [])
    if len(group) < max(1, lane[1]):
        group.append([(task, fut)])
    else:
        slot = group[sum(len(g) for g in group) % len(group)]
        task.first = False
        slot.append((task, fut))


def _settle(fut: Future[BatchResult], result: BatchResult | None = None, *,
            error: BaseException | None = None) -> None:
    """Hand a part's outcome to its request, unless the request stopped waiting for it meanwhile.

    A late read's future is cancelled by the request while the read runs; setting it then raises, and
    the lane would end there, leaving the parts queued behind it unread.
    """
    with contextlib.suppress(InvalidStateError):
        if error is not None:
            fut.set_exception(error)
        elif result is not None:
            fut.set_result(result)

