"""Architecture coverage: every tied architecture transformers ships, built tiny and checked.

Walks transformers' auto mappings (causal-LM, masked-LM, seq2seq, image-text-to-text),
builds each architecture from its default config shrunk generically (2 layers, or one of
each kind a hybrid has; hidden size 32, a small vocabulary; with its tie flag on; then the
hand-written overrides of ``tools/tiny_configs.py`` where that breaks a config's own
checks), keeps those that declare a tie, and for each saves the model with
``save_pretrained`` (and a ``.bin`` form of the same file) and checks tiecli against
transformers' own loading:

- ``inspect``: each tie the architecture declares is found, in the names the file uses
  (the alias ``save_pretrained`` left out, its source the tensor it shares memory with),
  in the safetensors and in the ``.bin`` form;
- ``untie``: of the ``save_pretrained`` folder, equals transformers' full state dict in its
  on-disk naming (same names, bit-identical tensors);
- ``dedupe``: of that untied copy, loads in transformers (``from_pretrained``) with
  bit-identical logits, on the seeded input tiecli's forward proof builds;
- ``verify``: reports no error on the ``save_pretrained`` folder nor on the deduped copy;
- ``forward``: ``verify --forward --against <untied>`` passes on the deduped copy and fails
  on a copy with one weight perturbed.

Usage (from the repository root)::

    nice .venv/bin/python tools/coverage.py                # full walk: docs/coverage.md
    .venv/bin/python tools/coverage.py --only gpt_neox,llava
    .venv/bin/python tools/coverage.py --table             # also regenerate the pattern table

Results are written as they come (``docs/coverage.json``, then the table), so an
interrupted walk keeps what it did; ``--resume`` skips architectures already there
(``--only`` with ``--resume`` re-runs the rows it names, in their place).
``--table`` rewrites the ``model_types`` and ``architectures`` of
``tiecli/data/tie_patterns.json`` from the walk (see docs/coverage.md).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from tiny_configs import tiny  # noqa: E402 - beside this script, found by the path above

MAPPINGS = (
    ("causal-lm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("masked-lm", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("seq2seq", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("image-text-to-text", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),
)
# The most downloaded tied architectures, by model type: the transformers-free path
# (pattern table only) must find their ties from config.json (tests/cli/test_coverage.py).
# Chosen from the model types of the Hub's most downloaded fill-mask, text-generation,
# text2text and image-text-to-text checkpoints (BERT/RoBERTa-family encoders, the
# Llama/Qwen/Gemma/Mistral/Phi decoders, T5/BART-family seq2seq, the common VLMs),
# keeping those that declare a tie.
TOP = [
    ("bert", "BertForMaskedLM"),
    ("roberta", "RobertaForMaskedLM"),
    ("xlm-roberta", "XLMRobertaForMaskedLM"),
    ("distilbert", "DistilBertForMaskedLM"),
    ("gpt2", "GPT2LMHeadModel"),
    ("t5", "T5ForConditionalGeneration"),
    ("mt5", "MT5ForConditionalGeneration"),
    ("umt5", "UMT5ForConditionalGeneration"),
    ("llama", "LlamaForCausalLM"),
    ("qwen2", "Qwen2ForCausalLM"),
    ("qwen3", "Qwen3ForCausalLM"),
    ("qwen3_moe", "Qwen3MoeForCausalLM"),
    ("qwen2_moe", "Qwen2MoeForCausalLM"),
    ("mistral", "MistralForCausalLM"),
    ("mixtral", "MixtralForCausalLM"),
    ("gemma", "GemmaForCausalLM"),
    ("gemma2", "Gemma2ForCausalLM"),
    ("gemma3_text", "Gemma3ForCausalLM"),
    ("gemma3", "Gemma3ForConditionalGeneration"),
    ("phi3", "Phi3ForCausalLM"),
    ("phi", "PhiForCausalLM"),
    ("gpt_neox", "GPTNeoXForCausalLM"),
    ("gpt_neo", "GPTNeoForCausalLM"),
    ("gptj", "GPTJForCausalLM"),
    ("bart", "BartForConditionalGeneration"),
    ("mbart", "MBartForConditionalGeneration"),
    ("marian", "MarianMTModel"),
    ("pegasus", "PegasusForConditionalGeneration"),
    ("albert", "AlbertForMaskedLM"),
    ("electra", "ElectraForMaskedLM"),
    ("deberta-v2", "DebertaV2ForMaskedLM"),
    ("camembert", "CamembertForMaskedLM"),
    ("mpnet", "MPNetForMaskedLM"),
    ("modernbert", "ModernBertForMaskedLM"),
    ("opt", "OPTForCausalLM"),
    ("bloom", "BloomForCausalLM"),
    ("falcon", "FalconForCausalLM"),
    ("stablelm", "StableLmForCausalLM"),
    ("starcoder2", "Starcoder2ForCausalLM"),
    ("olmo2", "Olmo2ForCausalLM"),
    ("smollm3", "SmolLM3ForCausalLM"),
    ("granite", "GraniteForCausalLM"),
    ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
    ("llava", "LlavaForConditionalGeneration"),
    ("paligemma", "PaliGemmaForConditionalGeneration"),
    ("idefics3", "Idefics3ForConditionalGeneration"),
    ("smolvlm", "SmolVLMForConditionalGeneration"),
]

CHECKS = ("inspect", "inspect-bin", "untie", "dedupe", "verify", "forward")
FLAG = "tie_word_embeddings"
VOCAB = 512

# Generic shrinking: config keys (at any nesting level) and the value they get, when larger.
LAYERS = {
    "num_hidden_layers",
    "num_layers",
    "n_layer",
    "n_layers",
    "encoder_layers",
    "decoder_layers",
    "num_decoder_layers",
    "num_encoder_layers",
    "depth",
    "text_layers",
    "vision_layers",
}
SIZES = {
    "hidden_size": 32,
    "n_embd": 32,
    "d_model": 32,
    "embed_dim": 32,
    "intermediate_size": 64,
    "ffn_dim": 64,
    "d_ff": 64,
    "n_inner": 64,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "num_attention_heads": 4,
    "n_head": 4,
    "num_heads": 4,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "head_dim": 8,
    "d_kv": 8,
    "kv_channels": 8,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "out_hidden_size": 32,
    "projection_dim": 32,
    "embedding_size": 32,
    "rotary_dim": 4,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 4,
    "v_head_dim": 8,
}


class Skip(Exception):
    """The architecture cannot be built tiny here (the message says why)."""


class _Timeout(BaseException):
    pass


def architectures() -> list[tuple[str, str, str]]:
    """(model_type, class name, task) for each class the auto mappings name, once each."""
    from transformers.models.auto import modeling_auto

    seen: dict[tuple[str, str], str] = {}
    for task, attr in MAPPINGS:
        for model_type, cls in getattr(modeling_auto, attr).items():
            names = cls if isinstance(cls, (list, tuple)) else [cls]
            for name in names:
                seen.setdefault((model_type, name), task)
    return [(mt, cls, task) for (mt, cls), task in seen.items()]


def _shrink(doc: Any, sizes: bool = True, kinds: int = 1) -> Any:
    """A config dict made small: counts (and with ``sizes``, widths) down, per-layer
    lists and per-layer dicts cut to the new count, keeping one layer of each kind the
    original had (``layer_types``: a hybrid model keeps an attention layer; ``kinds``
    layers of each, or with 0 the first two)."""
    if isinstance(doc, list):
        return [_shrink(v, sizes, kinds) for v in doc]
    if not isinstance(doc, dict):
        return doc
    out = {}
    old_layers = [doc[k] for k in LAYERS if isinstance(doc.get(k), int) and doc[k] > 2]
    keep = _kept_layers(doc, old_layers, kinds) if kinds else None
    heads = doc.get("num_attention_heads")
    for key, value in doc.items():
        if isinstance(value, bool) or value is None:
            out[key] = value
        elif key in LAYERS and isinstance(value, int):
            out[key] = len(keep[1]) if keep and value == keep[0] else min(value, 2)
        elif not sizes and (key in SIZES or key == "num_key_value_heads"):
            out[key] = value
        elif key == "num_key_value_heads" and isinstance(value, int):
            out[key] = 4 if value == heads else 2
        elif key in ("num_experts_per_tok", "top_k", "moe_topk") and isinstance(value, int):
            out[key] = min(value, 2)
        elif key in SIZES and isinstance(value, int):
            out[key] = min(value, SIZES[key])
        elif keep and isinstance(value, list) and _layer_ids(key, value, keep[0]):
            out[key] = [keep[1].index(i) for i in value if i in keep[1]]
        elif isinstance(value, list) and keep and len(value) == keep[0]:
            out[key] = [value[i] for i in keep[1]]
        elif isinstance(value, list) and old_layers and len(value) in old_layers:
            out[key] = value[:2]
        elif (
            isinstance(value, dict)
            and old_layers
            and value
            and all(str(k).isdigit() for k in value)
        ):
            # layers past the first two renumbered; a dict of the first two only (or a label
            # table, ``id2label``) as it was
            past = keep and any(int(k) >= 2 for k in value)
            kept = _layer_dict(value, keep[1] if past else [0, 1])
            out[key] = {k: _shrink(v, sizes, kinds) for k, v in kept.items()}
        elif isinstance(value, dict):
            out[key] = _shrink(value, sizes, kinds)
        else:
            out[key] = value
    ids = [
        v
        for k, v in out.items()
        if isinstance(v, int)
        and not isinstance(v, bool)
        and str(k).endswith(("_token_id", "_index"))
    ]
    if isinstance(out.get("vocab_size"), int) and all(i < VOCAB for i in ids):
        out["vocab_size"] = min(out["vocab_size"], VOCAB)
    if sizes:
        _consistent(doc, out)
    return out


def _kept_layers(
    doc: dict[str, Any], old_layers: list[int], per_kind: int = 1
) -> tuple[int, list[int]] | None:
    """(the layer count, the layers kept) where a per-layer list of kinds (``layer_types``,
    ``layers_block_type``, ``mlp_layer_types``) names more than one: the first ``per_kind``
    layers of each kind, at least two, in their order; None where the first two layers do."""
    for count in old_layers:
        kinds = [
            v
            for v in doc.values()
            if isinstance(v, list)
            and len(v) == count
            and all(isinstance(x, str) for x in v)
            and len(set(v)) > 1
        ]
        if not kinds:
            continue
        keep = set()
        for v in kinds:
            for kind in set(v):
                keep.update([i for i, k in enumerate(v) if k == kind][:per_kind])
        for i in range(count):
            if len(keep) >= 2:
                break
            keep.add(i)
        if sorted(keep) != [0, 1]:
            return count, sorted(keep)
    return None


def _layer_ids(key: Any, value: list[Any], count: int) -> bool:
    """The list numbers layers rather than holding a value per layer: Zamba2's
    ``hybrid_layer_ids``, or Llama 4's ``moe_layers`` naming every one of its layers."""
    if not value or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        return False
    if str(key).endswith("layer_ids"):
        return True
    rising = all(a < b for a, b in zip(value, value[1:], strict=False))
    return len(value) == count and rising and str(key).endswith("layers")


