"""What is timed: the rows of each table, and the baselines' workers.

Every row is a subprocess; a baseline (load-then-save, the transformers round
trip) runs as ``bench.py _worker KIND IN OUT``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from measure import Case
from synth import HEAD

BENCH = Path(__file__).resolve().parent / "bench.py"


def tiecli_argv() -> list[str]:
    exe = Path(sys.executable).parent / "tiecli"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("tiecli")
    return [found] if found else [sys.executable, "-m", "tiecli"]


def byte_compiled() -> str:
    """Byte-compile the tiecli package that is timed, as ``pip install`` does, and say so.

    With ``PYTHONDONTWRITEBYTECODE`` set (as in some sandboxes and CI images) an editable
    install would otherwise compile every module from source on every run, some 50 ms
    no installed tiecli pays; Python still reads bytecode that is already there."""
    import compileall
    import importlib.util

    spec = importlib.util.find_spec("tiecli")
    if spec is None or spec.origin is None:
        return "tiecli not found to byte-compile"
    folder = Path(spec.origin).parent
    ok = compileall.compile_dir(str(folder), quiet=1)
    return f"tiecli byte-compiled before timing ({folder}){'' if ok else ', with errors'}"


def transformers_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):
        return False


def variant_cases(variant: str, inp: Path, scratch: Path, deduped: Path) -> list[Case]:
    T = tiecli_argv()
    W = [sys.executable, str(BENCH), "_worker"]
    is_dir = inp.is_dir()
    suffix = "" if is_dir else inp.suffix
    o = lambda name: scratch / (name + suffix)  # noqa: E731
    cp = ["cp", "-r"] if is_dir else ["cp"]
    sync_target = '"$1"/* "$1"' if is_dir else '"$1"'
    cases = [
        Case("cp", "cp" + (" -r" if is_dir else ""), cp + [str(inp), str(o("cp"))], out=o("cp")),
        Case(
            "cp_sync",
            "cp + sync (fsync'd floor)",
            [
                "sh",
                "-c",
                f'{" ".join(cp)} "$0" "$1" && sync {sync_target}',
                str(inp),
                str(o("cpsync")),
            ],
            out=o("cpsync"),
        ),
        Case(
            "dedupe",
            "tiecli dedupe -o",
            T + ["dedupe", str(inp), "-o", str(o("dedupe")), "-q"],
            out=o("dedupe"),
        ),
        Case(
            "dedupe_fsync",
            "tiecli dedupe -o --fsync",
            T + ["dedupe", str(inp), "-o", str(o("dedupe_fsync")), "--fsync", "-q"],
            out=o("dedupe_fsync"),
        ),
    ]
    if variant != "hf":
        cases.append(
            Case(
                "dedupe_inplace",
                "tiecli dedupe (in place)",
                T + ["dedupe", str(o("inplace")), "-q"],
                fresh=(inp, o("inplace")),
            )
        )
    if variant == "bin":
        cases.append(
            Case(
                "dedupe_to_st",
                "tiecli dedupe --to safetensors -o",
                T
                + [
                    "dedupe",
                    str(inp),
                    "--to",
                    "safetensors",
                    "-o",
                    str(scratch / "to_st.safetensors"),
                    "-q",
                ],
                out=scratch / "to_st.safetensors",
            )
        )
        cases.append(
            Case(
                "loadsave",
                "torch.load + torch.save",
                W + ["torchsave", str(inp), str(o("loadsave"))],
                out=o("loadsave"),
            )
        )
    else:
        what = "load_file + save_file" + (" (per shard)" if variant == "sharded" else "")
        cases.append(
            Case(
                "loadsave", what, W + ["loadsave", str(inp), str(o("loadsave"))], out=o("loadsave")
            )
        )
        cases.append(
            Case(
                "loadsave_sync",
                what + " + fsync",
                W + ["loadsave_sync", str(inp), str(o("loadsave_sync"))],
                out=o("loadsave_sync"),
            )
        )
    if variant == "hf" and transformers_available():
        cases.append(
            Case(
                "transformers",
                "transformers from_pretrained + save_pretrained",
                W + ["transformers", str(inp), str(o("hf_rt"))],
                out=o("hf_rt"),
            )
        )
    cases.append(
        Case(
            "inspect",
            "tiecli inspect --json" + (" (with config)" if variant == "hf" else ""),
            T + ["inspect", str(inp), "--json", "-q"],
        )
    )
    if variant != "hf":
        cases.append(
            Case(
                "untie",
                "tiecli untie -o (deduped input)",
                T + ["untie", str(deduped), "-o", str(o("untie")), "-q"],
                out=o("untie"),
            )
        )
        cases.append(
            Case("verify_deduped", "tiecli verify (deduped)", T + ["verify", str(deduped), "-q"])
        )
    cases.append(
        Case("verify_original", "tiecli verify (original)", T + ["verify", str(inp), "-q"])
    )
    return cases


def startup_cases() -> list[Case]:
    T = tiecli_argv()
    return [
        Case("help", "tiecli --help", T + ["--help"]),
        Case("version", "tiecli --version", T + ["--version"]),
        Case("import_tiecli", 'python -c "import tiecli"', [sys.executable, "-c", "import tiecli"]),
        Case(
            "import_torch",
            'python -c "import torch" (reference)',
            [sys.executable, "-c", "import torch"],
        ),
        Case("python", 'python -c "pass" (reference)', [sys.executable, "-c", "pass"]),
    ]


def moe_cases(inp: Path, scratch: Path) -> list[Case]:
    """Many small tensors: inspect alone, against copying the folder."""
    T = tiecli_argv()
    return [
        Case("cp", "cp -r", ["cp", "-r", str(inp), str(scratch / "cp")], out=scratch / "cp"),
        Case("inspect", "tiecli inspect --json", T + ["inspect", str(inp), "--json", "-q"]),
    ]


def worker(kind: str, src: str, dst: str) -> None:
    s, d = Path(src), Path(dst)
    if kind == "loadsave_sync":
        # The same script made durable like tiecli's output (fsync before done).
        worker("loadsave", src, dst)
        for f in [d] if d.is_file() else sorted(d.iterdir()):
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        return
    if kind == "loadsave":
        # What users do today: load everything, drop the alias, save. Per shard
        # for a sharded folder; other files (config.json) are copied over.
        from safetensors.torch import load_file, save_file

        if s.is_file():
            sd = load_file(s)
            sd.pop(HEAD, None)
            save_file(sd, d, metadata={"format": "pt"})
            return
        d.mkdir()
        for f in sorted(s.iterdir()):
            if f.suffix == ".safetensors":
                sd = load_file(f)
                sd.pop(HEAD, None)
                save_file(sd, d / f.name, metadata={"format": "pt"})
                del sd
            elif f.name.endswith(".index.json"):
                idx = json.loads(f.read_text())
                idx["weight_map"].pop(HEAD, None)
                (d / f.name).write_text(json.dumps(idx, indent=2))
            elif f.is_file():
                shutil.copyfile(f, d / f.name)
    elif kind == "torchsave":
        import torch

        sd = torch.load(s, map_location="cpu", weights_only=True)
        sd.pop(HEAD, None)
        torch.save(sd, d)
    elif kind == "transformers":
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        kw = (
            {"dtype": torch.bfloat16}
            if (major, minor) >= (4, 56)
            else {"torch_dtype": torch.bfloat16}
        )
        model = AutoModelForCausalLM.from_pretrained(s, **kw)
        model.save_pretrained(d)
    else:
        raise SystemExit(f"unknown worker {kind!r}")
