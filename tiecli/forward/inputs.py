"""The seeded input a rebuilt model runs on: the example its ``module:function`` returned,
or token ids it accepts (and the pixel values or audio features it cannot do without)."""

from __future__ import annotations

from typing import Any

from ..errors import UsageError, param
from . import media
from .media import BATCH, SEQ


def _special_ids(config: Any) -> set[int]:
    """Token ids the config (and its text, vision, audio sub-configs) names.

    Image, video and audio placeholders (``image_token_id``,
    ``image_token_index``, ``boi_token_index`` ...) make a multimodal model
    expect features the input does not carry; the seeded input avoids them all.
    """
    from ..arch.build import sub_configs

    ids: set[int] = set()
    for c in sub_configs(config):
        for key, value in vars(c).items():
            if "token_id" in key or "token_index" in key:
                values = value if isinstance(value, (list, tuple)) else [value]
                ids.update(v for v in values if isinstance(v, int) and not isinstance(v, bool))
    return ids


def _vocab_size(model: Any, config: Any) -> int | None:
    """Rows of the model's input embeddings; else the text config's vocabulary."""
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
        rows = getattr(emb, "num_embeddings", None)
        if isinstance(rows, int) and rows > 0:
            return rows
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        for c in (text, config):
            vocab = getattr(c, "vocab_size", None)
            if isinstance(vocab, int) and vocab > 0:
                return vocab
    return None


def token_ids(vocab: int, avoid: set[int], shape: tuple[int, int], g: Any) -> Any:
    """Seeded ids below ``vocab``, none of them in ``avoid``."""
    import torch

    banned = sorted(i for i in avoid if 0 <= i < vocab)
    if vocab > 1 << 20:  # a vocabulary from a config: no table of its size, redraw instead
        ids = torch.randint(0, vocab, shape, generator=g)
        if banned and len(banned) < vocab // 2:
            hit = torch.isin(ids, torch.tensor(banned))
            while hit.any():
                ids[hit] = torch.randint(0, vocab, (int(hit.sum()),), generator=g)
                hit = torch.isin(ids, torch.tensor(banned))
        return ids
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[banned] = False
    pool = allowed.nonzero().flatten()
    if not len(pool):
        pool = torch.arange(vocab)
    return pool[torch.randint(0, len(pool), shape, generator=g)]


def example_input(model: Any, example: Any, device: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The seeded input: the one a ``module:function`` returned, else token ids the model accepts.

    Ids come from the input embeddings' vocabulary (a composite config has none
    at the top level) and avoid every special token the config names, so that a
    multimodal model runs on text alone; what ``forward`` cannot do without
    (images, patches, audio, a Q-Former's ids, boxes, a language: see
    :mod:`tiecli.forward.media`) gets a seeded value of the configured size, in
    the weights' dtype.
    """
    import torch

    g = torch.Generator().manual_seed(0)
    if example is not None:
        if isinstance(example, dict):
            return (), {k: v.to(device) if torch.is_tensor(v) else v for k, v in example.items()}
        if isinstance(example, tuple):
            return tuple(v.to(device) if torch.is_tensor(v) else v for v in example), {}
        return (example.to(device),), {}
    config = getattr(model, "config", None)
    vocab = _vocab_size(model, config)
    if vocab is None:
        emb = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
        if emb is None:
            raise UsageError(
                f"cannot make an input for this model; let {param('model')} return "
                "(module, example_input)"
            )
        vocab = emb.num_embeddings
    avoid = _special_ids(config) if config is not None else set()
    ids = token_ids(vocab, avoid, (BATCH, SEQ), g)
    if config is None:
        return (ids.to(device),), {}
    kwargs = _inputs(model, config, ids, vocab, avoid, g)
    dtype = next((q.dtype for q in model.parameters() if q.is_floating_point()), None)
    cast = {k: v.to(dtype) if dtype and v.is_floating_point() else v for k, v in kwargs.items()}
    return (), {k: v.to(device) for k, v in cast.items()}


def _inputs(
    model: Any, config: Any, ids: Any, vocab: int, avoid: set[int], g: Any
) -> dict[str, Any]:
    """The arguments beside a plain model's ids, each where ``forward`` needs it."""
    import torch

    main = getattr(model, "main_input_name", "input_ids")
    required = media.required(model)
    page = getattr(config, "model_type", None) in media.PAGE_MODELS and media.names(model, "bbox")
    images = "pixel_values" in required or main == "pixel_values" or media.wants_images(model)
    images = images or page
    kwargs: dict[str, Any] = {}
    if main == "input_ids" or media.names(model, "input_ids"):
        image = _image_tokens(config) if images else None
        if image is not None:  # the image's placeholders first, as a processor writes them
            token, count = image
            ids = torch.cat([torch.full((BATCH, count), token, dtype=ids.dtype), ids], dim=1)
        if images:
            ids, placed = media.image_placement(model, ids, config)
            kwargs.update(placed)
        kwargs["input_ids"] = ids
        if media.accepts(model, "attention_mask"):
            kwargs["attention_mask"] = torch.ones_like(ids)
        if page:
            kwargs["bbox"] = media.unit_boxes(tuple(ids.shape), g)
        lang = media.language_ids(model, config)
        if lang is not None:
            kwargs["lang_ids"] = lang
    if getattr(config, "is_encoder_decoder", False):
        start = getattr(config, "decoder_start_token_id", None) or 0
        dec = token_ids(vocab, avoid, (BATCH, SEQ), g)
        dec[:, 0] = start
        kwargs["decoder_input_ids"] = dec
    if images:
        kwargs["pixel_values"] = media.pixel_values(model, config, g)
    if "qformer_input_ids" in required:
        qformer = media.qformer_ids(config, g)
        if qformer is None:
            raise UsageError(_asked("the Q-Former's instruction ids"))
        kwargs["qformer_input_ids"] = qformer
        if media.names(model, "qformer_attention_mask"):
            kwargs["qformer_attention_mask"] = torch.ones_like(qformer)
    if "flattened_patches" in required or main == "flattened_patches":
        patches = media.flattened_patches(config, g)
        if patches is None:
            raise UsageError(_asked("image patches"))
        kwargs["flattened_patches"] = patches
    added = media.added_features(model, config)
    if "input_features" in required or main == "input_features":
        features = media.input_features(config, g)
        if features is None:
            raise UsageError(_asked("audio features"))
        kwargs["input_features"] = features
    elif added is not None:
        kwargs["input_features"] = torch.randn((BATCH, *added), generator=g)
    return kwargs


def _asked(what: str) -> str:
    return f"cannot make {what} for this model; let {param('model')} return (module, example_input)"


def _image_tokens(config: Any) -> tuple[int, int] | None:
    """(image token id, placeholders per image) when the config names both; a video's
    token and its frames' placeholders where the config places a video only."""
    token = getattr(config, "image_token_id", None)
    if not isinstance(token, int):
        token = getattr(config, "image_token_index", None)
    frames = 1
    if media.video_only(config):  # each frame's query tokens
        token, frames = config.video_token_index, media.VIDEO_FRAMES
    for key in ("num_query_tokens", "image_seq_length", "mm_tokens_per_image"):
        count = getattr(config, key, None)
        if isinstance(token, int) and isinstance(count, int) and 0 < count <= 4096:
            return token, count * frames
    return None