def _layer_dict(value: dict[Any, Any], keep: list[int]) -> dict[Any, Any]:
    """A per-layer dict (keys are layer numbers) for the layers kept, renumbered."""
    by_index = {int(k): k for k in value}
    return {
        type(by_index[i])(new): value[by_index[i]] for new, i in enumerate(keep) if i in by_index
    }


# Multimodal rotary sections the modeling code defaults when the config leaves them out,
# by the text config's model_type; the three sections must sum to half the rotary width,
# so they are scaled to the tiny head. From transformers 5.24's
# models/qwen2_vl/modeling_qwen2_vl.py, qwen2_5_vl/modeling_qwen2_5_vl.py,
# qwen2_5_omni/modeling_qwen2_5_omni.py, paddleocr_vl/modeling_paddleocr_vl.py
# (``rope_parameters.get("mrope_section", [16, 24, 24])``) and glm4v/modeling_glm4v.py,
# glm4v_moe/modeling_glm4v_moe.py, glm_ocr/modeling_glm_ocr.py (``[8, 12, 12]``).
MROPE_DEFAULTS = {
    "qwen2_vl_text": [16, 24, 24],
    "qwen2_5_vl_text": [16, 24, 24],
    "qwen2_5_omni_text": [16, 24, 24],
    "paddleocr_vl_text": [16, 24, 24],
    "glm4v_text": [8, 12, 12],
    "glm4v_moe_text": [8, 12, 12],
    "glm_ocr_text": [8, 12, 12],
}
# Values a model reads whatever its layers are, which its default config leaves unset, by
# the config's model_type: models/step3p7/modeling_step3p7.py builds a sliding-window mask
# for every config (``create_sliding_window_causal_mask``), and masking_utils.py raises
# without ``sliding_window`` even where no layer slides; models/qwen4_exp/
# configuration_qwen4_exp.py names "indexed_attention" layers but leaves the index's
# widths (``indexer_*``, all required together) unset, which such a layer divides by.
UNSET = {
    "step3p5": {"sliding_window": 4},
    "qwen4_exp_text": {
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 8,
        "indexer_budget": 4,
        "indexer_compress_ratio": 2,
    },
}
# Counts a config derives from another when it is first built, and keeps: left to be
# derived again from the shrunk count (models/hrm_text/configuration_hrm_text.py:
# ``num_layers_per_stack`` remembers the ``num_hidden_layers`` it was built with).
DERIVED = ("num_layers_per_stack",)


