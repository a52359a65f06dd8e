"""Tiny builds of multimodal and mixture-of-experts architectures, for ``verify --forward``.

Each entry is a config shrunk to a couple of layers and a hidden size of a few
dozen, with its special tokens (image, video, audio) inside the small
vocabulary as in the real checkpoints. ``build(name, dst)`` makes the model
with a fixed seed and writes it with ``save_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

VOCAB = 160  # special tokens sit at 150..159
IMG, VID, AUD, BOI, EOI, VSTART, VEND, ASTART, AEND = 150, 151, 152, 153, 154, 155, 156, 157, 158


def _llama(**kw: Any) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
        **kw,
    }


def _clip_vision(**kw: Any) -> dict[str, Any]:
    return {
        "model_type": "clip_vision_model",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 16,
        "patch_size": 4,
        "projection_dim": 16,
        **kw,
    }


def _siglip_vision(**kw: Any) -> dict[str, Any]:
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 16,
        "patch_size": 4,
        **kw,
    }


def _qwen_text(**kw: Any) -> dict[str, Any]:
    return {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "tie_word_embeddings": True,
        **kw,
    }


def _specs() -> dict[str, tuple[str, str, dict[str, Any]]]:
    """name -> (config class, model class, config arguments)."""
    mrope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
    return {
        "llava": (
            "LlavaConfig",
            "LlavaForConditionalGeneration",
            {
                "text_config": _llama(),
                "vision_config": _clip_vision(),
                "image_token_index": IMG,
                "image_seq_length": 16,
                "tie_word_embeddings": True,
            },
        ),
        "llava_next": (
            "LlavaNextConfig",
            "LlavaNextForConditionalGeneration",
            {
                "text_config": _llama(),
                "vision_config": _clip_vision(),
                "image_token_index": IMG,
                "image_grid_pinpoints": [[16, 16], [16, 32]],
                "tie_word_embeddings": True,
            },
        ),
        "llava_onevision": (
            "LlavaOnevisionConfig",
            "LlavaOnevisionForConditionalGeneration",
            {
                "text_config": _qwen_text(model_type="qwen2"),
                "vision_config": _siglip_vision(),
                "image_token_index": IMG,
                "video_token_index": VID,
                "image_grid_pinpoints": [[16, 16], [16, 32]],
                "tie_word_embeddings": True,
            },
        ),
        "aya_vision": (
            "AyaVisionConfig",
            "AyaVisionForConditionalGeneration",
            {
                "text_config": {
                    "model_type": "cohere2",
                    "vocab_size": VOCAB,
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "num_key_value_heads": 2,
                    "head_dim": 8,
                    "max_position_embeddings": 64,
                    "bos_token_id": 1,
                    "eos_token_id": 2,
                    "tie_word_embeddings": True,
                },
                "vision_config": _siglip_vision(),
                "image_token_index": IMG,
                "downsample_factor": 2,
                "tie_word_embeddings": True,
            },
        ),
        "qwen2_5_vl": (
            "Qwen2_5_VLConfig",
            "Qwen2_5_VLForConditionalGeneration",
            {
                "text_config": _qwen_text(
                    model_type="qwen2_5_vl_text",
                    rope_parameters=mrope,
                    bos_token_id=1,
                    eos_token_id=2,
                ),
                "vision_config": {
                    "depth": 2,
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_heads": 2,
                    "patch_size": 4,
                    "spatial_merge_size": 2,
                    "temporal_patch_size": 2,
                    "out_hidden_size": 32,
                    "window_size": 8,
                    "fullatt_block_indexes": [1],
                },
                "image_token_id": IMG,
                "video_token_id": VID,
                "vision_start_token_id": VSTART,
                "vision_end_token_id": VEND,
                "tie_word_embeddings": True,
            },
        ),
        "glm4v": (
            "Glm4vConfig",
            "Glm4vForConditionalGeneration",
            {
                "text_config": _qwen_text(
                    rope_parameters={
                        "rope_type": "default",
                        "rope_theta": 10000.0,
                        "mrope_section": [2, 1, 1],
                    },
                ),
                "vision_config": {
                    "depth": 2,
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_heads": 2,
                    "patch_size": 4,
                    "spatial_merge_size": 2,
                    "temporal_patch_size": 2,
                    "out_hidden_size": 32,
                    "image_size": 16,
                },
                "image_token_id": IMG,
                "video_token_id": VID,
                "image_start_token_id": VSTART,
                "image_end_token_id": VEND,
                "video_start_token_id": BOI,
                "video_end_token_id": EOI,
                "tie_word_embeddings": True,
            },
        ),
        "internvl": (
            "InternVLConfig",
            "InternVLForConditionalGeneration",
            {
                "text_config": _qwen_text(model_type="qwen2"),
                "vision_config": {
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 2,
                    "image_size": [16, 16],
                    "patch_size": [4, 4],
                },
                "image_token_id": IMG,
                "downsample_ratio": 0.5,
                "tie_word_embeddings": True,
            },
        ),
        "marian": (
            "MarianConfig",
            "MarianMTModel",
            {  # sinusoidal position tables that save_pretrained never writes
                "vocab_size": VOCAB,
                "d_model": 16,
                "encoder_layers": 1,
                "decoder_layers": 1,
                "encoder_attention_heads": 2,
                "decoder_attention_heads": 2,
                "encoder_ffn_dim": 32,
                "decoder_ffn_dim": 32,
                "max_position_embeddings": 32,
                "pad_token_id": VOCAB - 1,
                "decoder_start_token_id": VOCAB - 1,
                "eos_token_id": 0,
                "tie_word_embeddings": True,
            },
        ),
        "qwen2_vl": (
            "Qwen2VLConfig",
            "Qwen2VLForConditionalGeneration",
            {
                "text_config": _qwen_text(
                    model_type="qwen2_vl_text",
                    rope_parameters=mrope,
                    bos_token_id=1,
                    eos_token_id=2,
                ),
                "vision_config": {
                    "depth": 2,
                    "embed_dim": 16,
                    "hidden_size": 32,
                    "num_heads": 2,
                    "patch_size": 4,
                    "spatial_merge_size": 2,
                    "temporal_patch_size": 2,
                },
                "image_token_id": IMG,
                "video_token_id": VID,
                "vision_start_token_id": VSTART,
                "vision_end_token_id": VEND,
                "tie_word_embeddings": True,
            },
        ),
        "qwen3_vl": (
            "Qwen3VLConfig",
            "Qwen3VLForConditionalGeneration",
            {
                "text_config": _qwen_text(
                    model_type="qwen3_vl_text",
                    head_dim=8,
                    rope_parameters={
                        "rope_type": "default",
                        "rope_theta": 10000.0,
                        "mrope_section": [1, 1, 2],
                        "mrope_interleaved": True,
                    },
                ),
                "vision_config": {
                    "depth": 2,
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_heads": 2,
                    "patch_size": 4,
                    "spatial_merge_size": 2,
                    "temporal_patch_size": 2,
                    "out_hidden_size": 32,
                    "num_position_embeddings": 16,
                    "deepstack_visual_indexes": [1],
                },
                "image_token_id": IMG,
                "video_token_id": VID,
                "vision_start_token_id": VSTART,
                "vision_end_token_id": VEND,
                "tie_word_embeddings": True,
            },
        ),
        "qwen3_5": (
            "Qwen3_5Config",
            "Qwen3_5ForConditionalGeneration",
            {
                "text_config": _qwen_text(
                    model_type="qwen3_5_text",
                    head_dim=8,
                    num_hidden_layers=2,
                    layer_types=["linear_attention", "full_attention"],
                    linear_key_head_dim=8,
                    linear_value_head_dim=8,
                    linear_num_key_heads=2,
                    linear_num_value_heads=4,
                    rope_parameters={
                        "rope_type": "default",
                        "rope_theta": 10000.0,
                        "mrope_section": [1, 1, 0],
                        "mrope_interleaved": True,
                        "partial_rotary_factor": 0.5,
                    },
                ),
                "vision_config": {
                    "depth": 2,
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_heads": 2,
                    "patch_size": 4,
                    "spatial_merge_size": 2,
                    "temporal_patch_size": 2,
                    "out_hidden_size": 32,
                    "num_position_embeddings": 16,
                },
                "image_token_id": IMG,
                "video_token_id": VID,
                "vision_start_token_id": VSTART,
                "vision_end_token_id": VEND,
                "tie_word_embeddings": True,
            },
        ),
        "gemma3": (
            "Gemma3Config",
            "Gemma3ForConditionalGeneration",
            {
                "text_config": {
                    "model_type": "gemma3_text",
                    "vocab_size": VOCAB,
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "num_key_value_heads": 2,
                    "head_dim": 8,
                    "query_pre_attn_scalar": 8,
                    "sliding_window": 4,
                    "max_position_embeddings": 64,
                },
                "vision_config": _siglip_vision(),
                "mm_tokens_per_image": 4,
                "boi_token_index": BOI,
                "eoi_token_index": EOI,
                "image_token_index": IMG,
            },
        ),
        "mistral3": (
            "Mistral3Config",
            "Mistral3ForConditionalGeneration",
            {
                "text_config": _llama(model_type="mistral", head_dim=8),
                "vision_config": {
                    "model_type": "pixtral",
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 2,
                    "head_dim": 8,
                    "image_size": 16,
                    "patch_size": 4,
                },
                "image_token_index": IMG,
                "spatial_merge_size": 2,
                "tie_word_embeddings": True,
            },
        ),
        "paligemma": (
            "PaliGemmaConfig",
            "PaliGemmaForConditionalGeneration",
            {
                "text_config": {
                    "model_type": "gemma",
                    "vocab_size": VOCAB,
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "num_key_value_heads": 2,
                    "head_dim": 8,
                    "max_position_embeddings": 64,
                },
                "vision_config": _siglip_vision(projection_dim=32),
                "image_token_index": IMG,
                "vocab_size": VOCAB,
                "projection_dim": 32,
                "hidden_size": 32,
            },
        ),
        "smolvlm": (
            "SmolVLMConfig",
            "SmolVLMForConditionalGeneration",
            {
                "text_config": _llama(),
                "vision_config": {
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 2,
                    "image_size": 16,
                    "patch_size": 4,
                },
                "image_token_id": IMG,
                "scale_factor": 2,
                "tie_word_embeddings": True,
            },
        ),
        "idefics3": (
            "Idefics3Config",
            "Idefics3ForConditionalGeneration",
            {
                "text_config": _llama(),
                "vision_config": {
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 2,
                    "image_size": 16,
                    "patch_size": 4,
                },
                "image_token_id": IMG,
                "scale_factor": 2,
                "tie_word_embeddings": True,
            },
        ),
        "granite_speech": (
            "GraniteSpeechConfig",
            "GraniteSpeechForConditionalGeneration",
            {
                "text_config": {
                    "model_type": "granite",
                    "vocab_size": VOCAB,
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "num_key_value_heads": 2,
                    "max_position_embeddings": 64,
                    "tie_word_embeddings": True,
                },
                "encoder_config": {
                    "input_dim": 16,
                    "num_layers": 2,
                    "hidden_dim": 16,
                    "feedforward_mult": 2,
                    "num_heads": 2,
                    "dim_head": 8,
                    "output_dim": 8,
                    "context_size": 8,
                    "max_pos_emb": 16,
                    "dropout": 0.0,
                    "conv_kernel_size": 3,
                },
                "projector_config": {
                    "model_type": "blip_2_qformer",
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "encoder_hidden_size": 16,
                    "cross_attention_frequency": 1,
                    "max_position_embeddings": 32,
                    "vocab_size": 32,
                },
                "audio_token_index": AUD,
                "has_lora_adapter": False,
                "downsample_rate": 2,
                "window_size": 4,
                "tie_word_embeddings": True,
            },
        ),
        "switch_transformers": (
            "SwitchTransformersConfig",
            "SwitchTransformersForConditionalGeneration",
            {
                "vocab_size": VOCAB,
                "d_model": 64,  # wide enough for the CPU kernels' vectorised paths
                "d_kv": 16,
                "d_ff": 128,
                "expert_capacity": 8,
                "num_layers": 2,
                "num_sparse_encoder_layers": 1,
                "num_decoder_layers": 2,
                "num_sparse_decoder_layers": 1,
                "num_heads": 4,
                "num_experts": 4,
                "relative_attention_num_buckets": 8,
                "relative_attention_max_distance": 16,
                "decoder_start_token_id": 0,
            },
        ),
        "mixtral": (  # saved one tensor per expert, merged by transformers on loading
            "MixtralConfig",
            "MixtralForCausalLM",
            _llama(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
        ),
        "qwen2_5_omni_thinker": (
            "Qwen2_5OmniThinkerConfig",
            "Qwen2_5OmniThinkerForConditionalGeneration",
            {
                "text_config": _qwen_text(model_type="qwen2_5_omni_text", rope_parameters=mrope),
                "vision_config": {
                    "depth": 2,
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_heads": 2,
                    "patch_size": 4,
                    "spatial_merge_size": 2,
                    "temporal_patch_size": 2,
                    "window_size": 16,
                    "out_hidden_size": 32,
                    "fullatt_block_indexes": [1],
                },
                "audio_config": {
                    "num_mel_bins": 16,
                    "encoder_layers": 2,
                    "encoder_attention_heads": 2,
                    "encoder_ffn_dim": 32,
                    "d_model": 16,
                    "max_source_positions": 32,
                    "n_window": 4,
                    "output_dim": 32,
                },
                "audio_token_index": AUD,
                "image_token_index": IMG,
                "video_token_index": VID,
                "audio_start_token_id": ASTART,
                "audio_end_token_id": AEND,
                "vision_start_token_id": VSTART,
                "vision_end_token_id": VEND,
                "user_token_id": 5,
                "tie_word_embeddings": True,
            },
        ),
        "blip_2": (
            "Blip2Config",
            "Blip2ForConditionalGeneration",
            {
                "vision_config": {
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 2,
                    "image_size": 16,
                    "patch_size": 4,
                },
                "qformer_config": {
                    "vocab_size": 32,
                    "hidden_size": 16,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "intermediate_size": 32,
                    "encoder_hidden_size": 16,
                    "max_position_embeddings": 32,
                },
                "text_config": {
                    "model_type": "opt",
                    "vocab_size": VOCAB,
                    "hidden_size": 32,
                    "ffn_dim": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "max_position_embeddings": 64,
                    "word_embed_proj_dim": 32,
                    "bos_token_id": 1,
                    "eos_token_id": 2,
                    "pad_token_id": 0,
                },
                "num_query_tokens": 4,
                "image_token_index": IMG,
            },
        ),
        "whisper": (
            "WhisperConfig",
            "WhisperForConditionalGeneration",
            {
                "vocab_size": VOCAB,
                "num_mel_bins": 16,
                "encoder_layers": 2,
                "decoder_layers": 2,
                "encoder_attention_heads": 2,
                "decoder_attention_heads": 2,
                "encoder_ffn_dim": 32,
                "decoder_ffn_dim": 32,
                "d_model": 16,
                "max_source_positions": 16,
                "max_target_positions": 32,
                "decoder_start_token_id": 3,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "pad_token_id": 0,
                "begin_suppress_tokens": None,
                "suppress_tokens": None,
            },
        ),
        "blip": (
            "BlipConfig",
            "BlipForConditionalGeneration",
            {
                "text_config": {
                    "vocab_size": VOCAB,
                    "hidden_size": 32,
                    "encoder_hidden_size": 16,
                    "intermediate_size": 64,
                    "projection_dim": 16,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "max_position_embeddings": 64,
                    "bos_token_id": 1,
                    "sep_token_id": 3,
                },
                "vision_config": {
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "projection_dim": 16,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 2,
                    "image_size": 16,
                    "patch_size": 4,
                },
                "projection_dim": 16,
                "image_text_hidden_size": 16,
            },
        ),
    }


NAMES = sorted(_specs())


def build(name: str, dst: Path, seed: int = 0) -> Path:
    """A tiny ``name`` model with seeded random weights, saved to ``dst`` by transformers."""
    import torch
    import transformers

    config_cls, model_cls, kwargs = _specs()[name]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    model.save_pretrained(dst)
    return dst
