"""Architecture coverage: declared ties in the names the file uses, with and without transformers.

The full walk is ``tools/coverage.py`` (its table: docs/coverage.md, its data:
docs/coverage.json); these tests run a fast subset of it, check the pattern table
finds the walk's ties from config.json alone for the most downloaded tied
architectures, and check a file written in the model's own names is read in those.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, coverage_walk

from tiecli import api

WALK = json.loads((ROOT / "docs" / "coverage.json").read_text(encoding="utf-8"))
ROWS = {(r["model_type"], r["class"]): r for r in WALK["rows"]}


def _walker() -> Any:
    return coverage_walk()


# A handful of the walk, run in CI: a renamed head (GPT-NeoX), a vision-language model
# whose file keeps transformers 4 names (Llava), an encoder-decoder with three aliases
# (T5), a masked-LM head with a tied bias (BERT), a plain decoder (Qwen2), a model whose
# forward needs a run without the attention mask (Qwen3-Omni's thinker) and one whose
# position tables are never saved (Marian).
FAST = [
    ("gpt_neox", "GPTNeoXForCausalLM"),
    ("llava", "LlavaForConditionalGeneration"),
    ("t5", "T5ForConditionalGeneration"),
    ("bert", "BertForMaskedLM"),
    ("qwen2", "Qwen2ForCausalLM"),
    ("qwen3_omni_moe_thinker", "Qwen3OmniMoeThinkerForConditionalGeneration"),
    ("marian", "MarianMTModel"),
]
ON_DISK = {
    "GPTNeoXForCausalLM": {"embed_out.weight": "gpt_neox.embed_in.weight"},
    "LlavaForConditionalGeneration": {
        "language_model.lm_head.weight": "language_model.model.embed_tokens.weight"
    },
}

# The most downloaded tied architectures (tools/coverage.py TOP, listed in
# docs/coverage.md): the transformers-free path must find their ties from config.json.
TOP = _walker().TOP


@pytest.mark.parametrize(("model_type", "cls"), FAST, ids=[c for c, _ in FAST])
def test_a_tiny_architecture_passes_every_check_in_its_on_disk_names(
    tmp_path: Path, model_type: str, cls: str
) -> None:
    walk = _walker()
    row = walk.check(model_type, cls, tmp_path)
    assert "skip" not in row, row.get("skip")
    assert row["checks"] == {c: "ok" for c in walk.CHECKS}, row.get("trace")
    if cls in ON_DISK:
        assert row["ties"] == ON_DISK[cls]
    import transformers

    if WALK["transformers"] == transformers.__version__:
        assert row["ties"] == ROWS[model_type, cls]["ties"]  # the committed walk is this one'


def test_the_top_architectures_are_in_the_walk_and_pass_it() -> None:
    assert len(TOP) >= 40
    missing = [c for c in TOP if c not in ROWS]
    assert missing == []
    for model_type, cls in TOP:
        row = ROWS[model_type, cls]
        assert row.get("ties"), f"{cls} declares no tie in the walk"
        naming = {c: row["checks"][c] for c in ("inspect", "inspect-bin", "untie", "verify")}
        assert naming == dict.fromkeys(naming, "ok"), cls


def _sources_only(folder: Path, model_type: str, cls: str, ties: dict[str, str]) -> Path:
    """A save_pretrained-like folder: config.json and each tie's source, aliases left out."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config = {"model_type": model_type, "architectures": [cls], "tie_word_embeddings": True}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    tensors = {s: torch.full((4, 4), float(i)) for i, s in enumerate(sorted(set(ties.values())))}
    tensors["some.other.weight"] = torch.zeros(2)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


FREE = """
import json, sys
sys.modules["transformers"] = None
from tiecli import api
out = {}
for folder in sys.argv[1:]:
    r = api.inspect(folder)
    out[folder] = {"by": r.declared_by, "ties": sorted([t.alias, t.source] for t in r.ties)}
print(json.dumps(out))
"""


def test_without_transformers_the_table_finds_the_walks_ties_from_config_json(
    tmp_path: Path,
) -> None:
    folders = {}
    for model_type, cls in TOP:
        ties = ROWS[model_type, cls]["ties"]
        folders[str(_sources_only(tmp_path / cls, model_type, cls, ties))] = ties
    env = {**os.environ, "TIECLI_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-c", FREE, *folders],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    wrong = {}
    for folder, ties in folders.items():
        want = sorted([a, s] for a, s in ties.items())
        if got[folder]["ties"] != want or got[folder]["by"] != "pattern table":
            wrong[Path(folder).name] = (got[folder], want)
    assert wrong == {}


