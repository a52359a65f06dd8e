"""`tiecli.load` and `tiecli.save`: ties restored as shared memory, files any reader can load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FIXTURES, MANIFEST, assert_same, fixture_path
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file

import tiecli

# Bind the public names load-first, so that one bug (see the first test) does not
# fail every test of this file when it runs alone.
tiecli.load, tiecli.save  # noqa: B018


def test_public_load_and_save_resolve_in_any_order() -> None:
    """`tiecli.save` first must not leave `tiecli.load` naming a module."""
    code = "import tiecli; tiecli.save; print(callable(tiecli.load), callable(tiecli.save))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


def tiny_model(model: str) -> torch.nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(fixture_path(model, "hf"))
    cls = getattr(transformers, MANIFEST["models"][model]["architecture"])
    torch.manual_seed(0)
    return cls(config).eval()


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


# -- save ----------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt2", "t5"])
def test_save_model_loads_back_everywhere(model: str, tmp_path: Path) -> None:
    net = tiny_model(model)
    ties = MANIFEST["models"][model]["ties"]
    path = tmp_path / "m.safetensors"
    assert tiecli.save(net, path) == path
    assert not list(tmp_path.glob(".*tiecli-tmp"))

    # one stored copy per tie, every alias in the record
    plain = load_file(path)
    assert not set(ties) & set(plain)
    assert len(plain) == MANIFEST["models"][model]["num_state_dict_names"] - len(ties)
    meta = metadata(path)
    record = json.loads(meta["tiecli"])
    assert record["version"] == 1
    assert {t["alias"]: t["source"] for t in record["ties"]} == ties
    assert all(t["kind"] == "tied" and "declared" in t["evidence"] for t in record["ties"])
    for alias, source in ties.items():
        assert meta[alias] == source

    # safetensors' own loader: nothing missing, nothing unexpected
    other = tiny_model(model)
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    missing, unexpected = load_model(other, path, strict=True)
    assert not unexpected
    assert set(missing) <= set(ties)
    want = net.state_dict()
    got = other.state_dict()
    for name in want:
        assert torch.equal(got[name], want[name]), name

    # tiecli.load: every state-dict name, aliases are their source's memory
    loaded = tiecli.load(path)
    assert_same(loaded, {n: t for n, t in want.items()})
    for alias, source in ties.items():
        assert loaded[alias].data_ptr() == loaded[source].data_ptr()
        assert (
            loaded[alias].untyped_storage().data_ptr()
            == loaded[source].untyped_storage().data_ptr()
        )


def test_save_state_dict_with_transposed_view(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    embed = torch.randn(12, 5, generator=g)
    bias = torch.randn(7, generator=g)
    sd = {"embed.weight": embed, "head.weight": embed.t(), "same.weight": embed, "other.bias": bias}
    path = tmp_path / "sd.safetensors"
    tiecli.save(sd, path, metadata={"note": "kept"})

    plain = load_file(path)
    assert sorted(plain) == ["embed.weight", "other.bias"]
    meta = metadata(path)
    assert meta["note"] == "kept"
    assert meta["same.weight"] == "embed.weight"
    assert "head.weight" not in meta  # the convention is for identity aliases only
    record = {t["alias"]: t for t in json.loads(meta["tiecli"])["ties"]}
    assert record["head.weight"]["transform"] == "transpose"
    assert record["same.weight"]["transform"] == "identity"

    loaded = tiecli.load(path)
    assert_same(loaded, sd)
    assert loaded["head.weight"].shape == (5, 12)
    assert loaded["head.weight"].stride() == (1, 5)
    for alias in ("head.weight", "same.weight"):
        assert loaded[alias].data_ptr() == loaded["embed.weight"].data_ptr()

    # untie writes the transposed copy out for plain readers
    u = tiecli.untie(path, tmp_path / "u.safetensors")
    assert_same(load_file(u.output), sd)


def test_save_keeps_overlapping_views_that_are_not_ties(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32)
    sd = {"a": base[:12].view(3, 4), "b": base[12:].view(3, 4), "c": base[:6]}
    path = tmp_path / "v.safetensors"
    tiecli.save(sd, path)
    assert_same(load_file(path) | {}, {k: v.clone() for k, v in sd.items()})
    assert_same(tiecli.load(path), sd)


def test_save_rejects_what_is_not_a_state_dict(tmp_path: Path) -> None:
    with pytest.raises(tiecli.TiecliError):
        tiecli.save([torch.zeros(2)], tmp_path / "x.safetensors")
    with pytest.raises(tiecli.TiecliError):
        tiecli.save({"a": torch.zeros(2), "b": 3}, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_save_replaces_existing_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"old": torch.ones(3)}, str(path))
    tiecli.save({"new": torch.zeros(2)}, path)
    assert sorted(load_file(path)) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# -- load ----------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt2", "t5", "bert-mlm"])
@pytest.mark.parametrize("form", ["hf", "hf-sharded", "bin"])
def test_load_restores_declared_ties_as_shared_memory(model: str, form: str) -> None:
    loaded = tiecli.load(fixture_path(model, form))
    full = load_file(fixture_path(model, "full") / "model.safetensors")
    assert_same(loaded, full)
    for alias, source in MANIFEST["models"][model]["ties"].items():
        assert loaded[alias].data_ptr() == loaded[source].data_ptr(), alias


@pytest.mark.parametrize("model", ["gpt2", "t5", "bert-mlm"])
def test_load_of_deduped_file_needs_no_transformers(
    model: str, tmp_path: Path, no_transformers
) -> None:
    out = tmp_path / "m.safetensors"
    tiecli.dedupe(fixture_path(model, "full") / "model.safetensors", out, use_transformers=False)
    loaded = tiecli.load(out, use_transformers=False)
    assert_same(loaded, load_file(fixture_path(model, "full") / "model.safetensors"))


def test_load_of_full_form_keeps_stored_copies_apart() -> None:
    loaded = tiecli.load(fixture_path("gpt2", "full"))
    assert loaded["lm_head.weight"].data_ptr() != loaded["transformer.wte.weight"].data_ptr()


def test_load_gives_duplicates_as_independent_copies(tmp_path: Path) -> None:
    out = tmp_path / "d.safetensors"
    tiecli.dedupe(FIXTURES / "custom/value-duplicate.safetensors", out, by_value=True, min_bytes=0)
    loaded = tiecli.load(out)
    assert "b.weight" not in load_file(out)
    assert torch.equal(loaded["b.weight"], loaded["a.weight"])
    assert loaded["b.weight"].data_ptr() != loaded["a.weight"].data_ptr()
    loaded["b.weight"].add_(1)
    assert not torch.equal(loaded["b.weight"], loaded["a.weight"])


def test_load_rejects_a_bad_record(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    record = {"version": 1, "ties": [{"alias": "b", "source": "missing"}]}
    save_file({"a": torch.ones(2, 2)}, str(path), metadata={"tiecli": json.dumps(record)})
    with pytest.raises(tiecli.TieRecordError, match="'b'"):
        tiecli.load(path)
