"""verify --forward on tiny builds of multimodal and mixture-of-experts architectures.

Each model is built by transformers with seeded random weights and saved with
``save_pretrained`` (which leaves tied aliases out and keeps the original
names of composite models). For each: a deduped copy proves equal against the
original, a copy with one weight changed slightly is a ``forward-mismatch``,
and nothing ever prints a traceback. The rest of the list is marked ``slow``:
``pytest -m "not slow"`` runs the fast few (about 12 s on 2 cores).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import tiny_models
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import tiecli
from tiecli.cli import app

runner = CliRunner()
FAST = {"llava", "blip", "switch_transformers", "qwen2_5_omni_thinker", "mixtral"}
MODELS = [
    pytest.param(name, marks=() if name in FAST else pytest.mark.slow) for name in tiny_models.NAMES
]
EMBEDDINGS = re.compile(r"(embed_tokens|word_embeddings|shared)\.weight$")


def verify_json(*args: str) -> tuple[int, dict, str]:
    """Exit code, the one JSON document on stdout, and stderr; never an escaped exception."""
    r = runner.invoke(app, ["verify", "--json", "-q", "--forward", "--device", "cpu", *args])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.stdout + r.stderr
    return r.exit_code, json.loads(r.stdout), r.stderr


def perturbed(src: Path, dst: Path) -> str:
    """A copy of ``src`` with the input embeddings' first column nudged by 1e-3."""
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    name = next(n for n in sd if EMBEDDINGS.search(n))
    sd[name][:, 0] += 1e-3
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("name", MODELS)
def test_tiny_model_deduped_and_perturbed(name: str, tmp_path: Path) -> None:
    original = tiny_models.build(name, tmp_path / "original")
    deduped = tmp_path / "deduped"
    tiecli.dedupe(original, deduped)

    code, doc, _ = verify_json("--against", str(original), str(deduped))
    assert code == 0, doc["problems"]
    f = doc["forward"]
    assert f["outputs_equal"] is True and f["max_abs_diff"] == 0.0
    assert f["outputs_finite"] is True and f["ties_shared_on_device"] is True

    bad = tmp_path / "perturbed"
    changed = perturbed(original, bad)
    code, doc, _ = verify_json("--against", str(bad), str(deduped))
    assert code == 1, (changed, doc)
    assert doc["forward"]["outputs_equal"] is False and doc["forward"]["max_abs_diff"] > 0
    assert [p["code"] for p in doc["problems"]] == ["forward-mismatch"]


@pytest.mark.parametrize("name", ["llava", "mixtral", "marian"])
def test_loaded_model_is_what_transformers_loads(name: str, tmp_path: Path) -> None:
    # composite names renamed, the tied head filled from the embeddings, experts merged:
    # the model that runs is the one transformers' from_pretrained gives
    import transformers

    from tiecli.arch.build import build_meta_model
    from tiecli.forward import example_input, float_outputs, load_onto

    path = tiny_models.build(name, tmp_path / name)
    model = build_meta_model(path, real_buffers=True)
    model, problems, stats, _ = load_onto(model, path, torch.device("cpu"), None, True)
    assert problems == [] and stats.shared_ties >= 1
    reference = getattr(transformers, type(model).__name__).from_pretrained(path).eval()
    args, kwargs = example_input(model, None, torch.device("cpu"))
    with torch.inference_mode():
        ours, theirs = float_outputs(model(*args, **kwargs)), float_outputs(reference(**kwargs))
    assert len(ours) == len(theirs)
    for a, b in zip(
        ours, theirs, strict=True
    ):  # within rounding: theirs sit where the file put them
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# -- the same weights at other file offsets ----------------------------------


def _padded(src: Path, dst: Path, pad: int) -> Path:
    """``src`` rewritten with ``pad`` more header bytes: every tensor at another offset."""
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt", "pad": "x" * pad})
    return dst


@pytest.fixture(scope="module")
def switch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build("switch_transformers", tmp_path_factory.mktemp("switch") / "m")


def test_placed_tensors_are_aligned_whatever_the_file_offset(switch: Path, tmp_path: Path) -> None:
    from tiecli.arch.build import build_meta_model
    from tiecli.forward import load_onto

    for pad in range(0, 64, 8):  # the header grows by 8 bytes: tensors at every offset mod 64
        shifted = _padded(switch, tmp_path / f"p{pad}", pad)
        model = build_meta_model(shifted, real_buffers=True)
        model, problems, _, _ = load_onto(model, shifted, torch.device("cpu"), None, True)
        assert problems == []
        misaligned = [n for n, p in model.named_parameters() if p.data_ptr() % 64]
        assert misaligned == [], (pad, misaligned[:3])


def test_same_weights_at_other_offsets_give_identical_outputs(switch: Path, tmp_path: Path) -> None:
    # SwitchTransformers' CPU kernels round differently on memory aligned differently:
    # read straight from the file, 8 bytes more header gave a max abs diff near 1e-6
    base = _padded(switch, tmp_path / "p0", 0)
    for pad in (8, 24):
        shifted = _padded(switch, tmp_path / f"p{pad}", pad)
        code, doc, _ = verify_json("--against", str(base), str(shifted))
        assert code == 0, doc["problems"]
        assert doc["forward"]["outputs_equal"] is True and doc["forward"]["max_abs_diff"] == 0.0


# -- inputs ---------------------------------------------------------------------


def test_input_ids_span_the_text_vocabulary_and_avoid_special_tokens(tmp_path: Path) -> None:
    from tiecli.arch.build import build_meta_model
    from tiecli.forward import example_input

    path = tiny_models.build("llava", tmp_path / "llava")
    model = build_meta_model(path, real_buffers=True)
    _, kwargs = example_input(model, None, torch.device("cpu"))
    ids = kwargs["input_ids"]
    # the vision tower's position table (17 rows) comes first in module order; the
    # vocabulary is the language model's 160 ids, less the image token
    assert int(ids.max()) >= 17 and int(ids.max()) < tiny_models.VOCAB
    assert not set(ids.flatten().tolist()) & {tiny_models.IMG}


