"""Reporting: one row per command (median, spread, ratio to cp with its spread, peak
memory), the targets checked against them, and the Markdown report."""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shutil
from pathlib import Path

from measure import RSS_METHOD, Case, ratios, spread
from synth import MB


def summarize(c: Case, cp: Case | None) -> dict:
    """One row. ``x_cp``: the median of the round-by-round ratios to ``cp`` (each ratio
    taken from runs made back to back), with their min and max."""
    t = [s.seconds for s in c.samples]
    med, lo, hi = spread(t)
    x = spread(ratios(c, cp)) if cp is not None and cp.samples else None
    return {
        "key": c.key,
        "label": c.label,
        "argv": c.argv,
        "seconds": t,
        "rc": [s.rc for s in c.samples],
        "peak_rss_mb": [round(s.peak_rss / MB, 1) for s in c.samples],
        "peak_anon_mb": [round(s.peak_anon / MB, 1) for s in c.samples],
        "median_s": med,
        "min_s": lo,
        "max_s": hi,
        "x_cp": x[0] if x else None,
        "x_cp_min": x[1] if x else None,
        "x_cp_max": x[2] if x else None,
        "cpu_s": spread(cpu)[0]
        if (cpu := [s.cpu for s in c.samples if s.cpu is not None])
        else None,
        "max_peak_rss_mb": max(s.peak_rss for s in c.samples) / MB,
        "max_peak_anon_mb": max(s.peak_anon for s in c.samples) / MB,
        "ok": all(s.rc == 0 for s in c.samples),
    }


def ratio_text(r: dict) -> str:
    """``1.12× (1.05–1.20)``: the median ratio to cp and its range over the rounds."""
    return f"{r['x_cp']:.2f}× ({r['x_cp_min']:.2f}–{r['x_cp_max']:.2f})"


