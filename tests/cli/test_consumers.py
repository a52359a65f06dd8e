"""What each consumer loads: the rules (data/consumers.json), padded ties, nested
tie flags, and how inspect and verify report them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FORMS, MODELS, fixture_path, model_folder, small_tensor
from safetensors.torch import save_file
from typer.testing import CliRunner

import tiecli
from tiecli import consumer_choice, consumers
from tiecli.cli import app

runner = CliRunner()
NAMES = ["transformers-4", "transformers-5", "vllm", "mlx-lm", "llama.cpp"]
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
V_EMB, V_HEAD = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"
LLAMA = {"model_type": "llama", "hidden_size": 4, "vocab_size": 10}


_t = small_tensor
_folder = model_folder


def _case(tmp_path: Path, name: str) -> Path:
    """The situations consumers resolve differently, each built here."""
    e, h = _t(0), _t(1)
    d = tmp_path / name
    if name == "head-differs":  # config tied, the stored head trained untied
        return _folder(d, LLAMA | {"tie_word_embeddings": True}, {EMB: e, HEAD: h})
    if name == "head-differs-bin":
        return _folder(d, LLAMA | {"tie_word_embeddings": True}, {EMB: e, HEAD: h}, "bin")
    if name == "untied-head-absent":
        return _folder(d, LLAMA | {"tie_word_embeddings": False}, {EMB: e})
    if name == "only-head":  # the MobileLLM case
        return _folder(d, LLAMA | {"tie_word_embeddings": True}, {HEAD: h})
    if name == "only-head-bin":
        return _folder(d, LLAMA | {"tie_word_embeddings": True}, {HEAD: h}, "bin")
    if name == "padded":  # 12 embedding rows (vocab_size), the head's 10 equal to the first 10
        padded = torch.cat([e, _t(2, rows=2)])
        cfg = LLAMA | {"vocab_size": 12, "tie_word_embeddings": True}
        return _folder(d, cfg, {EMB: padded, HEAD: e.clone()})
    if name == "nested-only":  # the flag only in text_config; the head differs
        cfg = {"model_type": "llava", "text_config": LLAMA | {"tie_word_embeddings": True}}
        return _folder(d, cfg, {V_EMB: e, V_HEAD: h})
    if name == "nested-disagree":  # tied on top, untied in text_config; no head stored
        cfg = {
            "model_type": "llava",
            "tie_word_embeddings": True,
            "text_config": LLAMA | {"tie_word_embeddings": False},
        }
        return _folder(d, cfg, {V_EMB: e})
    if name == "healthy":
        return _folder(d, LLAMA | {"tie_word_embeddings": True}, {EMB: e, HEAD: e.clone()})
    raise AssertionError(name)


# Each consumer's outcome per tensor, as the observed behaviours describe them.
EXPECTED: dict[str, dict[str, dict[str, str]]] = {
    "head-differs": {
        "transformers-4": {HEAD: "source", EMB: "stored"},
        "transformers-5": {HEAD: "stored", EMB: "stored"},
        "vllm": {HEAD: "stored", EMB: "stored"},
        "mlx-lm": {HEAD: "source", EMB: "stored"},
        "llama.cpp": {HEAD: "stored", EMB: "stored"},
    },
    "head-differs-bin": {
        "transformers-4": {HEAD: "source", EMB: "stored"},
        "transformers-5": {HEAD: "stored", EMB: "stored"},
        "vllm": {HEAD: "source", EMB: "stored"},
        "mlx-lm": {},  # reads safetensors only: left out
        "llama.cpp": {HEAD: "stored", EMB: "stored"},
    },
    "untied-head-absent": {
        "transformers-4": {HEAD: "random", EMB: "stored"},
        "transformers-5": {HEAD: "random", EMB: "stored"},
        "vllm": {HEAD: "uninitialized", EMB: "stored"},
        "mlx-lm": {HEAD: "refuses", EMB: "refuses"},
        "llama.cpp": {HEAD: "source", EMB: "stored"},
    },
    "only-head": {
        "transformers-4": {HEAD: "refuses", EMB: "refuses"},
        "transformers-5": {HEAD: "stored", EMB: "source"},
        # vLLM 0.32 unties (a safetensors checkpoint stores lm_head): the embedding stays empty
        "vllm": {HEAD: "stored", EMB: "uninitialized"},
        "mlx-lm": {HEAD: "refuses", EMB: "refuses"},
        "llama.cpp": {HEAD: "refuses", EMB: "refuses"},
    },
    "only-head-bin": {  # a .bin is not looked into: vLLM keeps the tie and its loader fails
        "transformers-4": {HEAD: "refuses", EMB: "refuses"},
        "transformers-5": {HEAD: "stored", EMB: "source"},
        "vllm": {HEAD: "refuses", EMB: "refuses"},
        "mlx-lm": {},  # reads safetensors only: left out
        "llama.cpp": {HEAD: "refuses", EMB: "refuses"},
    },
    "padded": {
        "transformers-4": {HEAD: "refuses", EMB: "refuses"},
        "transformers-5": {HEAD: "refuses", EMB: "refuses"},
        "vllm": {HEAD: "refuses", EMB: "refuses"},
        "mlx-lm": {HEAD: "source", EMB: "stored"},  # logits from the padded embedding
        "llama.cpp": {HEAD: "refuses", EMB: "refuses"},
    },
    "nested-only": {
        "transformers-4": {V_HEAD: "source", V_EMB: "stored"},
        "transformers-5": {V_HEAD: "stored", V_EMB: "stored"},
        "vllm": {V_HEAD: "stored", V_EMB: "stored"},
        "mlx-lm": {V_HEAD: "source", V_EMB: "stored"},
        "llama.cpp": {V_HEAD: "stored", V_EMB: "stored"},
    },
    "nested-disagree": {
        "transformers-4": {V_HEAD: "random", V_EMB: "stored"},  # reads text_config only
        "transformers-5": {V_HEAD: "source", V_EMB: "stored"},  # any level that ties
        "vllm": {V_HEAD: "source", V_EMB: "stored"},
        "mlx-lm": {V_HEAD: "refuses", V_EMB: "refuses"},  # text_config: untied, no head
        "llama.cpp": {V_HEAD: "source", V_EMB: "stored"},  # reads no flag
    },
}


def _loads(doc: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["name"]: c["loads"] for c in doc["consumers"]}


def _codes(doc: dict[str, Any]) -> set[str]:
    """Problem codes, with those folded into another problem about the same tensors."""
    out = set()
    for p in doc["problems"]:
        out.add(p["code"])
        out |= {r["code"] for r in p.get("consumers", [])}
    return out


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_each_consumer_outcome(tmp_path: Path, case: str, no_transformers: None) -> None:
    r = runner.invoke(app, ["inspect", "--json", str(_case(tmp_path, case))])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [c["name"] for c in doc["consumers"]] == NAMES
    assert _loads(doc) == EXPECTED[case]
    assert doc["consumers_agree"] is False


@pytest.mark.parametrize(
    ("case", "codes"),
    [
        ("head-differs", {"consumers-disagree"}),
        ("head-differs-bin", {"consumers-disagree"}),
        ("untied-head-absent", {"consumer-bad-load", "consumers-disagree"}),
        ("only-head", {"consumer-bad-load", "consumers-disagree"}),
        ("padded", {"consumer-bad-load"}),
        ("nested-only", {"consumers-disagree"}),
        ("nested-disagree", {"consumer-bad-load", "consumers-disagree"}),
    ],
)
def test_verify_names_what_consumers_do(
    tmp_path: Path, case: str, codes: set[str], no_transformers: None
) -> None:
    r = runner.invoke(app, ["verify", "--strict", "--json", str(_case(tmp_path, case))])
    doc = json.loads(r.stdout)
    assert r.exit_code == 1 and doc["ok"] is False
    assert codes <= _codes(doc)
    assert [c["name"] for c in doc["checkpoints"][0]["consumers"]] == NAMES


def test_a_disagreement_no_other_check_sees_fails_verify(
    tmp_path: Path, no_transformers: None
) -> None:
    path = _case(tmp_path, "nested-disagree")
    r = runner.invoke(app, ["verify", "--json", str(path)])
    doc = json.loads(r.stdout)
    assert r.exit_code == 1
    top = {p["code"]: p for p in doc["problems"]}
    assert {"consumer-bad-load", "consumers-disagree"} <= set(top)
    bad = [p["message"] for p in doc["problems"] if p["code"] == "consumer-bad-load"]
    assert any(m.startswith("transformers-4") and "randomly" in m for m in bad)
    assert any(m.startswith("mlx-lm") and "refuse" in m for m in bad)
    assert top["consumers-disagree"]["tensors"] == sorted([V_EMB, V_HEAD])


@pytest.mark.parametrize(
    ("only", "code"),
    [
        ("llama.cpp", 0),
        ("transformers-5,vllm", 0),
        ("transformers>=5", 0),
        ("transformers<5", 1),
        ("transformers", 1),
        ("vllm,mlx-lm", 1),
        ("transformers>=4.40,<5,llama.cpp", 1),
    ],
)
def test_verify_for_limits_the_consumers(
    tmp_path: Path, only: str, code: int, no_transformers: None
) -> None:
    path = _case(tmp_path, "nested-disagree")
    r = runner.invoke(app, ["verify", "--for", only, "--json", str(path)])
    assert r.exit_code == code, r.output
    doc = json.loads(r.stdout)
    assert doc["for"] == only
    checked = [c["name"] for c in doc["checkpoints"][0]["consumers"]]
    assert checked == [n for n in NAMES if n in checked] and checked
    if only == "transformers<5":
        assert checked == ["transformers-4"]


@pytest.mark.parametrize("only", ["exllama", "transformers>=7", "vllm<<1", ""])
def test_verify_for_rejects_unknown_consumers(tmp_path: Path, only: str) -> None:
    path = _case(tmp_path, "healthy")
    r = runner.invoke(app, ["verify", "--for", only, str(path)])
    assert r.exit_code == 2
    assert r.output.startswith("Error: --for")


def test_healthy_checkpoint_passes_and_agrees(tmp_path: Path, no_transformers: None) -> None:
    path = _case(tmp_path, "healthy")
    r = runner.invoke(app, ["verify", "--strict", "--json", str(path)])
    assert r.exit_code == 0 and json.loads(r.stdout)["problems"] == []
    doc = json.loads(runner.invoke(app, ["inspect", "--json", str(path)]).stdout)
    assert doc["consumers_agree"] is True and doc["consumer_problems"] == []
    for c in doc["consumers"]:
        assert set(c) >= {"name", "versions", "loads", "notes", "source"}
        assert set(c["loads"]) == {HEAD, EMB}
        assert c["loads"][EMB] == "stored" and c["loads"][HEAD] in ("stored", "source")
        assert c["source"] and all(":" in s for s in c["source"])


@pytest.mark.parametrize("model", MODELS)
def test_every_fixture_form_agrees(model: str) -> None:
    for form in FORMS:
        r = tiecli.inspect(fixture_path(model, form))
        assert r.consumers_agree, (model, form, [p.message for p in r.consumer_problems])
        assert {c.name for c in r.consumers} == set(NAMES)
        tied = {n for t in r.ties if t.kind == "tied" for n in (t.alias, t.source)}
        for c in r.consumers:
            if c.applies:
                assert tied <= set(c.loads), (model, form, c.name)
                assert not set(c.loads.values()) & consumers.BAD


def test_no_config_no_prediction(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    e = _t(0)
    save_file({EMB: e, HEAD: _t(1)}, path)
    doc = json.loads(runner.invoke(app, ["inspect", "--json", str(path)]).stdout)
    assert doc["consumers"] == [] and doc["consumers_agree"] is True


# -- human output -------------------------------------------------------------------


def test_table_when_consumers_disagree_one_line_when_they_agree(
    tmp_path: Path, no_transformers: None
) -> None:
    bad = runner.invoke(app, ["inspect", str(_case(tmp_path, "head-differs"))], terminal_width=200)
    assert "What each consumer loads" in bad.stdout
    row = next(line for line in bad.stdout.splitlines() if "transformers-4" in line)
    assert "source" in row and "stored" in row
    assert "consumers-disagree" in bad.stdout
    good = runner.invoke(app, ["inspect", str(_case(tmp_path, "healthy"))], terminal_width=200)
    assert "consumers: all load the same values" in good.stdout
    assert "What each consumer loads" not in good.stdout


def test_verify_shows_the_table_beside_consumer_problems(
    tmp_path: Path, no_transformers: None
) -> None:
    r = runner.invoke(
        app, ["verify", str(_case(tmp_path, "untied-head-absent"))], terminal_width=200
    )
    assert r.exit_code == 1
    assert "consumer-bad-load" in r.stdout and "What each consumer loads" in r.stdout
    row = next(line for line in r.stdout.splitlines() if line.startswith("│ vllm"))
    assert "uninitialized" in row
    ok = runner.invoke(app, ["verify", str(_case(tmp_path, "healthy"))], terminal_width=200)
    assert ok.exit_code == 0 and "What each consumer loads" not in ok.stdout


def test_tensor_names_in_the_table_are_shown_literally(
    tmp_path: Path, no_transformers: None
) -> None:
    prefix = "[red]x\x1b[2J."
    path = _folder(
        tmp_path / "m",
        LLAMA | {"tie_word_embeddings": True},
        {prefix + EMB: _t(0), prefix + HEAD: _t(1)},
    )
    r = runner.invoke(app, ["inspect", str(path)], terminal_width=300)
    assert "What each consumer loads" in r.stdout
    assert "\x1b" not in r.stdout
    assert "[red]x\\x1b[2J." in r.stdout


# -- detection: padded ties, nested flags --------------------------------------------


@pytest.mark.parametrize("with_config", [True, False])
def test_padded_tie_is_found_with_its_rows_and_never_deduped(
    tmp_path: Path, with_config: bool, no_transformers: None
) -> None:
    e = _t(0)
    tensors = {EMB: torch.cat([e, _t(2, rows=6)]), HEAD: e.clone()}
    if with_config:
        path = _folder(tmp_path / "m", LLAMA | {"tie_word_embeddings": True}, tensors)
    else:
        path = tmp_path / "m.safetensors"
        save_file(tensors, path)
    r = tiecli.inspect(path)
    (tie,) = r.ties
    assert (tie.alias, tie.source) == (HEAD, EMB)
    assert tie.to_dict()["pad"] == {"source_rows": 16, "alias_rows": 10}
    assert not tie.dedupable and r.dedupable_bytes == 0
    (p,) = r.problems
    assert p.code == "padded" and "16 rows" in p.message and "10 rows" in p.message
    d = tiecli.dedupe(path, tmp_path / "out", dry_run=True)
    assert d.removed == []


def test_rows_that_differ_are_not_a_padded_tie(tmp_path: Path, no_transformers: None) -> None:
    path = tmp_path / "m.safetensors"
    save_file({EMB: torch.cat([_t(0), _t(2, rows=6)]), HEAD: _t(1)}, path)
    assert tiecli.inspect(path).ties == []


def test_nested_flag_read_without_transformers(tmp_path: Path, no_transformers: None) -> None:
    cfg = {
        "model_type": "llava",
        "text_config": LLAMA | {"tie_word_embeddings": False},
        # a vision tower's serialised default: not where any loader reads the flag
        "vision_config": {"tie_word_embeddings": True},
    }
    path = _folder(tmp_path / "m", cfg, {V_EMB: _t(0)})
    r = tiecli.inspect(path)
    assert [p.code for p in r.problems] == ["config-mismatch"]
    assert set(r.problems[0].tensors) == {V_HEAD, V_EMB}


def test_nested_flags_that_disagree_are_reported(tmp_path: Path, no_transformers: None) -> None:
    path = _case(tmp_path, "nested-disagree")
    r = tiecli.inspect(path)
    (p,) = [p for p in r.problems if p.code == "config-flags-disagree"]
    assert p.severity == "warning"
    assert "tie_word_embeddings=true" in p.message
    assert "text_config.tie_word_embeddings=false" in p.message
    # the pattern table reads the flag as transformers 5 does: the head is a tie
    assert [(t.alias, t.source) for t in r.ties] == [(V_HEAD, V_EMB)]


# -- the rules themselves ---------------------------------------------------------------


def test_rules_cover_every_situation_with_a_cited_source() -> None:
    doc = consumers.table()
    situations = set(doc["situations"])
    for rule in doc["consumers"]:
        assert set(rule["situations"]) == situations, rule["name"]
        assert rule["source"] and all(s["repo"] and s["path"] for s in rule["source"])
        for spec in rule["situations"].values():
            specs = [spec[k] for k in ("tied", "untied") if k in spec] or [spec]
            for s in specs:
                for key in ("alias", "source"):
                    value = s.get(key, "stored")
                    values = value.values() if isinstance(value, dict) else [value]
                    assert set(values) <= set(doc["outcomes"]), (rule["name"], s)


def test_adding_a_consumer_is_a_data_change(monkeypatch: pytest.MonkeyPatch) -> None:
    rule = json.loads(json.dumps(consumers.table()["consumers"][-1]))
    rule |= {"name": "sglang", "package": "sglang", "versions": ">=0.4"}
    rule["flag"] = {"read": "any", "nested": ["text_config"], "default": True}
    rule["situations"]["both_differ"] = {"tied": {"alias": "source"}, "untied": {"alias": "stored"}}
    doc = consumers.table() | {"consumers": [*consumers.table()["consumers"], rule]}
    monkeypatch.setattr(consumers, "table", lambda: doc)
    pair = consumers.Pair(HEAD, EMB, True, True, equal=False)
    loads = {c.name: c.loads for c in consumers.evaluate([pair], LLAMA, "safetensors")}
    assert loads["sglang"] == {HEAD: "source", EMB: "stored"}
    assert [r["name"] for r in consumer_choice.select("sglang")] == ["sglang"]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({}, {"nested-first": True, "any": True}),
        ({"tie_word_embeddings": False}, {"nested-first": False, "any": False}),
        (
            {"tie_word_embeddings": False, "text_config": {"tie_word_embeddings": True}},
            {"nested-first": True, "any": True},
        ),
        (
            {"tie_word_embeddings": True, "text_config": {"tie_word_embeddings": False}},
            {"nested-first": False, "any": True},
        ),
        ({"tie_word_embeddings": False, "text_config": {}}, {"nested-first": True, "any": False}),
    ],
)
def test_flag_readings(config: dict[str, Any], expected: dict[str, bool]) -> None:
    for how, value in expected.items():
        flag = {"read": how, "nested": ["text_config"], "default": True}
        assert consumers.tied_by(flag, config) is value, (how, config)
    assert consumers.tied_by({"read": "ignored"}, config) is None


def test_equal_copies_agree_whichever_a_consumer_loads() -> None:
    pair = consumers.Pair(HEAD, EMB, True, True, equal=True)
    loads = consumers.evaluate([pair], LLAMA, "safetensors")
    assert {c.loads[HEAD] for c in loads} == {"source", "stored"}
    assert consumers.judge([pair], loads) == []


def test_inspect_with_a_config_stays_torch_free(tmp_path: Path) -> None:
    path = _case(tmp_path, "head-differs")
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"
        "import tiecli\n"
        f"r = tiecli.inspect({str(path)!r})\n"
        "assert r.consumers and not r.consumers_agree, r\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_padded_tie_under_a_vocab_size_of_the_heads_rows_refuses_everywhere(
    tmp_path: Path, no_transformers: None
) -> None:
    """MLX-LM serves a padded embedding as the head only when the model is built with its
    rows: with vocab_size counting the head's rows, its strict load fails on the shape (as
    observed with MLX-LM 0.32), like every other consumer."""
    e = _t(0)
    padded = torch.cat([e, _t(2, rows=2)])
    tensors = {EMB: padded, HEAD: e.clone()}
    short = _folder(tmp_path / "short", LLAMA | {"tie_word_embeddings": True}, tensors)
    full = _folder(
        tmp_path / "full", LLAMA | {"vocab_size": 12, "tie_word_embeddings": True}, tensors
    )
    loads = {}
    for name, path in (("short", short), ("full", full)):
        r = runner.invoke(app, ["inspect", "--json", str(path)])
        assert r.exit_code == 0, r.output
        loads[name] = _loads(json.loads(r.stdout))
    assert all(set(v.values()) == {"refuses"} for v in loads["short"].values())
    assert loads["full"]["mlx-lm"] == {HEAD: "source", EMB: "stored"}
    nested = {"model_type": "llava", "text_config": LLAMA | {"tie_word_embeddings": True}}
    v = _folder(tmp_path / "nested", nested, {V_EMB: padded, V_HEAD: e.clone()})
    r = runner.invoke(app, ["inspect", "--json", str(v)])
    assert _loads(json.loads(r.stdout))["mlx-lm"] == {V_HEAD: "refuses", V_EMB: "refuses"}


def test_servers_leave_out_a_model_class_they_have_no_implementation_for(tmp_path: Path) -> None:
    # transformers' own save of a vision encoder-decoder: the decoder's flag ties its head,
    # the top level says untied; vLLM, MLX-LM and llama.cpp serve no such class
    transformers = pytest.importorskip("transformers")
    enc = transformers.ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=8,
        patch_size=4,
    )
    dec = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        is_decoder=True,
        add_cross_attention=True,
    )
    cfg = transformers.VisionEncoderDecoderConfig(encoder=enc.to_dict(), decoder=dec.to_dict())
    torch.manual_seed(0)
    transformers.VisionEncoderDecoderModel(cfg).save_pretrained(tmp_path / "ved")

    doc = json.loads(runner.invoke(app, ["inspect", "--json", str(tmp_path / "ved")]).stdout)
    by_name = {c["name"]: c for c in doc["consumers"]}
    for name in ("vllm", "mlx-lm", "llama.cpp"):
        assert by_name[name]["applies"] is False
        assert any("VisionEncoderDecoderModel" in n for n in by_name[name]["notes"])
    assert by_name["transformers-5"]["applies"] is True
    assert doc["consumers_agree"] is True
    r = runner.invoke(app, ["verify", "--json", str(tmp_path / "ved")])
    assert r.exit_code == 0, r.stdout
