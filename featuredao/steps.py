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

    def operation(self, view: str | None = None) -> AbstractContextManager[None]: ...

    def read_group(self, fetches: Sequence[Fetch], timeout_s: float | None) -> list[Chunks | Exception]:
        """Each fetch's chunks read together; per fetch its answer, or the error its read raises."""
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
    out: list[BatchResult | Exception] = [RuntimeError("unfinished")] * len(reads)
    sends: dict[int, Chunks | Exception | None] = dict.fromkeys(range(len(reads)))
    while sends:
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
        sends = {}
        groups: dict[int, list[int]] = {}
        for i, fetch in fetches.items():
            groups.setdefault(id(fetch.source), []).append(i)
        for members in groups.values():
            sends.update(zip(members, _exchange([fetches[i] for i in members]), strict=True))
    return out


def _exchange(fetches: list[Fetch]) -> list[Chunks | Exception]:
    """One ``read_group`` call for the fetches of one source, until the latest of their deadlines.

    A fetch out of time before it starts is ``Overloaded`` (it queued behind this process's own work); one
    whose deadline passed before the answer came is a timeout, as if it had been read alone.
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
    if not ready:
        return answers
    ats = [fetches[i].at for i in ready]
    timeout_s = None if None in ats else max(a for a in ats if a is not None) - now
    got: Sequence[Chunks | Exception]
    try:
        with source.operation():
            got = source.read_group([fetches[i] for i in ready], timeout_s)
    except BackendUnavailable as exc:
        down = exc  # the whole round trip failed: every chunk of every fetch with it
        got = [[down] * len(fetches[i].chunks) for i in ready]
    except Exception as exc:
        got = [exc] * len(ready)
    done = time.perf_counter()
    for i, answer in zip(ready, got, strict=True):
        fetch = fetches[i]
        if fetch.at is not None and done > fetch.at and not isinstance(answer, Exception):
            answer = _each(fetch, lambda f: BackendTimeout("deadline passed before the store answered",
                                                           source=source.name, view=f.view))
        answers[i] = answer
    return answers


def _each(fetch: Fetch, error: Callable[[Fetch], BackendUnavailable]) -> Chunks:
    return [error(fetch) for _ in fetch.chunks]
