#!/usr/bin/env python
"""tiecli on a torch distributed checkpoint (DCP): dedupe to safetensors against `cp -r`.

    python benchmarks/dcp.py [--repeat 5] [--out benchmarks/results-dcp.md]
                             [--workdir DIR] [--keep]

Writes a DCP of some 1 GB with 2 ranks (gloo on 127.0.0.1, CPU, FSDP2 `fully_shard`
of a tied Llama, `dcp.save`; the tied pair stored twice, every tensor split across
the ranks' files) with `tests/dcp_save.py`, then times, in one run and alternating,

- `cp -r` of the DCP folder (the floor: every byte read and written once);
- `tiecli dedupe DCP --to safetensors -o OUT` (one copy per tie, verified).

The inputs are dropped from the page cache and read back once before timing, and every
timed run follows a `sync` and a touch of memory (untimed), as in `bench.py`
(`measure.warm`, `measure.prefault`). Reports medians over `--repeat` rounds, min–max,
the ratio of the medians with its spread (min and max over rounds of tiecli's time over
that round's cp), CPU time (user + system) and peak RSS of the whole process tree (as
`bench.py` measures them).
A timed command that exits non-zero stops the benchmark at once: its command line, exit
status and stderr are printed, no report is written, and it exits 1. Targets: time ≤ 1.5× `cp -r`, memory ≤ 150 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from cases import byte_compiled, tiecli_argv  # noqa: E402
from measure import RSS_METHOD, Sample, measure, prefault, prefault_bytes, remove, warm  # noqa: E402
from report import machine_info  # noqa: E402
from synth import MB, du  # noqa: E402

TARGET_X_CP = 1.5
TARGET_RSS_MB = 150


def generate(workdir: Path) -> Path:
    out = workdir / "dcp-large"
    if (out / "fsdp" / ".metadata").is_file():
        return out / "fsdp"
    remove(out)
    subprocess.run(
        [sys.executable, str(REPO / "tests" / "dcp_save.py"), str(out), "large"], check=True
    )
    return out / "fsdp"


def reference(dcp: Path, workdir: Path) -> Path:
    """The same model as one safetensors file with the tie stored twice (made with tiecli,
    untimed): the form whose dedupe SPEC section 9 measures, timed beside the DCP as a
    reference for what the machine gives at that moment."""
    ref = workdir / "dcp-large" / "reference.safetensors"
    if ref.is_file():
        return ref
    folder = workdir / "dcp-large" / "hf"
    remove(folder)
    cmd = [*tiecli_argv(), "dedupe", str(dcp), "--to", "safetensors", "-o", str(folder), "-q"]
    subprocess.run(cmd, check=True)
    deduped = folder / "model.safetensors"
    subprocess.run([*tiecli_argv(), "untie", str(deduped), "-o", str(ref), "-q"], check=True)
    remove(folder)
    return ref


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, default=HERE / "results-dcp.md")
    ap.add_argument("--workdir", type=Path, default=HERE / "out" / "work")
    ap.add_argument("--keep", action="store_true", help="keep the generated DCP for the next run")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(byte_compiled(), flush=True)
    dcp = generate(args.workdir)
    size = du(dcp)
    ref = reference(dcp, args.workdir)
    scratch = args.workdir / "scratch"
    scratch.mkdir(exist_ok=True)
    cp_out, tie_out = scratch / "cp-copy", scratch / "deduped"
    outs = [cp_out, tie_out, scratch / "ref-copy.safetensors", scratch / "ref-deduped.safetensors"]
    cases = {
        "cp": ["cp", "-r", str(dcp), str(cp_out)],
        "tiecli": [
            *tiecli_argv(),
            "dedupe",
            str(dcp),
            "--to",
            "safetensors",
            "-o",
            str(tie_out),
            "-q",
        ],
        "cp-ref": ["cp", str(ref), str(outs[2])],
        "tiecli-ref": [*tiecli_argv(), "dedupe", str(ref), "-o", str(outs[3]), "-q"],
    }
    load_before = os.getloadavg()
    samples: dict[str, list[Sample]] = {k: [] for k in cases}
    for key in cases:  # one untimed round: the page cache holds the input for every timed one
        for o in outs:
            remove(o)
        subprocess.run(cases[key], check=True, capture_output=True)
    warm([dcp, ref])  # cached as a read caches them, as bench.py's inputs (measure.warm)
    touch = prefault_bytes(None, size)
    out_size = 0
    for _ in range(args.repeat):
        for key, argv in cases.items():
            for o in outs:
                remove(o)
            os.sync()  # no run pays to flush an earlier run's output (untimed)
            prefault(touch)  # nor the host's faults for memory it took back (measure.prefault)
            s = measure(argv, scratch)
            if s.rc != 0:  # a run that errors is not a fast run: no report at all
                print(
                    f"FAILED: {' '.join(argv)} exited {s.rc}; no figures are reported.\n"
                    f"{s.stderr[-2000:]}",
                    file=sys.stderr,
                )
                for o in outs:
                    remove(o)
                return 1
            if key == "tiecli":
                out_size = du(tie_out)
            samples[key].append(s)
    load_after = os.getloadavg()
    for o in outs:
        remove(o)
    if not args.keep:
        remove(dcp.parent)

    med = {k: statistics.median(x.seconds for x in v) for k, v in samples.items()}
    ratios = [t.seconds / c.seconds for t, c in zip(samples["tiecli"], samples["cp"], strict=True)]
    x_cp = med["tiecli"] / med["cp"]
    x_ref = med["tiecli-ref"] / med["cp-ref"]
    peak = max(s.peak_rss for s in samples["tiecli"]) / MB
    rows = []
    for key, label in (
        ("cp", "`cp -r` of the DCP folder"),
        ("tiecli", "`tiecli dedupe --to safetensors -o`"),
        ("cp-ref", "reference: `cp` of the same model as one safetensors file"),
        ("tiecli-ref", "reference: `tiecli dedupe -o` of that file"),
    ):
        t = [s.seconds for s in samples[key]]
        rss = max(s.peak_rss for s in samples[key]) / MB
        cpus = [s.cpu for s in samples[key] if s.cpu is not None]
        cpu = f"{statistics.median(cpus):.3f}" if cpus else "—"
        rows.append(f"| {label} | {med[key]:.3f} | {min(t):.3f}–{max(t):.3f} | {cpu} | {rss:.0f} |")
    checks = [
        (x_cp <= TARGET_X_CP, f"time {x_cp:.2f}× cp -r (target ≤ {TARGET_X_CP}×)"),
        (peak <= TARGET_RSS_MB, f"peak RSS {peak:.0f} MB (target ≤ {TARGET_RSS_MB} MB)"),
    ]
    info = machine_info(args.workdir)
    report = "\n".join(
        [
            "# tiecli on a torch distributed checkpoint",
            "",
            f"DCP of {size / MB:.0f} MB written by 2 ranks (gloo, CPU, FSDP2, `dcp.save`) of a tied "
            f"Llama (fp32, the tied pair stored twice); deduped output {out_size / MB:.0f} MB. "
            f"{args.repeat} timed rounds after one untimed round, alternating; inputs dropped "
            "from the page cache and read back before timing (warm, cached as a read caches "
            "them), `sync` and a touch of 2× the checkpoint + 1 GB of memory before every "
            "timed run (untimed), as `bench.py` runs.",
            "",
            "| command | median s | min–max s | median CPU s (user + sys) | peak RSS MB |",
            "|---|---:|---:|---:|---:|",
            *rows,
            "",
            f"Ratio of medians: **{x_cp:.2f}× `cp -r`** (per-round ratios "
            f"{min(ratios):.2f}–{max(ratios):.2f}). Reference, same rounds: `tiecli dedupe -o` "
            f"of the model as one safetensors file is **{x_ref:.2f}× `cp`**.",
            "",
            *[f"- {'PASS' if ok else 'FAIL'}: {text}" for ok, text in checks],
            "",
            f"Peak RSS: {RSS_METHOD}.",
            "",
            f"Load average (1, 5, 15 min) before the timed rounds {load_before}, after "
            f"{load_after}, on {os.cpu_count()} cores: other work on the machine slows both "
            "commands, tiecli (which verifies beside the copy, on a second core) the more.",
            "",
            "Machine: " + json.dumps(info),
            "",
        ]
    )
    args.out.write_text(report)
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "dcp_bytes": size,
                "output_bytes": out_size,
                "seconds": {k: [s.seconds for s in v] for k, v in samples.items()},
                "peak_rss": {k: [s.peak_rss for s in v] for k, v in samples.items()},
                "cpu": {k: [s.cpu for s in v] for k, v in samples.items()},
                "x_cp": x_cp,
                "x_cp_reference": x_ref,
                "ratios": ratios,
                "machine": info,
            },
            indent=2,
        )
    )
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
