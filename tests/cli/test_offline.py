"""A checkpoint folder is untrusted: its config never runs code, reaches the network or asks.

Every test builds its hostile folder itself from a shipped fixture.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import FIXTURES, FORMS, MANIFEST, MODELS, fixture_path, with_config
from typer.testing import CliRunner

from tiecli.arch import build
from tiecli.cli import app

runner = CliRunner()

CUSTOM_CODE = """\
import pathlib
pathlib.Path({marker!r}).write_text("code from the checkpoint folder ran")
from transformers import PretrainedConfig


class EvilConfig(PretrainedConfig):
    model_type = "evil"
"""


def _custom_code_folder(tmp_path: Path, marker: Path, *, auto_map: bool) -> Path:
    folder = with_config(
        "llama-tied",
        "full",
        tmp_path / "model",
        model_type="evil",
        architectures=["EvilForCausalLM"],
        **(
            {
                "auto_map": {
                    "AutoConfig": "configuration_evil.EvilConfig",
                    "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                }
            }
            if auto_map
            else {}
        ),
    )
    (folder / "configuration_evil.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    (folder / "modeling_evil.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    return folder


def _run(args: list[str], cache: Path, stdin: str = "y\ny\ny\n") -> subprocess.CompletedProcess:
    env = {**os.environ, "TIECLI_CACHE_DIR": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "tiecli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.mark.parametrize("auto_map", [True, False], ids=["auto_map", "unknown-model-type"])
def test_custom_code_in_the_folder_never_runs_and_nothing_is_asked(
    tmp_path: Path, auto_map: bool
) -> None:
    marker = tmp_path / "ran"
    folder = _custom_code_folder(tmp_path, marker, auto_map=auto_map)
    cache = tmp_path / "cache"
    for args in (
        ["inspect", str(folder), "--json"],
        ["verify", str(folder), "--json"],
        ["dedupe", str(folder), "-o", str(tmp_path / "d"), "--json"],
        ["untie", str(folder), "-o", str(tmp_path / "u"), "--json"],
    ):
        proc = _run(args, cache)  # a "y" waits on stdin for any prompt
        assert not marker.exists(), f"{args[0]} ran code from the checkpoint folder"
        assert "[y/N]" not in proc.stdout + proc.stderr
        assert proc.returncode in (0, 1), proc.stderr
        doc = json.loads(proc.stdout)  # one JSON document, nothing in front of it
        assert doc["command"] == args[0]
        if args[0] == "inspect":
            note = " ".join(doc["notes"])
            # the pattern table still finds the llama tie by its names and values
            assert "pattern table" in note
            assert any(t["alias"] == "lm_head.weight" for t in doc["ties"])
            if auto_map:
                assert "custom code" in note


def test_custom_code_is_never_run_by_the_forward_proof(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    folder = _custom_code_folder(tmp_path, marker, auto_map=True)
    proc = _run(["verify", str(folder), "--forward", "--device", "cpu", "--json"], tmp_path / "c")
    assert not marker.exists()
    # tiecli cannot build what only the folder's code describes: a usage matter, one line
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "custom code" in proc.stderr
    assert "--model module:function" in proc.stderr and "upgrade" not in proc.stderr
    assert "[y/N]" not in proc.stdout + proc.stderr


# -- no network ------------------------------------------------------------------


@pytest.fixture
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Any attempt to resolve or connect is recorded and fails."""
    attempts: list[str] = []

    def refuse(*args: object, **_kwargs: object) -> None:
        attempts.append(repr(args[:2]))
        raise OSError("sockets are disabled in this test")

    for name in ("getaddrinfo", "create_connection"):
        monkeypatch.setattr(socket, name, refuse)
    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    build.refused_network.clear()
    return attempts


def _every_fixture() -> list[Path]:
    paths = [fixture_path(m, f) for m in MODELS for f in FORMS]
    return paths + [FIXTURES / rel for rel in MANIFEST["custom"]]


