"""Progress reporting for long byte-crunching work, on stderr.

Library code takes a :class:`Progress` and calls ``task``/``advance``; the
default does nothing. The CLI passes :func:`console_progress`, which shows a
rich bar only once work has gone on for about a second.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Progress:
    """Does nothing; the interface library code talks to."""

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Progress]:
        yield self

    def describe(self, description: str) -> None:
        """Rename the task under way (one bar for several files names the latest)."""

    def advance(self, amount: int) -> None:
        pass


NO_PROGRESS = Progress()


class _RichProgress(Progress):
    DELAY = 1.0

    def __init__(self) -> None:
        self._bar: Any = None
        self._task: Any = None
        self._started = 0.0
        self._pending = 0
        self._description = ""
        self._total = 0
        self._lock = threading.Lock()

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Progress]:
        self._description, self._total, self._pending = description, total, 0
        self._started = time.monotonic()
        try:
            yield self
        finally:
            if self._bar is not None:
                self._bar.stop()
            self._bar = self._task = None

    def advance(self, amount: int) -> None:
        with self._lock:  # a writer and the reader that follows it both report
            self._advance(amount)

    def describe(self, description: str) -> None:
        with self._lock:
            self._description = description
            if self._bar is not None:
                self._bar.update(self._task, description=_shown(description))

    def _advance(self, amount: int) -> None:
        if self._bar is None:
            self._pending += amount
            if time.monotonic() - self._started < self.DELAY:
                return
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
            from rich.progress import Progress as Bar

            self._bar = Bar(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True, emoji=False),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(_shown(self._description), total=self._total)
            amount, self._pending = self._pending, 0
        self._bar.advance(self._task, amount)


def _shown(description: str) -> str:
    """Shard names come from files: never markup, never raw control characters."""
    from rich.markup import escape

    from .terminal import printable

    return str(escape(printable(description)))


def console_progress(quiet: bool) -> Progress:
    return NO_PROGRESS if quiet else _RichProgress()
