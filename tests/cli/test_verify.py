"""verify for CI, the pre-commit hook, check_model and the Trainer callback."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    FIXTURES,
    FORMS,
    MODELS,
    ROOT,
    TIED_MODELS,
    fixture_path,
    run_json,
    runner,
    with_config,
)
from safetensors.torch import load_file, save_file

import tiecli
from tiecli.cli import app


def run_verify(*args: str) -> tuple[int, dict]:
    return run_json(["verify", "--json", *args], (0, 1))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("model", MODELS)
def test_consistent_fixtures_pass(model: str, form: str) -> None:
    code, doc = run_verify(str(fixture_path(model, form)))
    assert code == 0 and doc["ok"] is True and doc["problems"] == []
    assert doc["checked"] == [str(fixture_path(model, form))]


@pytest.mark.parametrize("model", TIED_MODELS)
def test_require_deduped_fails_on_full_and_passes_after_dedupe(model: str, tmp_path: Path) -> None:
    for form in ("full", "full-sharded"):
        src = fixture_path(model, form)
        code, doc = run_verify("--require-deduped", str(src))
        assert code == 1 and doc["ok"] is False
        assert {p["code"] for p in doc["problems"]} == {"duplicate-stored"}
        for p in doc["problems"]:
            assert "bytes wasted" in p["message"] and f"tiecli dedupe {src}" in p["message"]
            assert len(p["tensors"]) == 2
        out = tmp_path / f"{model}-{form}"
        tiecli.dedupe(src, out)
        assert run_verify("--require-deduped", str(out))[0] == 0
        assert run_verify(str(out))[0] == 0


def test_bin_and_hf_outputs_pass_require_deduped() -> None:
    for form in ("hf", "hf-sharded", "bin"):
        assert run_verify("--require-deduped", str(fixture_path("t5", form)))[0] == 0


def test_drift_fails() -> None:
    code, doc = run_verify(str(FIXTURES / "drift"))
    assert code == 1
    (p,) = doc["problems"]
    assert p["code"] == "drift" and p["severity"] == "error"
    assert set(p["tensors"]) == {"lm_head.weight", "model.embed_tokens.weight"}


def _record(
    tmp_path: Path, ties: list[dict], tensors: dict | None = None, version: int = 1
) -> Path:
    path = tmp_path / "rec.safetensors"
    g = torch.Generator().manual_seed(0)
    tensors = tensors or {"emb": torch.randn(8, 4, generator=g), "vec": torch.randn(5, generator=g)}
    save_file(
        tensors,
        path,
        metadata={"format": "pt", "tiecli": json.dumps({"version": version, "ties": ties})},
    )
    return path


@pytest.mark.parametrize(
    "ties,version,words",
    [
        ([{"alias": "head", "source": "emb"}], 2, "version 2"),
        ([{"alias": "vec", "source": "emb"}], 1, "also stored"),
        ([{"alias": "head", "source": "nowhere"}], 1, "not stored"),
        ([{"alias": "a", "source": "b"}, {"alias": "b", "source": "emb"}], 1, "chains"),
        ([{"alias": "a", "source": "b"}, {"alias": "b", "source": "a"}], 1, "chains and cycles"),
        ([{"alias": "head", "source": "vec", "transform": "transpose"}], 1, "2-D"),
        ([{"alias": "head", "source": "emb", "transform": "rotate"}], 1, "unknown transform"),
    ],
)
def test_bad_record_fails(tmp_path: Path, ties: list, version: int, words: str) -> None:
    code, doc = run_verify(str(_record(tmp_path, ties, version=version)))
    assert code == 1
    assert [p["code"] for p in doc["problems"]][:1] == ["bad-record"]
    assert any(words in p["message"] for p in doc["problems"]), doc["problems"]


def test_bad_record_makes_load_fail(tmp_path: Path) -> None:
    path = _record(tmp_path, [{"alias": "head", "source": "nowhere"}])
    with pytest.raises(tiecli.TieRecordError, match="head"):
        tiecli.load(path)


def test_config_mismatch_fails(tmp_path: Path) -> None:
    out = with_config("gpt2", "hf", tmp_path / "m", tie_word_embeddings=False)
    code, doc = run_verify(str(out))
    assert code == 1 and [p["code"] for p in doc["problems"]] == ["config-mismatch"]
    assert "lm_head.weight" in doc["problems"][0]["tensors"]


def test_source_missing_is_warning_and_strict_fails(tmp_path: Path) -> None:
    out = tmp_path / "m"
    out.mkdir()
    shutil.copy(fixture_path("llama-tied", "full") / "config.json", out)
    sd = load_file(fixture_path("llama-tied", "full") / "model.safetensors")
    del sd["model.embed_tokens.weight"]
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    # for the one consumer that loads it right (transformers 5 ties the embedding to the
    # stored head), a missing source is a warning, and --strict makes it fail
    code, doc = run_verify("--for", "transformers>=5", str(out))
    assert code == 0 and [(p["code"], p["severity"]) for p in doc["problems"]] == [
        ("source-missing", "warning")
    ]
    code, doc = run_verify("--strict", "--for", "transformers>=5", str(out))
    assert code == 1 and doc["ok"] is False
    # the others refuse it or serve an uninitialised embedding: the warning hides none of it
    code, doc = run_verify(str(out))
    found = [(p["code"], p["severity"]) for p in doc["problems"]]
    assert code == 1 and found[0] == ("source-missing", "warning")
    assert ("consumer-bad-load", "error") in found and ("consumers-disagree", "error") in found


def test_json_document_shape() -> None:
    code, doc = run_verify(str(FIXTURES / "drift"), str(fixture_path("gpt2", "hf")))
    assert code == 1
    for key in ("command", "path", "format", "ok", "problems", "checked"):
        assert key in doc
    assert doc["command"] == "verify"
    assert doc["checked"] == [str(FIXTURES / "drift"), str(fixture_path("gpt2", "hf"))]
    (p,) = doc["problems"]
    assert set(p) >= {"code", "severity", "message", "tensors", "path"}


def test_shard_files_are_one_checkpoint() -> None:
    folder = fixture_path("t5", "full-sharded")
    files = sorted(str(f) for f in folder.iterdir() if f.name != "config.json")
    code, doc = run_verify(*files)
    assert code == 0 and len(doc["checked"]) == 1
    assert doc["checked"][0].endswith("model.safetensors.index.json")


def test_human_output_names_failures() -> None:
    r = runner.invoke(app, ["verify", str(FIXTURES / "drift")], env={"COLUMNS": "200"})
    assert r.exit_code == 1
    assert "drift" in r.stdout and "FAILED" in r.stdout
    r = runner.invoke(app, ["verify", str(fixture_path("gpt2", "hf"))])
    assert r.exit_code == 0 and "OK" in r.stdout


# -- pre-commit hook --------------------------------------------------------


def _hook() -> dict:
    (hook,) = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    return hook


def _run_hook(files: list[Path]) -> subprocess.CompletedProcess:
    """Run the hook's entry as pre-commit would: matching file names as arguments."""
    hook = _hook()
    pattern = re.compile(hook["files"])
    chosen = [str(f) for f in files if pattern.search(str(f))]
    argv = shlex.split(hook["entry"])
    assert argv[0] == "tiecli"
    return subprocess.run(
        [sys.executable, "-m", "tiecli", *argv[1:], *chosen], capture_output=True, text=True
    )