def table(rows: list[dict]) -> str:
    head = (
        "| command | median s | min–max s | × cp (min–max) | CPU s | peak RSS MB | peak anon MB |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        xcp = ratio_text(r).replace("×", "") if r["x_cp"] is not None else "—"
        label = r["label"] + ("" if r["ok"] else f" **(exit {sorted(set(r['rc']) - {0})})**")
        cpu = f"{r['cpu_s']:.3f}" if r.get("cpu_s") is not None else "—"
        lines.append(
            f"| {label} | {r['median_s']:.3f} | {r['min_s']:.3f}–{r['max_s']:.3f} | {xcp} "
            f"| {cpu} | {r['max_peak_rss_mb']:.0f} | {r['max_peak_anon_mb']:.0f} |"
        )
    return head + "\n".join(lines) + "\n"


def scaling_table(results: dict) -> str:
    """inspect of the MoE checkpoints: time and memory per tensor at each count."""
    rows = []
    for size, variants in results.items():
        g = variants.get("sharded") if isinstance(variants, dict) else None
        if not size.startswith("moe") or not g:
            continue
        r = next((x for x in g["rows"] if x["key"] == "inspect"), None)
        if r is not None:
            rows.append((g["tensors"], r))
    if not rows:
        return ""
    lines = [
        "| tensors | inspect median s (min–max) | µs per tensor | µs per added tensor "
        "| CPU s | peak RSS MB |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    before = None
    for n, r in sorted(rows, key=lambda x: x[0]):
        added = "—"
        if before is not None:
            added = f"{(r['median_s'] - before[1]) / (n - before[0]) * 1e6:.1f}"
        lines.append(
            f"| {n:,} | {r['median_s']:.3f} ({r['min_s']:.3f}–{r['max_s']:.3f}) "
            f"| {r['median_s'] / n * 1e6:.1f} | {added} "
            f"| {r['cpu_s'] if r.get('cpu_s') is None else format(r['cpu_s'], '.3f')} "
            f"| {r['max_peak_rss_mb']:.0f} |"
        )
        before = (n, r["median_s"])
    return "\n".join(lines) + "\n"


def machine_info(workdir: Path) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    fs, best = "unknown", ""
    try:
        real = str(workdir.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            mnt = parts[1]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fs = mnt, f"{parts[2]} ({parts[0]} on {mnt})"
    except OSError:
        pass

    def version(pkg: str) -> str:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as v

        try:
            return v(pkg)
        except PackageNotFoundError:
            return "not installed"

    import psutil

    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "disk_free_gb": round(shutil.disk_usage(workdir).free / 1e9, 1),
        "filesystem": fs,
        "workdir": str(workdir),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "safetensors": version("safetensors"),
        "tiecli": version("tiecli"),
    }


def check_targets(results: dict) -> list[tuple[bool, str]]:
    """The targets, from the medians (ratios: the median of the round-by-round ratios;
    memory: the worst run)."""
    out: list[tuple[bool, str]] = []

    def row(size: str, variant: str, key: str) -> dict | None:
        for r in results.get(size, {}).get(variant, {}).get("rows", []):
            if r["key"] == key and r["ok"]:
                return r
        return None

    def add(ok: bool, text: str) -> None:
        out.append((ok, text))

    def ratio(size: str, variant: str, key: str, limit: float, what: str, base: str = "cp") -> None:
        r, b = row(size, variant, key), row(size, variant, base)
        if r is None or b is None:
            return
        if base == "cp":
            x, lo, hi = r["x_cp"], r["x_cp_min"], r["x_cp_max"]
        else:  # against another row: the ratio of the medians
            x = lo = hi = r["median_s"] / b["median_s"]
        add(
            x <= limit,
            f"[{size}] {variant}: {what} ≤ {limit:.2f}× {b['label']}: {x:.2f}× "
            f"(rounds {lo:.2f}–{hi:.2f}; {r['median_s']:.3f} s vs {b['median_s']:.3f} s)",
        )

    def memory(size: str, variant: str, key: str, limit: float) -> None:
        r = row(size, variant, key)
        if r is not None:
            add(
                r["max_peak_rss_mb"] <= limit,
                f"[{size}] {variant}: {r['label']} peak RSS ≤ {limit:.0f} MB: "
                f"{r['max_peak_rss_mb']:.0f} MB (anon {r['max_peak_anon_mb']:.0f} MB)",
            )

    for r in results.get("startup", {}).get("rows", []):
        if r["key"] == "help":
            add(r["median_s"] <= 0.4, f"tiecli --help ≤ 0.4 s: {r['median_s']:.3f} s")
    for size in [s for s in results if s != "startup"]:
        ratio(size, "single", "dedupe", 1.10, "dedupe -o")
        ratio(size, "single", "dedupe_inplace", 1.05, "dedupe in place", base="cp_sync")
        ratio(size, "sharded", "dedupe", 1.15, "dedupe -o")
        ratio(size, "bin", "dedupe", 1.5, "dedupe -o")
        ratio(size, "bin", "untie", 1.5, "untie -o")
        d, ls = row(size, "single", "dedupe"), row(size, "single", "loadsave")
        if d and ls:
            f = ls["median_s"] / d["median_s"]
            add(f >= 3, f"[{size}] single: dedupe ≥ 3× faster than load-then-save: {f:.2f}×")
        d, tr = row(size, "hf", "dedupe"), row(size, "hf", "transformers")
        if d and tr:
            f = tr["median_s"] / d["median_s"]
            add(f >= 5, f"[{size}] hf: dedupe ≥ 5× faster than transformers round trip: {f:.2f}×")
        for key in ("dedupe", "dedupe_fsync", "dedupe_inplace", "untie", "verify_deduped"):
            memory(size, "single", key, 150)
        for key in ("dedupe", "untie"):
            memory(size, "bin", key, 150)
        r = row(size, "single", "inspect")
        if r:
            add(r["median_s"] <= 0.5, f"[{size}] single: inspect ≤ 0.5 s: {r['median_s']:.3f} s")
            memory(size, "single", "inspect", 100)
        r = row(size, "sharded", "inspect")
        if r and size == "moe":
            cpu = f" (CPU {r['cpu_s']:.3f} s)" if r.get("cpu_s") is not None else ""
            add(
                r["median_s"] <= 1.0,
                f"[{size}] sharded: inspect ≤ 1.0 s: {r['median_s']:.3f} s{cpu}",
            )
            memory(size, "sharded", "inspect", 150)
    per = sorted(
        (g["sharded"]["tensors"], r["median_s"])
        for s, g in results.items()
        if s.startswith("moe") and "sharded" in g
        for r in g["sharded"]["rows"]
        if r["key"] == "inspect"
    )
    slopes = [(t2 - t1) / (n2 - n1) for (n1, t1), (n2, t2) in zip(per, per[1:], strict=False)]
    if len(slopes) > 1:  # start-up is paid once: the cost of each added tensor is what grows
        add(
            max(slopes) <= 1.5 * min(slopes),
            "inspect cost per added tensor is linear (largest ≤ 1.5× smallest): "
            + ", ".join(
                f"{b * 1e6:.1f} µs from {n1:,} to {n2:,}"
                for b, (n1, _t1), (n2, _t2) in zip(slopes, per, per[1:], strict=False)
            ),
        )
    return out


def markdown(
    a: argparse.Namespace, machine: dict, sections: list[str], check_lines: list[str]
) -> str:
    cache = (
        "The page cache is **dropped before every timed run** (`--cold`): inputs, and Python "
        "itself, come from disk"
        if a.cold
        else "Inputs are dropped from the page cache and read back once before timing "
        "(`posix_fadvise` DONTNEED, then a sequential read; a destructive run's fresh copy "
        "too), so they stay **page-cache warm** and every input's cached pages are laid out "
        "as a read lays them out, whatever wrote the file"
    )
    faulted = (
        "memory is not touched beforehand (`--prefault-gb 0`)"
        if a.prefault_gb == 0
        else "then, untimed, the harness touches and frees "
        + (f"{a.prefault_gb:g} GB" if a.prefault_gb else "2× the checkpoint + 1 GB")
        + " of memory, so no row pays the host for memory the VM handed back "
        "(free page reporting)"
    )
    notes = (
        "Method: every row runs as a subprocess; rows are timed round-robin, "
        f"{a.repeat} round(s). {cache}; `sync` runs, untimed, before every timed run so no "
        f"run pays for an earlier run's dirty pages; {faulted}. "
        "Destructive runs get a fresh copy of the input "
        "first (copy not timed); outputs are deleted between runs (not timed). "
        "`× cp` = the median over the rounds of the row's time / plain `cp`'s time in the same "
        "round, with the lowest and highest of those ratios (`cp` does not fsync; the "
        "`cp + sync` row is the durable floor). Peak RSS = max over runs of "
        f"{RSS_METHOD}; it counts file-backed mmap pages the process touched. "
        "Peak anon = the same poll of RssAnon (heap only, mmap'd file pages excluded; a poll can "
        "miss spikes shorter than 5 ms). A command that exits non-zero stops the run."
    )
    m = machine
    return "\n".join(
        [
            "# tiecli benchmark results",
            "",
            f"Generated by `python benchmarks/bench.py --sizes {','.join(a.sizes)} "
            f"--repeat {a.repeat}{' --cold' if a.cold else ''}` on {m['date']}.",
            "",
            "## Machine",
            "",
            f"- CPU: {m['cpu']}, {m['cores']} cores; RAM {m['ram_gb']} GB",
            f"- Work dir: {m['filesystem']}, {m['disk_free_gb']} GB free at start",
            f"- {m['os']}; Python {m['python']}, torch {m['torch']}, "
            f"transformers {m['transformers']}, safetensors {m['safetensors']}, "
            f"tiecli {m['tiecli']}",
            "",
            notes,
            "",
            "## Results",
            "",
            "\n".join(sections),
            "## Targets",
            "",
            "```",
            "\n".join(check_lines),
            "```",
            "",
        ]
    )
