"""What each consumer loads (tiecli.consumers.evaluate) and the problems judged from it
(judge), on tie pairs built by hand: the shipped table, and small tables of our own."""

from __future__ import annotations

from typing import Any

import pytest

from tiecli.consumers import ConsumerLoad, Pair, evaluate, judge

HEAD, EMB = "lm_head.weight", "model.embed_tokens.weight"
TIED = {"model_type": "llama", "tie_word_embeddings": True}
UNTIED = {"model_type": "llama", "tie_word_embeddings": False}

ABSENT = Pair(HEAD, EMB, alias_stored=False, source_stored=True, equal=False)
EQUAL = Pair(HEAD, EMB, alias_stored=True, source_stored=True, equal=True)
DIFFER = Pair(HEAD, EMB, alias_stored=True, source_stored=True, equal=False)


def loads(found: list[ConsumerLoad]) -> dict[str, dict[str, str]]:
    return {c.name: c.loads for c in found if c.applies}


def codes(pairs: list[Pair], found: list[ConsumerLoad]) -> list[str]:
    return sorted(p.code for p in judge(pairs, found))


def test_pair_situations() -> None:
    assert [p.situation for p in (ABSENT, EQUAL, DIFFER)] == [
        "alias_absent",
        "both_equal",
        "both_differ",
    ]
    assert Pair(HEAD, EMB, True, False, False).situation == "source_absent"
    padded = Pair(HEAD, EMB, True, True, False, padded=True, short_vocab=True)
    assert (padded.situation, padded.rule) == ("padded", "padded_short_vocab")


# -- the shipped table ------------------------------------------------------------------


def test_a_tied_config_without_the_head_loads_the_embedding_everywhere() -> None:
    found = evaluate([ABSENT], TIED, "safetensors")
    assert {c: v[HEAD] for c, v in loads(found).items()} == dict.fromkeys(
        ["transformers-4", "transformers-5", "vllm", "mlx-lm", "llama.cpp"], "source"
    )
    assert judge([ABSENT], found) == []


def test_an_untied_config_without_the_head_is_a_bad_load_and_a_disagreement() -> None:
    found = evaluate([ABSENT], UNTIED, "safetensors")
    got = loads(found)
    assert got["transformers-4"][HEAD] == "random"
    assert got["vllm"][HEAD] == "uninitialized"
    assert set(got["mlx-lm"].values()) == {"refuses"}  # a refusal covers every tensor
    assert got["llama.cpp"][HEAD] == "source"  # it reads no flag
    problems = judge([ABSENT], found)
    bad = [p for p in problems if p.code == "consumer-bad-load"]
    assert len(bad) == 4 and all(p.tensors == [HEAD, EMB] for p in bad)
    assert any("mlx-lm" in p.message and "refuse" in p.message for p in bad)
    assert [p.code for p in problems].count("consumers-disagree") == 1


def test_a_head_that_differs_under_a_tied_config_splits_the_consumers() -> None:
    found = evaluate([DIFFER], TIED, "safetensors")
    got = loads(found)
    assert got["transformers-4"][HEAD] == "source" and got["transformers-5"][HEAD] == "stored"
    (p,) = judge([DIFFER], found)
    assert p.code == "consumers-disagree" and p.tensors == [HEAD, EMB]
    assert "transformers-4" in p.message and "transformers-5" in p.message


@pytest.mark.parametrize(("pair", "config"), [(DIFFER, UNTIED), (EQUAL, TIED), (ABSENT, TIED)])
def test_consistent_checkpoints_raise_nothing(pair: Pair, config: dict[str, Any]) -> None:
    for fmt in ("safetensors", "pytorch"):
        assert judge([pair], evaluate([pair], config, fmt)) == []


def test_a_consumer_that_reads_no_pickles_does_not_apply_to_one() -> None:
    found = {c.name: c for c in evaluate([ABSENT], UNTIED, "pytorch")}
    assert found["mlx-lm"].applies is False and found["mlx-lm"].loads == {}
    assert found["mlx-lm"].notes == ["reads only safetensors checkpoints"]
    assert "mlx-lm" not in " ".join(p.message for p in judge([ABSENT], list(found.values())))