def test_hook_definition() -> None:
    hook = _hook()
    assert hook["id"] == "tiecli-verify" and hook["entry"] == "tiecli verify --require-deduped"
    pattern = re.compile(hook["files"])
    for name in (
        "a.safetensors",
        "a.bin",
        "a.pt",
        "a.pth",
        "a.ckpt",
        "model.safetensors.index.json",
    ):
        assert pattern.search(name)
    for name in ("config.json", "README.md", "tokenizer.json"):
        assert not pattern.search(name)


def test_hook_passes_deduped_and_fails_duplicated(tmp_path: Path) -> None:
    dup = tmp_path / "dup"
    shutil.copytree(fixture_path("llama-tied", "full-sharded"), dup)
    files = sorted(dup.iterdir())
    r = _run_hook(files)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "duplicate-stored" in r.stdout
    tiecli.dedupe(dup)
    r = _run_hook(sorted(dup.iterdir()))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("safetensors-sharded") == 1  # the shards and index checked once


# -- check_model and the Trainer callback -------------------------------------


def _gpt2():
    from transformers import AutoConfig, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(AutoConfig.from_pretrained(fixture_path("gpt2", "hf")))


def test_check_model_healthy_and_broken() -> None:
    m = _gpt2()
    assert tiecli.check_model(m) is None
    m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone())
    with pytest.raises(
        tiecli.TieError, match="lm_head.weight -> transformer.wte.weight: tie broken"
    ):
        tiecli.check_model(m)
    with torch.no_grad():
        m.lm_head.weight[0, 0] += 0.25
    with pytest.raises(tiecli.TieError, match="differ, max abs diff 0.25"):
        tiecli.check_model(m)


def test_check_model_custom_module_with_transposed_tie() -> None:
    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Parameter(torch.randn(10, 4))
            self.head = torch.nn.Parameter(self.emb.detach().t().clone())

    m = Tiny()
    with pytest.raises(tiecli.TieError, match="head -> emb"):
        tiecli.check_model(m, ties={"head": "emb"})
    assert tiecli.check_model(torch.nn.Linear(2, 2)) is None


class _Data(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict:
        ids = (torch.arange(8) + i) % 64
        return {"input_ids": ids, "labels": ids}


def _trainer(tmp_path: Path, callbacks: list, steps: int):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        save_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        logging_steps=1000,
        disable_tqdm=True,
    )
    return Trainer(model=_gpt2(), args=args, train_dataset=_Data(), callbacks=callbacks)


def test_trainer_callback_verifies_saved_checkpoints(tmp_path: Path) -> None:
    from tiecli.integrations.transformers import TieGuardCallback

    guard = TieGuardCallback(require_deduped=True)
    _trainer(tmp_path, [guard], steps=4).train()
    assert [Path(p).name for p in guard.verified] == ["checkpoint-2", "checkpoint-4"]
    assert tiecli.verify(guard.verified[-1], require_deduped=True).ok


def test_trainer_callback_fails_on_tie_broken_mid_training(tmp_path: Path) -> None:
    from transformers import TrainerCallback

    from tiecli.integrations.transformers import TieGuardCallback

    class BreakTie(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:
                model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())

    guard = TieGuardCallback()
    trainer = _trainer(tmp_path, [BreakTie(), guard], steps=8)
    with pytest.raises(tiecli.TieError, match="lm_head.weight -> transformer.wte.weight"):
        trainer.train()
    assert [Path(p).name for p in guard.verified] == ["checkpoint-2"]
    assert not (tmp_path / "checkpoint-4").exists()
