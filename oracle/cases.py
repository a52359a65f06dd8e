"""Build the oracle's checkpoints: tiny Llama, Qwen2 and Llava models in the situations a tie
can be in, each with a locally trained sentencepiece tokenizer (nothing is downloaded).

Run in a venv with torch, transformers, safetensors and sentencepiece:
    python oracle/cases.py OUT_DIR
Writes OUT_DIR/<case>/ (config.json, weights, tokenizer.model, tokenizer_config.json) and
OUT_DIR/cases.json (one entry per case: name, situation, form, what it stresses).
The embedding and head are drawn with std 1 so that a randomly initialised tensor
(std = initializer_range, 0.02) or an uninitialised one is told apart from both.
"""

from __future__ import annotations

import copy
import json
import random
import sys
from pathlib import Path

import torch

VOCAB = 128
PAD_ROWS = 32
HIDDEN = 128
EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
LLAVA_EMBED = "language_model.model.embed_tokens.weight"
LLAVA_HEAD = "language_model.lm_head.weight"

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": HIDDEN // 4,  # 32: vLLM's CPU attention has no kernel for 16
    "vocab_size": VOCAB,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}
QWEN2 = dict(
    LLAMA,
    architectures=["Qwen2ForCausalLM"],
    model_type="qwen2",
    use_sliding_window=False,
    sliding_window=None,
    max_window_layers=2,
)
QWEN2.pop("head_dim")

# name, base, situation (tiecli's), form, flag settings, what is stored, note
CASES = [
    ("llama-tied", "llama", "alias_absent", "safetensors", {"top": True}, "embed", "healthy tied"),
    (
        "llama-untied",
        "llama",
        "both_differ",
        "safetensors",
        {"top": False},
        "both",
        "healthy untied",
    ),
    ("qwen2-tied", "qwen2", "alias_absent", "safetensors", {"top": True}, "embed", "healthy tied"),
    (
        "qwen2-untied",
        "qwen2",
        "both_differ",
        "safetensors",
        {"top": False},
        "both",
        "healthy untied",
    ),
    (
        "llama-tied-head-differs",
        "llama",
        "both_differ",
        "safetensors",
        {"top": True},
        "both",
        "flag tied, a stored head that differs",
    ),
    (
        "llama-tied-head-differs-bin",
        "llama",
        "both_differ",
        "pytorch",
        {"top": True},
        "both",
        "flag tied, a stored head that differs (.bin)",
    ),
    (
        "qwen2-tied-head-differs",
        "qwen2",
        "both_differ",
        "safetensors",
        {"top": True},
        "both",
        "flag tied, a stored head that differs",
    ),
    (
        "llama-untied-head-absent",
        "llama",
        "alias_absent",
        "safetensors",
        {"top": False},
        "embed",
        "flag untied, head absent",
    ),
    (
        "llama-untied-head-absent-bin",
        "llama",
        "alias_absent",
        "pytorch",
        {"top": False},
        "embed",
        "flag untied, head absent (.bin)",
    ),
    (
        "llama-head-only",
        "llama",
        "source_absent",
        "safetensors",
        {"top": True},
        "head",
        "only the head stored (MobileLLM)",
    ),
    (
        "llama-head-only-bin",
        "llama",
        "source_absent",
        "pytorch",
        {"top": True},
        "head",
        "only the head stored (MobileLLM, .bin)",
    ),
    (
        "llama-padded",
        "llama",
        "padded",
        "safetensors",
        {"top": True},
        "padded",
        "embedding padded past the head's rows, shared rows equal",
    ),
    (
        "llama-padded-head-vocab",
        "llama",
        "padded",
        "safetensors",
        {"top": True},
        "padded-head-vocab",
        "embedding padded past the head's rows; config vocab_size = the head's rows",
    ),
    (
        "llava-nested-tied",
        "llava",
        "alias_absent",
        "safetensors",
        {"nested": True},
        "embed",
        "VLM: the flag only in text_config (tied), head absent",
    ),
    (
        "llava-flags-disagree",
        "llava",
        "alias_absent",
        "safetensors",
        {"top": True, "nested": False},
        "embed",
        "VLM: top-level tied, text_config untied, head absent",
    ),
]


