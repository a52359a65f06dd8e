"""The seeded inputs beside token ids that a model's ``forward`` cannot do without: images,
image patches, audio features, a Q-Former's ids, boxes, a language, and where the image
goes in the text. Each is read from the config and ``forward``'s signature; the few
conventions no config states are data here, with the transformers file they come from."""

from __future__ import annotations

import inspect
from typing import Any

BATCH, SEQ = 2, 8

# Arguments that say where an image goes in the text: a model that names one takes its
# image through it and refuses (or ignores) text alone. transformers 5.24:
# models/idefics/modeling_idefics.py ("Exactly 1 of pixel_values, image_encoder_embeddings or
# perceiver_embeddings has to be not-None"; image_attention_mask: batch × text × images) and
# models/kosmos2/modeling_kosmos2.py ("You have to specify either `pixel_values` or
# `image_embeds`"; image_embeds_position_mask: batch × text, 1 where the image's
# latent_query_num embeddings go, after the leading token as its processor writes them).
IMAGE_PLACEMENT = ("image_attention_mask", "image_embeds_position_mask")

# Document models that read each word's box as fractions of the page, beside the page's
# image: models/udop/modeling_udop.py clips ``bbox`` to [0, 1], requires it ("Bbox is
# required for horizontal relative position bias") and adds the page's patches (its
# tied patch embedding) to the text by those boxes. LayoutLM-family models read integer
# 0..1000 coordinates and default them, so only these model types get boxes.
PAGE_MODELS = ("udop",)


# Frames of a video whose query tokens go to the text (models/instructblipvideo/
# modeling_instructblipvideo.py: "video has frames=4 always", its processor's default).
VIDEO_FRAMES = 4


def video_only(config: Any) -> bool:
    """The config places a video's query tokens and names no image token (InstructBLIP-Video)."""
    image = getattr(config, "image_token_id", None)
    if not isinstance(image, int):
        image = getattr(config, "image_token_index", None)
    video = getattr(config, "video_token_index", None)
    return isinstance(video, int) and not isinstance(image, int)


def signature(model: Any) -> dict[str, inspect.Parameter]:
    """``forward``'s parameters by name (none when it has no signature)."""
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return {}


def names(model: Any, name: str) -> bool:
    """``forward`` names the argument (not only through ``**kwargs``)."""
    return name in signature(model)


