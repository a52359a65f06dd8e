"""``tiecli fix``: after it, every consumer loads the same model, and verify passes.

Each situation consumers resolve differently is built here, in each file form
it exists in (a safetensors file, a sharded safetensors checkpoint, a .bin)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import model_folder, run_json, small_tensor, snapshot
from safetensors.torch import load_file
from typer.testing import CliRunner

import tiecli
from tiecli.api.fixing import config_text
from tiecli.cli import app

runner = CliRunner()
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
V_EMB, V_HEAD = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"
NORM = "model.norm.weight"
LLAMA = {"model_type": "llama", "hidden_size": 4, "vocab_size": 10}
FORMS = ["st", "sharded", "bin"]


_t = small_tensor
_folder = model_folder


def _case(tmp_path: Path, name: str, form: str = "st") -> Path:
    e, h = _t(0), _t(1)
    d = tmp_path / f"{name}-{form}"
    tied, untied = LLAMA | {"tie_word_embeddings": True}, LLAMA | {"tie_word_embeddings": False}
    if name == "head-differs":  # config tied, the stored head trained untied
        return _folder(d, tied, {EMB: e, HEAD: h}, form)
    if name == "only-head":  # the MobileLLM case
        return _folder(d, tied, {HEAD: h}, form)
    if name == "untied-head-absent":
        return _folder(d, untied, {EMB: e}, form)
    if name == "padded":  # 12 embedding rows, the head's 10 equal to the first 10
        return _folder(d, tied, {EMB: torch.cat([e, _t(2, rows=2)]), HEAD: e.clone()}, form)
    if name == "padded-untied":
        return _folder(d, untied, {EMB: torch.cat([e, _t(2, rows=2)]), HEAD: e.clone()}, form)
    if name == "nested-only":  # the flag only in text_config; the head differs
        cfg = {"model_type": "llava", "text_config": tied}
        return _folder(d, cfg, {V_EMB: e, V_HEAD: h}, form)
    if name == "nested-disagree":  # tied on top, untied in text_config; no head stored
        cfg = {"model_type": "llava", "tie_word_embeddings": True, "text_config": untied}
        return _folder(d, cfg, {V_EMB: e}, form)
    if name == "only-head-disagree":  # only the head, and the levels disagree
        cfg = {"model_type": "llava", "tie_word_embeddings": False, "text_config": tied}
        return _folder(d, cfg, {V_HEAD: h}, form)
    if name == "healthy":
        return _folder(d, tied, {EMB: e, HEAD: e.clone()}, form)
    raise AssertionError(name)


def _json(args: list[str], code: int = 0) -> dict[str, Any]:
    return run_json([*args, "--json"], code)[1]


def _agrees(path: Path) -> None:
    """What fix promises: inspect reports every consumer agreeing, verify exits 0."""
    doc = _json(["inspect", str(path)])
    assert doc["consumers_agree"] is True, doc["consumer_problems"]
    assert doc["consumer_problems"] == []
    assert [c for c in doc["consumers"] if c["applies"]]
    assert not any(
        o in ("random", "uninitialized", "refuses")
        for c in doc["consumers"]
        for o in c["loads"].values()
    )
    verdict = _json(["verify", str(path)])
    assert verdict["ok"] is True, verdict["problems"]


def _disagrees(path: Path) -> None:
    doc = _json(["inspect", str(path)])
    assert doc["consumers_agree"] is False


def _config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


# -- each situation, each form -------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_a_head_that_differs_makes_the_config_untied(tmp_path: Path, form: str) -> None:
    path = _case(tmp_path, "head-differs", form)
    _disagrees(path)
    doc = _json(["fix", str(path)])
    assert doc["command"] == "fix" and doc["changed"] is True
    assert doc["config_edits"] == [{"key": "tie_word_embeddings", "from": True, "to": False}]
    assert doc["tensor_writes"] == []
    assert [r["situation"] for r in doc["resolutions"]] == ["both_differ"]
    assert _config(path)["tie_word_embeddings"] is False
    _agrees(path)


@pytest.mark.parametrize("form", FORMS)
def test_only_the_head_stored_stores_the_embedding(tmp_path: Path, form: str) -> None:
    path = _case(tmp_path, "only-head", form)
    _disagrees(path)
    doc = _json(["fix", str(path)])
    assert doc["config_edits"] == []
    (w,) = doc["tensor_writes"]
    assert (w["name"], w["action"], w["from"], w["shape"]) == (EMB, "copy", HEAD, [10, 4])
    _agrees(path)
    loaded = tiecli.load(path)
    assert torch.equal(loaded[EMB], _t(1)) and torch.equal(loaded[HEAD], _t(1))
    assert torch.equal(loaded[NORM], torch.arange(4.0))


@pytest.mark.parametrize("form", FORMS)
def test_a_padded_tie_is_trimmed_only_when_asked(tmp_path: Path, form: str) -> None:
    path = _case(tmp_path, "padded", form)
    _disagrees(path)
    before = snapshot(path)
    r = runner.invoke(app, ["fix", str(path)])
    assert r.exit_code == 2
    assert "12 rows" in r.stderr and "10" in r.stderr and "--trim-padding" in r.stderr
    assert snapshot(path) == before
    doc = _json(["fix", str(path), "--trim-padding"])
    (w,) = doc["tensor_writes"]
    assert (w["name"], w["action"], w["shape"], w["rows_before"]) == (EMB, "trim", [10, 4], 12)
    _agrees(path)
    loaded = tiecli.load(path)
    assert torch.equal(loaded[EMB], _t(0)) and torch.equal(loaded[HEAD], _t(0))


@pytest.mark.parametrize("form", FORMS)
def test_a_padded_tie_under_an_untied_config_is_found_and_trimmed(
    tmp_path: Path, form: str
) -> None:
    path = _case(tmp_path, "padded-untied", form)
    doc = _json(["inspect", str(path)])
    (p,) = [p for p in doc["problems"] if p["code"] == "padded"]
    assert "12 rows" in p["message"] and "10 rows" in p["message"]
    (tie,) = doc["ties"]
    assert tie["pad"] == {"source_rows": 12, "alias_rows": 10}
    assert doc["dedupable_bytes"] == 0
    assert doc["consumers_agree"] is False
    assert (
        tiecli.dedupe(path, tmp_path / "d", by_value=True, min_bytes=0, dry_run=True).removed == []
    )
    _json(["fix", str(path), "--trim-padding"])
    assert _config(path)["tie_word_embeddings"] is False
    _agrees(path)


def test_trimming_refuses_a_vocab_size_other_than_the_heads_rows(tmp_path: Path) -> None:
    path = _case(tmp_path, "padded")
    cfg = _config(path) | {"vocab_size": 12}
    (path / "config.json").write_text(json.dumps(cfg))
    before = snapshot(path)
    r = runner.invoke(app, ["fix", str(path), "--trim-padding"])
    assert r.exit_code == 1
    assert "vocab_size=12" in r.stderr and "10 rows" in r.stderr
    assert snapshot(path) == before


@pytest.mark.parametrize("form", FORMS)
def test_a_padded_head_under_a_config_counting_the_padding_is_dropped_with_tie(
    tmp_path: Path, form: str
) -> None:
    """config.json ties the head and counts the padded rows (vocab_size 12): the stored head,
    the embedding's first 10 rows, is what no consumer can load. fix names --tie, which
    drops it, so every consumer ties the head to the 12-row embedding as the config says."""
    path = _case(tmp_path, "padded", form)
    (path / "config.json").write_text(json.dumps(_config(path) | {"vocab_size": 12}))
    (p,) = [p for p in _json(["inspect", str(path)])["problems"] if p["code"] == "padded"]
    assert p["message"].endswith(f"(tiecli fix {path} --tie)")
    _disagrees(path)
    before = snapshot(path)
    r = runner.invoke(app, ["fix", str(path)])
    assert r.exit_code == 2 and "--tie" in r.stderr and "--trim-padding" in r.stderr
    r = runner.invoke(app, ["fix", str(path), "--trim-padding"])
    assert r.exit_code == 1 and "--tie" in r.stderr and "vocab_size=12" in r.stderr
    assert snapshot(path) == before
    doc = _json(["fix", str(path), "--tie"])
    assert doc["config_edits"] == []
    assert [(w["name"], w["action"], w["bytes"]) for w in doc["tensor_writes"]] == [
        (HEAD, "drop", 0)
    ]
    assert [r["situation"] for r in doc["resolutions"]] == ["padded"]
    _agrees(path)
    loaded = tiecli.load(path)
    padded = torch.cat([_t(0), _t(2, rows=2)])
    assert torch.equal(loaded[EMB], padded) and torch.equal(loaded[HEAD], padded)
    assert _json(["fix", str(path)])["changed"] is False  # fixed stays fixed


def test_tie_does_not_drop_a_padded_head_the_config_does_not_count(tmp_path: Path) -> None:
    """vocab_size = the head's rows: dropping the head would serve the padding; --tie is no
    way out there, --trim-padding is."""
    path = _case(tmp_path, "padded")
    (p,) = [p for p in _json(["inspect", str(path)])["problems"] if p["code"] == "padded"]
    assert p["message"].endswith(f"(tiecli fix {path} --trim-padding)")
    before = snapshot(path)
    r = runner.invoke(app, ["fix", str(path), "--tie"])
    assert r.exit_code == 2 and "--trim-padding" in r.stderr and "--tie to drop" not in r.stderr
    assert snapshot(path) == before


@pytest.mark.parametrize("form", FORMS)
def test_an_absent_head_under_an_untied_config_needs_a_choice(tmp_path: Path, form: str) -> None:
    path = _case(tmp_path, "untied-head-absent", form)
    _disagrees(path)
    before = snapshot(path)
    r = runner.invoke(app, ["fix", str(path)])
    assert r.exit_code == 2
    assert "--tie" in r.stderr and "--untie-head" in r.stderr and HEAD in r.stderr
    assert r.stderr.startswith("Error: ") and len(r.stderr.strip().splitlines()) == 1
    assert snapshot(path) == before


@pytest.mark.parametrize("form", FORMS)
def test_tie_makes_the_config_say_tied(tmp_path: Path, form: str) -> None:
    path = _case(tmp_path, "untied-head-absent", form)
    doc = _json(["fix", str(path), "--tie"])
    assert doc["config_edits"] == [{"key": "tie_word_embeddings", "from": False, "to": True}]
    assert doc["tensor_writes"] == []
    _agrees(path)


@pytest.mark.parametrize("form", FORMS)
def test_untie_head_stores_a_copy_of_the_embedding(tmp_path: Path, form: str) -> None:
    path = _case(tmp_path, "untied-head-absent", form)
    doc = _json(["fix", str(path), "--untie-head"])
    assert [(w["name"], w["from"]) for w in doc["tensor_writes"]] == [(HEAD, EMB)]
    assert _config(path)["tie_word_embeddings"] is False
    _agrees(path)
    assert torch.equal(tiecli.load(path)[HEAD], _t(0))


def test_tie_and_untie_head_together_are_refused(tmp_path: Path) -> None:
    path = _case(tmp_path, "untied-head-absent")
    r = runner.invoke(app, ["fix", str(path), "--tie", "--untie-head"])
    assert r.exit_code == 2 and "--tie and --untie-head" in r.stderr


# -- nested flags --------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_a_flag_only_in_text_config_is_changed_there_and_on_top(tmp_path: Path, form: str) -> None:
    path = _case(tmp_path, "nested-only", form)
    _disagrees(path)
    doc = _json(["fix", str(path)])
    assert {e["key"]: e["to"] for e in doc["config_edits"]} == {
        "tie_word_embeddings": False,
        "text_config.tie_word_embeddings": False,
    }
    cfg = _config(path)
    assert (
        cfg["tie_word_embeddings"] is False and cfg["text_config"]["tie_word_embeddings"] is False
    )
    _agrees(path)


@pytest.mark.parametrize("form", FORMS)
def test_levels_that_disagree_are_made_to_agree(tmp_path: Path, form: str) -> None:
    path = _case(tmp_path, "nested-disagree", form)
    _disagrees(path)
    doc = _json(["fix", str(path)])
    assert doc["flags_before"] == {
        "tie_word_embeddings": True,
        "text_config.tie_word_embeddings": False,
    }
    assert doc["config_edits"] == [
        {"key": "text_config.tie_word_embeddings", "from": False, "to": True}
    ]
    inspected = _json(["inspect", str(path)])
    assert "config-flags-disagree" not in {p["code"] for p in inspected["problems"]}
    _agrees(path)


def test_fix_and_its_checks_work_without_transformers(tmp_path: Path) -> None:
    """Nested flags and their disagreement are read with no transformers at all."""
    paths = [_case(tmp_path, n) for n in ("nested-only", "nested-disagree", "only-head-disagree")]
    code = (
        "import json, sys\n"
        "sys.modules['transformers'] = None\n"
        "import tiecli\n"
        "out = []\n"
        f"for p in {[str(p) for p in paths]!r}:\n"
        "    before = tiecli.inspect(p)\n"
        "    codes = sorted({q.code for q in before.problems})\n"
        "    r = tiecli.fix(p)\n"
        "    after = tiecli.inspect(p)\n"
        "    out.append([before.consumers_agree, codes, [e.key for e in r.config_edits],\n"
        "                after.consumers_agree, tiecli.verify(p).ok])\n"
        "print(json.dumps(out))\n"
        "print('transformers' in sys.modules and sys.modules['transformers'] is not None)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = r.stdout.strip().splitlines()
    results = json.loads(lines[0])
    assert lines[1] == "False"
    nested_only, disagree, only_head = results
    assert nested_only[0] is False and nested_only[3:] == [True, True]
    assert nested_only[2] == ["tie_word_embeddings", "text_config.tie_word_embeddings"]
    assert disagree[0] is False and "config-flags-disagree" in disagree[1]
    assert disagree[2] == ["text_config.tie_word_embeddings"] and disagree[3:] == [True, True]
    assert only_head[0] is False and "config-flags-disagree" in only_head[1]
    assert only_head[2] == ["tie_word_embeddings"] and only_head[3:] == [True, True]


# -- nothing to do, dry runs, outputs ---------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_a_checkpoint_consumers_agree_on_is_left_alone(tmp_path: Path, form: str) -> None:
    path = _case(tmp_path, "healthy", form)
    before = snapshot(path)
    mtimes = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    doc = _json(["fix", str(path)])
    assert doc["changed"] is False and doc["config_edits"] == [] and doc["tensor_writes"] == []
    assert any("nothing to change" in n for n in doc["notes"])
    assert snapshot(path) == before
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == mtimes
    r = runner.invoke(app, ["fix", str(path)])
    assert r.exit_code == 0 and "nothing to change" in r.stdout


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path) -> None:
    path = _case(tmp_path, "only-head-disagree")
    before = snapshot(path)
    doc = _json(["fix", str(path), "--dry-run"])
    assert doc["dry_run"] is True and doc["changed"] is True
    assert doc["config_edits"] == [{"key": "tie_word_embeddings", "from": False, "to": True}]
    assert [(w["name"], w["action"], w["from"]) for w in doc["tensor_writes"]] == [
        (V_EMB, "copy", V_HEAD)
    ]
    r = runner.invoke(app, ["fix", str(path), "--dry-run"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert "Would edit" in r.stdout and "tie_word_embeddings" in r.stdout
    assert "Would write" in r.stdout and V_EMB in r.stdout and "dry run" in r.stdout
    assert snapshot(path) == before


@pytest.mark.parametrize("form", FORMS)
def test_output_folder_gets_the_fixed_config_input_untouched(tmp_path: Path, form: str) -> None:
    path = _case(tmp_path, "only-head-disagree", form)
    (path / "tokenizer.json").write_text("{}")
    before = snapshot(path)
    out = tmp_path / "out"
    doc = _json(["fix", str(path), "-o", str(out)])
    assert doc["output"] == str(out)
    assert snapshot(path) == before
    assert (out / "tokenizer.json").read_text() == "{}"
    assert _config(out)["tie_word_embeddings"] is True
    _agrees(out)
    r = runner.invoke(app, ["fix", str(path), "-o", str(out)])
    assert r.exit_code == 2 and "--force" in r.stderr


def test_a_single_file_output_cannot_hold_the_config(tmp_path: Path) -> None:
    path = _case(tmp_path, "head-differs")
    r = runner.invoke(app, ["fix", str(path / "model.safetensors"), "-o", str(tmp_path / "o.st")])
    assert r.exit_code == 2 and "config.json" in r.stderr
    assert not (tmp_path / "o.st").exists()


def test_in_place_on_the_weights_file_edits_the_config_beside_it(tmp_path: Path) -> None:
    path = _case(tmp_path, "head-differs")
    _json(["fix", str(path / "model.safetensors")])
    _agrees(path)


def test_the_python_twin_returns_the_result(tmp_path: Path) -> None:
    path = _case(tmp_path, "head-differs")
    r = tiecli.fix(path)
    assert isinstance(r, tiecli.FixResult) and r.changed
    assert r.to_dict()["config_edits"][0]["to"] is False
    assert "fix" in tiecli.__all__


def test_a_killed_run_between_weights_and_config_still_agrees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The weights go first, the config last: a run stopped between the two leaves
    the pair bit-identical, which consumers load alike whatever the flags say."""
    import tiecli.api.fixing as fixing

    path = _case(tmp_path, "only-head-disagree")
    config_before = (path / "config.json").read_bytes()

    def killed(*_a: Any, **_k: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(fixing, "replace_config", killed)
    with pytest.raises(KeyboardInterrupt):
        tiecli.fix(path)
    assert (path / "config.json").read_bytes() == config_before
    assert set(load_file(path / "model.safetensors")) == {V_EMB, V_HEAD, NORM}
    assert tiecli.inspect(path).consumers_agree
    monkeypatch.undo()
    r = tiecli.fix(path)  # the next run finishes the job
    assert [e.key for e in r.config_edits] == ["tie_word_embeddings"] and r.tensor_writes == []
    _agrees(path)


# -- config.json keeps its style -----------------------------------------------------------


STYLES = {
    "indent-2-newline": lambda c: json.dumps(c, indent=2) + "\n",
    "indent-4-sorted": lambda c: json.dumps(c, indent=4, sort_keys=True),
    "tab": lambda c: json.dumps(c, indent="\t") + "\n",
    "compact": lambda c: json.dumps(c, separators=(",", ":")),
    "one-line": lambda c: json.dumps(c) + "\n\n",
    "unicode": lambda c: json.dumps(c, indent=2, ensure_ascii=False) + "\n",
    "crlf": lambda c: (json.dumps(c, indent=2) + "\n").replace("\n", "\r\n"),
}


@pytest.mark.parametrize("style", list(STYLES))
def test_config_edits_keep_keys_order_and_style(tmp_path: Path, style: str) -> None:
    dump = STYLES[style]
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "torch_dtype": "float32",
        "model_type": "llama",
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "tie_word_embeddings": True,
        "name": "modèle",
        "hidden_size": 4,
        "vocab_size": 10,
        "rms_norm_eps": 1e-06,
    }
    path = _case(tmp_path, "head-differs")
    (path / "config.json").write_text(dump(cfg), newline="")
    tiecli.fix(path)
    want = dump(cfg | {"tie_word_embeddings": False})
    assert (path / "config.json").read_bytes().decode() == want


def test_a_new_flag_goes_last_in_the_config_style() -> None:
    original = json.dumps({"model_type": "llama", "vocab_size": 10}, indent=3) + "\n"
    new = {"model_type": "llama", "vocab_size": 10, "tie_word_embeddings": False}
    assert config_text(original, new) == json.dumps(new, indent=3) + "\n"


def test_a_config_temporary_left_by_a_killed_run_is_removed(tmp_path: Path) -> None:
    path = _case(tmp_path, "head-differs")
    leftover = path / ".config.json.999999999-0123abcd.tiecli-tmp"  # its writer is gone
    leftover.write_text("{")
    _json(["fix", str(path)])
    assert not leftover.exists()
    _agrees(path)


def test_a_linked_config_is_replaced_never_written_through(tmp_path: Path) -> None:
    path = _case(tmp_path, "head-differs")
    blob = path / "blob-of-config"
    (path / "config.json").rename(blob)
    (path / "config.json").symlink_to(blob.name)
    shared = blob.read_bytes()
    _json(["fix", str(path)])
    assert blob.read_bytes() == shared  # the link's target, perhaps shared, is untouched
    assert not (path / "config.json").is_symlink()
    assert _config(path)["tie_word_embeddings"] is False
    _agrees(path)
