"""Shards are written two at a time (tiecli.write.run._two_at_a_time): every file is
written, never more than two at once, none starts after a failure, and the failure
raised is the first in file order."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from tiecli.write.run import _two_at_a_time


def test_every_call_runs_in_order_two_at_a_time() -> None:
    lock = threading.Lock()
    running, most, started = 0, 0, []

    def call(i: int) -> None:
        nonlocal running, most
        with lock:
            started.append(i)
            running += 1
            most = max(most, running)
        time.sleep(0.02)
        with lock:
            running -= 1

    _two_at_a_time([lambda i=i: call(i) for i in range(6)])
    assert started == list(range(6))
    assert most == 2


def test_no_call_starts_after_a_failure() -> None:
    started = []
    second_started, first_failed = threading.Event(), threading.Event()

    def first() -> None:
        started.append(0)
        second_started.wait(5)  # file 1 is being written when file 0 fails
        first_failed.set()
        raise OSError("disk gone")

    def later(i: int) -> None:
        started.append(i)
        second_started.set()
        first_failed.wait(5)

    with pytest.raises(OSError, match="disk gone"):
        _two_at_a_time([first] + [lambda i=i: later(i) for i in range(1, 5)])
    assert sorted(started) == [0, 1]


def test_the_first_failure_in_file_order_is_raised() -> None:
    later_failed = threading.Event()

    def first() -> None:
        later_failed.wait(5)  # fails after the second has failed
        raise ValueError("file 0")

    def second() -> None:
        try:
            raise ValueError("file 1")
        finally:
            later_failed.set()

    with pytest.raises(ValueError, match="file 0"):
        _two_at_a_time([first, second])


def test_no_thread_is_left_behind() -> None:
    def fail() -> None:
        raise RuntimeError("x")

    before = threading.active_count()
    with pytest.raises(RuntimeError):
        _two_at_a_time([lambda: None, fail, lambda: None])
    assert threading.active_count() == before


def test_no_executor_is_imported() -> None:
    """The quick exit of the command line needs no exit handler registered: an
    executor would register one (through logging)."""
    import subprocess

    code = (
        "import sys; from tiecli.write.run import _two_at_a_time; "
        "_two_at_a_time([lambda: None] * 3); "
        "import atexit; print('concurrent.futures' in sys.modules, atexit._ncallbacks())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "0"]
