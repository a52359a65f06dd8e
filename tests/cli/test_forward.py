"""verify --forward: rebuild, load with ties restored, run, compare."""

from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import TIED_MODELS, error_line, fixture_path, run_json, runner, with_config
from safetensors.torch import load_file, save_file

import tiecli
from tiecli.cli import app

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def verify_json(*args: str) -> tuple[int, dict]:
    return run_json(["verify", "--json", "--forward", *args])


def perturbed_copy(src: Path, dst: Path, skip: set[str]) -> str:
    """A copy of a `full` folder with one element of one untied weight changed."""
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    name = next(n for n, t in sd.items() if n not in skip and t.dim() == 2)
    sd[name][0, 0] += 0.125
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return name


def _check_against(model: str, device: str, tmp_path: Path) -> None:
    full = fixture_path(model, "full")
    deduped = tmp_path / "deduped"
    tiecli.dedupe(full, deduped)
    code, doc = verify_json("--device", device, "--against", str(full), str(deduped))
    assert code == 0, doc
    f = doc["forward"]
    assert f["outputs_equal"] is True and f["max_abs_diff"] == 0.0
    assert f["ties_shared_on_device"] is True
    assert f["device"].startswith(device)
    assert f["unique_parameter_bytes"] < f["tie_unaware_bytes"]
    assert f["seconds"] > 0

    ties = tiecli.inspect(full).ties
    bad = tmp_path / "perturbed"
    perturbed_copy(full, bad, {t.alias for t in ties} | {t.source for t in ties})
    code, doc = verify_json("--device", device, "--against", str(bad), str(deduped))
    assert code == 1
    assert doc["forward"]["outputs_equal"] is False and doc["forward"]["max_abs_diff"] > 0
    (p,) = [p for p in doc["problems"] if p["code"] == "forward-mismatch"]
    assert "max abs diff" in p["message"]
    # a tolerance wide enough accepts it
    code, doc = verify_json(
        "--device", device, "--against", str(bad), "--atol", "1e3", str(deduped)
    )
    assert code == 0 and doc["forward"]["outputs_equal"] is True


@pytest.mark.parametrize("model", TIED_MODELS)
def test_forward_against_reference_cpu(model: str, tmp_path: Path) -> None:
    _check_against(model, "cpu", tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model", TIED_MODELS)
def test_forward_against_reference_cuda(model: str, tmp_path: Path) -> None:
    _check_against(model, "cuda", tmp_path)


@pytest.mark.parametrize("form", ["hf", "hf-sharded", "bin", "full-sharded"])
def test_forward_on_every_form(form: str) -> None:
    code, doc = verify_json("--device", "cpu", str(fixture_path("t5", form)))
    assert code == 0, doc
    assert (
        doc["forward"]["ties_shared_on_device"] is True and doc["forward"]["outputs_finite"] is True
    )


def test_forward_bf16() -> None:
    code, doc = verify_json(
        "--device", "cpu", "--dtype", "bfloat16", str(fixture_path("llama-tied", "hf"))
    )
    assert code == 0, doc
    assert (
        doc["forward"]["unique_parameter_bytes"] * 2
        == tiecli.inspect(fixture_path("llama-tied", "hf")).bytes
    )


CUSTOM = textwrap.dedent(
    """
    import torch
    from torch import nn

    class TiedLM(nn.Module):
        # head is stored transposed: head == embed.weight.T, one storage
        def __init__(self, vocab=32, hidden=8):
            super().__init__()
            self.embed = nn.Embedding(vocab, hidden)
            self.proj = nn.Linear(hidden, hidden)
            self.head = nn.Parameter(torch.empty(hidden, vocab))

        def forward(self, ids):
            return torch.tanh(self.proj(self.embed(ids))) @ self.head

    def build():
        return TiedLM()

    def build_with_input():
        return TiedLM(), torch.arange(12).reshape(2, 6) % 32

    def build_broken():
        m = TiedLM()
        def untie(module, incompatible):
            module.head = nn.Parameter(module.head.detach().clone())
        m.register_load_state_dict_post_hook(untie)
        return m
    """
)


@pytest.fixture
def custom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    name = f"custom_lm_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(CUSTOM)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(32, 8, generator=g)
    sd = {
        "embed.weight": emb,
        "head": emb.t(),
        "proj.weight": torch.randn(8, 8, generator=g),
        "proj.bias": torch.randn(8, generator=g),
    }
    torch.save(sd, tmp_path / "custom.pt")
    yield tmp_path / "custom.pt", name
    sys.modules.pop(name, None)


def test_custom_module_with_transposed_tie(custom, tmp_path: Path) -> None:
    ckpt, mod = custom
    (tie,) = tiecli.inspect(ckpt).ties
    assert (tie.alias, tie.transform) == ("head", "transpose")
    code, doc = verify_json("--device", "cpu", "--model", f"{mod}:build", str(ckpt))
    assert code == 0, doc
    assert (
        doc["forward"]["ties_shared_on_device"] is True
        and doc["forward"]["architecture"] == "TiedLM"
    )
    # deduped to safetensors, the record restores the transposed head; outputs identical
    out = tmp_path / "custom.safetensors"
    tiecli.dedupe(ckpt, out, to="safetensors")
    code, doc = verify_json(
        "--device", "cpu", "--model", f"{mod}:build_with_input", "--against", str(ckpt), str(out)
    )
    assert code == 0, doc
    assert doc["forward"]["outputs_equal"] is True


def test_tie_broken_after_loading_is_reported(custom) -> None:
    ckpt, mod = custom
    code, doc = verify_json("--device", "cpu", "--model", f"{mod}:build_broken", str(ckpt))
    assert code == 1
    assert doc["forward"]["ties_shared_on_device"] is False
    (p,) = [p for p in doc["problems"] if p["code"] == "tie-broken-on-device"]
    assert set(p["tensors"]) == {"head", "embed.weight"}


def _err(args: list[str]) -> str:
    r = runner.invoke(app, ["verify", "--forward", *args])
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    return error_line(r)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_unavailable_is_a_clear_error() -> None:
    assert "CUDA is not available" in _err(["--device", "cuda", str(fixture_path("gpt2", "hf"))])


def test_transformers_missing_is_a_clear_error(no_transformers) -> None:
    assert "tiecli[hf]" in _err(["--device", "cpu", str(fixture_path("gpt2", "hf"))])


def test_unknown_architecture_is_a_clear_error(tmp_path: Path) -> None:
    out = with_config("gpt2", "hf", tmp_path / "m", architectures=["NoSuchModelForCausalLM"])
    assert "NoSuchModelForCausalLM" in _err(["--device", "cpu", str(out)])


def test_no_config_and_no_model_is_a_clear_error(tmp_path: Path) -> None:
    bare = tmp_path / "bare.safetensors"
    shutil.copy(fixture_path("gpt2", "full") / "model.safetensors", bare)
    assert "--model" in _err(["--device", "cpu", str(bare)])


def test_forward_options_need_forward() -> None:
    r = runner.invoke(app, ["verify", "--against", "x", str(fixture_path("gpt2", "hf"))])
    assert r.exit_code == 2 and "--forward" in r.stderr
