"""The benchmark's progress bar (rich, on stderr, shown only on a terminal)."""

from __future__ import annotations


class Progress:
    """A rich progress bar on stderr (shown only on a terminal); ``update`` takes absolute values."""

    def __init__(self, total: float, unit: str, enabled: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        console = Console(stderr=True)
        self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn(unit), TimeRemainingColumn(), console=console, transient=True,
                                 disable=not (enabled and console.is_terminal))
        self._task = self._bar.add_task("bench", total=total)
        self._base = 0.0

    def __enter__(self) -> Progress:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def cell(self, description: str) -> None:
        """A new cell starts: what was done so far becomes the base."""
        self._base = self._bar.tasks[0].completed
        self._bar.update(self._task, description=description)

    def update(self, done_in_cell: float) -> None:
        """Progress inside the current cell."""
        self._bar.update(self._task, completed=self._base + done_in_cell)