def _consistent(doc: dict[str, Any], out: dict[str, Any]) -> None:
    """Widths and counts the shrunk config must keep in step with each other (in place)."""
    n = max((out[k] for k in LAYERS if isinstance(out.get(k), int)), default=None)
    for key in DERIVED:
        if isinstance(out.get(key), int):
            out[key] = None
    # a repeating pattern of block kinds (RecurrentGemma's ``block_types``) reaches each kind
    for key, value in out.items():
        if (
            n is not None
            and str(key).endswith("types")
            and isinstance(value, list)
            and len(value) < max(doc.get(k, 0) for k in LAYERS if isinstance(doc.get(k), int))
            and all(isinstance(x, str) for x in value)
        ):
            need = max(value.index(kind) for kind in value) + 1
            if need > n:
                for k in LAYERS:
                    if out.get(k) == n:
                        out[k] = need
                n = need
    # an attention (or expert) layer every ``period`` layers from ``offset`` (Jamba)
    for key in [k for k in out if str(k).endswith("_layer_offset")]:
        period = str(key).removesuffix("_offset") + "_period"
        if n is not None and isinstance(out[key], int) and out[key] >= n:
            out[key], out[period] = n - 1, n
    # multi-head latent attention: the rotary part is the head_dim the rope is built for
    if isinstance(out.get("qk_rope_head_dim"), int):
        if doc.get("head_dim") == doc.get("qk_rope_head_dim"):
            out["head_dim"] = out["qk_rope_head_dim"]
        if isinstance(out.get("qk_nope_head_dim"), int) and "qk_head_dim" in out:
            out["qk_head_dim"] = out["qk_nope_head_dim"] + out["qk_rope_head_dim"]
    experts = next((out[k] for k in ("n_routed_experts", "num_experts") if k in out), None)
    if isinstance(experts, int):
        if "num_experts_per_tok" in out and out["num_experts_per_tok"] is None:
            out["num_experts_per_tok"] = 2  # DeepSeek-V2's default config leaves it unset
        group = out.get("n_group")
        if isinstance(group, int) and experts % group:
            out["n_group"] = 1
            if isinstance(out.get("topk_group"), int):
                out["topk_group"] = 1
    # a width derived from hidden_size (RWKV: equal, Zamba2: twice, OPT's embeddings: equal,
    # which BLIP-2's projection into the language model assumes) follows it
    hidden = doc.get("hidden_size")
    for key in ("word_embed_proj_dim", "attention_hidden_size"):
        width = doc.get(key)
        if isinstance(width, int) and isinstance(hidden, int) and width % hidden == 0:
            out[key] = width // hidden * out["hidden_size"]
    width = doc.get("attention_hidden_size")
    if isinstance(width, int) and isinstance(hidden, int) and width % hidden == 0:
        heads, new_heads = doc.get("num_attention_heads"), out.get("num_attention_heads")
        if isinstance(heads, int) and doc.get("attention_head_dim") == width // heads:
            out["attention_head_dim"] = out["attention_hidden_size"] // new_heads
    # Zamba2: each mamba head's width is the expanded width over the head count
    expand, mamba_heads = doc.get("mamba_expand"), doc.get("n_mamba_heads")
    if isinstance(doc.get("mamba_headdim"), int) and isinstance(mamba_heads, int):
        if doc["mamba_headdim"] == int(expand * hidden) // mamba_heads:
            out["mamba_headdim"] = int(expand * out["hidden_size"]) // mamba_heads
    # BLIP-2 / InstructBLIP place their query tokens at an image token a processor adds to
    # the vocabulary; the default config names none (image_token_index None), so the last
    # id of the tiny vocabulary stands for it, as a checkpoint's config names one
    if isinstance(out.get("num_query_tokens"), int):
        for key in ("image_token_index", "image_token_id", "video_token_index"):
            if key in out and out[key] is None:
                out[key] = VOCAB - 1
    for key, value in UNSET.get(str(out.get("model_type")), {}).items():
        if out.get(key) is None:
            out[key] = value
    _mrope(out)


