"""The seeded input a rebuilt model runs on: the example its ``module:function`` returned,
or token ids it accepts (and the pixel values or audio features it cannot do without)."""

from __future__ import annotations

import inspect
from typing import Any

from ..errors import UsageError, param

BATCH, SEQ = 2, 8


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


def _required(model: Any) -> set[str]:
    """Names of ``forward``'s arguments that have no default."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {
        p.name
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _accepts(model: Any, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _pixel_values(config: Any, g: Any) -> Any:
    """Seeded images of the size the vision config expects."""
    import torch

    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", None) or 224
    h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
    channels = getattr(vision, "num_channels", None) or 3
    return torch.rand((BATCH, channels, h, w), generator=g)


def example_input(model: Any, example: Any, device: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The seeded input: the one a ``module:function`` returned, else token ids the model accepts.

    Ids come from the input embeddings' vocabulary (a composite config has none
    at the top level) and avoid every special token the config names, so that a
    multimodal model runs on text alone; an argument ``forward`` cannot do
    without (BLIP's ``pixel_values``) gets a seeded value of the configured size.
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
    dtype = next((q.dtype for q in model.parameters() if q.is_floating_point()), None)
    main = getattr(model, "main_input_name", "input_ids")
    required = _required(model)
    kwargs: dict[str, Any] = {}
    if main == "input_ids" or _names(model, "input_ids"):
        image = _image_tokens(config) if "pixel_values" in required else None
        if image is not None:  # the image's placeholders first, as a processor writes them
            token, count = image
            ids = torch.cat([torch.full((BATCH, count), token, dtype=ids.dtype), ids], dim=1)
        kwargs["input_ids"] = ids
        if _accepts(model, "attention_mask"):
            kwargs["attention_mask"] = torch.ones_like(ids)
    if getattr(config, "is_encoder_decoder", False):
        start = getattr(config, "decoder_start_token_id", None) or 0
        dec = token_ids(vocab, avoid, (BATCH, SEQ), g)
        dec[:, 0] = start
        kwargs["decoder_input_ids"] = dec
    if "pixel_values" in required or main == "pixel_values":
        kwargs["pixel_values"] = _pixel_values(config, g).to(dtype)
    if "input_features" in required or main == "input_features":
        features = _input_features(config, g)
        if features is None:
            raise UsageError(
                "cannot make audio features for this model; "
                f"let {param('model')} return (module, example_input)"
            )
        kwargs["input_features"] = features.to(dtype)
    return (), {k: v.to(device) for k, v in kwargs.items()}


def _names(model: Any, name: str) -> bool:
    """``forward`` names the argument (not only through ``**kwargs``)."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _image_tokens(config: Any) -> tuple[int, int] | None:
    """(image token id, placeholders per image) when the config names both."""
    token = getattr(config, "image_token_id", None)
    if not isinstance(token, int):
        token = getattr(config, "image_token_index", None)
    for key in ("num_query_tokens", "image_seq_length", "mm_tokens_per_image"):
        count = getattr(config, key, None)
        if isinstance(token, int) and isinstance(count, int) and 0 < count <= 4096:
            return token, count
    return None


def _input_features(config: Any, g: Any) -> Any:
    """Seeded log-mel features shaped as a Whisper-style encoder expects them."""
    import torch

    bins = getattr(config, "num_mel_bins", None)
    positions = getattr(config, "max_source_positions", None)
    if not isinstance(bins, int) or not isinstance(positions, int):
        return None
    # two convolutions, the second with stride 2: frames = 2 × encoder positions
    return torch.randn((BATCH, bins, 2 * positions), generator=g)