def test_a_tie_no_flag_governs_loads_what_is_stored() -> None:
    free = Pair("b", "a", True, True, False, governed=False)
    assert all(
        v == {"b": "stored", "a": "stored"}
        for v in loads(evaluate([free], TIED, "safetensors")).values()
    )


# -- tables of our own: the rules' mechanics --------------------------------------------


def rule(**changes: Any) -> dict[str, Any]:
    base = {
        "name": "demo",
        "versions": "1.x",
        "reads": ["safetensors"],
        "source": [{"repo": "o/r", "path": "load.py", "symbol": "load"}],
        "flag": {"read": "nested-first", "nested": ["text_config"], "default": True},
        "situations": {
            "alias_absent": {"tied": {"alias": "source"}, "untied": {"alias": "random"}},
            "both_differ": {"refuses": True, "note": "fails on load"},
        },
    }
    return {**base, **changes}


def test_nested_first_reads_the_text_config_before_the_top_level() -> None:
    config = {"tie_word_embeddings": True, "text_config": {"tie_word_embeddings": False}}
    (c,) = evaluate([ABSENT], config, "safetensors", [rule()])
    assert c.tied is False and c.loads == {HEAD: "random", EMB: "stored"}
    (c,) = evaluate([ABSENT], {"text_config": {}}, "safetensors", [rule()])
    assert c.tied is True and c.loads[HEAD] == "source"  # the default


def test_any_reads_a_flag_set_at_any_level() -> None:
    config = {"tie_word_embeddings": False, "text_config": {"tie_word_embeddings": True}}
    any_level = {"read": "any", "nested": ["text_config"], "default": False}
    (c,) = evaluate([ABSENT], config, "safetensors", [rule(flag=any_level)])
    assert c.tied is True and c.loads[HEAD] == "source"


def test_a_refusal_turns_every_load_into_refuses_and_keeps_the_note() -> None:
    (c,) = evaluate([DIFFER, Pair("x", "y", True, True, True)], TIED, "safetensors", [rule()])
    assert (
        c.refuses and set(c.loads.values()) == {"refuses"} and set(c.loads) == {HEAD, EMB, "x", "y"}
    )
    assert c.notes == ["fails on load"]
    (p,) = judge([DIFFER], [c])
    assert p.code == "consumer-bad-load" and "demo (1.x) would refuse" in p.message
    assert "fails on load" in p.message


def test_the_worst_outcome_of_a_tensor_in_two_pairs_wins() -> None:
    pairs = [ABSENT, Pair(HEAD, "other.weight", True, True, True, governed=False)]
    (c,) = evaluate(pairs, {"tie_word_embeddings": False}, "safetensors", [rule()])
    assert c.loads[HEAD] == "random"


def test_two_consumers_that_agree_raise_nothing_and_a_third_that_differs_does() -> None:
    one, two = rule(name="one"), rule(name="two")
    assert judge([ABSENT], evaluate([ABSENT], TIED, "safetensors", [one, two])) == []
    flips = {"alias_absent": {"tied": {"alias": "random"}, "untied": {"alias": "random"}}}
    three = rule(name="three", situations=flips)
    found = evaluate([ABSENT], TIED, "safetensors", [one, two, three])
    assert codes([ABSENT], found) == ["consumer-bad-load", "consumers-disagree"]
    (d,) = [p for p in judge([ABSENT], found) if p.code == "consumers-disagree"]
    assert "random values in three" in d.message and "one, two" in d.message


def test_an_unknown_outcome_in_the_table_is_an_error() -> None:
    bad = {"alias_absent": {"alias": "sometimes"}}
    with pytest.raises(ValueError, match="unknown outcome"):
        evaluate([ABSENT], TIED, "safetensors", [rule(situations=bad)])
