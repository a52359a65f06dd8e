"""What the tests share: fixture paths, the CLI run in process, equality and snapshots."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from typer.testing import CliRunner, Result

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
MANIFEST = json.loads((FIXTURES / "MANIFEST.json").read_text())
MODELS = ["gpt2", "llama-tied", "llama-untied", "t5", "bert-mlm"]
TIED_MODELS = ["gpt2", "llama-tied", "t5", "bert-mlm"]
FORMS = ["hf", "hf-sharded", "full", "full-sharded", "bin"]


def fixture_path(model: str, form: str) -> Path:
    return FIXTURES / model / form


# Every command's JSON document starts with these fields (SPEC §4).
JSON_HEADER = ("command", "path", "format", "ok", "problems")

runner = CliRunner()


def invoke(args: Sequence[object]) -> Result:
    """``tiecli *args`` in this process; fails if an exception escaped the CLI or a
    traceback was printed (errors are one ``Error:`` line and an exit code)."""
    from tiecli.cli import app

    r = runner.invoke(app, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    return r


def document(r: Result, code: int | Iterable[int] | None = None) -> dict[str, Any]:
    """The one JSON document a ``--json`` run printed. A run that reported (exit 0 or 1)
    always prints one; after an error (exit 2) stdout is empty and the document is
    ``{"stderr": <the error>}``. ``code``: the exit code (or codes) the run must have."""
    if code is not None:
        codes = (code,) if isinstance(code, int) else tuple(code)
        assert r.exit_code in codes, (r.exit_code, r.stdout, r.stderr)
    if r.exit_code in (0, 1):
        return json.loads(r.stdout)
    assert r.stdout.strip() == "", r.stdout
    return {"stderr": r.stderr}


def run_json(
    args: Sequence[object], code: int | Iterable[int] | None = None
) -> tuple[int, dict[str, Any]]:
    """``tiecli *args`` (``--json`` among them): its exit code and :func:`document`."""
    r = invoke(args)
    return r.exit_code, document(r, code)


def error_line(r: Any) -> str:
    """The one ``Error: ...`` line of a refused run (a CLI result or a finished process):
    nothing else on stderr, nothing on stdout, no traceback."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert "Traceback" not in r.stdout + r.stderr and r.stdout == "", (r.stdout, r.stderr)
    return lines[0]


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Two state dicts hold the same names, dtypes, shapes and values, bit for bit."""
    import torch

    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype, name
        assert g.shape == w.shape, name
        assert torch.equal(g, w), name


def snapshot(folder: Path) -> dict[str, str | None]:
    """Every path under ``folder`` -> sha256 of its bytes (None for a folder): equal
    snapshots before and after a run prove it left ``folder`` as it was."""
    out: dict[str, str | None] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    return out


def with_config(model: str, form: str, dst: Path, **changes: Any) -> Path:
    """A copy of a fixture folder whose config.json has ``changes`` applied."""
    shutil.copytree(fixture_path(model, form), dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def sharded_pickle(x: Path) -> Path:
    """gpt2 as two .bin shards with an index; the tied pair stored twice in one shard."""
    import torch
    from safetensors.torch import load_file

    x.mkdir(parents=True)
    shutil.copy2(FIXTURES / "gpt2/full/config.json", x)
    sd = load_file(FIXTURES / "gpt2/full/model.safetensors")
    pair = ("transformer.wte.weight", "lm_head.weight")
    shards = {
        "pytorch_model-00001-of-00002.bin": {n: t for n, t in sd.items() if n not in pair},
        "pytorch_model-00002-of-00002.bin": {n: sd[n] for n in pair},
    }
    weight_map = {}
    for name, part in shards.items():
        torch.save(part, x / name)
        weight_map |= {n: name for n in part}
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in sd.values())},
        "weight_map": weight_map,
    }
    (x / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return x


def small_tensor(seed: int, rows: int = 10) -> Any:
    """Seeded ``rows`` x 4 values: an embedding or head of a tiny model."""
    import torch

    return torch.randn(rows, 4, generator=torch.Generator().manual_seed(seed))


def model_folder(
    path: Path, config: dict[str, Any], tensors: dict[str, Any], form: str = "st"
) -> Path:
    """A model folder: ``config`` and ``tensors`` (plus a norm) as one safetensors file
    (``st``), a ``bin``, or two shards with an index (``sharded``)."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {**tensors, "model.norm.weight": torch.arange(4.0)}
    if form == "st":
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    elif form == "bin":
        torch.save(tensors, path / "pytorch_model.bin")
    else:  # two shards: the norm apart from the pair
        names = list(tensors)
        shards = {"model-00001-of-00002.safetensors": names[:-1]}
        shards["model-00002-of-00002.safetensors"] = names[-1:]
        weight_map = {}
        for shard, members in shards.items():
            save_file({n: tensors[n] for n in members}, path / shard, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(members, shard)
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def same_but_location(remote: dict[str, Any], local: dict[str, Any]) -> None:
    """Two JSON reports are equal but for the fields that name where the checkpoint lives
    (a remote run beside a local run of the same files)."""
    where = ("path", "config", "remote", "checked", "checkpoints")
    r = {k: v for k, v in remote.items() if k not in where}
    loc = {k: v for k, v in local.items() if k not in where}
    for p in r.get("problems", []) + loc.get("problems", []):
        p.pop("path", None)
        p["message"] = p["message"].replace(str(FIXTURES), "").split("fix:")[0]
    assert r == loc


def coverage_walk(name: str = "tiecli_coverage_walk") -> Any:
    """``tools/coverage.py`` (the architecture walk, not a package) loaded as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "coverage.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