def _mrope(out: dict[str, Any]) -> None:
    """Scale the multimodal rotary sections to half the tiny head's rotary width."""
    rope = out.get("rope_parameters")
    if not isinstance(rope, dict):
        return
    sections = rope.get("mrope_section") or MROPE_DEFAULTS.get(str(out.get("model_type")))
    heads = out.get("num_attention_heads")
    head_dim = out.get("head_dim") or (
        out["hidden_size"] // heads if isinstance(heads, int) and out.get("hidden_size") else None
    )
    if not sections or not isinstance(head_dim, int):
        return
    factor = rope.get("partial_rotary_factor") or out.get("partial_rotary_factor") or 1.0
    half = int(head_dim * factor) // 2
    if sum(sections) == half:
        return
    scaled = [s * half // sum(sections) for s in sections]
    for i in sorted(range(len(sections)), key=lambda i: -sections[i])[: half - sum(scaled)]:
        scaled[i] += 1
    out["rope_parameters"] = {**rope, "mrope_section": scaled}


def _set_flag(doc: dict[str, Any], value: bool) -> dict[str, Any]:
    """The tie flag set at the top and in every nested config that carries or takes it."""
    out = dict(doc)
    out[FLAG] = value
    for key in ("text_config", "decoder", "generator", "language_config", "llm_config"):
        if isinstance(out.get(key), dict):
            out[key] = {**out[key], FLAG: value}
    return out


def tiny_config(
    model_type: str,
    tie: bool = True,
    sizes: bool = True,
    cls_name: str | None = None,
    kinds: int = 1,
) -> Any:
    from transformers import AutoConfig

    try:
        base = AutoConfig.for_model(model_type)
    except Exception as e:  # noqa: BLE001 - a default refused by its own checks: the overrides
        try:
            base = AutoConfig.for_model(model_type, **tiny({}, model_type, cls_name))
        except Exception:  # noqa: BLE001
            raise Skip(f"no default config ({_first(e)})") from None
    doc = tiny(_set_flag(_shrink(base.to_dict(), sizes, kinds), tie), model_type, cls_name)
    doc.pop("model_type", None)
    for k in ("transformers_version", "architectures", "_name_or_path"):
        doc.pop(k, None)
    try:
        return type(base)(**doc)
    except Exception as e:  # noqa: BLE001
        raise Skip(f"the shrunk config is refused ({_first(e)})") from None


def _first(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).strip().splitlines()[:4])
    return (text[:200] if text else type(e).__name__).replace("|", "/")


@contextlib.contextmanager
def _quiet() -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stderr(io.StringIO()),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _deadline(seconds: int) -> Any:
    def fire(*_: Any) -> None:
        raise _Timeout

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def fit(cls: type, config: Any) -> Any:
    """The config ``cls`` takes: a causal-LM class of a composite model type takes the
    text sub-config, as AutoModelForCausalLM.from_config does
    (transformers/models/auto/auto_factory.py), or the sub-config of its own class
    (Musicgen's decoder: MusicgenForCausalLM takes a MusicgenDecoderConfig)."""
    want = getattr(cls, "config_class", None)
    subs = getattr(config, "sub_configs", {})
    if want is None or isinstance(config, want):
        return config
    if subs.get("text_config") is want:
        return config.get_text_config()
    for key, sub in subs.items():
        if sub is want and isinstance(getattr(config, key, None), want):
            return getattr(config, key)
    return config


def build(cls_name: str, config: Any) -> Any:
    import torch
    import transformers

    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise Skip(f"transformers exports no {cls_name}")
    torch.manual_seed(0)
    try:
        model = cls(fit(cls, config))
    except Exception as e:  # noqa: BLE001
        raise Skip(f"cannot build tiny ({_first(e)})") from None
    n = sum(p.numel() for p in model.parameters())
    if n > 60_000_000:
        raise Skip(f"still {n // 1_000_000}M parameters once shrunk")
    return model.eval()


def memory_ties(model: Any) -> dict[str, str]:
    from tiecli.arch.declared import module_ties

    return module_ties(model)


