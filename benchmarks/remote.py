"""What ``tiecli inspect`` of a remote checkpoint reads: requests and bytes, over local HTTP.

Generates the 1.26 GB synthetic checkpoint of bench.py (its ``lm_head.weight`` a stored copy of
the 272 MB embedding) and a deduped copy of it (nothing left to find), serves both from
127.0.0.1 with the test suite's Range server (multi-range requests answered
``multipart/byteranges`` as nginx and Apache do, or, with ``--multi whole``, refused with the
whole file as nginx with ``max_ranges 1`` does), and runs ``inspect --json`` on each URL;
with ``--s3``, also from a moto S3 server on 127.0.0.1 through s3fs:

    .venv/bin/python benchmarks/remote.py [--workdir DIR] [--size 1x] [--repeat 5] [--s3]

Prints a markdown table of requests, bytes read, the share of the checkpoint read and the
median wall time of ``--repeat`` runs (requests and bytes are the same in every run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import bench  # noqa: E402
from remote_server import serve  # noqa: E402


def inspect(url: str, *flags: str, env: dict[str, str] | None = None) -> tuple[dict, float]:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "tiecli", "inspect", "--json", "-q", *flags, url],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(out.stdout), time.perf_counter() - start


CASES = [
    ("stored copy, default --max-download", "single", ()),
    ("stored copy, --max-download 600000000", "single", ("--max-download", "600000000")),
    ("deduped (nothing to compare)", "deduped", ()),
]


def row(label: str, size: int, doc: dict, walls: list[float]) -> str:
    remote = doc["remote"]
    tie = doc["ties"][0] if doc["ties"] else None
    tied_bytes = 2 * tie["bytes"] if tie and "value" in tie["evidence"] else 0
    evidence = (
        ", ".join(tie["evidence"]) + (" (unconfirmed)" if tie.get("unconfirmed") else "")
        if tie
        else "no tie"
    )
    return (
        f"| {label} | {size / 1e9:.2f} GB | {remote['requests']} | {remote['bytes_read']:,} | "
        f"{100 * remote['bytes_read'] / size:.3f} % | "
        f"{100 * (remote['bytes_read'] - tied_bytes) / size:.3f} % | {evidence} | "
        f"{statistics.median(walls):.2f} s |"
    )


def measure(
    url_of: dict[str, str], sizes: dict[str, int], repeat: int, env: dict[str, str] | None = None
) -> list[str]:
    """Each case ``repeat`` times, round-robin; one row each (median wall)."""
    docs: dict[str, dict] = {}
    walls: dict[str, list[float]] = {label: [] for label, _k, _f in CASES}
    for _ in range(repeat):
        for label, kind, flags in CASES:
            doc, took = inspect(url_of[kind], *flags, env=env)
            if label in docs:  # the same requests and bytes every time
                assert doc["remote"] == docs[label]["remote"], (doc["remote"], docs[label])
            docs[label] = doc
            walls[label].append(took)
    return [row(label, sizes[kind], docs[label], walls[label]) for label, kind, _f in CASES]


@contextmanager
def moto_s3(files: dict[str, Path]) -> Iterator[tuple[str, dict[str, str]]]:
    """A moto S3 server on 127.0.0.1 holding ``files`` (key -> path) in bucket ``bench``."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
    }
    try:
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        s3.create_bucket(Bucket="bench")
        for key, path in files.items():  # one PUT each (moto's multipart uploads are flaky)
            with open(path, "rb") as f:
                s3.put_object(Bucket="bench", Key=key, Body=f)
        yield "s3://bench", env
    finally:
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--size", default="1x")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--multi", default="multipart", choices=["multipart", "whole"])
    ap.add_argument("--s3", action="store_true", help="also read it from a moto S3 server")
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
    paths = {"single": single, "deduped": deduped}
    sizes = {k: p.stat().st_size for k, p in paths.items()}
    header = (
        "| checkpoint | size | requests | bytes read | share read | "
        "share read beyond the tied pair | tie | wall (median) |\n|---|---|---|---|---|---|---|---|"
    )
    with serve(work, multi=a.multi) as (base, counts):
        urls = {k: f"{base}/{p.relative_to(work).as_posix()}" for k, p in paths.items()}
        before = (counts.requests, counts.bytes)
        rows = measure(urls, sizes, 1)  # once, to check tiecli's count against the server's
        served = (counts.requests - before[0], counts.bytes - before[1])
        said = (
            sum(int(r.split("|")[3]) for r in rows),
            sum(int(r.split("|")[4].replace(",", "")) for r in rows),
        )
        # in --multi whole the server counts the whole files it began to send (refused unread)
        assert said[0] == served[0] and (a.multi == "whole" or said == served), (said, served)
        rows = measure(urls, sizes, a.repeat)
    print(f"HTTP ({a.multi}), {a.repeat} runs each:\n{header}\n" + "\n".join(rows))
    if a.s3:
        keys = {"single.safetensors": single, "deduped.safetensors": deduped}
        with moto_s3(keys) as (bucket, env):
            urls = {
                "single": f"{bucket}/single.safetensors",
                "deduped": f"{bucket}/deduped.safetensors",
            }
            rows = measure(urls, sizes, a.repeat, env)
        print(f"\nS3 (moto server, s3fs), {a.repeat} runs each:\n{header}\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