def accepts(model: Any, name: str) -> bool:
    """``forward`` takes the argument, by name or through ``**kwargs``."""
    params = signature(model)
    return not params or name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def required(model: Any) -> set[str]:
    """Names of ``forward``'s arguments that have no default."""
    return {
        p.name
        for p in signature(model).values()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def wants_images(model: Any) -> bool:
    """The model takes its image through an argument that places it in the text."""
    return any(names(model, n) for n in IMAGE_PLACEMENT)


def pixel_values(model: Any, config: Any, g: Any) -> Any:
    """Seeded images of the size the vision config expects; one per sample, or as many
    frames as a video model takes (batch × frames × channels × height × width)."""
    import torch

    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", None) or 224
    h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
    channels = getattr(vision, "num_channels", None) or 3
    if names(model, "image_attention_mask"):  # Idefics: batch × images × C × H × W
        return torch.rand((BATCH, 1, channels, h, w), generator=g)
    if video_only(config):  # batch × frames × C × H × W
        return torch.rand((BATCH, VIDEO_FRAMES, channels, h, w), generator=g)
    return torch.rand((BATCH, channels, h, w), generator=g)


def image_placement(model: Any, ids: Any, config: Any) -> tuple[Any, dict[str, Any]]:
    """(the ids, the arguments that place the image in them) for a model that names one."""
    import torch

    if names(model, "image_embeds_position_mask"):  # Kosmos-2
        count = getattr(config, "latent_query_num", None)
        if isinstance(count, int) and 0 < count <= 4096:
            fill = ids[:, 1:2].expand(ids.shape[0], count)  # the image's slots hold text ids
            ids = torch.cat([ids[:, :1], fill, ids[:, 1:]], dim=1)
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[:, 1 : 1 + count] = True
            return ids, {"image_embeds_position_mask": mask}
    if names(model, "image_attention_mask"):  # Idefics: every token sees the one image
        return ids, {"image_attention_mask": torch.ones((*ids.shape, 1), dtype=ids.dtype)}
    return ids, {}


def flattened_patches(config: Any, g: Any) -> Any | None:
    """Pix2Struct's input: a 4 × 4 grid of patches, each its row and column id (from 1, as
    its image processor numbers them) then ``patch_embed_hidden_size`` values."""
    import torch

    vision = getattr(config, "vision_config", None) or config
    width = getattr(vision, "patch_embed_hidden_size", None)
    if not isinstance(width, int):
        return None
    side = 4
    rows = torch.arange(1, side + 1).repeat_interleave(side).float()
    cols = torch.arange(1, side + 1).repeat(side).float()
    ids = torch.stack([rows, cols], dim=-1).expand(BATCH, side * side, 2)
    return torch.cat([ids, torch.rand((BATCH, side * side, width), generator=g)], dim=-1)


def qformer_ids(config: Any, g: Any) -> Any | None:
    """InstructBLIP's instruction for its Q-Former: ids from the Q-Former's vocabulary."""
    from .inputs import token_ids

    qformer = getattr(config, "qformer_config", None)
    vocab = getattr(qformer, "vocab_size", None)
    if not isinstance(vocab, int) or vocab <= 0:
        return None
    avoid = {getattr(qformer, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    return token_ids(vocab, {i for i in avoid if isinstance(i, int)}, (BATCH, SEQ), g)


def unit_boxes(shape: tuple[int, int], g: Any) -> Any:
    """Seeded word boxes (x0, y0, x1, y1) as fractions of the page, x0 ≤ x1 and y0 ≤ y1."""
    import torch

    corners = torch.rand((*shape, 2, 2), generator=g).sort(dim=-2).values  # (x0, y0), (x1, y1)
    return corners.reshape(*shape, 4)


def language_ids(model: Any, config: Any) -> Any | None:
    """X-MOD's language: its config's first, for every sample (models/xmod/modeling_xmod.py
    refuses to run without one: "Input language unknown")."""
    import torch

    languages = getattr(config, "languages", None)
    if not names(model, "lang_ids") or not languages:
        return None
    if getattr(config, "default_language", None) is not None:
        return None
    return torch.zeros((BATCH,), dtype=torch.long)


def added_features(model: Any, config: Any) -> tuple[int, int] | None:
    """(mel bins, frames) for a model that adds its audio to the text embeddings position by
    position (no audio placeholder to place it at) and refuses to run without it: one
    text position per ``2 × downsample_factor`` frames (a stride-2 convolution, then the
    projector's frame stacking; models/voxtral_realtime/modeling_voxtral_realtime.py:
    "You must specify exactly one of input_features or encoder_inputs_embeds")."""
    audio = getattr(config, "audio_config", None)
    bins = getattr(audio, "num_mel_bins", None)
    factor = getattr(config, "downsample_factor", None)
    if not names(model, "input_features") or not names(model, "encoder_inputs_embeds"):
        return None
    if not isinstance(bins, int) or not isinstance(factor, int):
        return None
    return bins, SEQ * 2 * factor


def input_features(config: Any, g: Any) -> Any:
    """Seeded log-mel features shaped as a Whisper-style encoder expects them."""
    import torch

    bins = getattr(config, "num_mel_bins", None)
    positions = getattr(config, "max_source_positions", None)
    if not isinstance(bins, int) or not isinstance(positions, int):
        return None
    # two convolutions, the second with stride 2: frames = 2 × encoder positions
    return torch.randn((BATCH, bins, 2 * positions), generator=g)
