"""Every benchmark script starts: its imports resolve and it prints its usage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = ["bench.py", "dcp.py", "phases.py", "remote.py"]


def test_every_script_is_listed() -> None:
    mains = {p.name for p in BENCHMARKS.glob("*.py") if "__main__" in p.read_text()}
    assert mains == set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_benchmark_script_prints_its_usage(script: str) -> None:
    r = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage:")