def test_a_model_that_needs_images_gets_them(tmp_path: Path) -> None:
    from tiecli.arch.build import build_meta_model
    from tiecli.forward import example_input

    path = tiny_models.build("blip", tmp_path / "blip")
    model = build_meta_model(path, real_buffers=True)
    _, kwargs = example_input(model, None, torch.device("cpu"))
    assert kwargs["pixel_values"].shape == (2, 3, 16, 16)
    assert not set(kwargs["input_ids"].flatten().tolist()) & {tiny_models.IMG}


def test_image_placeholders_lead_the_ids_when_the_image_is_required(tmp_path: Path) -> None:
    from tiecli.arch.build import build_meta_model
    from tiecli.forward import example_input

    path = tiny_models.build("blip_2", tmp_path / "blip_2")
    model = build_meta_model(path, real_buffers=True)
    _, kwargs = example_input(model, None, torch.device("cpu"))
    ids = kwargs["input_ids"]
    assert kwargs["pixel_values"].shape == (2, 3, 16, 16)
    assert (ids[:, :4] == tiny_models.IMG).all() and not (ids[:, 4:] == tiny_models.IMG).any()
    assert kwargs["attention_mask"].shape == ids.shape


def test_a_speech_model_gets_audio_features(tmp_path: Path) -> None:
    from tiecli.arch.build import build_meta_model
    from tiecli.forward import example_input

    path = tiny_models.build("whisper", tmp_path / "whisper")
    model = build_meta_model(path, real_buffers=True)
    _, kwargs = example_input(model, None, torch.device("cpu"))
    assert kwargs["input_features"].shape == (2, 16, 32)  # mel bins × 2 × encoder positions
    assert "input_ids" not in kwargs and kwargs["decoder_input_ids"][:, 0].tolist() == [3, 3]


# -- never a traceback ------------------------------------------------------------

RAISING = """
import torch
from torch import nn

class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(8, 4)

    def forward(self, ids):
        return self.embed(ids).no_such_attribute

def build():
    return Broken()
"""


@pytest.fixture
def raising_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    name = f"raising_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(RAISING)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save({"embed.weight": torch.randn(8, 4)}, tmp_path / "broken.pt")
    yield tmp_path / "broken.pt", f"{name}:build"


def test_an_exception_from_the_model_code_is_forward_failed(raising_model, monkeypatch) -> None:
    ckpt, spec = raising_model
    monkeypatch.delenv("TIECLI_DEBUG", raising=False)
    code, doc, _ = verify_json("--model", spec, str(ckpt))
    assert code == 1 and doc["ok"] is False
    (p,) = [p for p in doc["problems"] if p["code"] == "forward-failed"]
    assert "Broken" in p["message"] and "AttributeError" in p["message"]
    assert doc["forward"]["architecture"] == "Broken"


def test_debug_lets_the_exception_through(raising_model, monkeypatch) -> None:
    ckpt, spec = raising_model
    monkeypatch.setenv("TIECLI_DEBUG", "1")
    r = runner.invoke(
        app, ["verify", "--json", "--forward", "--device", "cpu", "--model", spec, str(ckpt)]
    )
    assert isinstance(r.exception, AttributeError)


def test_a_config_transformers_refuses_is_forward_failed(tmp_path: Path) -> None:
    path = tiny_models.build("llava", tmp_path / "llava")
    cfg = json.loads((path / "config.json").read_text())
    cfg["vision_feature_select_strategy"] = "no-such-strategy"
    (path / "config.json").write_text(json.dumps(cfg))
    code, doc, _ = verify_json(str(path))
    assert code == 1
    (p,) = [p for p in doc["problems"] if p["code"] == "forward-failed"]
    assert "LlavaForConditionalGeneration" in p["message"] and "config.json" in p["message"]
    assert doc["forward"]["architecture"] == "LlavaForConditionalGeneration"


def test_a_model_the_checkpoint_leaves_half_empty_is_not_run(tmp_path: Path) -> None:
    """Parameters the file does not hold stay on meta: the forward pass is not run on them
    (it could only fail, or run on memory nobody initialised)."""
    from helpers import fixture_path

    x = shutil.copytree(fixture_path("gpt2", "hf"), tmp_path / "x")
    tensors = load_file(x / "model.safetensors")
    del tensors["transformer.h.0.mlp.c_fc.weight"]
    save_file(tensors, x / "model.safetensors", metadata={"format": "pt"})
    r = runner.invoke(app, ["verify", str(x), "--forward", "--device", "cpu", "--json"])
    assert r.exit_code == 1, r.output
    messages = [p["message"] for p in json.loads(r.stdout)["problems"]]
    assert any("transformer.h.0.mlp.c_fc.weight" in m for m in messages)
    assert any("forward pass not run: 1 parameter(s)" in m for m in messages)
    assert not any("raised" in m for m in messages)


def test_ids_of_a_huge_vocabulary_avoid_special_tokens_without_a_table() -> None:
    from tiecli.forward import token_ids

    g = torch.Generator().manual_seed(0)
    vocab = (1 << 20) + 10  # past the size a table of allowed ids is made for
    avoid = set(range(0, 1 << 20, 2))  # half of it special: most first draws hit one
    ids = token_ids(vocab, avoid, (4, 64), g)
    assert ids.shape == (4, 64) and int(ids.min()) >= 0 and int(ids.max()) < vocab
    assert not any(int(i) in avoid for i in ids.flatten())
