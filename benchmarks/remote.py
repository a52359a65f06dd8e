"""What ``tiecli inspect`` of a remote checkpoint reads: requests and bytes, over local HTTP.

Generates the 1.26 GB synthetic checkpoint of bench.py (its ``lm_head.weight`` a stored copy of
the 272 MB embedding) and a deduped copy of it (nothing left to find), serves both from
127.0.0.1 with the test suite's Range server, and runs ``inspect --json`` on each URL:

    .venv/bin/python benchmarks/remote.py [--workdir DIR] [--size 1x]

Prints a markdown table of requests, bytes read and the share of the checkpoint read.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import bench  # noqa: E402
from remote_server import serve  # noqa: E402


def inspect(url: str, *flags: str) -> tuple[dict, float]:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "tiecli", "inspect", "--json", "-q", *flags, url],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout), time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--size", default="1x")
    a = ap.parse_args()
    work = bench.resolve_workdir(a.workdir) / "remote"
    size_dir = work / a.size
    bench.generate(a.size, size_dir, ("single",), print)
    single = bench.inputs_for(size_dir)["single"]
    deduped = work / f"{a.size}-deduped.safetensors"
    if not deduped.exists():
        subprocess.run(
            [sys.executable, "-m", "tiecli", "dedupe", "-q", str(single), "-o", str(deduped)],
            check=True,
        )
    rows = []
    with serve(work) as (base, counts):
        cases = [
            ("stored copy, default --max-download", single, ()),
            ("stored copy, --max-download 600000000", single, ("--max-download", "600000000")),
            ("deduped (nothing to compare)", deduped, ()),
        ]
        for label, path, flags in cases:
            before = (counts.requests, counts.bytes)
            doc, took = inspect(f"{base}/{path.relative_to(work).as_posix()}", *flags)
            served = (counts.requests - before[0], counts.bytes - before[1])
            assert (doc["remote"]["requests"], doc["remote"]["bytes_read"]) == served
            size = path.stat().st_size
            tie = doc["ties"][0] if doc["ties"] else None
            tied_bytes = 2 * tie["bytes"] if tie and "value" in tie["evidence"] else 0
            rows.append(
                f"| {label} | {size / 1e9:.2f} GB | {doc['remote']['requests']} | "
                f"{doc['remote']['bytes_read']:,} | {100 * doc['remote']['bytes_read'] / size:.3f} % | "
                f"{100 * (doc['remote']['bytes_read'] - tied_bytes) / size:.3f} % | "
                f"{', '.join(tie['evidence']) + (' (unconfirmed)' if tie.get('unconfirmed') else '') if tie else 'no tie'} | "
                f"{took:.2f} s |"
            )
    print(
        "| checkpoint | size | requests | bytes read | share read | share read beyond the tied pair | tie | wall |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
