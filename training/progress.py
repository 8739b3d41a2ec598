"""Progress display for long engine work: a transient rich bar on stderr, drawn only on a terminal.

stdout stays machine-readable (`--json`), and logs, CI and pipes see nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


class Bar:
    """A bar with a description, done/total, optional live fields (`{task.fields[loss]}` ...) and a time column.

    A no-op when disabled or when stderr is not a terminal."""

    def __init__(self, description: str, total: int | None = None, done: int = 0, enabled: bool = True,
                 fields: str | None = None, eta: bool = False, **initial: str) -> None:
        self.bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        console = Console(stderr=True)
        if not console.is_terminal:
            return
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
        if fields:
            columns.append(TextColumn(fields))
        columns.append(TimeRemainingColumn() if eta else TimeElapsedColumn())
        self.bar = Progress(*columns, console=console, transient=True)
        self.task = self.bar.add_task(description, total=total, completed=done, **initial)
        self.bar.start()

    def update(self, completed: int | None = None, advance: int | None = None, **fields: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=completed, advance=advance, **fields)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@contextmanager
def progress(description: str, total: int | None = None, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)` for a bar that closes with the block."""
    bar = Bar(description, total, enabled=enabled)
    try:
        yield lambda n=1: bar.update(advance=n)
    finally:
        bar.close()
