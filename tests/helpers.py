"""Shared paths and constants for the tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

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
