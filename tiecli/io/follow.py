"""A writer thread and a reader that follows it, a piece behind, through a shared mark.

A rewrite compares what it writes with the input while it writes: the writer
reports how far it has got (:class:`Mark`), the follower waits for the bytes it
needs and stops the writer as soon as something differs (:func:`beside`).
Nothing here knows a file format: the writer and the follower are given.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..atomic import output_errors

T = TypeVar("T")


def beside(mark: Mark, shown: Path, write: Callable[[], None], follow: Callable[[], T]) -> T:
    """Run ``write`` in a thread while ``follow`` reads behind it here, through ``mark``.

    A follower that fails stops the writer; otherwise the writer's error, if any, is
    raised once it has ended (an OS error as an OutputError about ``shown``)."""

    failed: list[BaseException] = []

    def run() -> None:
        try:
            write()
        except BaseException as e:  # raised here once the follower is done
            failed.append(e)
        finally:
            mark.end()

    writer = threading.Thread(target=run, name="tiecli-writer")
    writer.start()
    try:
        followed = follow()
    except BaseException:
        mark.stop()
        raise
    finally:
        try:
            writer.join()
        except BaseException:  # interrupted while waiting (Ctrl-C): stop the writer first
            mark.stop()
            writer.join()
            raise
    if failed:
        with output_errors(shown):
            raise failed[0]
    return followed


class Stopped(Exception):
    """The reader gave up; the writer stops at its next step."""


class WriterEnded(Exception):
    """The writer finished or failed before writing what the reader waits for."""


class Mark:
    """How far a writer has got, shared with the reader that follows it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pos = 0
        self._ended = False  # the writer finished or failed
        self._stopped = False  # the reader wants the writer to stop

    def reached(self, pos: int) -> None:
        with self._cond:
            if self._stopped:
                raise Stopped
            self._pos = pos
            self._cond.notify_all()

    def end(self) -> None:
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True

    def poke(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def until(self, done: Callable[[], bool]) -> bool:
        """Wait until ``done()`` or the writer ends; whether ``done()``."""
        with self._cond:
            self._cond.wait_for(lambda: done() or self._ended)
            return done()

    def ready(self, pos: int) -> None:
        """Return once the first ``pos`` bytes are written; raise if they never will be."""
        with self._cond:
            self._cond.wait_for(lambda: self._pos >= pos or self._ended)
            if self._pos < pos:
                raise WriterEnded
