"""The pattern table's flag data: every ``when`` names a flag the table knows."""

from __future__ import annotations

from tiecli.arch import patterns


def test_every_when_is_always_or_a_known_flag() -> None:
    t = patterns.table()
    flags = set(patterns.tie_flags())
    assert flags == {"tie_word_embeddings"}
    rules = [r for rs in t["model_types"].values() for r in rs] + t["common"]
    rules += [r for cs in t["architectures"].values() for rs in cs.values() for r in rs]
    assert {r.get("when", "always") for r in rules} <= flags | {"always"}
    for model_type, own in t["model_type_defaults"].items():
        assert set(own) <= flags, model_type
        assert all(isinstance(v, bool) for v in own.values()), model_type


def test_flag_value_reads_levels_then_model_type_then_table() -> None:
    flag = "tie_word_embeddings"
    assert patterns.flag_value({"model_type": "llama", flag: True}, flag) is True
    assert patterns.flag_value({"model_type": "gpt2", "text_config": {flag: False}}, flag) is False
    assert patterns.flag_value({"model_type": "llama"}, flag) is False  # llama's default
    assert patterns.flag_value({"model_type": "gpt2"}, flag) is True
    assert patterns.flag_value({"model_type": "no-such-model"}, flag) is True  # the table's


def test_switched_off_names_the_flag_of_each_pair() -> None:
    cfg = {"model_type": "llama", "tie_word_embeddings": False}
    off = patterns.switched_off(["model.embed_tokens.weight"], cfg)
    assert [(p.alias, p.source, p.when) for p in off] == [
        ("lm_head.weight", "model.embed_tokens.weight", "tie_word_embeddings")
    ]
    assert (
        patterns.switched_off(["model.embed_tokens.weight"], {**cfg, "tie_word_embeddings": True})
        == []
    )
    assert patterns.flag_pairs(["model.embed_tokens.weight"], cfg) == [
        ("lm_head.weight", "model.embed_tokens.weight")
    ]