def train_tokenizer(where: Path) -> Path:
    import sentencepiece as spm

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(400)]
    text = where / "corpus.txt"
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)))
    prefix = where / "spm"
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(prefix),
        vocab_size=VOCAB,
        model_type="unigram",
        character_coverage=1.0,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def config_for(base: str, flags: dict) -> dict:
    if base == "llava":
        text = copy.deepcopy(LLAMA)
        text.pop("architectures")
        if "nested" in flags:
            text["tie_word_embeddings"] = flags["nested"]
        cfg = {
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "text_config": text,
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
                "projection_dim": 32,
            },
            "image_token_index": VOCAB - 1,
            "projector_hidden_act": "gelu",
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
            "torch_dtype": "float32",
        }
        if "top" in flags:
            cfg["tie_word_embeddings"] = flags["top"]
        return cfg
    cfg = copy.deepcopy(LLAMA if base == "llama" else QWEN2)
    cfg["tie_word_embeddings"] = flags["top"]
    return cfg


def base_state(base: str, cfg: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the architecture, from a seeded init, with our own embedding/head."""
    import transformers

    torch.manual_seed(0)
    untied = dict(cfg, tie_word_embeddings=False)
    if base == "llava":
        untied["text_config"] = dict(untied["text_config"], tie_word_embeddings=False)
        conf = transformers.LlavaConfig(**{k: v for k, v in untied.items() if k != "architectures"})
        model = transformers.LlavaForConditionalGeneration(conf)
    else:
        conf = transformers.AutoConfig.for_model(
            **{k: v for k, v in untied.items() if k not in ("architectures", "model_type")},
            model_type=untied["model_type"],
        )
        model = transformers.AutoModelForCausalLM.from_config(conf)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if base == "llava":  # the original llava-hf key names, which every consumer reads
        out = {}
        for k, v in state.items():
            if k.startswith("model.language_model."):
                k = "language_model.model." + k[len("model.language_model.") :]
            elif k.startswith("model."):
                k = k[len("model.") :]
            elif k == "lm_head.weight":
                k = LLAVA_HEAD
            elif k.startswith("language_model.") or k.startswith("vision_tower."):
                pass
            out[k] = v
        state = out
    return state


def build(out: Path) -> list[dict]:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(out)
    entries = []
    for name, base, situation, form, flags, stored, note in CASES:
        cfg = config_for(base, flags)
        state = base_state(base, cfg)
        embed_key, head_key = (LLAVA_EMBED, LLAVA_HEAD) if base == "llava" else (EMBED, HEAD)
        g = torch.Generator().manual_seed(1)
        embed = torch.randn(VOCAB, HIDDEN, generator=g)
        head = torch.randn(VOCAB, HIDDEN, generator=g)
        state.pop(embed_key, None)
        state.pop(head_key, None)
        if stored == "embed":
            state[embed_key] = embed
        elif stored == "head":
            state[head_key] = head
        elif stored == "both":
            state[embed_key], state[head_key] = embed, head
        elif stored == "padded":
            padded = torch.cat([embed, torch.randn(PAD_ROWS, HIDDEN, generator=g)])
            state[embed_key], state[head_key] = padded, embed.clone()
            cfg["vocab_size"] = VOCAB + PAD_ROWS
        elif stored == "padded-head-vocab":  # the config counts the head's rows
            padded = torch.cat([embed, torch.randn(PAD_ROWS, HIDDEN, generator=g)])
            state[embed_key], state[head_key] = padded, embed.clone()
        d = out / name
        d.mkdir(exist_ok=True)
        for f in d.iterdir():
            f.unlink()
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        (d / "tokenizer.model").write_bytes(tok.read_bytes())
        (d / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "LlamaTokenizer",
                    "bos_token": "<s>",
                    "eos_token": "</s>",
                    "unk_token": "<unk>",
                    "add_bos_token": True,
                    "add_eos_token": False,
                    "model_max_length": 256,
                }
            )
        )
        (d / "generation_config.json").write_text(
            json.dumps({"bos_token_id": 1, "eos_token_id": 2})
        )
        if form == "safetensors":
            save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        else:
            torch.save(state, d / "pytorch_model.bin")
        entries.append(
            {
                "name": name,
                "base": base,
                "situation": situation,
                "form": form,
                "note": note,
                "embed": embed_key,
                "head": head_key,
                "flags": flags,
            }
        )
    (out / "cases.json").write_text(json.dumps(entries, indent=2))
    return entries


if __name__ == "__main__":
    for e in build(Path(sys.argv[1])):
        print(e["name"])