def test_every_command_on_every_fixture_runs_without_a_socket(
    no_sockets: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIECLI_CACHE_DIR", str(tmp_path / "cache"))  # transformers is asked
    for i, path in enumerate(_every_fixture()):
        out = tmp_path / f"out{i}"
        out.mkdir()
        for args in (
            ["inspect", str(path), "--json"],
            ["verify", str(path), "--json"],
            ["dedupe", str(path), "-o", str(out / "d"), "--json"],
            ["untie", str(path), "-o", str(out / "u"), "--json"],
        ):
            result = runner.invoke(app, args)
            assert result.exit_code in (0, 1), (args, result.output)
    for model in MODELS:
        path = fixture_path(model, "hf")
        result = runner.invoke(
            app, ["verify", str(path), "--forward", "--device", "cpu", "--against", str(path)]
        )
        assert result.exit_code == 0, result.output
    assert no_sockets == []
    assert build.refused_network == []


def test_a_config_naming_a_pretrained_backbone_is_built_offline(
    no_sockets: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from safetensors.torch import save_file

    monkeypatch.setenv("TIECLI_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "detr"
    folder.mkdir()
    config = {
        "architectures": ["DetrForObjectDetection"],
        "model_type": "detr",
        "use_timm_backbone": False,
        "use_pretrained_backbone": True,
        "backbone": "some-owner/some-backbone",
        "d_model": 16,
        "encoder_layers": 1,
        "decoder_layers": 1,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "encoder_ffn_dim": 16,
        "decoder_ffn_dim": 16,
        "num_queries": 4,
    }
    (folder / "config.json").write_text(json.dumps(config))
    save_file(
        {"a.weight": torch.randn(4, 4), "b.weight": torch.randn(4, 4)}, folder / "model.safetensors"
    )
    result = runner.invoke(app, ["inspect", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    assert no_sockets == []  # transformers would ask the Hub whether the backbone exists
    assert build.refused_network == []
    assert any("pattern table" in n for n in json.loads(result.stdout)["notes"])


def test_the_socket_backstop_refuses_and_records(no_sockets: list[str]) -> None:
    with build.offline(), pytest.raises(OSError, match="network access is disabled"):
        socket.create_connection(("127.0.0.1", 9))
    assert build.refused_network and no_sockets == []
    build.refused_network.clear()
    with pytest.raises(OSError, match="sockets are disabled in this test"):
        socket.create_connection(("127.0.0.1", 9))  # restored afterwards


# -- bounded by the checkpoint ----------------------------------------------------


def test_a_config_far_larger_than_its_checkpoint_is_not_built(tmp_path: Path) -> None:
    folder = with_config("gpt2", "hf", tmp_path / "m", n_layer=100_000)
    started = time.perf_counter()
    proc = _run(["inspect", str(folder), "--json"], tmp_path / "cache", stdin="")
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - started < 60  # building 100,000 blocks on meta: minutes
    notes = " ".join(json.loads(proc.stdout)["notes"])
    assert "does not fit the checkpoint" in notes
    assert "pattern table" in notes


def test_the_budget_counts_modules_and_parameters() -> None:
    budget = build.Budget(tensors=10, nbytes=1000)
    assert budget.modules == 1160 and budget.parameters == 296
    assert budget.buffer_bytes == 256 << 20
    assert budget.parameter_bytes == 4000 + (256 << 20)
    assert build.Budget(10, 1 << 30).buffer_bytes == 2 << 30


def test_every_fixture_model_fits_its_own_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bound never refuses a real checkpoint: each fixture's declared ties still come."""
    monkeypatch.setenv("TIECLI_CACHE_DIR", str(tmp_path))  # built here, not read from a cache
    for model in MODELS:
        for form in FORMS:
            import tiecli

            result = tiecli.inspect(fixture_path(model, form))
            if (fixture_path(model, form) / "config.json").exists():
                assert result.declared_by and result.declared_by.startswith("transformers"), (
                    model,
                    form,
                    result.notes,
                )


@pytest.mark.parametrize(
    ("model", "changes", "why"),
    [
        ("gpt2", {"n_layer": 100_000}, "does not fit the checkpoint"),
        # 6.4 GB of position embeddings and 1.6 GB of position-id buffers for 16 KB of weights
        ("bert-mlm", {"max_position_embeddings": 100_000_000}, "bytes of parameters"),
    ],
    ids=["layers", "positions"],
)
def test_the_forward_proof_refuses_a_config_far_larger_than_its_checkpoint(
    tmp_path: Path, model: str, changes: dict, why: str
) -> None:
    folder = with_config(model, "hf", tmp_path / "m", **changes)
    started = time.perf_counter()
    proc = _run(
        ["verify", str(folder), "--forward", "--device", "cpu", "--json"], tmp_path / "c", stdin=""
    )
    assert time.perf_counter() - started < 60
    assert proc.returncode == 1, proc.stderr
    failed = [p for p in json.loads(proc.stdout)["problems"] if p["code"] == "forward-failed"]
    assert failed and why in failed[0]["message"]


def test_a_layer_count_transformers_would_expand_is_refused_before_it_reads_the_config(
    tmp_path: Path,
) -> None:
    # transformers 5 expands layer_types per layer while reading a Qwen2 config: 30 million
    # layers cost minutes and gigabytes before any module is built
    folder = with_config(
        "llama-tied",
        "hf",
        tmp_path / "m",
        model_type="qwen2",
        architectures=["Qwen2ForCausalLM"],
        num_hidden_layers=30_000_000,
    )
    started = time.perf_counter()
    proc = _run(["inspect", str(folder), "--json"], tmp_path / "cache", stdin="")
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - started < 30
    notes = " ".join(json.loads(proc.stdout)["notes"])
    assert "num_hidden_layers=30000000" in notes and "pattern table" in notes


def test_the_forward_proof_weighs_parameters_before_making_them(tmp_path: Path) -> None:
    """A ViT whose config asks for 9 million patches would make 576 MB of parameters on the
    CPU before they move to meta: weighed on meta first, and refused."""
    from transformers import ViTConfig, ViTModel

    folder = tmp_path / "vit"
    config = ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        image_size=32,
        patch_size=8,
    )
    ViTModel(config).save_pretrained(folder)
    doc = json.loads((folder / "config.json").read_text())
    doc.update(image_size=3000, patch_size=1)
    (folder / "config.json").write_text(json.dumps(doc))
    proc = _run(
        ["verify", str(folder), "--forward", "--device", "cpu", "--json"], tmp_path / "c", stdin=""
    )
    assert proc.returncode == 1, proc.stderr
    failed = [p for p in json.loads(proc.stdout)["problems"] if p["code"] == "forward-failed"]
    assert failed and "bytes of parameters" in failed[0]["message"]


def test_buffers_and_parameters_are_weighed_on_meta() -> None:
    import torch

    budget = build.Budget(tensors=2, nbytes=1 << 20)
    with torch.device("meta"):
        heavy_buffer = torch.nn.Module()
        heavy_buffer.register_buffer("table", torch.empty(1 << 30))
        heavy_param = torch.nn.Linear(1 << 15, 1 << 15)
        light = torch.nn.Linear(64, 64)
    with pytest.raises(build.BuildRefused, match="bytes of buffers"):
        build.weigh("M", heavy_buffer, budget)
    with pytest.raises(build.BuildRefused, match="bytes of parameters"):
        build.weigh("M", heavy_param, budget)
    build.weigh("M", light, budget)  # fits: no refusal
