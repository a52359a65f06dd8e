"""Hand-written tiny config overrides, per model type or class, for ``tools/coverage.py``.

The walk shrinks every default config generically (``_shrink``: 2 layers, hidden size
32, a small vocabulary). Some architectures validate relations between config keys
that generic shrinking breaks (heads that must divide widths, sections that must sum to
a head size, layer counts whose parts must add up) or keep their size in keys it does
not know. Each entry below is deep-merged into the shrunk config (a nested dict merges
into the sub-config of that name); its comment names the transformers file whose check
it satisfies (paths under ``transformers/models/``).
"""

from __future__ import annotations

from typing import Any

# Qwen3.5's text model (and Qwen3.5-MoE's): see "qwen3_5" below
QWEN3_5_TEXT: dict[str, Any] = {
    "layer_types": ["linear_attention", "full_attention"],
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
}

# Qwen4-exp's text model: see "qwen4_exp" below
QWEN4_EXP_TEXT: dict[str, Any] = {
    "layer_types": ["linear_attention", "indexed_attention"],
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "indexer_n_heads": 2,
    "indexer_kv_heads": 1,
    "indexer_head_dim": 8,
    "indexer_budget": 4,
    "indexer_compress_ratio": 2,
}

# the small VQ-VAE image tokenizer Chameleon and Emu3 share the shape of (widths are
# base_channels * channel_multiplier; GroupNorm of 32 groups: multiples of 32)
VQVAE: dict[str, Any] = {"base_channels": 32, "channel_multiplier": [1, 2], "num_res_blocks": 1}

