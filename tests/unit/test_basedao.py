"""BaseDao's shared batch logic on a scripted adapter: chunks, concurrency, deadlines, partial failure."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
from fakes import make_view

from featuredao.config import View
from featuredao.dao import BaseDao, Capabilities, Source
from featuredao.errors import BackendQueryError, BackendTimeout, BackendUnavailable
from featuredao.types import Key, RawRows

Hook = Callable[[list[Key], float | None], None]


class ScriptedSource(Source):
    """A source whose only setting is its pool and batch size; driver ConnectionErrors mean 'down'."""

    type_name = "scripted"
    capabilities = Capabilities(create=False)
    error_map = ((ConnectionError, BackendUnavailable),)

    def __init__(self, pool_size: int, batch_size: int) -> None:
        super().__init__("src", SimpleNamespace(pool_size=pool_size, batch_size=batch_size))

    def dao(self, view: View) -> ScriptedDao:
        return ScriptedDao(self, view)

    def ping(self) -> None:
        pass


class ScriptedDao(BaseDao):
    """Serves ``rows``; records every chunk it is sent; runs ``hook`` first (to block, sleep or fail)."""

    def __init__(self, source: Source, view: View) -> None:
        super().__init__(source, view)
        self.rows: dict[Key, dict[str, object]] = {}
        self.calls: list[list[Key]] = []
        self.budgets: list[float | None] = []
        self.hook: Hook | None = None
        self._lock = threading.Lock()

    def _fetch_batch(self, keys: list[Key], fields: list[str], timeout_s: float | None) -> RawRows:
        with self._lock:
            self.calls.append(list(keys))
            self.budgets.append(timeout_s)
        if self.hook is not None:
            self.hook(keys, timeout_s)
        return {k: {f: self.rows[k].get(f) for f in fields} for k in keys if k in self.rows}


@pytest.fixture
def make() -> Iterator[Callable[..., ScriptedDao]]:
    sources: list[ScriptedSource] = []

    def build(pool_size: int = 1, batch_size: int = 3, n: int = 12) -> ScriptedDao:
        source = ScriptedSource(pool_size, batch_size)
        sources.append(source)
        dao = source.dao(make_view())
        dao.rows = {f"k{i}": {"a": i, "b": f"v{i}"} for i in range(n)}
        return dao

    yield build
    for s in sources:
        s.close()


def expected(keys: list[str]) -> list[dict[str, object] | None]:
    return [{"a": int(k[1:]), "b": k.replace("k", "v")} if k.startswith("k") else None for k in keys]


def test_chunks_keep_batch_size_and_order_and_read_duplicates_once(make: Callable[..., ScriptedDao]) -> None:
    dao = make(pool_size=1, batch_size=3)
    keys = ["k5", "k1", "x", "k5", "k9", "k2", "k1", "k7", "k0", "y", "k3"]
    result = dao.read(keys)
    unique = list(dict.fromkeys(keys))
    assert dao.calls == [unique[i:i + 3] for i in range(0, len(unique), 3)]  # each chunk sent once, in order
    assert result.rows == expected(keys) and result.keys == keys


def test_every_chunk_is_read_once_when_concurrent(make: Callable[..., ScriptedDao]) -> None:
    dao = make(pool_size=4, batch_size=2, n=20)
    keys = [f"k{i}" for i in reversed(range(20))]
    result = dao.read(keys + keys[::3])
    assert all(len(c) <= 2 for c in dao.calls) and len(dao.calls) == 10
    assert sorted(k for c in dao.calls for k in c) == sorted(keys)
    assert result.rows == expected(keys + keys[::3])


def test_empty_read_sends_nothing(make: Callable[..., ScriptedDao]) -> None:
    dao = make()
    assert dao.read([]).rows == [] and dao.calls == []


def _barrier_hook(parties: int, timeout_s: float = 0.5) -> Hook:
    """Every chunk waits until all of them are in flight: chunks read one after another never get there."""
    barrier = threading.Barrier(parties, timeout=timeout_s)

    def hook(keys: list[Key], timeout_s: float | None) -> None:
        barrier.wait()

    return hook


def test_chunks_run_concurrently_when_the_pool_allows(make: Callable[..., ScriptedDao]) -> None:
    dao = make(pool_size=3, batch_size=2, n=6)
    # Within the read's 5 s: a loaded machine may take more than the control's 0.5 s to start 3 workers.
    dao.hook = _barrier_hook(3, timeout_s=4.0)
    keys = [f"k{i}" for i in range(6)]
    assert dao.read(keys, timeout_s=5.0).rows == expected(keys)
    assert len(dao.calls) == 3


def test_the_barrier_breaks_when_chunks_run_one_after_another(make: Callable[..., ScriptedDao]) -> None:
    # The control of the test above: with a pool of one the same read cannot pass the barrier.
    dao = make(pool_size=1, batch_size=2, n=6)
    dao.hook = _barrier_hook(3)
    with pytest.raises(threading.BrokenBarrierError):
        dao.read([f"k{i}" for i in range(6)], timeout_s=5.0)


def test_a_slow_chunk_is_cut_at_the_deadline(make: Callable[..., ScriptedDao]) -> None:
    dao = make(pool_size=2, batch_size=2, n=4)
    release = threading.Event()

    def stuck(keys: list[Key], timeout_s: float | None) -> None:
        if "k2" in keys:  # a store that ignores its time budget: only the read's own deadline ends the wait
            release.wait(5.0)

    dao.hook = stuck
    try:
        started = time.monotonic()
        result = dao.read_partial(["k0", "k1", "k2", "k3"], timeout_s=0.1)
        elapsed = time.monotonic() - started
    finally:
        release.set()
    assert 0.09 <= elapsed < 1.0
    assert result.failed == ["k2", "k3"] and isinstance(result.error, BackendTimeout)
    assert result.rows == [*expected(["k0", "k1"]), None, None]
    assert all(b is not None and b <= 0.1 for b in dao.budgets)  # each chunk is told the time left


def test_sequential_chunks_stop_when_the_time_is_spent(make: Callable[..., ScriptedDao]) -> None:
    dao = make(pool_size=1, batch_size=2, n=6)

    def late(keys: list[Key], timeout_s: float | None) -> None:
        if "k0" in keys:
            time.sleep(0.15)  # answers, but after the whole read's time is spent

    dao.hook = late
    result = dao.read_partial([f"k{i}" for i in range(6)], timeout_s=0.1)
    assert dao.calls == [["k0", "k1"]]  # the later chunks are never sent: no time was left for them
    assert result.failed == ["k2", "k3", "k4", "k5"] and isinstance(result.error, BackendTimeout)
    assert result.rows[:2] == expected(["k0", "k1"])


def test_a_failed_chunk_leaves_its_keys_in_failed(make: Callable[..., ScriptedDao]) -> None:
    dao = make(pool_size=3, batch_size=2, n=6)

    def shard_down(keys: list[Key], timeout_s: float | None) -> None:
        if "k2" in keys:
            raise ConnectionError("connection refused")  # a driver error, mapped by the source

    dao.hook = shard_down
    keys = [f"k{i}" for i in range(6)]
    result = dao.read_partial(keys)
    assert result.failed == ["k2", "k3"]
    assert isinstance(result.error, BackendUnavailable)
    assert isinstance(result.error.__cause__, ConnectionError)
    assert result.rows == [*expected(["k0", "k1"]), None, None, *expected(["k4", "k5"])]
    assert len(dao.calls) == 3
    with pytest.raises(BackendUnavailable):
        dao.read(keys)


def test_errors_that_are_not_unavailability_propagate(make: Callable[..., ScriptedDao]) -> None:
    dao = make(pool_size=3, batch_size=2, n=6)

    def bad_query(keys: list[Key], timeout_s: float | None) -> None:
        if "k4" in keys:
            raise BackendQueryError("no such column")

    dao.hook = bad_query
    with pytest.raises(BackendQueryError):
        dao.read_partial([f"k{i}" for i in range(6)])
