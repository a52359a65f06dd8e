#!/usr/bin/env python
"""tiecli benchmark: one command reproduces every figure of SPEC section 9.

    python benchmarks/bench.py [--sizes small,1x,2x,moe10k,moe,moe200k] [--repeat 5]
                               [--out benchmarks/results.md] [--workdir DIR] [--keep]

It generates synthetic checkpoints (streamed, little memory), times tiecli against
`cp`, a load-then-save script and a transformers round trip in one run, writes a
Markdown report plus a JSON file of raw timings, and prints PASS/FAIL lines for the
targets. See benchmarks/README.md. The parts: synth.py (checkpoints), measure.py
(timing, peak memory, spread), cases.py (what is timed), report.py (tables, targets).

The same file doubles as the worker for the baselines it times
(`bench.py _worker KIND IN OUT`), so every baseline is a plain subprocess too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from cases import byte_compiled, moe_cases, startup_cases, tiecli_argv, variant_cases, worker
from measure import (
    DROP_CACHES,
    Case,
    CommandFailed,
    drop_caches,
    prefault_bytes,
    remove,
    run_cases,
    warm,
)
from report import check_targets, machine_info, markdown, scaling_table, summarize, table
from synth import ALL_VARIANTS, MB, SIZES, du, generate, inputs_for, specs_for

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_WORKDIR = HERE / "out" / "work"


def resolve_workdir(arg: str | None) -> Path:
    wd = Path(arg).resolve() if arg else DEFAULT_WORKDIR
    out_root = (HERE / "out").resolve()
    repo = REPO.resolve()
    if (wd == repo or repo in wd.parents) and not (wd == out_root or out_root in wd.parents):
        raise SystemExit(
            f"error: --workdir {wd} is inside the repository; use benchmarks/out/ or a folder outside it"
        )
    return wd


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--sizes", default="1x,2x", help=f"comma list of {','.join(SIZES)} (default: 1x,2x)"
    )
    ap.add_argument(
        "--variants",
        default="auto",
        help="comma list of single,sharded,bin,hf; auto = all for small/1x, single for 2x, "
        "sharded for the moe sizes",
    )
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per command (default 5)")
    ap.add_argument(
        "--out", default=str(HERE / "results.md"), help="Markdown report; raw JSON goes next to it"
    )
    ap.add_argument(
        "--workdir",
        default=None,
        help=f"where checkpoints are generated (default {DEFAULT_WORKDIR})",
    )
    ap.add_argument(
        "--keep", action="store_true", help="keep generated checkpoints (and reuse them next run)"
    )
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target FAILs")
    ap.add_argument(
        "--prefault-gb",
        type=float,
        default=None,
        help="memory touched and freed before every timed run (default: 2x the checkpoint "
        "+ 1 GB, at most half the free memory; 0 = off)",
    )
    ap.add_argument(
        "--cold",
        action="store_true",
        help="drop the page cache before every timed run (root only): disk-bound figures",
    )
    a = ap.parse_args(argv)
    if a.cold:
        try:
            drop_caches()
        except OSError as e:
            ap.error(f"--cold needs to write {DROP_CACHES} (run as root): {e.strerror}")
    a.sizes = [s.strip() for s in a.sizes.split(",") if s.strip()]
    for s in a.sizes:
        if s not in SIZES:
            ap.error(f"unknown size {s!r}; choose from {', '.join(SIZES)}")
    if a.repeat < 1:
        ap.error("--repeat must be ≥ 1")
    a.chosen = None
    if a.variants != "auto":
        a.chosen = tuple(v.strip() for v in a.variants.split(",") if v.strip())
        bad = [v for v in a.chosen if v not in ALL_VARIANTS]
        if bad:
            ap.error(f"unknown variant(s) {bad}; choose from {', '.join(ALL_VARIANTS)}")
    return a


def deduped_copy(inp: Path, scratch: Path, log: Callable[[str], None]) -> Path:
    """A deduped copy of ``inp`` (untimed), the input of the untie and verify rows."""
    deduped = scratch / ("deduped" + ("" if inp.is_dir() else inp.suffix))
    argv = tiecli_argv() + ["dedupe", str(inp), "-o", str(deduped), "-q"]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        log(f"  ! could not make the deduped input for untie/verify: {r.stderr.strip()[-400:]}")
    return deduped


def run_variant(
    a: argparse.Namespace,
    size: str,
    variant: str,
    inp: Path,
    workdir: Path,
    one: int,
    log: Callable[[str], None],
) -> list[Case]:
    """Time every row of one variant; the input must come out unchanged."""
    scratch = inp.parent.parent / f"_scratch_{variant}"
    remove(scratch)
    scratch.mkdir()
    try:
        moe = "moe" in SIZES[size]
        deduped = scratch / "none" if moe or variant == "hf" else deduped_copy(inp, scratch, log)
        files = [inp] if inp.is_file() else [f for f in inp.rglob("*") if f.is_file()]
        before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in files}
        warm([inp] + ([deduped] if deduped.exists() else []))
        log(
            f"-- {size}/{variant}: {inp.relative_to(workdir)} ({du(inp) / MB:.1f} MB), "
            f"{a.repeat} round(s)"
        )
        cases = moe_cases(inp, scratch) if moe else variant_cases(variant, inp, scratch, deduped)
        warm_bytes = prefault_bytes(a.prefault_gb, one)
        run_cases(cases, a.repeat, scratch, log, a.cold, warm_bytes)
        after = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in before if p.exists()}
        if after != before:
            log(f"  ! WARNING: the input {inp} changed during the run")
    finally:
        remove(scratch)
    return cases


def run_all(
    a: argparse.Namespace, workdir: Path, log: Callable[[str], None]
) -> tuple[dict, dict, list[str]]:
    """Every size and variant: (results, generation times, Markdown sections)."""
    results: dict = {}
    gen_times: dict = {}
    sections: list[str] = []
    created: list[Path] = []
    try:
        scratch = workdir / "_scratch"
        scratch.mkdir(exist_ok=True)
        created.append(scratch)
        log("\n== startup ==")
        cases = startup_cases()
        run_cases(cases, a.repeat, scratch, log, a.cold, prefault_bytes(a.prefault_gb, 0))
        rows = [summarize(c, None) for c in cases]
        results["startup"] = {"rows": rows}
        sections.append("### startup (no checkpoint)\n\n" + table(rows))
        print(table(rows))

        for size in a.sizes:
            cfg = SIZES[size]
            variants = cfg["variants"] if a.chosen is None else a.chosen
            size_dir = workdir / size
            if not size_dir.exists() or not a.keep:
                created.append(size_dir)
            # disk: inputs (hf is a hard link) + ~4 outputs of the largest variant alive at once
            specs = specs_for(cfg)
            one = sum(s.nbytes for s in specs)
            need = one * (len([v for v in variants if v != "hf"]) + 4)
            free = shutil.disk_usage(workdir).free
            if not (size_dir / ".generated.json").exists() and free < need:
                raise SystemExit(
                    f"error: {size} needs ~{need / 1e9:.1f} GB free in {workdir}, "
                    f"have {free / 1e9:.1f} GB"
                )
            log(f"\n== {size}: {len(specs)} tensors, {one / MB:.1f} MB per checkpoint ==")
            gen_times[size] = generate(size, size_dir, tuple(variants), log)
            paths = inputs_for(size_dir)
            results[size] = {}
            for variant in variants:
                inp = paths[variant]
                cases = run_variant(a, size, variant, inp, workdir, one, log)
                rows = [summarize(c, cases[0]) for c in cases]
                results[size][variant] = {
                    "input": str(inp),
                    "bytes": du(inp),
                    "tensors": len(specs),
                    "rows": rows,
                }
                title = (
                    f"### {size} / {variant} — `{inp.relative_to(workdir)}`, "
                    f"{du(inp) / MB:.1f} MB, {len(specs)} tensors"
                )
                sections.append(title + "\n\n" + table(rows))
                print(f"\n{title}\n")
                print(table(rows))
    finally:
        if not a.keep:
            for p in created:
                remove(p)
            try:
                workdir.rmdir()  # only when empty
            except OSError:
                pass
    scaling = scaling_table(results)
    if scaling:
        sections.append("### inspect per tensor (MoE checkpoints, 4 shards)\n\n" + scaling)
        print("\n" + scaling)
    return results, gen_times, sections


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        worker(*argv[1:4])
        return 0
    a = parse_args(argv)
    workdir = resolve_workdir(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out_md = Path(a.out).resolve()

    def log(msg: str) -> None:
        print(msg, flush=True)

    machine = machine_info(workdir)
    log(
        f"tiecli benchmark — {machine['cpu']}, {machine['cores']} cores, {machine['ram_gb']} GB "
        f"RAM, {machine['filesystem']}, {machine['disk_free_gb']} GB free; "
        f"tiecli = {' '.join(tiecli_argv())}"
    )
    log(byte_compiled())
    try:
        results, gen_times, sections = run_all(a, workdir, log)
    except CommandFailed as e:
        print(f"\nFAILED: a timed command exited non-zero; no figures are reported.\n{e}")
        return 1
    checks = check_targets(results)
    check_lines = [f"{'PASS' if ok else 'FAIL'}  {text}" for ok, text in checks]
    print("\n== targets ==")
    print("\n".join(check_lines))
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(markdown(a, machine, sections, check_lines))
    out_json = out_md.with_suffix(".json")
    doc = {
        "machine": machine,
        "argv": sys.argv,
        "repeat": a.repeat,
        "generation_seconds": gen_times,
        "results": results,
        "targets": [{"ok": ok, "text": t} for ok, t in checks],
    }
    out_json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {out_md} and {out_json}")
    return 1 if a.strict and not all(ok for ok, _ in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
