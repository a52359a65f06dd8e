#!/usr/bin/env python
"""Where one tiecli command's time goes: a timeline of its phases, wall and CPU.

    python benchmarks/phases.py [--rounds N] -- dedupe IN -o OUT -q
    python benchmarks/phases.py -- dedupe DCP --to safetensors -o OUT -q

Runs the command in this process (after one untimed run, so the page cache is warm),
``--rounds`` times, removing ``-o``'s output before each, and prints for the last round
when each phase began and ended, in seconds from the interpreter's start, and on which
thread: the imports, opening the checkpoint, finding ties, planning, the writer and the
follower beside it, the comparison of each alias, the fsync, the rename, the rendering.
Then the process's CPU time (user + system) over all rounds. A command that exits
non-zero stops it (exit 1).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()

# (module, function) pairs timed; each call is one phase on the thread that ran it
PHASES = [
    ("tiecli.api.target", "open_to_rewrite"),
    ("tiecli.api.target", "open_checkpoint"),
    ("tiecli.api.rewrites", "find_ties"),
    ("tiecli.plan", "plan_dedupe"),
    ("tiecli.plan", "plan_untie"),
    ("tiecli.write.run", "execute"),
    ("tiecli.formats.safetensors_write", "write_file"),
    ("tiecli.formats.safetensors_write", "follow"),
    ("tiecli.formats.safetensors_write", "check_one"),
    ("tiecli.formats.safetensors_write", "sync_file"),
    ("tiecli.atomic", "Staging.commit"),
    ("tiecli.cli.commands", "_emit"),
]


def _wrap(owner: Any, name: str, label: str, log: list[tuple[str, str, float, float]]) -> None:
    real = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            thread = threading.current_thread().name
            log.append((label, thread, began - STARTED, time.perf_counter() - STARTED))

    setattr(owner, name, timed)


def _instrument(log: list[tuple[str, str, float, float]]) -> None:
    for module, dotted in PHASES:
        owner: Any = importlib.import_module(module)
        *outer, name = dotted.split(".")
        for part in outer:
            owner = getattr(owner, part)
        _wrap(owner, name, dotted, log)


def _output(argv: list[str]) -> Path | None:
    for flag in ("-o", "--output"):
        if flag in argv[:-1]:
            return Path(argv[argv.index(flag) + 1])
    return None


def _remove(p: Path | None) -> None:
    # imported here, not at the top: its modules would hide part of tiecli's import time
    from measure import remove

    if p is not None:
        remove(p)


def _run(app: Callable[..., Any], argv: list[str]) -> int:
    try:
        app(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1, help="timed rounds (the last is shown)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="tiecli's arguments, after --")
    a = ap.parse_args()
    argv = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not argv:
        ap.error("give tiecli's arguments after --")
    before = time.perf_counter()
    from tiecli.cli.commands import app

    imported = time.perf_counter()
    log: list[tuple[str, str, float, float]] = []
    _instrument(log)
    out = _output(argv)
    _remove(out)
    if _run(app, argv) != 0:  # untimed: warms the page cache and every lazy import
        print(f"FAILED: tiecli {' '.join(argv)} exited non-zero", file=sys.stderr)
        return 1
    cpu0 = os.times()
    for _ in range(a.rounds):
        _remove(out)
        log.clear()
        began = time.perf_counter()
        if _run(app, argv) != 0:
            print(f"FAILED: tiecli {' '.join(argv)} exited non-zero", file=sys.stderr)
            return 1
        ended = time.perf_counter()
    cpu1 = os.times()
    cpu = (cpu1.user - cpu0.user + cpu1.system - cpu0.system) / a.rounds
    print(f"imports of tiecli.cli.commands (first run of this process): {imported - before:.3f} s")
    print(f"last round: {ended - began:.3f} s wall; CPU per round {cpu:.3f} s (user + system)")
    print(f"{'phase':<34} {'thread':<14} {'from s':>8} {'to s':>8} {'took s':>8}")
    for label, thread, t0, t1 in sorted(log, key=lambda x: x[2]):
        print(
            f"{label:<34} {thread[:14]:<14} {t0 - began + STARTED:>8.3f} "
            f"{t1 - began + STARTED:>8.3f} {t1 - t0:>8.3f}"
        )
    _remove(out)
    print(f"load average {os.getloadavg()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
