"""Reads of several views of one source, driven together: one round trip (or one checkout) for all.

A DAO whose ``grouped()`` is true can also read as steps (``read_steps``): a generator that does its own
work (cache lookups, the breaker, key planning), yields one :class:`Fetch` for what it needs from the
store, is sent each chunk's rows (or has the error thrown in) and returns the ``BatchResult`` its
``read_partial`` would have. :func:`drive` runs a request's reads of one source this way and hands their
fetches to the source's ``read_group`` at once, so a user's view and the items' views of one Redis
cost one pipelined round trip, not one each on two threads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from featuredao.errors import BackendTimeout, BackendUnavailable, Overloaded
from featuredao.types import BatchResult, Key, RawRows

Chunks = list[RawRows | BackendUnavailable]
"""A fetch's answer: per chunk, its rows or the BackendUnavailable it failed with (as ``_run_chunks``)."""


class GroupSource(Protocol):
    """What :func:`drive` needs of a source (``featuredao.dao.Source``, with ``grouped_reads``)."""

    name: str

    @property
    def closed(self) -> bool: ...

    def operation(self, view: str | None = None) -> AbstractContextManager[None]: ...

    def translate(self, exc: BaseException, view: str | None = None) -> BaseException: ...

    def read_group(self, fetches: Sequence[Fetch], timeout_s: float | None) -> list[Chunks | Exception]:
        """Each fetch's chunks read together; per fetch its answer, or the error its read raises."""
        ...

    async def aread_group(self, fetches: Sequence[Fetch],
                          timeout_s: float | None) -> list[Chunks | Exception]:
        """``read_group`` with the driver's asyncio client."""
        ...


@dataclass(slots=True)
class Fetch:
    """What one view's read needs from its store: its chunks of distinct keys, the fields to read."""

    source: GroupSource
    dao: Any
    """The adapter's own DAO (its source's ``read_group`` knows its type)."""
    view: str
    chunks: list[list[Key]]
    fields: list[str]
    at: float | None
    """This read's deadline (``time.perf_counter``), within the request's."""


ReadSteps = Generator[Fetch, Chunks, BatchResult]


def drive(reads: Sequence[ReadSteps]) -> list[BatchResult | Exception]:
    """Run reads to their end; each round's fetches of one source go to its ``read_group`` together.

    A read's error (raised by its own steps) is its outcome, as ``read_partial`` would have raised it.
    """
    out, sends = _begin(reads)
    while sends:
        fetches = _advance(reads, sends, out)
        sends = {}
        for members in _by_source(fetches):
            sends.update(zip(members, _exchange([fetches[i] for i in members]), strict=True))
    return out


async def adrive(reads: Sequence[ReadSteps]) -> list[BatchResult | Exception]:
    """``drive`` on the running loop: each source's fetches go to its ``aread_group``, awaited."""
    out, sends = _begin(reads)
    while sends:
        fetches = _advance(reads, sends, out)
        sends = {}
        for members in _by_source(fetches):
            sends.update(zip(members, await _aexchange([fetches[i] for i in members]), strict=True))
    return out


_Sends = dict[int, Chunks | Exception | None]


def _begin(reads: Sequence[ReadSteps]) -> tuple[list[BatchResult | Exception], _Sends]:
    return [RuntimeError("unfinished")] * len(reads), dict.fromkeys(range(len(reads)))


def _advance(reads: Sequence[ReadSteps], sends: _Sends,
             out: list[BatchResult | Exception]) -> dict[int, Fetch]:
    """Each live read given what it waited for: its next fetch, or its end (into ``out``)."""
    fetches: dict[int, Fetch] = {}
    for i, value in sends.items():
        read = reads[i]
        try:
            step = read.throw(value) if isinstance(value, Exception) else read.send(value)  # type: ignore[arg-type]
        except StopIteration as stop:
            out[i] = stop.value
        except Exception as exc:
            out[i] = exc
        else:
            fetches[i] = step
    return fetches


def _by_source(fetches: dict[int, Fetch]) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for i, fetch in fetches.items():
        groups.setdefault(id(fetch.source), []).append(i)
    return list(groups.values())


def _exchange(fetches: list[Fetch]) -> list[Chunks | Exception]:
    """One ``read_group`` call for the fetches of one source, until the latest of their deadlines."""
    answers, ready, timeout_s = _ready(fetches)
    if not ready:
        return answers
    source = fetches[0].source
    got: Sequence[Chunks | Exception]
    try:
        with source.operation():
            got = source.read_group([fetches[i] for i in ready], timeout_s)
    except Exception as exc:
        got = _failed(fetches, ready, exc)
    return _settled(fetches, answers, ready, got)


async def _aexchange(fetches: list[Fetch]) -> list[Chunks | Exception]:
    """``_exchange`` on the running loop, bounded by the same deadline."""
    import asyncio
    answers, ready, timeout_s = _ready(fetches)
    if not ready:
        return answers
    source = fetches[0].source
    got: Sequence[Chunks | Exception]
    try:
        with source.operation():
            reading = source.aread_group([fetches[i] for i in ready], timeout_s)
            got = await asyncio.wait_for(reading, timeout_s)
    except TimeoutError:
        got = _failed(fetches, ready, BackendTimeout("deadline passed before the store answered",
                                                      source=source.name))
    except Exception as exc:
        got = _failed(fetches, ready, exc)
    return _settled(fetches, answers, ready, got)


