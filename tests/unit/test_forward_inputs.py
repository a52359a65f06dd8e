"""The seeded input of a forward proof (``tiecli.forward.inputs.example_input``) for models
that cannot run on token ids alone: each gets what its ``forward`` refuses to do without,
shaped from its config, with the image or video placeholders where its processor puts
them. Models are built on the meta device from the coverage walk's tiny configs (no
download, no weights); one runs for real to show the input is accepted."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import coverage_walk

from tiecli.forward import example_input
from tiecli.forward.media import SEQ, VIDEO_FRAMES


@pytest.fixture(scope="module")
def walk() -> Any:
    return coverage_walk("tiecli_inputs_walk")


def _inputs(walk: Any, model_type: str, cls: str, **changes: Any) -> tuple[Any, dict[str, Any]]:
    import transformers

    config = walk.tiny_config(model_type)
    for key, value in changes.items():
        setattr(config, key, value)
    with torch.device("meta"):
        model = getattr(transformers, cls)(config)
    _, kwargs = example_input(model, None, torch.device("cpu"))
    return config, kwargs


def test_instructblip_gets_qformer_ids_and_its_query_placeholders(walk: Any) -> None:
    config, kw = _inputs(walk, "instructblip", "InstructBlipForConditionalGeneration")
    q = config.num_query_tokens
    assert kw["qformer_input_ids"].shape == (2, SEQ)
    assert int(kw["qformer_input_ids"].max()) < config.qformer_config.vocab_size
    assert kw["qformer_attention_mask"].shape == (2, SEQ)
    ids = kw["input_ids"]
    assert ids.shape == (2, q + SEQ)
    assert (ids[:, :q] == config.image_token_id).all()
    assert not (ids[:, q:] == config.image_token_id).any()
    assert kw["pixel_values"].shape[1:] == (3, 224, 224)


def test_instructblip_video_gets_frames_and_a_placeholder_per_query_and_frame(walk: Any) -> None:
    config, kw = _inputs(walk, "instructblipvideo", "InstructBlipVideoForConditionalGeneration")
    n = config.num_query_tokens * VIDEO_FRAMES
    assert kw["pixel_values"].shape == (2, VIDEO_FRAMES, 3, 224, 224)
    assert (kw["input_ids"][:, :n] == config.video_token_index).all()
    assert kw["input_ids"].shape == (2, n + SEQ)


def test_pix2struct_gets_flattened_patches_of_its_patch_width(walk: Any) -> None:
    config, kw = _inputs(walk, "pix2struct", "Pix2StructForConditionalGeneration")
    patches = kw["flattened_patches"]
    assert patches.shape == (2, 16, 2 + config.vision_config.patch_embed_hidden_size)
    assert patches[0, :, 0].tolist() == [r for r in (1, 2, 3, 4) for _ in range(4)]  # row ids
    assert patches[0, :, 1].tolist() == [1, 2, 3, 4] * 4  # column ids
    assert "input_ids" not in kw and kw["decoder_input_ids"].shape == (2, SEQ)


def test_udop_gets_word_boxes_as_fractions_of_the_page(walk: Any) -> None:
    _, kw = _inputs(walk, "udop", "UdopForConditionalGeneration")
    box = kw["bbox"]
    assert box.shape == (2, SEQ, 4) and box.is_floating_point()
    assert bool((box >= 0).all() and (box <= 1).all())
    assert bool((box[..., 0] <= box[..., 2]).all() and (box[..., 1] <= box[..., 3]).all())


def test_idefics_gets_an_image_each_token_attends_to(walk: Any) -> None:
    _, kw = _inputs(walk, "idefics", "IdeficsForVisionText2Text")
    assert kw["pixel_values"].shape == (2, 1, 3, 224, 224)
    assert kw["image_attention_mask"].shape == (2, SEQ, 1)
    assert bool((kw["image_attention_mask"] == 1).all())


def test_kosmos2_places_the_image_after_the_first_token(walk: Any) -> None:
    config, kw = _inputs(walk, "kosmos-2", "Kosmos2ForConditionalGeneration")
    n = config.latent_query_num
    mask = kw["image_embeds_position_mask"]
    assert kw["input_ids"].shape == mask.shape == (2, n + SEQ)
    assert not mask[:, 0].any() and mask[:, 1 : 1 + n].all() and not mask[:, 1 + n :].any()
    assert kw["pixel_values"].shape == (2, 3, 224, 224)


def test_xmod_runs_in_its_first_language(walk: Any) -> None:
    _, kw = _inputs(walk, "xmod", "XmodForMaskedLM")
    assert kw["lang_ids"].tolist() == [0, 0]
    _, chosen = _inputs(walk, "xmod", "XmodForMaskedLM", default_language="en_XX")
    assert "lang_ids" not in chosen  # the checkpoint chose one: the model uses it


def test_voxtral_realtime_gets_audio_for_each_text_position(walk: Any) -> None:
    config, kw = _inputs(walk, "voxtral_realtime", "VoxtralRealtimeForConditionalGeneration")
    bins = config.audio_config.num_mel_bins
    assert kw["input_features"].shape == (2, bins, SEQ * 2 * config.downsample_factor)
    assert kw["input_ids"].shape == (2, SEQ)


def test_a_model_that_runs_on_text_gets_text_only(walk: Any) -> None:
    _, kw = _inputs(walk, "qwen2_5_omni_thinker", "Qwen2_5OmniThinkerForConditionalGeneration")
    assert set(kw) == {"input_ids", "attention_mask"}
    _, kw = _inputs(walk, "llava", "LlavaForConditionalGeneration")
    assert set(kw) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize(
    ("model_type", "cls"),
    [
        ("kosmos-2", "Kosmos2ForConditionalGeneration"),
        ("pix2struct", "Pix2StructForConditionalGeneration"),
    ],
)
def test_the_built_input_runs_the_model(walk: Any, model_type: str, cls: str) -> None:
    from tiecli.forward.check import call

    model = walk.build(cls, walk.tiny_config(model_type))
    args, kwargs = example_input(model, None, torch.device("cpu"))
    with torch.no_grad():
        out, _ = call(model, args, kwargs, seeded=True)
    assert torch.isfinite(out.logits).all()


class _Noisy(torch.nn.Module):
    """A forward that draws noise, as a diffusion language model masks its input."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w + torch.randn(3)


def test_a_forward_that_draws_noise_gives_the_same_output_every_run() -> None:
    """Two runs of one model agree (the generators are seeded alike before each run),
    and the caller's generator state is left as it was."""
    from tiecli.forward.check import run_forward

    model = _Noisy()
    x = torch.arange(3.0)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    (a,), _ = run_forward(model, x, torch.device("cpu"))
    (b,), _ = run_forward(model, x, torch.device("cpu"))
    assert torch.equal(a, b)
    assert torch.equal(torch.random.get_rng_state(), state)
    plain = model(x).detach()  # without the seeding, the same model disagrees with itself
    assert not torch.equal(plain, model(x).detach())
