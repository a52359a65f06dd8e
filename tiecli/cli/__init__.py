"""The ``tiecli`` command line: its console entry point (:func:`main`) here, its
commands in :mod:`tiecli.cli.commands` (``app``, imported from there when asked for).

The console entry pauses Python's cycle collector while it starts and renders.
Start-up builds some 25,000 objects the collector tracks, which live as long as
the process (the functions, classes and dicts of typer, rich and tiecli's modules),
and the collector ran 45 times over them as they piled up, in a small rewrite
before its work began; the process ends right after it renders. The command's
work, the library call that reads and writes checkpoints or builds a model, runs
with the collector on (:func:`collecting`), so it frees what it drops as it always
has, but without walking what start-up built: that is set aside first
(``gc.freeze``), and given back when :func:`main` returns. Together some 5 to 7 ms
of a small rewrite's 110 (45 collections before its work down to none; 8 in it).
``app`` run any other way (``CliRunner``, a caller's own process) leaves the
collector alone.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_paused = False  # the console entry turned the collector off, and it is off now
_froze = False  # collecting() froze what start-up built (nobody had frozen anything)


def main() -> None:
    """Console entry point: ``tiecli`` and ``python -m tiecli``."""
    import sys

    global _paused, _froze
    _paused = gc.isenabled()  # a process that runs without a collector keeps it so
    gc.disable()
    try:
        from .commands import for_words

        for_words(sys.argv[1:])()
    except SystemExit as e:
        _leave(e.code)
        raise
    finally:
        if _froze:
            _froze = False
            gc.unfreeze()  # what start-up built is collectable again, as before main
        if _paused:
            _paused = False
            gc.enable()


@contextmanager
def collecting() -> Iterator[None]:
    """Run the block with the cycle collector on where the console entry paused it,
    everything built so far set aside (frozen), and paused again after it, for the
    rendering that follows. Anywhere else, nothing."""
    global _paused, _froze
    if not _paused:
        yield
        return
    _paused = False
    if gc.get_freeze_count() == 0:  # a caller's own frozen objects: leave them be
        _froze = True
        gc.freeze()
    gc.enable()
    try:
        yield
    finally:
        gc.disable()
        _paused = True


def __getattr__(name: str) -> Any:
    from ..lazy import lazy_attribute

    # the typer app: importing typer and the commands waits for the first use
    return lazy_attribute(__name__, {"app": "commands"}, globals(), name)


def _leave(code: Any) -> None:
    """End the process at once with ``code``, once all output is flushed, skipping
    the interpreter's teardown of every loaded module (some 10 to 20 ms, a few per cent
    of a whole rewrite). Only where nothing can need it: no other thread running, no
    exit handler registered (``atexit``: anyone's, a coverage tool's...) and no torch
    loaded; otherwise the normal exit follows."""
    import atexit
    import os
    import sys
    import threading

    handlers = getattr(atexit, "_ncallbacks", None)  # CPython's count of exit handlers
    if handlers is None or handlers() or threading.active_count() > 1 or "torch" in sys.modules:
        return
    if not isinstance(code, int | None):
        return
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:  # None: the descriptor was closed when the process began
                stream.flush()
    except Exception:  # noqa: BLE001 - a closed pipe: the normal exit reports it
        return
    os._exit(code or 0)