def _ready(fetches: list[Fetch]) -> tuple[list[Chunks | Exception], list[int], float | None]:
    """The answers so far, the fetches that still have time, and the time until the latest deadline.

    A fetch out of time before it starts is ``Overloaded``: it queued behind this process's own work.
    """
    source = fetches[0].source
    now = time.perf_counter()
    answers: list[Chunks | Exception] = [[] for _ in fetches]
    ready = []
    for i, fetch in enumerate(fetches):
        if fetch.at is not None and fetch.at <= now:
            answers[i] = _each(fetch, lambda f: Overloaded("no time left when the read could start",
                                                           source=source.name, view=f.view))
        else:
            ready.append(i)
    ats = [fetches[i].at for i in ready]
    timeout_s = None if not ready or None in ats else max(a for a in ats if a is not None) - now
    return answers, ready, timeout_s


def _failed(fetches: list[Fetch], ready: list[int], exc: Exception) -> list[Chunks | Exception]:
    """The whole exchange failed: an unavailable store fails every chunk, another error every read."""
    if isinstance(exc, BackendUnavailable):
        return [[exc] * len(fetches[i].chunks) for i in ready]
    return [exc] * len(ready)


def _settled(fetches: list[Fetch], answers: list[Chunks | Exception], ready: list[int],
             got: Sequence[Chunks | Exception]) -> list[Chunks | Exception]:
    """The answers; the rows of a fetch whose own deadline passed before they came are a timeout, as if
    read alone (a chunk that failed keeps its own reason: ``Overloaded`` for our pool, say)."""
    done = time.perf_counter()
    source = fetches[0].source
    for i, answer in zip(ready, got, strict=True):
        fetch = fetches[i]
        if fetch.at is not None and done > fetch.at and not isinstance(answer, Exception):
            late = BackendTimeout("deadline passed before the store answered", source=source.name,
                                  view=fetch.view)
            answer = [c if isinstance(c, BackendUnavailable) else late for c in answer]
        answers[i] = answer
    return answers


def chunks_in_turn(source: GroupSource, fetch: Fetch, until: float | None,
                   read_chunk: Callable[[list[Key], float | None], RawRows],
                   refused: Callable[[Exception], bool]) -> Chunks | Exception:
    """One fetch's chunks read one after another on the connection a group holds, or the error its read
    raises: ``read_chunk(keys, time_left)`` reads one; ``until`` is the group's deadline (perf_counter).

    As a view read alone, nothing is sent once the time is gone and no statement follows a chunk that
    failed. A statement the store ``refused`` (a missing table) fails this fetch only, the connection
    runs the next; any other error (the connection's, or close) is raised and fails the group.
    """
    answers: Chunks = []
    total = len(fetch.chunks)
    for chunk in fetch.chunks:
        left = None if until is None else until - time.perf_counter()
        if left is not None and left <= 0:
            gone = BackendTimeout("deadline passed before the store answered", source=source.name,
                                  view=fetch.view)
            return answers + [gone] * (total - len(answers))
        try:
            answers.append(read_chunk(chunk, left))
        except Exception as exc:
            if source.closed or not refused(exc):
                raise
            mapped = source.translate(exc, fetch.view)
            if mapped is not exc:
                mapped.__cause__ = exc  # as operation() raises it: from the driver's error
            if isinstance(mapped, BackendUnavailable):  # cancelled at its time limit: the rest with it
                return answers + [mapped] * (total - len(answers))
            return mapped if isinstance(mapped, Exception) else exc
    return answers


async def each_alone(source: GroupSource, fetches: Sequence[Fetch],
                     timeout_s: float | None) -> list[Chunks | Exception]:
    """``aread_group`` of a source with no grouped round trip of its own: every chunk read concurrently
    with its DAO's asyncio read (``_afetch_batch``), as each view would be read alone."""
    import asyncio

    async def alone(fetch: Fetch) -> Chunks | Exception:
        reads = (fetch.dao._afetch_batch(c, fetch.fields, timeout_s) for c in fetch.chunks)
        got = await asyncio.gather(*reads, return_exceptions=True)
        chunks: Chunks = []
        for outcome in got:
            if not isinstance(outcome, BaseException):
                chunks.append(outcome)
                continue
            if not isinstance(outcome, Exception):
                raise outcome
            mapped = source.translate(outcome, fetch.view)
            if not isinstance(mapped, BackendUnavailable):
                return mapped if isinstance(mapped, Exception) else outcome
            chunks.append(mapped)
        return chunks

    return list(await asyncio.gather(*(alone(f) for f in fetches)))


def _each(fetch: Fetch, error: Callable[[Fetch], BackendUnavailable]) -> Chunks:
    return [error(fetch) for _ in fetch.chunks]
