"""The coverage walk's shrinker (tools/coverage.py ``_shrink``): a default config made tiny
keeps what its model needs to run — a layer of each kind, rotary sections that fit the
tiny head, consistent latent-attention widths — and leaves other configs as they were."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import coverage_walk


@pytest.fixture(scope="module")
def walk() -> Any:
    return coverage_walk("tiecli_shrink_walk")


def test_a_hybrid_model_keeps_one_layer_of_each_kind(walk: Any) -> None:
    kinds = ["linear_attention"] * 3 + ["full_attention"]
    doc = {
        "num_hidden_layers": 48,
        "layer_types": kinds * 12,
        "mlp_only_layers": [],
        "per_layer": [float(i) for i in range(48)],
    }
    out = walk._shrink(doc)
    assert out["num_hidden_layers"] == 2
    assert out["layer_types"] == ["linear_attention", "full_attention"]
    assert out["per_layer"] == [0.0, 3.0]  # every per-layer list takes the same layers
    assert out["mlp_only_layers"] == []


def test_three_kinds_keep_three_layers_and_per_layer_dicts_are_renumbered(walk: Any) -> None:
    types = ["conv", "conv", "full_attention", "conv", "sliding_attention"] * 4
    doc = {"num_hidden_layers": 20, "layer_types": types, "heads": {str(i): i for i in range(20)}}
    out = walk._shrink(doc)
    assert out["num_hidden_layers"] == 3
    assert out["layer_types"] == ["conv", "full_attention", "sliding_attention"]
    assert out["heads"] == {"0": 0, "1": 2, "2": 4}


def test_layer_kinds_the_first_two_layers_cover_are_cut_as_before(walk: Any) -> None:
    doc = {"num_hidden_layers": 26, "layer_types": ["sliding_attention", "full_attention"] * 13}
    assert walk._shrink(doc)["layer_types"] == ["sliding_attention", "full_attention"]
    same = {"num_hidden_layers": 24, "layer_types": ["full_attention"] * 24}
    assert walk._shrink(same) == {"num_hidden_layers": 2, "layer_types": ["full_attention"] * 2}
    # two of each kind (where one alone does not build), or the first two as before
    hybrid = {"num_hidden_layers": 8, "layer_types": ["linear_attention"] * 3 + ["full"] * 5}
    two = walk._shrink(hybrid, kinds=2)
    assert two["layer_types"] == ["linear_attention"] * 2 + ["full"] * 2
    assert two["num_hidden_layers"] == 4
    assert walk._shrink(hybrid, kinds=0)["layer_types"] == ["linear_attention"] * 2


def test_layer_ids_follow_the_layers_kept(walk: Any) -> None:
    types = ["mamba"] * 6 + ["hybrid"] + ["mamba"] * 5 + ["hybrid"]
    doc = {"num_hidden_layers": 13, "layers_block_type": types, "hybrid_layer_ids": [6, 12]}
    out = walk._shrink(doc)
    assert out["layers_block_type"] == ["mamba", "hybrid"]
    assert out["hybrid_layer_ids"] == [1]


def test_lists_of_layer_numbers_are_renumbered_and_label_tables_kept(walk: Any) -> None:
    doc = {
        "num_hidden_layers": 48,
        "layer_types": (["chunked_attention"] * 3 + ["full_attention"]) * 12,
        "moe_layers": list(range(48)),
        "no_rope_layers": ([1] * 3 + [0]) * 12,
        "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    }
    out = walk._shrink(doc)
    assert out["layer_types"] == ["chunked_attention", "full_attention"]
    assert out["moe_layers"] == [0, 1]  # both kept layers, renumbered
    assert out["no_rope_layers"] == [1, 0]  # a value per layer, taken
    assert out["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"}


def test_a_repeating_block_pattern_gets_layers_enough_for_each_kind(walk: Any) -> None:
    doc = {"num_hidden_layers": 26, "block_types": ["recurrent", "recurrent", "attention"]}
    out = walk._shrink(doc)
    assert out["num_hidden_layers"] == 3 and out["block_types"] == doc["block_types"]


def test_an_attention_period_beyond_the_tiny_count_lands_inside_it(walk: Any) -> None:
    doc = {
        "num_hidden_layers": 32,
        "attn_layer_period": 8,
        "attn_layer_offset": 4,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
    }
    out = walk._shrink(doc)
    assert (out["attn_layer_period"], out["attn_layer_offset"]) == (2, 1)
    assert (out["expert_layer_period"], out["expert_layer_offset"]) == (2, 1)


@pytest.mark.parametrize(
    ("rope", "extra", "model_type", "want"),
    [
        ({"rope_type": "default"}, {}, "qwen2_vl_text", [1, 2, 1]),  # the code's [16, 24, 24]
        ({"rope_type": "default", "mrope_section": [24, 20, 20]}, {}, "x", [2, 1, 1]),
        ({"rope_type": "default", "partial_rotary_factor": 0.5}, {}, "glm4v_moe_text", [0, 1, 1]),
        ({"rope_type": "default"}, {"head_dim": 128}, "glm4v_text", [1, 2, 1]),
    ],
)
def test_rotary_sections_sum_to_half_the_tiny_rotary_width(
    walk: Any, rope: dict[str, Any], extra: dict[str, Any], model_type: str, want: list[int]
) -> None:
    doc = {
        "model_type": model_type,
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "rope_parameters": rope,
        **extra,
    }
    out = walk._shrink(doc)
    assert out["rope_parameters"]["mrope_section"] == want
    head = out.get("head_dim") or out["hidden_size"] // out["num_attention_heads"]
    assert sum(want) == int(head * rope.get("partial_rotary_factor", 1.0)) // 2


def test_a_text_model_without_rotary_sections_gets_none(walk: Any) -> None:
    doc = {"model_type": "qwen2", "hidden_size": 4096, "num_attention_heads": 32}
    doc["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    assert "mrope_section" not in walk._shrink(doc)["rope_parameters"]


def test_latent_attention_widths_stay_consistent(walk: Any) -> None:
    doc = {
        "hidden_size": 7168,
        "num_attention_heads": 128,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128,
        "qk_head_dim": 192,
        "head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 256,
        "n_group": 8,
        "topk_group": 4,
    }
    out = walk._shrink(doc)
    assert out["head_dim"] == out["qk_rope_head_dim"] == 4
    assert out["qk_head_dim"] == out["qk_nope_head_dim"] + out["qk_rope_head_dim"]
    assert out["n_routed_experts"] % out["n_group"] == 0 and out["topk_group"] <= out["n_group"]


def test_counts_and_widths_derived_from_others_follow_them(walk: Any) -> None:
    rwkv = walk._shrink({"hidden_size": 4096, "attention_hidden_size": 4096})
    assert rwkv["attention_hidden_size"] == rwkv["hidden_size"] == 32
    zamba2 = walk._shrink(
        {
            "hidden_size": 2560,
            "num_attention_heads": 32,
            "attention_hidden_size": 5120,
            "attention_head_dim": 160,
            "mamba_expand": 2,
            "n_mamba_heads": 8,
            "mamba_headdim": 640,
        }
    )
    assert zamba2["attention_hidden_size"] == 64 and zamba2["attention_head_dim"] == 16
    assert zamba2["mamba_headdim"] * zamba2["n_mamba_heads"] == 2 * zamba2["hidden_size"]
    opt = walk._shrink({"hidden_size": 768, "word_embed_proj_dim": 768})
    assert opt["word_embed_proj_dim"] == 32
    hrm = walk._shrink({"num_hidden_layers": 128, "num_layers_per_stack": 16})
    assert hrm["num_layers_per_stack"] is None  # derived again from num_hidden_layers
    moe = walk._shrink({"n_routed_experts": 64, "num_experts_per_tok": None})
    assert moe["num_experts_per_tok"] == 2


def test_query_tokens_get_an_image_token_inside_the_tiny_vocabulary(walk: Any) -> None:
    out = walk._shrink({"num_query_tokens": 32, "image_token_index": None, "text_config": {}})
    assert out["image_token_index"] == walk.VOCAB - 1
    named = walk._shrink({"num_query_tokens": 32, "image_token_index": 7})
    assert named["image_token_index"] == 7


def test_shrunk_default_configs_build_models_that_run(walk: Any) -> None:
    """Three default configs the old shrinker made unrunnable, each in well under a second."""
    import torch
    import transformers

    from tiecli.forward.check import call
    from tiecli.forward.inputs import example_input

    for model_type, cls in (
        ("qwen3_next", "Qwen3NextForCausalLM"),
        ("deepseek_v3", "DeepseekV3ForCausalLM"),
        ("recurrent_gemma", "RecurrentGemmaForCausalLM"),
    ):
        model = walk.build(cls, walk.tiny_config(model_type))
        assert transformers.__version__  # built by the installed transformers
        args, kwargs = example_input(model, None, torch.device("cpu"))
        with torch.no_grad():
            out, _ = call(model, args, kwargs, seeded=True)
        assert torch.isfinite(out.logits).all(), model_type
