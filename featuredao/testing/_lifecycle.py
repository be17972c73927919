"""The context-manager protocol every local or throwaway server shares: ``with Server() as s`` starts it."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class StartStop:
    """Mixin: ``__enter__`` calls ``start()`` (which returns the server), ``__exit__`` calls ``stop()``."""

    def start(self) -> Self:
        """Start serving; return self."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop serving and release everything."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
