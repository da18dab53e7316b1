"""Progress reporting for long work (calibration, sensitivity searches).

Library code calls ``ctx.progress.task(description, total)`` and ``advance()``; the
default does nothing, the CLI installs :class:`RichProgress` to draw bars on stderr.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

__all__ = ["NullProgress", "Progress", "ProgressTask", "RichProgress"]


class ProgressTask(Protocol):
    """A running task: call ``advance`` as units of work complete."""

    def advance(self, amount: int = 1) -> None:
        """Record ``amount`` more units of work done."""


class Progress(Protocol):
    """Something that can show tasks."""

    def task(self, description: str, total: int | None) -> contextlib.AbstractContextManager[ProgressTask]:
        """Return a context manager showing a task of ``total`` units (None: unknown)."""


class _NullTask:
    def advance(self, amount: int = 1) -> None:
        """Do nothing."""


class NullProgress:
    """Progress that shows nothing (the library default)."""

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[ProgressTask]:
        """Yield a task whose ``advance`` does nothing."""
        yield _NullTask()


class RichProgress:
    """Progress bars on stderr drawn by ``rich`` (used by the CLI)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as _RichProgress

        self._progress = _RichProgress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._depth = 0

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[ProgressTask]:
        """Show a bar for the duration of the ``with`` block."""
        progress = self._progress
        if self._depth == 0:
            progress.start()
        self._depth += 1
        task_id = progress.add_task(description, total=total)

        class _Task:
            def advance(self, amount: int = 1) -> None:
                progress.advance(task_id, amount)

        try:
            yield _Task()
        finally:
            progress.remove_task(task_id)
            self._depth -= 1
            if self._depth == 0:
                progress.stop()
