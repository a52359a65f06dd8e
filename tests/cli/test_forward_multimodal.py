"""verify --forward --against on tiny models that do not run on token ids alone.

Each is the coverage walk's tiny build of the architecture (its default config made
small; no download), saved with ``save_pretrained``. A deduped copy proves equal to the
original; a copy with one weight changed that only the non-text input reaches (the
image's patch embedding, the Q-Former's word embeddings, the audio encoder's first
convolution, the chosen language's adapter) is a ``forward-mismatch``: the seeded input
carries that input, and the proof sees it. Pix2Struct runs in the fast subset.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import coverage_walk, document, invoke
from safetensors.torch import load_file, save_file

import tiecli

# (model_type, class, a weight only the non-text input reaches, as the file names it)
CASES = [
    ("pix2struct", "Pix2StructForConditionalGeneration", r"patch_projection\.weight$"),
    (
        "instructblip",
        "InstructBlipForConditionalGeneration",
        r"qformer\..*word_embeddings\.weight$",
    ),
    ("kosmos-2", "Kosmos2ForConditionalGeneration", r"vision.*patch_embedding\.weight$"),
    ("udop", "UdopForConditionalGeneration", r"^patch_embed\.proj\.weight$"),
    ("idefics", "IdeficsForVisionText2Text", r"vision.*patch_embedding\.weight$"),
    ("voxtral_realtime", "VoxtralRealtimeForConditionalGeneration", r"audio.*conv1.*weight$"),
    ("xmod", "XmodForMaskedLM", r"layer\.0\..*adapter_modules\.en_XX\.dense1\.weight$"),
]
FAST = {"pix2struct"}


def _walk() -> Any:
    return coverage_walk("tiecli_mm_walk")


def _verify(*args: str) -> tuple[int, dict[str, Any]]:
    r = invoke(["verify", "--json", "-q", "--forward", "--device", "cpu", *args])
    assert "Traceback" not in r.stderr
    return r.exit_code, document(r, (0, 1))


def _perturbed(src: Path, dst: Path, pattern: str) -> str:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    name = next(n for n in sorted(tensors) if re.search(pattern, n))
    tensors[name] = tensors[name] + 0.01  # every row: the seeded ids avoid some (padding)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return name


@pytest.mark.parametrize(
    ("model_type", "cls", "reached"),
    [pytest.param(*c, marks=() if c[0] in FAST else pytest.mark.slow, id=c[0]) for c in CASES],
)
def test_deduped_copy_proves_equal_and_a_change_only_the_extra_input_reaches_is_seen(
    tmp_path: Path, model_type: str, cls: str, reached: str
) -> None:
    walk = _walk()
    model = walk.build(cls, walk.tiny_config(model_type))
    original = tmp_path / "original"
    model.save_pretrained(original)
    deduped = tmp_path / "deduped"
    tiecli.dedupe(original, deduped)

    code, doc = _verify("--against", str(original), str(deduped))
    assert code == 0, doc["problems"]
    f = doc["forward"]
    assert f["outputs_equal"] is True and f["max_abs_diff"] == 0.0 and f["outputs_finite"]

    changed = _perturbed(original, tmp_path / "perturbed", reached)
    code, doc = _verify("--against", str(tmp_path / "perturbed"), str(deduped))
    assert code == 1, changed
    assert doc["forward"]["outputs_equal"] is False and doc["forward"]["max_abs_diff"] > 0
    assert [p["code"] for p in doc["problems"]] == ["forward-mismatch"], changed


@pytest.mark.slow
def test_a_model_transformers_cannot_run_is_forward_failed_naming_why(tmp_path: Path) -> None:
    """Llama 4's forward reads a field its own language model's output lacks
    (transformers 5.24): a clear forward-failed, never a false mismatch or a traceback."""
    walk = _walk()
    model = walk.build("Llama4ForConditionalGeneration", walk.tiny_config("llama4"))
    original = tmp_path / "original"
    model.save_pretrained(original)
    deduped = tmp_path / "deduped"
    tiecli.dedupe(original, deduped)
    code, doc = _verify("--against", str(original), str(deduped))
    assert code == 1
    codes = {p["code"] for p in doc["problems"]}
    assert codes == {"forward-failed"}, doc["problems"]
    assert any("image_outputs" in p["message"] for p in doc["problems"])
