"""An alias the architecture does not declare is never left for transformers to lose.

transformers restores a name absent from a checkpoint only when the architecture
ties it; the ``{alias: source}`` metadata convention alone is not enough. So with a
config.json tiecli can interpret, ``dedupe --by-value`` keeps such duplicates, and
``verify`` flags an absent alias the architecture does not declare.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tiecli
from tiecli.cli import app

runner = CliRunner()
GATE = "model.layers.0.mlp.gate_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"


def _model_with_incidental_duplicate(folder: Path) -> torch.nn.Module:
    """A tiny untied Llama whose up projection was set equal to its gate by hand (32 KiB)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.copy_(model.model.layers[0].mlp.gate_proj.weight)
    model.save_pretrained(folder)
    return model


def _load_up(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).model.layers[0].mlp.up_proj.weight


def test_by_value_keeps_a_duplicate_transformers_would_not_restore(tmp_path: Path) -> None:
    model = _model_with_incidental_duplicate(tmp_path / "m")
    out = tmp_path / "out"
    r = runner.invoke(
        app,
        ["dedupe", str(tmp_path / "m"), "-o", str(out), "--by-value", "--min-bytes", "1024"]
        + ["--json"],
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["removed"] == []
    [kept] = [k for k in doc["kept"] if k["alias"] == UP]
    assert kept["source"] == GATE and kept["kind"] == "duplicate"
    assert kept["reason"] == "transformers would not restore it: not a tie of LlamaForCausalLM"
    assert torch.equal(_load_up(out), model.model.layers[0].mlp.up_proj.weight)
    assert tiecli.verify(out).ok


@pytest.mark.parametrize("with_transformers", [True, False])
def test_verify_flags_an_absent_alias_the_architecture_does_not_declare(
    with_transformers: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model_with_incidental_duplicate(tmp_path / "m")
    want = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    # deduped as a bare file (no config: tiecli.load restores it), then given its config
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy2(tmp_path / "m" / "model.safetensors", bare)
    result = tiecli.dedupe(bare / "model.safetensors", by_value=True, min_bytes=1024)
    assert [t.alias for t in result.removed] == [UP]
    assert torch.equal(tiecli.load(bare / "model.safetensors")[UP], want)
    shutil.copy2(tmp_path / "m" / "config.json", bare)
    assert not torch.equal(_load_up(bare), want)  # what the problem is about

    if not with_transformers:  # the pattern table knows model_type llama
        monkeypatch.setitem(sys.modules, "transformers", None)
    r = runner.invoke(app, ["verify", str(bare), "--json"])
    assert r.exit_code == 1, r.output
    [problem] = json.loads(r.stdout)["problems"]
    assert problem["code"] == "alias-not-declared" and problem["severity"] == "error"
    assert problem["tensors"] == [UP, GATE]
    assert f"tiecli untie {bare}" in problem["message"]
    assert ("LlamaForCausalLM" in problem["message"]) == with_transformers
    monkeypatch.undo()

    tiecli.untie(bare)  # the fix it names
    assert tiecli.verify(bare).ok
    assert torch.equal(_load_up(bare), want)


def test_conversion_writes_an_undeclared_shared_storage_alias_as_a_copy(tmp_path: Path) -> None:
    """A pickle whose gate and up projections are one tensor: safetensors cannot share it,
    and transformers would not restore the dropped name, so it is written on its own."""
    model = _model_with_incidental_duplicate(tmp_path / "m")
    want = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy2(tmp_path / "m" / "config.json", pickled)
    sd = {n: t.detach().clone() for n, t in model.state_dict().items()}
    sd[UP] = sd[GATE]  # one storage under two names, as torch.save keeps it
    torch.save(sd, pickled / "pytorch_model.bin")

    out = tmp_path / "out"
    r = runner.invoke(
        app, ["dedupe", str(pickled), "--to", "safetensors", "-o", str(out), "--json"]
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert UP not in doc["removed"]
    [kept] = [k for k in doc["kept"] if k["alias"] == UP]
    assert "transformers would not restore it" in kept["reason"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert UP in f.keys() and torch.equal(f.get_tensor(UP), want)
    assert tiecli.verify(out).ok
    assert torch.equal(_load_up(out), want)
