"""The cache's work off the request path (L2 write-backs, refreshes): daemon threads behind bounded queues."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("featuredao")


class _Background:
    """Work off the request path on one daemon thread, behind a bounded queue: full means dropped."""

    def __init__(self, name: str, size: int = 1024) -> None:
        self._queue: queue.Queue[Callable[[], None]] = queue.Queue(size)
        self._name = name
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> bool:
        """Queue ``job``; False (and nothing queued) when the queue is full."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            return False
        return True

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until the work queued before this call is done (tests, orderly shutdowns)."""
        done = threading.Event()
        return self.submit(done.set) and done.wait(timeout_s)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                job()
            except Exception:  # one failed job must not stop the others
                log.exception("background cache work failed")


# L2 write-backs and stale-while-revalidate refreshes of every cached view, on these two threads: never on
# the request path, never unbounded.
writeback = _Background("featuredao-l2-writeback")
refreshes = _Background("featuredao-refresh", 256)


def flush_background(timeout_s: float = 5.0) -> bool:
    """Wait for the L2 write-backs and refreshes queued so far; False if they did not end in time."""
    return writeback.flush(timeout_s) and refreshes.flush(timeout_s)
