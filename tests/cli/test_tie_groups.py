"""Whole tie groups: every declared member is reported and restored, even when the
group's source is absent and only one alias is stored (T5 with only
``encoder.embed_tokens.weight``, BART with only ``lm_head.weight``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import fixture_path
from safetensors.torch import load_file, save_file

import tiecli
from tiecli.grouping import fills
from tiecli.ties import Tie

T5_GROUP = ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]


def _keep_only(src: Path, dst: Path, drop: list[str], rename: dict[str, str]) -> Path:
    """``src``'s full state dict less ``drop``, with ``rename`` applied, and its config."""
    dst.mkdir()
    full = load_file(str(src / "model.safetensors"))
    sd = {rename.get(k, k): v for k, v in full.items() if k not in drop}
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def _t5_encoder_only(tmp_path: Path) -> Path:
    return _keep_only(
        fixture_path("t5", "full"),
        tmp_path / "t5-encoder-only",
        ["shared.weight", "decoder.embed_tokens.weight", "lm_head.weight"],
        {},
    )


@pytest.mark.parametrize("with_transformers", [True, False])
def test_t5_with_only_an_encoder_alias_reports_and_restores_the_whole_group(
    tmp_path: Path, with_transformers: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not with_transformers:
        import sys

        monkeypatch.setitem(sys.modules, "transformers", None)
    path = _t5_encoder_only(tmp_path)
    report = tiecli.inspect(path)
    pairs = {(t.alias, t.source) for t in report.ties}
    assert pairs == {
        ("encoder.embed_tokens.weight", "shared.weight"),
        ("decoder.embed_tokens.weight", "shared.weight"),
        ("lm_head.weight", "shared.weight"),
    }
    assert [p.code for p in report.problems] == ["source-missing"]

    out = tmp_path / "untied"
    result = tiecli.untie(path, out)
    assert set(result.to_dict()["restored"]) == {
        "shared.weight",
        "decoder.embed_tokens.weight",
        "lm_head.weight",
    }
    got = load_file(str(out / "model.safetensors"))
    want = load_file(str(fixture_path("t5", "full") / "model.safetensors"))
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert tiecli.verify(out).ok

    loaded = tiecli.load(path)
    assert set(loaded) == set(want)
    for name in [*T5_GROUP, "lm_head.weight"]:
        assert torch.equal(loaded[name], want[name])


def test_untie_dry_run_json_names_each_member_once(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tiecli.cli import app

    path = _t5_encoder_only(tmp_path)
    r = CliRunner().invoke(
        app, ["untie", str(path), "-o", str(tmp_path / "o"), "--dry-run", "--json"]
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert sorted(doc["restored"]) == sorted(
        ["shared.weight", "decoder.embed_tokens.weight", "lm_head.weight"]
    )
    assert not (tmp_path / "o").exists()


def test_forward_proof_of_the_encoder_only_file_matches_the_full_model(tmp_path: Path) -> None:
    path = _t5_encoder_only(tmp_path)
    result = tiecli.verify(path, forward=True, against=fixture_path("t5", "full"))
    assert result.ok
    assert result.forward is not None and result.forward.outputs_equal is True


def test_bart_with_only_the_head_stored(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BartConfig(
        vocab_size=64,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(cfg)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    full = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    group = [
        "model.shared.weight",
        "model.encoder.embed_tokens.weight",
        "model.decoder.embed_tokens.weight",
    ]
    only_head = tmp_path / "only-head"
    only_head.mkdir()
    save_file(
        {k: v for k, v in full.items() if k not in group},
        str(only_head / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (only_head / "config.json").write_text((saved / "config.json").read_text())

    report = tiecli.inspect(only_head)
    members = {n for t in report.ties for n in (t.alias, t.source)}
    assert members >= {*group, "lm_head.weight"}
    out = tmp_path / "untied"
    tiecli.untie(only_head, out)
    got = load_file(str(out / "model.safetensors"))
    for name in [*group, "lm_head.weight"]:
        assert torch.equal(got[name], full["lm_head.weight"]), name


def _tie(alias: str, source: str, transform: str = "identity") -> Tie:
    return Tie(alias, source, transform, "tied", ["declared"], stored=False, bytes=4)


def test_fills_chain_through_an_absent_source_and_compose_transposes() -> None:
    ties = [
        _tie("a", "s", "transpose"),  # a stored: s = a transposed
        _tie("b", "s"),  # b = s = a transposed
        _tie("c", "s", "transpose"),  # c = s transposed = a
    ]
    made = {f.name: (f.origin, f.transform) for f in fills(ties, {"a"})}
    assert made == {"s": ("a", "transpose"), "b": ("a", "transpose"), "c": ("a", "identity")}


def test_fills_leave_a_group_with_nothing_stored_alone() -> None:
    assert fills([_tie("x", "y")], set()) == []
    # a stored source gives its aliases, nothing else
    made = [(f.name, f.origin) for f in fills([_tie("x", "y"), _tie("z", "y")], {"y"})]
    assert made == [("x", "y"), ("z", "y")]
