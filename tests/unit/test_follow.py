"""The writer thread and the follower beside it (tiecli/io/follow.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tiecli.io.follow import Mark, Stopped, beside


def test_an_interrupt_while_waiting_for_the_writer_stops_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C landing in the wait for the writer (the follower already done) stops the
    writer at its next step rather than leaving it to write to the end."""
    mark = Mark()
    steps: list[int] = []
    stopped = threading.Event()

    def write() -> None:
        try:
            for i in range(10_000):  # some 50 s unless stopped
                mark.reached(i)
                steps.append(i)
                time.sleep(0.005)
        except Stopped:
            stopped.set()
            raise

    real_join = threading.Thread.join
    calls: list[int] = []

    def join(self: threading.Thread, timeout: float | None = None) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        real_join(self, timeout)

    monkeypatch.setattr(threading.Thread, "join", join)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        beside(mark, Path("out"), write, lambda: None)
    assert stopped.is_set() and len(steps) < 10_000
    assert time.monotonic() - started < 10