def test_a_file_in_the_models_own_names_is_read_in_those(tmp_path: Path) -> None:
    """save_pretrained writes GPT-NeoX's head as embed_out.weight; a plain state_dict()
    keeps lm_head.weight. Each file's tie is found in its own names, and dedupe then
    untie restores the head under the name that file uses."""
    import torch
    from safetensors.torch import save_file
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config)
    disk = tmp_path / "save_pretrained"
    model.save_pretrained(disk)
    memory = tmp_path / "state_dict"
    memory.mkdir()
    (memory / "config.json").write_text((disk / "config.json").read_text())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(state, str(memory / "model.safetensors"))  # the head as its own copy

    for folder, head in ((disk, "embed_out.weight"), (memory, "lm_head.weight")):
        ties = {(t.alias, t.source) for t in api.inspect(folder).ties}
        assert ties == {(head, "gpt_neox.embed_in.weight")}, folder.name
        deduped = tmp_path / f"{folder.name}-deduped"
        api.dedupe(folder, deduped)
        out = api.untie(deduped, tmp_path / f"{folder.name}-untied")
        assert [t.alias for t in out.restored] == [head], folder.name


def _resume(
    walk: Any, tmp_path: Path, old: list[dict[str, Any]], only: str, died_in: Any = None
) -> tuple[Path, list[dict[str, Any]]]:
    """``--only ONLY --resume`` over an earlier walk that wrote ``old`` (and, with
    ``died_in``, whose process died inside that row): the report and its rows."""
    out = tmp_path / "walk.md"
    state = {"transformers": "x", "rows": old}
    out.with_suffix(".json").write_text(json.dumps(state), encoding="utf-8")
    if died_in is not None:
        out.with_suffix(".current").write_text(json.dumps(list(died_in)), encoding="utf-8")
    walk.main(["--only", only, "--resume", "--out", str(out)])
    return out, json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))["rows"]


def _fake_check(calls: list[tuple[str, str]]) -> Any:
    def check(model_type: str, cls: str, work: Path, timeout: int = 240) -> dict[str, Any]:
        calls.append((model_type, cls))
        return {"model_type": model_type, "class": cls, "skip": "re-run", "seconds": 0.0}

    return check


SHARED = "Gemma3ForConditionalGeneration"  # named by both gemma3 and shieldgemma2


def _faked(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[tuple[str, str]]]:
    """The walk with ``check`` recording the rows it is asked for instead of running them."""
    walk = _walker()
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(walk, "check", _fake_check(calls))
    return walk, calls


