"""The batch-first contract every view's DAO honours, and every wrapper (cache, resilience) composes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Self

from featuredao.config import View
from featuredao.deadline import Deadline
from featuredao.errors import Unsupported
from featuredao.steps import ReadSteps
from featuredao.types import BatchResult, FeatureValue, Key


class FeatureDao(ABC):
    """Read and write the features of one view, many keys per call."""

    view: View

    def read(self, keys: Sequence[Key], features: Sequence[str] | None = None, *,
             timeout_s: float | None = None, as_of: float | None = None,
             deadline: Deadline | None = None) -> BatchResult:
        """Return one entry per key in input order; a missing key is ``None`` in its place.

        ``as_of``: the request's time (epoch seconds) a sequence view's window ends at (None: now).
        ``deadline``: the caller's own (a request's); it wins over ``timeout_s``, counted from this call.
        """
        result = self.read_partial(keys, features, as_of=as_of, deadline=Deadline.of(deadline, timeout_s))
        if result.error is not None:
            raise result.error
        return result

    @abstractmethod
    def read_partial(self, keys: Sequence[Key], features: Sequence[str] | None = None, *,
                     timeout_s: float | None = None, as_of: float | None = None,
                     deadline: Deadline | None = None) -> BatchResult:
        """Like ``read``, but keys the store could not serve are listed in ``failed`` instead of raising."""

    @abstractmethod
    def upsert(self, rows: Iterable[tuple[Key, Mapping[str, FeatureValue]]]) -> int:
        """Write rows idempotently (whole rows: absent features are written as null); return the count."""

    def append(self, events: Iterable[tuple[Key, Mapping[str, FeatureValue]]]) -> int:
        """Add events to a sequence view, ``(key, {field: value})`` each; return the count."""
        raise Unsupported(f"view {self.view.name!r} takes no events")

    @abstractmethod
    def ping(self) -> None:
        """Raise a BackendError when the store cannot serve."""

    def native_async(self) -> bool:
        """Whether ``aread_partial`` reads without a thread (the driver's own asyncio client)."""
        return False

    def bounded_reads(self) -> bool:
        """Whether a read never waits past the time it is given (so a caller may run it in its thread)."""
        return False

    def grouped(self) -> bool:
        """Whether ``read_steps`` can read this view together with other views of its source."""
        return False

    def read_steps(self, keys: Sequence[Key], features: Sequence[str] | None = None, *,
                   as_of: float | None = None, deadline: Deadline) -> ReadSteps:
        """``read_partial`` as steps (``featuredao.steps``), where ``grouped()``."""
        raise Unsupported(f"view {self.view.name!r} cannot be read in a group")

    async def aread_partial(self, keys: Sequence[Key], features: Sequence[str] | None = None, *,
                            timeout_s: float | None = None, as_of: float | None = None,
                            deadline: Deadline | None = None) -> BatchResult:
        """``read_partial`` on the running loop, where ``native_async()`` (others raise Unsupported)."""
        raise Unsupported(f"view {self.view.name!r} has no asyncio read path")

    def peek(self, keys: Sequence[Key]) -> BatchResult | None:
        """The whole answer from memory without blocking, if this DAO holds it (a cache's L1)."""
        return None

    def invalidate(self, keys: Iterable[Key]) -> None:  # noqa: B027 - optional hook
        """Forget cached values of keys (a DAO that caches nothing has nothing to forget)."""

    def lane(self) -> tuple[str, int] | None:
        """The resource reads of this DAO share and how many may use it at once (None: no limit).

        A request runs the views of one lane on at most that many workers, so they queue on its own
        threads instead of timing out in the store's pool.
        """
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, most DAOs hold nothing
        """Release what this DAO holds (the source's pool is closed by its owner)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