def on_disk_truth(model: Any, stored: set[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """transformers' full state dict in its on-disk naming, and ``{alias: source}`` for the
    names ``save_pretrained`` left out (the source: the stored tensor sharing its memory)."""
    import re

    from transformers.core_model_loading import revert_weight_conversion

    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_save", None) or []]
    state = {k: v for k, v in model.state_dict().items() if not any(p.search(k) for p in ignored)}
    full = revert_weight_conversion(model, state)
    by_ptr: dict[tuple[int, tuple[int, ...], str], str] = {}
    for name in stored:
        t = full.get(name)
        if t is not None:
            by_ptr[(t.data_ptr(), tuple(t.shape), str(t.dtype))] = name
    ties = {}
    for name, t in full.items():
        if name in stored:
            continue
        src = by_ptr.get((t.data_ptr(), tuple(t.shape), str(t.dtype)))
        ties[name] = src if src is not None else "?"
    return full, ties


def _logits(model: Any) -> Any:
    """The model's logits on the input tiecli's forward proof builds for it (ids, and the
    images, patches, audio or boxes its ``forward`` cannot do without)."""
    import torch

    from tiecli.forward.check import call, float_outputs
    from tiecli.forward.inputs import example_input

    args, kwargs = example_input(model, None, torch.device("cpu"))
    with torch.no_grad():
        out, _ = call(model, args, kwargs, seeded=True)
    logits = getattr(out, "logits", None)
    return logits if torch.is_tensor(logits) else float_outputs(out)[0]


def _safetensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _perturbed(src: Path, dst: Path, names: set[str]) -> None:
    """A copy of ``src`` with every stored tied source moved by one step in its first
    element (a model with several ties, LUKE's words and entities, may read only some
    of them on a text input); the largest floating weight when no source is stored."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    picks = [k for k in tensors if k in names and tensors[k].is_floating_point()]
    if not picks:
        picks = [
            max(
                (k for k in tensors if tensors[k].is_floating_point()),
                key=lambda k: tensors[k].numel(),
            )
        ]
    for pick in picks:
        t = tensors[pick].clone()
        t.view(-1)[0] += 0.5
        tensors[pick] = t
    save_file(tensors, str(f), metadata=meta)


def check(model_type: str, cls_name: str, work: Path, timeout: int = 240) -> dict[str, Any]:
    """One architecture's row: ``{"ties": {...}, "checks": {check: "ok" | "FAIL: ..."}}``,
    or ``{"skip": why}`` / ``{"untied": True}``."""
    row: dict[str, Any] = {"model_type": model_type, "class": cls_name}
    start = time.monotonic()
    try:
        with _deadline(timeout), _quiet():
            _check(model_type, cls_name, work, row)
    except Skip as e:
        row["skip"] = str(e)
    except _Timeout:
        row["skip"] = f"took over {timeout} s"
    except Exception as e:  # noqa: BLE001 - a harness failure is reported, not hidden
        row.setdefault("checks", {})["harness"] = f"FAIL: {type(e).__name__}: {_first(e)}"
        row["trace"] = traceback.format_exc()[-2000:]
    row["seconds"] = round(time.monotonic() - start, 1)
    return row


def _check(model_type: str, cls_name: str, work: Path, row: dict[str, Any]) -> None:
    import torch

    from tiecli import api

    kinds = 1
    try:
        config = tiny_config(model_type, tie=True, cls_name=cls_name)
        model = build(cls_name, config)
        sizes = True
    except Skip as first:  # a config that ties widths together: fewer layers only
        try:
            config = tiny_config(model_type, tie=True, sizes=False, cls_name=cls_name)
            model = build(cls_name, config)
            sizes = False
        except Skip as second:
            try:  # two layers of each kind (Zamba ties its hybrid layers' shared block)
                config = tiny_config(model_type, tie=True, cls_name=cls_name, kinds=2)
                model = build(cls_name, config)
                sizes, kinds = True, 2
            except Skip:
                try:  # the first two layers, where a kind does not build tiny
                    config = tiny_config(model_type, tie=True, cls_name=cls_name, kinds=0)
                    model = build(cls_name, config)
                    sizes, kinds = True, 0
                except Skip:
                    raise Skip(f"{first}; with its widths kept: {second}") from None
    if model.config.model_type != model_type:  # built on a sub-config: config.json names it
        row["config_model_type"] = model.config.model_type
    ties = memory_ties(model)
    if not ties:
        row["untied"] = True
        return
    row["memory_ties"] = ties
    untied_cfg = tiny_config(model_type, tie=False, sizes=sizes, cls_name=cls_name, kinds=kinds)
    try:
        with torch.device("meta"):
            plain = type(model)(fit(type(model), untied_cfg))
        from tiecli.arch.declared import on_disk_names

        flagged = set(ties) - set(memory_ties(plain))
        renamed = on_disk_names(model, sorted(flagged))
        row["flag_ties"] = sorted(renamed.get(a, a) for a in flagged)
    except Exception:  # noqa: BLE001 - the flag is then unknown: every tie 'always'
        row["flag_ties"] = []
    config = model.config
    try:
        row["config_default"] = getattr(type(config)(), FLAG, None)
    except Exception:  # noqa: BLE001 - a default its own checks refuse: the declared default
        row["config_default"] = getattr(type(config), FLAG, None)

    sp = work / "save_pretrained"
    try:
        model.save_pretrained(sp)
    except Exception as e:  # noqa: BLE001
        raise Skip(f"save_pretrained fails ({_first(e)})") from None
    stored = set(_safetensors(sp))
    full, disk_ties = on_disk_truth(model, stored)
    row["ties"] = disk_ties
    checks: dict[str, str] = {}
    row["checks"] = checks

    def found(path: Path) -> str:
        r = api.inspect(path)
        got = {(t.alias, t.source) for t in r.ties}
        members = {t.alias: t.source for t in r.ties}
        missing = [
            f"{a}<-{s}" for a, s in disk_ties.items() if (a, s) not in got and members.get(a) != s
        ]
        return "ok" if not missing else "FAIL: not found " + ", ".join(missing[:3])

    checks["inspect"] = found(sp)
    binf = work / "bin"
    binf.mkdir()
    shutil.copy(sp / "config.json", binf / "config.json")
    torch.save(_safetensors(sp), binf / "pytorch_model.bin")
    checks["inspect-bin"] = found(binf)

    un = work / "untied"
    api.untie(sp, un)
    got = _safetensors(un)
    bad = sorted(set(full) ^ set(got))
    bad += [k for k in full if k in got and not torch.equal(full[k].detach(), got[k])]
    checks["untie"] = "ok" if not bad else "FAIL: differs at " + ", ".join(bad[:3])

    dd = work / "deduped"
    api.dedupe(un, dd)
    errors = []
    for p in (sp, dd):
        v = api.verify(p)
        errors += [f"{p.name}: {x.code}" for x in v.failures]
    checks["verify"] = "ok" if not errors else "FAIL: " + ", ".join(errors[:3])

    try:
        want = _logits(model)
    except Exception as e:  # noqa: BLE001 - transformers' own model does not run this tiny
        why = f"n/a: the tiny model does not run ({_first(e)})"
        checks["dedupe"] = checks["forward"] = why
        return
    try:  # transformers' own round trip is the reference: the deduped copy must match it
        own, info = type(model).from_pretrained(sp, output_loading_info=True)
        reference = _logits(own.eval())
        loaded = type(model).from_pretrained(dd).eval()
        same = torch.equal(reference, _logits(loaded))
        checks["dedupe"] = "ok" if same else "FAIL: logits differ after from_pretrained"
        if same and not torch.equal(want, reference):
            row["note"] = "transformers' own save/load round trip changes the logits"
        missing = sorted(info.get("missing_keys") or ())
        if not same and missing and not torch.equal(want, reference):
            # transformers' own save_pretrained output does not load back into this class
            # (ShieldGemma 2's conversion mapping renames for its classifier's tree): no
            # reference exists, and tiecli's proof rightly names the missing weights
            why = (
                "n/a: transformers' own save_pretrained output does not load back into "
                f"{cls_name} ({len(missing)} weights missing, e.g. {missing[0]})"
            )
            checks["dedupe"] = checks["forward"] = why
            proof = api.verify(dd, forward=True, device="cpu", against=un)
            said = " ".join(p.message for p in proof.failures if p.code == "forward-failed")
            if not any(k in said for k in missing):
                checks["forward"] = "FAIL: the proof does not say the weights are missing"
            return
    except Exception as e:  # noqa: BLE001
        checks["dedupe"] = f"FAIL: from_pretrained: {_first(e)}"

    good = api.verify(dd, forward=True, device="cpu", against=un)
    bent = work / "perturbed"
    _perturbed(dd, bent, set(disk_ties.values()))
    wrong = api.verify(bent, forward=True, device="cpu", against=un)
    if not good.ok:
        checks["forward"] = "FAIL: deduped: " + ", ".join(p.code for p in good.failures[:3])
    elif wrong.ok:
        checks["forward"] = "FAIL: a perturbed copy passes"
    elif "forward-mismatch" not in [p.code for p in wrong.failures]:
        codes = ", ".join(p.code for p in wrong.failures[:3])
        checks["forward"] = f"FAIL: a perturbed copy fails for another reason ({codes})"
    else:
        checks["forward"] = "ok"


def status(row: dict[str, Any]) -> str:
    if "skip" in row:
        return "skipped"
    if row.get("untied"):
        return "no tie"
    checks = row.get("checks", {}).values()
    return "ok" if all(v == "ok" or v.startswith("n/a") for v in checks) else "FAIL"


def render(rows: list[dict[str, Any]], version: str, total: int) -> str:
    tied = [r for r in rows if "skip" not in r and not r.get("untied")]
    ok = [r for r in tied if status(r) == "ok"]
    lines = [
        "# Architecture coverage",
        "",
        "Generated by `tools/coverage.py` (do not edit by hand): every architecture the",
        "causal-LM, masked-LM, seq2seq and image-text-to-text auto mappings of",
        f"**transformers {version}** name, built tiny from its default config with its tie flag",
        "on, saved with `save_pretrained` (and as `.bin`), and checked against transformers'",
        "own loading. Ties are listed in the names the file uses (`alias <- source`).",
        "",
        "Checks: **inspect** (each declared tie found, safetensors / `.bin`), **untie** (of",
        "the `save_pretrained` folder: transformers' full state dict in on-disk names,",
        "bit-identical), **dedupe** (of that: `from_pretrained` gives bit-identical logits),",
        "**verify** (no error on the saved nor the deduped folder), **forward**",
        "(`verify --forward --against` passes on the deduped copy, fails on a perturbed one).",
        "",
        "Where the generic shrink breaks a config's own checks or leaves it large (heads that",
        "must fill a mamba mixer, mrope sections that must sum to half a head, layer counts",
        "whose parts must add up, widths in keys of its own such as XLM's `emb_dim`),",
        "`tools/tiny_configs.py` holds hand-written overrides per model type or class,",
        "deep-merged into the shrunk config, each citing the transformers file whose check it",
        "meets. A class that takes a sub-config of its model type's config (Llama 4's causal",
        "LM, Musicgen's decoder) is built from that sub-config. The walk needs scipy (`pip",
        "install -e .[coverage]`); classes whose vision tower is a timm model stay skipped",
        "where timm (and torchvision for this torch) is not installed.",
        "",
        f"Walked {len(rows)} of {total} classes: {len(tied)} declare a tie, {len(ok)} pass every",
        "check they can run (`n/a`: transformers' own tiny model does not run a forward pass);",
        f"{sum(1 for r in rows if r.get('untied'))} declare none; "
        f"{sum(1 for r in rows if 'skip' in r)} skipped.",
        "",
        "## Tied architectures",
        "",
        "| model_type | class | ties (on disk) | " + " | ".join(CHECKS) + " |",
        "|---|---|---|" + "---|" * len(CHECKS),
    ]
    for r in sorted(tied, key=lambda r: (r["model_type"], r["class"])):
        ties = "<br>".join(f"`{a}` <- `{s}`" for a, s in sorted(r.get("ties", {}).items()))
        cells = [r["checks"].get(c, "-").replace("|", "/") for c in CHECKS]
        if "harness" in r["checks"]:
            cells[-1] += " " + r["checks"]["harness"]
        lines.append(
            f"| {r['model_type']} | {r['class']} | {ties or '-'} | " + " | ".join(cells) + " |"
        )
    lines += ["", "## Skipped", "", "| model_type | class | why |", "|---|---|---|"]
    for r in sorted((r for r in rows if "skip" in r), key=lambda r: (r["model_type"], r["class"])):
        lines.append(f"| {r['model_type']} | {r['class']} | {r['skip'].replace('|', '/')} |")
    walked = {(r["model_type"], r["class"]) for r in rows}
    unreached = [f"{mt} ({cls})" for mt, cls, _ in architectures() if (mt, cls) not in walked]
    if unreached:
        lines += ["", "## Not reached", "", "The walk stopped before these:", ""]
        lines += [", ".join(unreached)]
    untied = sorted(f"{r['model_type']} ({r['class']})" for r in rows if r.get("untied"))
    lines += ["", "## No tie declared", "", ", ".join(untied) or "-", ""]
    lines += [
        "## Without transformers: the pattern table",
        "",
        "`tools/coverage.py --table` writes the walk's ties, in on-disk names, into",
        "`tiecli/data/tie_patterns.json`: `model_types` (a model type takes the ties of its",
        "class with the most, then the first in mapping order), `architectures` (per model",
        "type, the classes whose",
        "ties differ from that, chosen by config.json's `architectures`) and",
        "`model_type_defaults` (per model type, the tie flag's default when config.json",
        "leaves it out; `defaults` names every flag a rule's `when` may name). A tie",
        "is `when: tie_word_embeddings` when building with the flag off drops it, else",
        "`always`. Only ties whose `inspect` check passed are written; hand-written model",
        "types the walk does not reach stay. Regenerate after a transformers upgrade:",
        "",
        "    nice .venv/bin/python tools/coverage.py --table",
        "",
        f"With transformers made unimportable, these {len(TOP)} most downloaded tied",
        "architectures must give the same ties from config.json as the walk",
        "(`tests/cli/test_coverage.py`); chosen from the model types of the Hub's most downloaded",
        "fill-mask, text-generation, text2text and image-text-to-text checkpoints:",
        "",
        ", ".join(f"{mt} ({cls})" for mt, cls in TOP),
        "",
    ]
    return "\n".join(lines)


def _head(alias: str) -> bool:
    """Not an encoder's or decoder's input embedding: those stay ``always`` in the table,
    as other consumers (transformers 4, vLLM) tie them whatever the head's flag says."""
    return not alias.endswith(("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"))


def _across_layers(alias: str, source: str) -> bool:
    """One block shared by layers at other positions (Zamba's shared transformer, tied
    from its first hybrid layer): which layers share it depends on the real config's
    layer count and pattern, not the tiny one's, so the table leaves it to transformers."""
    numbered = re.compile(r"\.\d+\.")
    return (
        alias != source
        and numbered.sub(".N.", alias) == numbered.sub(".N.", source)
        and (numbered.findall(alias) != numbered.findall(source))
    )


def pattern_rules(
    rows: list[dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, bool]]]:
    """``(model_types, architectures, model_type_defaults)`` for the pattern table.

    A class's rules are its ties in on-disk names, each ``when`` the tie flag when
    building with the flag off drops it, else ``always``. A model_type takes the rules
    of its class with the most ties (then the first in mapping order: a seq2seq model's
    full head beside its decoder-only causal-LM class); ``architectures`` lists, per
    model type, the other classes whose rules differ (chosen by config.json's
    ``architectures``). A class built on a sub-config (Llama 4's causal LM on its text
    config) counts under the model type that sub-config, and so its config.json, names.
    """
    order = {(mt, cls): i for i, (mt, cls, _) in enumerate(architectures())}
    by_type: dict[str, list[dict[str, str]]] = {}
    by_class: dict[str, dict[str, list[dict[str, str]]]] = {}
    defaults: dict[str, dict[str, bool]] = {}

    def rank(r: dict[str, Any]) -> tuple[int, int]:  # most ties first, then mapping order
        return (-len(r.get("ties") or {}), order.get((r["model_type"], r["class"]), len(order)))

    for r in sorted(rows, key=rank):
        if "skip" in r or r.get("untied") or "?" in r.get("ties", {}).values():
            continue
        if r.get("checks", {}).get("inspect") != "ok":
            continue
        flagged = set(r.get("flag_ties", []))
        rules = [
            {"alias": a, "source": s, "when": FLAG if a in flagged and _head(a) else "always"}
            for a, s in sorted(r["ties"].items())
            if not _across_layers(a, s)
        ]
        mt = r.get("config_model_type", r["model_type"])  # the model_type its config.json names
        if mt not in by_type:
            by_type[mt] = rules
        elif rules != by_type[mt]:
            by_class.setdefault(mt, {})[r["class"]] = rules
        if isinstance(r.get("config_default"), bool):
            defaults.setdefault(mt, {FLAG: r["config_default"]})
    return by_type, by_class, defaults


def write_table(rows: list[dict[str, Any]], version: str) -> None:
    path = ROOT / "tiecli" / "data" / "tie_patterns.json"
    table = json.loads(path.read_text(encoding="utf-8"))
    by_type, by_class, defaults = pattern_rules(rows)
    merged = dict(table["model_types"])
    # a hand-written rule's flag stays: it also says which flag other consumers
    # (transformers 4, vLLM) resolve the pair by, where transformers 5 may keep it tied
    known = {(mt, r["alias"], r["source"]): r["when"] for mt, rs in merged.items() for r in rs}
    for mt, rules in by_type.items():
        for r in rules:
            r["when"] = known.get((mt, r["alias"], r["source"]), r["when"])
    merged.update(by_type)
    # a hand-written model type whose every walked class declares no tie is stale
    kinds: dict[str, set[str]] = {}
    for r in rows:
        kinds.setdefault(r["model_type"], set()).add(status(r))
    for model_type, seen in kinds.items():
        if seen == {"no tie"}:
            merged.pop(model_type, None)
    table["model_types"] = dict(sorted(merged.items()))
    table["architectures"] = dict(sorted(by_class.items()))
    table["model_type_defaults"] = dict(sorted(defaults.items()))
    table["about"] = (
        "Known tie names, in the names the file uses (what save_pretrained writes). "
        "'model_types' applies when config.json names the model_type, or "
        "'architectures'[model_type][class] when its architectures names a class listed there; "
        "'when' names the config flag that switches the tie on, or 'always'. 'defaults' lists "
        "those flags with their default when config.json leaves them out; "
        "'model_type_defaults' a model type's own defaults. 'common' lists name pairs tried "
        "on checkpoints with no config ('when' there marks the pairs a tie flag governs). "
        "Names match at any '.'-boundary prefix "
        "(e.g. a Lightning 'model.' prefix). A pattern is a hypothesis: it ties a pair only "
        "when their values are equal, or, with a config, when the alias is absent."
    )
    table["generated"] = (
        f"model_types, architectures and model_type_defaults from tools/coverage.py --table, "
        f"transformers {version}"
    )
    path.write_text(_dump_table(table), encoding="utf-8")


def _dump_table(table: dict[str, Any]) -> str:
    """The table as JSON with one model type, class or rule per line (readable diffs)."""
    parts = []
    for key, value in table.items():
        if isinstance(value, dict) and value:
            inner = ",\n".join(
                f"    {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}"
                for k, v in value.items()
            )
            parts.append(f"  {json.dumps(key)}: {{\n{inner}\n  }}")
        elif isinstance(value, list) and value:
            inner = ",\n".join(f"    {json.dumps(v, ensure_ascii=False)}" for v in value)
            parts.append(f"  {json.dumps(key)}: [\n{inner}\n  ]")
        else:
            parts.append(f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _put(rows: list[dict[str, Any]], row: dict[str, Any]) -> None:
    """``row`` in place of the row of its (model_type, class), else at the end."""
    key = (row["model_type"], row["class"])
    for i, r in enumerate(rows):
        if (r["model_type"], r["class"]) == key:
            rows[i] = row
            return
    rows.append(row)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--only", help="comma-separated model_types (or class names); with --resume: re-run those"
    )
    ap.add_argument("--out", default=str(ROOT / "docs" / "coverage.md"))
    ap.add_argument("--resume", action="store_true", help="keep rows already in the .json")
    ap.add_argument("--rerun-failed", action="store_true", help="with --resume: redo FAIL rows")
    ap.add_argument("--rerun-skipped", action="store_true", help="with --resume: redo skips")
    ap.add_argument("--range", help="a:b, only architectures a..b-1 of the walk (to split it)")
    ap.add_argument("--merge", nargs="*", default=[], help="add the rows of other walks' .json")
    ap.add_argument("--table", action="store_true", help="regenerate the pattern table")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per architecture")
    args = ap.parse_args(argv)
    os.environ.setdefault("TIECLI_CACHE_DIR", tempfile.mkdtemp(prefix="tiecli-coverage-cache-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    torch.set_num_threads(1)
    out = Path(args.out)
    state = out.with_suffix(".json")
    rows: list[dict[str, Any]] = []
    if args.resume and state.exists():
        rows = json.loads(state.read_text(encoding="utf-8"))["rows"]
        if args.rerun_failed:
            rows = [r for r in rows if status(r) != "FAIL"]
        if args.rerun_skipped:
            rows = [r for r in rows if status(r) != "skipped"]
    for extra in args.merge:
        known = {(r["model_type"], r["class"]) for r in rows}
        more = json.loads(Path(extra).read_text(encoding="utf-8"))["rows"]
        rows += [r for r in more if (r["model_type"], r["class"]) not in known]
    done = {(r["model_type"], r["class"]) for r in rows}
    todo = architectures()
    total = len(todo)
    if args.range:
        a, b = (int(x) if x else None for x in args.range.split(":"))
        todo = todo[a:b]
    if args.only:
        wanted = set(args.only.split(","))
        todo = [a for a in todo if a[0] in wanted or a[1] in wanted]
    version = transformers.__version__
    if args.merge:
        state.write_text(
            json.dumps({"transformers": version, "rows": rows}, indent=1) + "\n", encoding="utf-8"
        )
        out.write_text(render(rows, version, total), encoding="utf-8")
    # --only re-runs the rows it names, even those a --resume kept (a row is one
    # (model_type, class): two model types may name the same class)
    redo = {(mt, cls) for mt, cls, _ in todo} if args.only else set()
    current = state.with_suffix(".current")
    if args.resume and current.exists():  # the last walk died inside this architecture
        mt, cls = json.loads(current.read_text(encoding="utf-8"))
        why = "the walk's process died while checking it (a crash inside transformers or torch)"
        _put(rows, {"model_type": mt, "class": cls, "skip": why, "seconds": 0})
        done.add((mt, cls))
        redo.discard((mt, cls))
    for model_type, cls_name, _task in todo:
        if (model_type, cls_name) in done and (model_type, cls_name) not in redo:
            continue
        current.write_text(json.dumps([model_type, cls_name]), encoding="utf-8")
        with tempfile.TemporaryDirectory(prefix="tiecli-coverage-") as tmp:
            row = check(model_type, cls_name, Path(tmp), args.timeout)
        _put(rows, row)
        print(f"{status(row):8} {row['seconds']:6.1f}s {model_type} {cls_name}", flush=True)
        if status(row) == "FAIL":
            print("         " + json.dumps(row.get("checks")), flush=True)
        state.write_text(
            json.dumps({"transformers": version, "rows": rows}, indent=1) + "\n", encoding="utf-8"
        )
        out.write_text(render(rows, version, total), encoding="utf-8")
    current.unlink(missing_ok=True)
    out.write_text(render(rows, version, total), encoding="utf-8")
    if args.table:
        write_table(rows, version)
    failed = [r for r in rows if status(r) == "FAIL"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