def test_only_with_resume_reruns_the_named_row_in_place_keyed_by_model_type(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    walk, calls = _faked(monkeypatch)
    old = [
        {"model_type": "gemma3", "class": SHARED, "skip": "old gemma3", "seconds": 1},
        {"model_type": "bert", "class": "BertForMaskedLM", "skip": "old bert", "seconds": 1},
        {"model_type": "shieldgemma2", "class": SHARED, "skip": "old shield", "seconds": 1},
    ]
    out, rows = _resume(walk, tmp_path, old, "shieldgemma2")
    assert calls == [("shieldgemma2", SHARED)]
    assert [(r["model_type"], r["skip"]) for r in rows] == [
        ("gemma3", "old gemma3"),
        ("bert", "old bert"),
        ("shieldgemma2", "re-run"),
    ]
    assert "old gemma3" in out.read_text(encoding="utf-8")


def test_only_a_class_name_with_resume_reruns_each_model_type_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    walk, calls = _faked(monkeypatch)
    old = [
        {"model_type": "shieldgemma2", "class": SHARED, "skip": "old shield", "seconds": 1},
        {"model_type": "bert", "class": "BertForMaskedLM", "skip": "old bert", "seconds": 1},
    ]
    _out, rows = _resume(walk, tmp_path, old, f"{SHARED},BertForMaskedLM")
    assert sorted(calls) == [
        ("bert", "BertForMaskedLM"),
        ("gemma3", SHARED),
        ("shieldgemma2", SHARED),
    ]
    assert [(r["model_type"], r["skip"]) for r in rows] == [
        ("shieldgemma2", "re-run"),
        ("bert", "re-run"),
        ("gemma3", "re-run"),
    ]


def test_a_crash_found_on_resume_replaces_its_row_and_is_not_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    walk, calls = _faked(monkeypatch)
    old = [
        {"model_type": "gemma3", "class": SHARED, "skip": "old gemma3", "seconds": 1},
        {"model_type": "shieldgemma2", "class": SHARED, "skip": "old shield", "seconds": 1},
    ]
    # the last run died inside shieldgemma2: it is recorded, in its row's place, not re-run
    died_in = ("shieldgemma2", SHARED)
    out, rows = _resume(walk, tmp_path, old, "gemma3,shieldgemma2", died_in)
    assert calls == [("gemma3", SHARED)]
    assert rows[0]["skip"] == "re-run"
    assert rows[1]["skip"].startswith("the walk's process died")
    assert len(rows) == 2
    assert not out.with_suffix(".current").exists()


# Architectures the generic shrink cannot build, built with tools/tiny_configs.py: a
# mamba mixer whose heads must fill its width, a sub-config width (XLM's emb_dim), a
# class-keyed override (Reformer's LM head needs is_decoder), a default config its own
# checks refuse (Gemma 4's assistant), and a causal-LM class of a composite model type
# built on its text sub-config (Llama 4).
HAND_WRITTEN = [
    ("mamba2", "Mamba2ForCausalLM", {"lm_head.weight": "backbone.embeddings.weight"}),
    ("xlm", "XLMWithLMHeadModel", {"pred_layer.proj.weight": "transformer.embeddings.weight"}),
    ("reformer", "ReformerModelWithLMHead", {}),
    (
        "gemma4_assistant",
        "Gemma4AssistantForCausalLM",
        {"lm_head.weight": "model.embed_tokens.weight"},
    ),
    ("llama4", "Llama4ForCausalLM", {"lm_head.weight": "model.embed_tokens.weight"}),
]


@pytest.mark.parametrize(
    ("model_type", "cls", "ties"), HAND_WRITTEN, ids=[c for _, c, _ in HAND_WRITTEN]
)
def test_a_hand_written_tiny_config_builds_the_architecture_small(
    model_type: str, cls: str, ties: dict[str, str]
) -> None:
    walk = _walker()
    model = walk.build(cls, walk.tiny_config(model_type, cls_name=cls))
    assert type(model).__name__ == cls
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert walk.memory_ties(model) == ties


@pytest.mark.parametrize(
    ("model_type", "cls"),
    [("gemma4_text", "Gemma4ForCausalLM"), ("mamba2", "Mamba2ForCausalLM")],
    ids=["Gemma4ForCausalLM", "Mamba2ForCausalLM"],
)
def test_an_architecture_built_from_a_hand_written_config_passes_every_check(
    tmp_path: Path, model_type: str, cls: str
) -> None:
    walk = _walker()
    row = walk.check(model_type, cls, tmp_path)
    assert "skip" not in row, row.get("skip")
    assert row["checks"] == {c: "ok" for c in walk.CHECKS}, row.get("trace")
    assert row["ties"] == {"lm_head.weight": HAND_WRITTEN_TIES[model_type]}


HAND_WRITTEN_TIES = {
    "gemma4_text": "model.embed_tokens.weight",
    "mamba2": "backbone.embeddings.weight",
}


def test_the_tiny_config_overrides_merge_into_sub_configs() -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    import tiny_configs

    doc = {"a": 1, "text_config": {"b": 2, "c": {"d": 3}}}
    over = {"text_config": {"c": {"e": 4}, "b": 5}, "f": [1]}
    assert tiny_configs.merge(doc, over) == {
        "a": 1,
        "text_config": {"b": 5, "c": {"d": 3, "e": 4}},
        "f": [1],
    }
    assert doc == {"a": 1, "text_config": {"b": 2, "c": {"d": 3}}}
    shrunk = tiny_configs.tiny({"is_decoder": False}, "reformer", "ReformerModelWithLMHead")
    assert shrunk["is_decoder"] is True and shrunk["axial_pos_embds_dim"] == [16, 16]
    assert (
        tiny_configs.tiny({"is_decoder": False}, "reformer", "ReformerForMaskedLM")["is_decoder"]
        is False
    )


def test_a_class_built_on_a_sub_config_gives_the_table_rules_of_that_model_type() -> None:
    walk = _walker()

    def row(model_type: str, cls: str, ties: dict[str, str], **more: Any) -> dict[str, Any]:
        return {
            "model_type": model_type,
            "class": cls,
            "ties": ties,
            "checks": {"inspect": "ok"},
            **more,
        }

    rows = [
        row("llama4", "Llama4ForConditionalGeneration", {"a.lm_head.weight": "a.embed.weight"}),
        row(
            "llama4",
            "Llama4ForCausalLM",
            {"lm_head.weight": "embed.weight"},
            config_model_type="llama4_text",
        ),
    ]
    by_type, by_class, _ = walk.pattern_rules(rows)
    assert [r["alias"] for r in by_type["llama4"]] == ["a.lm_head.weight"]
    assert [r["alias"] for r in by_type["llama4_text"]] == ["lm_head.weight"]
    assert by_class == {}


def test_a_block_shared_across_layer_positions_stays_out_of_the_table() -> None:
    """Zamba's shared block, tied from one layer to another, depends on the real layer
    count; the same-index pairs of two stacks (an encoder's layer i and a decoder's) and
    the head stay in."""
    walk = _walker()
    ties = {
        "lm_head.weight": "model.embed_tokens.weight",
        "model.layers.3.shared.q.weight": "model.layers.2.shared.q.weight",
        "model.encoder.layers.0.q.weight": "model.decoder.layers.0.q.weight",
    }
    row = {"model_type": "toy", "class": "ToyForCausalLM", "ties": ties}
    by_type, _, _ = walk.pattern_rules([row | {"checks": {"inspect": "ok"}}])
    assert [r["alias"] for r in by_type["toy"]] == [
        "lm_head.weight",
        "model.encoder.layers.0.q.weight",
    ]