TINY: dict[str, dict[str, Any]] = {
    # apertus1p5/configuration_apertus1p5.py validate_architecture: WavTokenizer has no
    # projection around its quantizer (codebook_dim == audio hidden_size); the image then
    # the audio token ranges follow each other inside the text vocabulary; the vision
    # tokenizer's widths are base_channels * channel_multiplier (GroupNorm of 32 groups)
    "apertus1p5": {
        "audio_config": {"codebook_dim": 32, "codebook_size": 64},
        "vision_config": {
            "codebook_size": 64,
            "base_channels": 32,
            "latent_channels": 32,
            "embed_dim": 32,
            "channel_multiplier": [1, 1, 1, 1, 1],
            "num_res_blocks": 1,
        },
        "image_token_id": 100,
        "audio_token_id": 101,
        "image_token_offset": 200,
        "audio_token_offset": 264,
    },
    # bamba/configuration_bamba.py validate_architecture: mamba_n_heads divides
    # mamba_expand * hidden_size (2 * 32) and mamba_d_head * mamba_n_heads equals it
    # (one attention layer: a cache of mamba layers alone has no sequence length)
    "bamba": {
        "mamba_n_heads": 4,
        "mamba_d_head": 16,
        "mamba_d_state": 16,
        "attn_layer_indices": [1],
    },
    # blt/modeling_blt.py BltModel: the hash n-gram embedding has
    # len(encoder_hash_byte_group_size) * encoder_hash_byte_group_vocab rows (3M by default)
    "blt": {"encoder_hash_byte_group_vocab": 64},
    # chameleon/modeling_chameleon.py ChameleonImageVocabularyMapping reads
    # vocabulary_map["<image>"] (the default config has none); configuration_chameleon.py
    # ChameleonVQVAEConfig: the VQ-VAE's widths are base_channels * channel_multiplier, not
    # keys the generic shrink knows (GroupNorm of 32 groups: multiples of 32)
    "chameleon": {
        "vocabulary_map": {"<image>": 8},
        "vq_config": {
            **VQVAE,
            "latent_channels": 32,
            "embed_dim": 16,
            "num_embeddings": 64,
            "resolution": 32,
        },
    },
    # cohere_compass/configuration_cohere_compass.py: the vision tower's deepstack
    # indexes name its layers (2 once shrunk); rope_parameters as for the text model
    "cohere_compass": {
        "text_config": {
            "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}
        },
        "vision_config": {"deepstack_visual_indexes": [0, 1]},
    },
    # cohere_compass/modeling_cohere_compass.py CohereCompassRotaryEmbedding: one
    # rope_parameters entry per layer type (the default config leaves it empty)
    "cohere_compass_text": {
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        "eos_token_id": 2,
        "vocab_size": 512,
    },
    # cosmos3_edge/configuration_cosmos3_edge.py validate_architecture: mrope_section
    # sums to head_dim // 2 (8 // 2)
    "cosmos3_edge": {"text_config": {"rope_parameters": {"mrope_section": [2, 1, 1]}}},
    # dbrx/configuration_dbrx.py validate_architecture: "tie_word_embeddings is not
    # supported for DBRX models": DBRX declares no tie
    "dbrx": {"tie_word_embeddings": False, "attn_config": {"rope_theta": 10000.0}},
    # deepseek_ocr2/modeling_deepseek_ocr2.py DeepseekOcr2TextModel: one mlp_layer_types
    # entry per layer (the default config has none)
    "deepseek_ocr2": {
        "text_config": {"mlp_layer_types": ["dense", "sparse"], "num_experts_per_tok": 2}
    },
    # diffusion_gemma/modeling_diffusion_gemma.py DiffusionGemmaTextRouter: num_experts,
    # top_k_experts and moe_intermediate_size (None in the default config)
    "diffusion_gemma": {
        "text_config": {"num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 32}
    },
    # dory/configuration_dory.py validate_architecture: n_input_layers + n_recurrent_layers
    # + n_output_layers == num_hidden_layers; to_dict doubles the counts and interleaves
    # "mlp" in layer_types, __post_init__ halves them back (to 2 layers: 1 + 0 + 1)
    "dory": {
        "num_hidden_layers": 4,
        "layer_types": ["sliding_attention", "mlp", "full_attention", "mlp"],
        "n_input_layers": 2,
        "n_recurrent_layers": 0,
        "n_output_layers": 2,
    },
    # dots1/modeling_dots1.py Dots1Experts: n_routed_experts, num_experts_per_tok (None in
    # the default config)
    "dots1": {"n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2},
    # dots3_note/configuration_dots3_note.py validate_architecture: the vision adapter's
    # adapter_in_dim equals the vision hidden_size (the audio adapter's input the audio
    # hidden_size), both adapters' outputs the text hidden_size; the indexer's head as
    # the others
    "dots3_note": {
        "vision_config": {"adapter_in_dim": 32, "adapter_out_dim": 32},
        "audio_config": {"adapter_input_size": 32, "adapter_out_dim": 32},
        "text_config": {"index_head_dim": 16},
    },
    # emu3/modeling_emu3.py and configuration_emu3.py Emu3VQVAEConfig: as Chameleon's
    "emu3": {
        "vocabulary_map": {"<image>": 8},
        "vq_config": {
            **VQVAE,
            "codebook_size": 64,
            "attn_resolutions": [],
        },
    },
    # ernie4_5_vl_moe/modeling_ernie4_5_vl_moe.py Ernie4_5_VLMoeRotaryEmbedding: the three
    # mrope sections sum to head_dim // 2 (its default [22, 22, 20] is for head_dim 128),
    # height and width sections alike
    "ernie4_5_vl_moe": {
        "text_config": {
            "rope_parameters": {"mrope_section": [1, 1, 2]},
            "moe_num_experts": 4,
            "moe_k": 2,
            "moe_intermediate_size": [32, 32],
        }
    },
    # esm/configuration_esm.py: vocab_size and pad_token_id default to None (ESM-2's 33
    # tokens, padding 1)
    "esm": {"vocab_size": 33, "pad_token_id": 1, "mask_token_id": 32},
    "flaubert": {"emb_dim": 32, "n_heads": 4},  # flaubert/configuration_flaubert.py: the same
    # florence2/configuration_florence2.py Florence2VisionConfig: per-stage widths, heads,
    # groups and depths are lists (the generic shrink keeps lists)
    "florence2": {
        "vision_config": {
            "embed_dim": [16, 32, 32, 32],
            "num_heads": [1, 2, 2, 2],
            "num_groups": [1, 2, 2, 2],
            "depths": [1, 1, 1, 1],
            "projection_dim": 32,
        }
    },
    # gemma3n/configuration_gemma3n.py and modeling_gemma3n.py: the last
    # num_kv_shared_layers layers reuse earlier layers' caches, so both layer types
    # must come before them (15 shared of 35 by default; 2 layers keep none shared)
    "gemma3n_text": {
        "vocab_size_per_layer_input": 512,
        "hidden_size_per_layer_input": 16,
        "intermediate_size": [64, 64],
        "num_kv_shared_layers": 0,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "gemma4": {
        "text_config": {"vocab_size_per_layer_input": 512, "hidden_size_per_layer_input": 16}
    },
    # gemma4_assistant/configuration_gemma4_assistant.py validate_architecture: the
    # drafter has no per-layer inputs, no MoE block, no double-wide MLP, and shares the
    # cache of all its layers (its default config is refused: no per-layer-input width 0)
    "gemma4_assistant": {
        "text_config": {
            "hidden_size_per_layer_input": 0,
            "vocab_size_per_layer_input": 0,
            "enable_moe_block": False,
            "use_double_wide_mlp": False,
            "num_hidden_layers": 2,
            "num_kv_shared_layers": 2,
        }
    },
    # gemma4/configuration_gemma4.py Gemma4TextConfig: the per-layer input embedding is
    # vocab_size_per_layer_input x (num_hidden_layers * hidden_size_per_layer_input)
    "gemma4_text": {"vocab_size_per_layer_input": 512, "hidden_size_per_layer_input": 16},
    "gemma4_unified_assistant": {
        "text_config": {
            "num_kv_shared_layers": 0,
            "layer_types": ["sliding_attention", "full_attention"],
        }
    },
    # granite4_vision/modeling_granite4_vision.py Granite4VisionModel: one projector per
    # deepstack_layer_map (vision layer, LLM layer) pair, spatial_target_layers are LLM
    # layers, downsample_rate is "query/window" (all None by default);
    # configuration_granite4_vision.py: the Q-Former gets vision hidden_size // 64 heads
    "granite4_vision": {
        "downsample_rate": "2/4",
        "deepstack_layer_map": [[-1, 0], [-2, 1]],
        "spatial_target_layers": [0, 1, 0, 1],
        "vision_config": {"hidden_size": 64},
    },
    # granitemoehybrid/configuration_granitemoehybrid.py validate_architecture: as
    # Bamba's; one Mamba layer and one attention layer
    "granitemoehybrid": {
        "mamba_n_heads": 4,
        "mamba_d_head": 16,
        "mamba_d_state": 16,
        "layer_types": ["mamba", "attention"],
    },
    # hunyuan_v1_dense/modeling_hunyuan_v1_dense.py HunYuanDenseV1Attention: head_dim
    # (None in the default config)
    "hunyuan_v1_dense": {"head_dim": 8},
    "hunyuan_v1_moe": {"head_dim": 8},  # hunyuan_v1_moe/modeling_hunyuan_v1_moe.py: the same
    # hunyuan_vl/modeling_hunyuan_vl.py: the same, and configuration_hunyuan_vl.py: its
    # mrope sections (None by default) sum to head_dim // 2
    "hunyuan_vl": {
        "text_config": {"head_dim": 8, "rope_parameters": {"mrope_section": [1, 1, 1, 1]}}
    },
    # hy_v4_vl/configuration_hy_v4_vl.py validate_architecture: mrope_section sums to
    # qk_rope_head_dim // 2; the indexer's head as the others
    "hy_v4_vl": {
        "text_config": {
            "qk_rope_head_dim": 8,
            "index_head_dim": 16,
            "rope_parameters": {"mrope_section": [2, 1, 1]},
        }
    },
    # inkling2/configuration_inkling2.py validate_architecture: the vision tower projects
    # into text_config.hidden_size (vision_config.text_hidden_size); swa_head_dim as head_dim
    "inkling2": {"vision_config": {"text_hidden_size": 32}, "text_config": {"swa_head_dim": 8}},
    "inkling2_loop": {
        "vision_config": {"text_hidden_size": 32},
        "text_config": {"swa_head_dim": 8},
    },
    # janus/configuration_janus.py JanusVQVAEConfig: as Chameleon's, and its projection
    # into the language model's width
    "janus": {
        "vq_config": {
            "base_channels": 32,
            "channel_multiplier": [1, 2],
            "num_res_blocks": 1,
            "latent_channels": 32,
            "num_embeddings": 64,
            "projection_dim": 32,
            "image_token_embed_dim": 32,
        },
        "vision_config": {"projection_dim": 32},
    },
    # lfm2_moe/modeling_lfm2_moe.py Lfm2MoeDecoderLayer: one layer_types entry per layer
    # (None in the default config); one dense layer, one MoE
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    # longcat_flash/configuration_longcat_flash.py: expert and dense FFN widths have
    # their own keys (expert_ffn_hidden_size, ffn_hidden_size), as has zero_expert_num;
    # qk_head_dim (qk_nope_head_dim + qk_rope_head_dim) is stored, not derived, and the
    # rotary table is head_dim wide (modeling_longcat_flash.py): qk_rope_head_dim
    "longcat_flash": {
        "zero_expert_num": 2,
        "expert_ffn_hidden_size": 32,
        "ffn_hidden_size": 64,
        "qk_head_dim": 8,
        "head_dim": 4,
    },
    # luke/configuration_luke.py: the entity vocabulary (500k) and its embedding width
    "luke": {"entity_vocab_size": 64, "entity_emb_size": 32},
    # mamba2/configuration_mamba2.py validate_architecture: hidden_size * expand (64)
    # == num_heads * head_dim; n_groups divides num_heads
    "mamba2": {"num_heads": 8, "head_dim": 8, "n_groups": 2, "state_size": 16},
    # ministral/modeling_ministral.py MinistralAttention: head_dim (None by default)
    "ministral": {"head_dim": 8},
    # molmo2/configuration_molmo2.py validate_architecture: vision_feature_layer indexes
    # the vision tower's 2 layers; the adapter projects into the text hidden size
    "molmo2": {"adapter_config": {"vision_feature_layer": [-1, -2], "text_hidden_size": 32}},
    # nemo_speechlm/configuration_nemo_speechlm.py validate_architecture: the diarization
    # head's audio_hidden_size equals audio_config.hidden_size; mamba heads as the others
    "nemo_speechlm": {
        "audio_config": {"diarization_config": {"head_config": {"audio_hidden_size": 32}}},
        "text_config": {"mamba_head_dim": 8},
    },
    # nemotron/modeling_nemotron.py NemotronAttention: num_key_value_heads (None by default)
    "nemotron": {"num_key_value_heads": 2},
    # neomme/configuration_neomme.py: layer_types holds a full_attention layer
    # and its partial rotary factor (0.25) rotates a multiple of 4 dims of head_dim
    "neomme": {"layer_types": ["sliding_attention", "full_attention"], "head_dim": 16},
    # olmo_hybrid/configuration_olmo_hybrid.py validate_architecture: an attention layer;
    # the linear-attention heads as the others
    "olmo_hybrid": {
        "layer_types": ["linear_attention", "full_attention"],
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 16,
    },
    # perceiver/configuration_perceiver.py: latent width, count and self-attention depth
    "perceiver": {"d_latents": 64, "num_latents": 16, "num_self_attends_per_block": 2},
    # qwen3_5/configuration_qwen3_5.py: layer_types cut to 2 keeps two linear-attention
    # layers, whose cache alone has no sequence length: one of each; linear heads as others
    "qwen3_5": {"text_config": QWEN3_5_TEXT},
    "qwen3_5_moe": {"text_config": QWEN3_5_TEXT},
    "qwen3_5_moe_text": QWEN3_5_TEXT,
    "qwen3_5_text": QWEN3_5_TEXT,
    # qwen4_exp/configuration_qwen4_exp.py validate_architecture: an indexed-attention
    # layer beside the linear one (a cache of linear layers alone has no length) needs
    # the whole QSA indexer set (one key head, budget a multiple of the compress ratio,
    # index heads as wide as the rotary part)
    "qwen4_exp": {"text_config": QWEN4_EXP_TEXT},
    "qwen4_exp_text": QWEN4_EXP_TEXT,
    # reformer/modeling_reformer.py ReformerModelWithLMHead: is_decoder=True; and
    # axial_pos_embds_dim sums to hidden_size, axial_pos_shape multiplies to a multiple
    # of the chunk length
    "reformer": {"axial_pos_embds_dim": [16, 16]},
    "ReformerModelWithLMHead": {"is_decoder": True},
    # vibevoice_asr/configuration_vibevoice_asr.py: the tokenizer encoders' widths are
    # num_filters doubled at each of the downsampling stages (2048 by default)
    "vibevoice_asr": {
        "acoustic_tokenizer_encoder_config": {"num_filters": 2, "depths": [1] * 7},
        "semantic_tokenizer_encoder_config": {"num_filters": 2, "depths": [1] * 7},
    },
    # xlm/configuration_xlm.py: the width is emb_dim, the heads n_heads
    "xlm": {"emb_dim": 32, "n_heads": 4},
}


def merge(doc: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with ``over`` deep-merged into it (dicts merge, anything else replaces)."""
    out = dict(doc)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def tiny(doc: dict[str, Any], model_type: str, cls_name: str | None = None) -> dict[str, Any]:
    """The shrunk config ``doc`` of ``model_type`` with its hand-written overrides: those
    of the model type, then those of the class (``cls_name``) built from it."""
    doc = merge(doc, TINY.get(model_type, {}))
    return merge(doc, TINY.get(cls_name, {})) if cls_name else doc
