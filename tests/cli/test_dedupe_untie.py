"""`dedupe` and `untie`: nothing lost, everything restorable, files and CLI as the spec says."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from helpers import (
    FIXTURES,
    FORMS,
    JSON_HEADER,
    MANIFEST,
    MODELS,
    TIED_MODELS,
    assert_same,
    run_json,
    snapshot,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import tiecli
from tiecli.cli import app

runner = CliRunner()

CUSTOM = list(MANIFEST["custom"])  # every custom fixture the generator made
CASES = [f"{m}/{f}" for m in MODELS for f in FORMS] + CUSTOM


# -- helpers ------------------------------------------------------------------


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    if a.numel() == 0:
        return True
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def stored(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor stored in a checkpoint, read with safetensors / torch alone (no tiecli)."""
    if path.is_dir():
        for name in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return stored(path / name)
        raise AssertionError(f"no weights in {path}")
    if path.name.endswith(".index.json"):
        weight_map = json.loads(path.read_text())["weight_map"]
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            sd = load_file(path.parent / shard)
            assert sorted(sd) == sorted(n for n, s in weight_map.items() if s == shard)
            out.update(sd)
        return out
    if path.suffix == ".safetensors":
        return load_file(path)
    top = torch.load(path, weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(top.get(key), dict):
            return top[key]
    return top


def place(copy_fixture, rel: str, name: str = "x") -> Path:
    """Copy fixture ``rel`` into tmp_path; a file keeps its suffix."""
    src = FIXTURES / rel
    return copy_fixture(rel, name if src.is_dir() else name + src.suffix)


def sibling(path: Path, name: str) -> Path:
    """An output path beside ``path`` mirroring it (a file for a file, a folder for a folder)."""
    return path.parent / (name if path.is_dir() else name + path.suffix)


def header_size(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def cli(*args: object) -> tuple[int, dict]:
    return run_json([*args, "--json", "-q"])


# -- 1. round trips on every fixture -------------------------------------------


@pytest.mark.parametrize("rel", CASES)
def test_dedupe_then_untie_round_trips(rel: str, copy_fixture) -> None:
    x = place(copy_fixture, rel)
    original = tiecli.load(x)

    deduped = tiecli.dedupe(x, sibling(x, "deduped"))
    assert Path(deduped.output) == sibling(x, "deduped")
    assert_same(tiecli.load(deduped.output), original)

    # untie of the deduped checkpoint stores exactly what untie of the input stores
    via_dedupe = tiecli.untie(deduped.output, sibling(x, "via-dedupe"))
    direct = tiecli.untie(x, sibling(x, "direct"))
    assert_same(stored(Path(via_dedupe.output)), stored(Path(direct.output)))
    assert_same(tiecli.load(via_dedupe.output), original)

    if rel.endswith(("/full", "/full-sharded")) or rel == "drift":
        # the full forms store every name: untie(dedupe(x)) is x itself
        assert_same(stored(Path(via_dedupe.output)), stored(x))
    model = rel.split("/")[0]
    if rel.endswith(("/full", "/full-sharded")) and model in TIED_MODELS:
        assert sorted(t.alias for t in deduped.removed) == sorted(MANIFEST["models"][model]["ties"])
        assert deduped.bytes_saved == MANIFEST["models"][model]["alias_bytes"]
        assert not set(MANIFEST["models"][model]["ties"]) & set(stored(Path(deduped.output)))


@pytest.mark.parametrize("rel", CASES)
def test_in_place_dedupe_keeps_values_and_is_idempotent(rel: str, copy_fixture) -> None:
    x = place(copy_fixture, rel)
    original = tiecli.load(x)
    first = tiecli.dedupe(x, by_value=True, min_bytes=0)
    assert_same(tiecli.load(x), original)
    files = snapshot(x.parent)
    second = tiecli.dedupe(x, by_value=True, min_bytes=0)
    assert second.changed is False
    assert second.bytes_saved == 0
    assert second.removed == []
    assert snapshot(x.parent) == files
    assert not list(x.parent.rglob("*.tiecli-tmp"))
    if first.removed:
        assert first.bytes_saved > 0


@pytest.mark.parametrize(
    "rel, removed",
    [
        ("custom/transposed.safetensors", {"head.weight": ("embed.weight", "transpose")}),
        ("custom/value-duplicate.safetensors", {"b.weight": ("a.weight", "identity")}),
        ("custom/no-ties.safetensors", {}),
    ],
)
def test_by_value_dedupe_of_custom_fixtures(rel: str, removed: dict, copy_fixture) -> None:
    x = place(copy_fixture, rel)
    original = stored(x)
    result = tiecli.dedupe(x, sibling(x, "out"), by_value=True, min_bytes=0)
    # exactly these: constant tensors (zeros, ones, 0.5) are never ties by value
    assert {t.alias: (t.source, t.transform) for t in result.removed} == removed
    assert all(t.kind == "duplicate" for t in result.removed)
    loaded = tiecli.load(result.output)
    assert_same(loaded, original)
    for alias, (source, _) in removed.items():
        # duplicates come back as independent copies
        assert loaded[alias].data_ptr() != loaded[source].data_ptr()
    restored = tiecli.untie(result.output, sibling(x, "untied"))
    assert sorted(restored.to_dict()["restored"]) == sorted(removed)
    assert_same(stored(Path(restored.output)), original)


# -- 1b. property test over random state dicts --------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64]


@st.composite
def state_dicts(draw) -> dict[str, torch.Tensor]:
    """Random tensors plus random ties among them, every copy stored on its own."""
    sd: dict[str, torch.Tensor] = {}
    n_base = draw(st.integers(1, 4))
    for i in range(n_base):
        dtype = draw(st.sampled_from(DTYPES))
        shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=2)))
        seed = draw(st.integers(0, 2**31 - 1))
        g = torch.Generator().manual_seed(seed)
        if draw(st.booleans()) and draw(st.booleans()):  # a quarter are constant
            base = torch.full(shape, draw(st.sampled_from([0, 1, 2])), dtype=dtype)
        elif dtype == torch.int64:
            base = torch.randint(-1000, 1000, shape, generator=g)
        else:
            base = torch.randn(shape, generator=g).to(dtype)
        sd[f"layer{i}.weight"] = base
        # copies: identity, transposed, and chains of several names of one tensor
        for j in range(draw(st.integers(0, 3))):
            transposed = base.dim() == 2 and draw(st.booleans())
            copy = base.t().contiguous().clone() if transposed else base.clone()
            sd[f"copy{i}_{j}.{'t' if transposed else 'w'}"] = copy
    # names the pattern table knows, to mix structural ties in
    if draw(st.booleans()):
        emb = torch.randn(draw(st.integers(2, 8)), 4, generator=torch.Generator().manual_seed(7))
        sd["model.embed_tokens.weight"] = emb
        sd["lm_head.weight"] = emb.clone()
    order = draw(st.permutations(list(sd)))
    return {k: sd[k].contiguous() for k in order}


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sd=state_dicts())
def test_property_dedupe_untie_round_trip(sd: dict[str, torch.Tensor], tmp_path_factory) -> None:
    d = tmp_path_factory.mktemp("prop")
    x = d / "x.safetensors"
    save_file(sd, str(x))
    original = tiecli.load(x)
    assert_same(original, sd)

    deduped = tiecli.dedupe(x, d / "d.safetensors", by_value=True, min_bytes=0)
    out = Path(deduped.output)
    assert_same(tiecli.load(out), sd)
    assert out.stat().st_size <= x.stat().st_size - sum(t.bytes for t in deduped.removed) + 4096
    assert len(stored(out)) == len(sd) - len(deduped.removed)

    restored = tiecli.untie(out, d / "u.safetensors")
    got = stored(Path(restored.output))
    assert sorted(got) == sorted(sd)
    for name, t in sd.items():
        assert same_bytes(got[name], t), name

    before = out.read_bytes()
    again = tiecli.dedupe(out, by_value=True, min_bytes=0)
    assert again.changed is False
    assert again.bytes_saved == 0
    assert out.read_bytes() == before


# -- 2. deduped HF folders load in transformers, bit-identical logits ----------

HF_MODELS = ["gpt2", "llama-tied", "t5", "bert-mlm"]


def _logits(folder: Path, model: str) -> torch.Tensor:
    import transformers

    cls = getattr(transformers, MANIFEST["models"][model]["architecture"])
    net, info = cls.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] in ([], set()), info
    assert info["unexpected_keys"] in ([], set()), info
    assert not info.get("mismatched_keys"), info
    net.eval()
    ids = torch.tensor([[1, 5, 9, 2, 33, 60, 7]])
    kwargs = {"decoder_input_ids": torch.tensor([[0, 3, 8]])} if model == "t5" else {}
    with torch.no_grad():
        return net(input_ids=ids, **kwargs).logits


@pytest.mark.parametrize("form", ["full", "full-sharded", "bin"])
@pytest.mark.parametrize("model", HF_MODELS)
def test_deduped_folder_loads_in_transformers(model: str, form: str, copy_fixture) -> None:
    x = copy_fixture(f"{model}/{form}", "x")
    out = x.parent / "deduped"
    to = "safetensors" if form == "bin" else None
    result = tiecli.dedupe(x, out, to=to)
    if form == "bin":
        assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()
        assert sorted(t.alias for t in result.removed) == sorted(MANIFEST["models"][model]["ties"])
    else:
        assert result.bytes_saved == MANIFEST["models"][model]["alias_bytes"]
    assert (out / "config.json").read_bytes() == (x / "config.json").read_bytes()
    assert torch.equal(_logits(out, model), _logits(x, model))


# -- 3. untie of transformers' own output is a complete state dict ------------


@pytest.mark.parametrize("model", MODELS)
def test_untie_hf_gives_the_whole_state_dict(model: str, copy_fixture) -> None:
    import transformers

    x = copy_fixture(f"{model}/hf", "x")
    missing = MANIFEST["models"][model]["hf_missing"]
    assert sorted(missing) == sorted(set(MANIFEST["models"][model]["ties"]) - set(stored(x)))
    result = tiecli.untie(x, x.parent / "untied")
    assert sorted(result.to_dict()["restored"]) == sorted(missing)
    sd = load_file(x.parent / "untied" / "model.safetensors")
    assert len(sd) == MANIFEST["models"][model]["num_state_dict_names"]

    config = transformers.AutoConfig.from_pretrained(x)
    cls = getattr(transformers, MANIFEST["models"][model]["architecture"])
    net = cls(config)
    assert sorted(sd) == sorted(net.state_dict())
    net.load_state_dict(sd, strict=True)
    for alias, source in MANIFEST["models"][model]["ties"].items():
        assert torch.equal(sd[alias], sd[source])
    # the file is complete: no record needed, so consumers knowing nothing of ties read it all
    with safe_open(str(x.parent / "untied" / "model.safetensors"), "pt") as f:
        assert "tiecli" not in (f.metadata() or {})


# -- 4. file sizes, idempotence, CLI ------------------------------------------


@pytest.mark.parametrize("model", TIED_MODELS)
def test_size_shrinks_by_alias_bytes_plus_header_change(model: str, copy_fixture) -> None:
    x = copy_fixture(f"{model}/full", "x") / "model.safetensors"
    size, head = x.stat().st_size, header_size(x)
    result = tiecli.dedupe(x)
    alias_bytes = MANIFEST["models"][model]["alias_bytes"]
    assert result.bytes_saved == alias_bytes
    assert x.stat().st_size == size - alias_bytes + (header_size(x) - head)

    before = x.read_bytes()
    again = tiecli.dedupe(x)
    assert (again.changed, again.bytes_saved, again.removed) == (False, 0, [])
    assert x.read_bytes() == before


@pytest.mark.parametrize("model", TIED_MODELS)
def test_sharded_size_shrinks_by_alias_bytes(model: str, copy_fixture) -> None:
    x = copy_fixture(f"{model}/full-sharded", "x")
    shards = sorted(x.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards)
    heads = sum(header_size(p) for p in shards)
    result = tiecli.dedupe(x)
    assert sorted(x.glob("*.safetensors")) == shards
    alias_bytes = MANIFEST["models"][model]["alias_bytes"]
    assert result.bytes_saved == alias_bytes
    new_heads = sum(header_size(p) for p in shards)
    assert sum(p.stat().st_size for p in shards) == size - alias_bytes + new_heads - heads
    index = json.loads((x / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == result.bytes_after
    assert not set(MANIFEST["models"][model]["ties"]) & set(index["weight_map"])
    record = json.loads(index["metadata"]["tiecli"])
    assert {t["alias"]: t["source"] for t in record["ties"]} == MANIFEST["models"][model]["ties"]
    hashes = snapshot(x)
    assert tiecli.dedupe(x).changed is False
    assert snapshot(x) == hashes


def test_record_format_v1(copy_fixture) -> None:
    x = copy_fixture("t5/full", "x")
    tiecli.dedupe(x)
    with safe_open(str(x / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    for alias in MANIFEST["models"]["t5"]["ties"]:
        assert meta[alias] == "shared.weight"
    record = json.loads(meta["tiecli"])
    assert record["version"] == 1
    assert sorted(t["alias"] for t in record["ties"]) == sorted(MANIFEST["models"]["t5"]["ties"])
    for t in record["ties"]:
        assert (t["source"], t["transform"], t["kind"]) == ("shared.weight", "identity", "tied")
        assert "declared" in t["evidence"]


def test_dry_run_writes_nothing_and_shows_the_plan(copy_fixture) -> None:
    x = copy_fixture("t5/full-sharded", "x")
    hashes = snapshot(x.parent)
    code, doc = cli("dedupe", x, "--dry-run")
    assert code == 0
    assert snapshot(x.parent) == hashes
    assert doc["dry_run"] is True
    assert doc["bytes_saved"] == MANIFEST["models"]["t5"]["alias_bytes"]
    assert sorted(doc["removed"]) == sorted(MANIFEST["models"]["t5"]["ties"])

    code, doc = cli("dedupe", x, "-o", x.parent / "out", "--dry-run")
    assert code == 0
    assert not (x.parent / "out").exists()
    assert snapshot(x.parent) == hashes

    code, doc = cli("untie", x.parent / "x", "--dry-run")
    assert code == 0 and snapshot(x.parent) == hashes


def test_cli_json_fields(copy_fixture) -> None:
    x = copy_fixture("gpt2/full", "x")
    code, doc = cli("dedupe", x, "-o", x.parent / "d")
    assert code == 0
    for key in (
        *JSON_HEADER,
        "output",
        "bytes_before",
        "bytes_after",
        "bytes_saved",
        "removed",
        "kept",
    ):
        assert key in doc, key
    assert doc["output"] == str(x.parent / "d")
    assert doc["bytes_before"] - doc["bytes_after"] == doc["bytes_saved"] == 4096
    assert doc["removed"] == ["lm_head.weight"]
    assert doc["kept"] == []

    code, doc = cli("untie", x.parent / "d", "-o", x.parent / "u")
    assert code == 0
    for key in ("command", "path", "format", "ok", "problems", "output", "restored", "bytes_after"):
        assert key in doc, key
    assert doc["restored"] == ["lm_head.weight"]
    assert doc["bytes_after"] == MANIFEST["models"]["gpt2"]["full_bytes"]
    assert doc["output"] == str(x.parent / "u")


@pytest.mark.parametrize("command", ["dedupe", "untie"])
def test_existing_output_needs_force(command: str, copy_fixture, tmp_path: Path) -> None:
    x = copy_fixture("llama-tied/full", "x")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    hashes = snapshot(tmp_path)
    result = runner.invoke(app, [command, str(x), "-o", str(out), "--json", "-q"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ") and "--force" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert snapshot(tmp_path) == hashes

    code, doc = cli(command, x, "-o", out, "--force")
    assert code == 0
    assert not (out / "keep.txt").exists()
    assert (out / "config.json").read_bytes() == (x / "config.json").read_bytes()
    assert_same(tiecli.load(out), tiecli.load(x))
    assert not list(tmp_path.rglob("*.tiecli-*"))

    # a single file: same rules
    f = x / "model.safetensors"
    target = tmp_path / "one.safetensors"
    target.write_bytes(b"not mine")
    code, _ = cli(command, f, "-o", target)
    assert code == 2 and target.read_bytes() == b"not mine"
    code, _ = cli(command, f, "-o", target, "--force")
    assert code == 0
    assert_same(tiecli.load(target), tiecli.load(f))


def test_folder_output_carries_other_files(copy_fixture) -> None:
    x = copy_fixture("bert-mlm/full-sharded", "x")
    (x / "tokenizer.json").write_text('{"hello": 1}')
    (x / "generation_config.json").write_text("{}")
    (x / "extra").mkdir()
    (x / "extra" / "notes.md").write_text("notes")
    out = x.parent / "out"
    tiecli.dedupe(x, out)
    for name in ("config.json", "tokenizer.json", "generation_config.json", "extra/notes.md"):
        assert (out / name).read_bytes() == (x / name).read_bytes()
    shards = {p.name for p in x.glob("*.safetensors")}
    assert {p.name for p in out.glob("*.safetensors")} == shards
    u = x.parent / "u"
    tiecli.untie(out, u)
    assert (u / "tokenizer.json").read_bytes() == (x / "tokenizer.json").read_bytes()


def test_drift_is_kept_and_listed(copy_fixture) -> None:
    x = copy_fixture("drift", "x")
    hashes = snapshot(x)
    code, doc = cli("dedupe", x)
    assert code == 0
    assert doc["removed"] == []
    assert [(t["alias"], t["source"]) for t in doc["kept"]] == [
        ("lm_head.weight", "model.embed_tokens.weight")
    ]
    assert "drift" in doc["kept"][0]["reason"]
    assert any(p["code"] == "drift" for p in doc["problems"])
    assert snapshot(x) == hashes  # nothing to change
    sd = stored(x)
    assert (
        abs(float(sd["lm_head.weight"][3, 5] - sd["model.embed_tokens.weight"][3, 5]) - 0.5) < 1e-6
    )


@pytest.mark.parametrize("model", TIED_MODELS)
def test_pickle_dedupe_keeps_aliases_sharing_storage(model: str, copy_fixture) -> None:
    x = copy_fixture(f"{model}/bin", "x")
    ties = MANIFEST["models"][model]["ties"]
    untied = tiecli.untie(x, x.parent / "untied")
    sd = torch.load(Path(untied.output) / "pytorch_model.bin", weights_only=True)
    for alias, source in ties.items():
        assert sd[alias].untyped_storage().data_ptr() != sd[source].untyped_storage().data_ptr()

    result = tiecli.dedupe(untied.output)
    assert sorted(t.alias for t in result.removed) == sorted(ties)
    path = Path(untied.output) / "pytorch_model.bin"
    assert path.stat().st_size < (x / "pytorch_model.bin").stat().st_size + sum(
        sd[a].nbytes for a in ties
    )
    sd = torch.load(path, weights_only=True)  # plain torch: aliasing is the record
    original = torch.load(x / "pytorch_model.bin", weights_only=True)
    assert_same(sd, original)
    for alias, source in ties.items():
        assert sd[alias].data_ptr() == sd[source].data_ptr()


def test_transposed_pickle_view_survives_dedupe_and_untie(copy_fixture) -> None:
    x = copy_fixture("custom/transposed.pt", "x.pt")
    original = torch.load(x, weights_only=True)
    u = tiecli.untie(x, x.parent / "u.pt")
    sd = torch.load(u.output, weights_only=True)
    assert_same(sd, original)
    assert (
        sd["head.weight"].untyped_storage().data_ptr()
        != sd["embed.weight"].untyped_storage().data_ptr()
    )
    # a pickle keeps no record: once untied, the copy is a duplicate by value
    assert tiecli.dedupe(u.output).removed == []
    assert [t.alias for t in tiecli.dedupe(u.output, by_value=True, min_bytes=0).removed] == [
        "head.weight"
    ]
    sd = torch.load(u.output, weights_only=True)
    assert_same(sd, original)
    assert sd["head.weight"].data_ptr() == sd["embed.weight"].data_ptr()
    assert sd["head.weight"].stride() == (1, 16)


def test_to_safetensors_in_place_replaces_the_pickle(copy_fixture) -> None:
    x = copy_fixture("gpt2/bin", "x")
    original = tiecli.load(x)
    code, doc = cli("dedupe", x, "--to", "safetensors")
    assert code == 0
    assert sorted(p.name for p in x.iterdir()) == ["config.json", "model.safetensors"]
    assert_same(tiecli.load(x), original)
    sd = load_file(x / "model.safetensors")
    assert "lm_head.weight" not in sd
    with safe_open(str(x / "model.safetensors"), "pt") as f:
        assert f.metadata()["lm_head.weight"] == "transformer.wte.weight"


@pytest.mark.parametrize(
    "name, key",
    [("lightning.ckpt", "state_dict"), ("fairseq.pt", "model"), ("deepspeed.pt", "module")],
)
def test_nested_pickle_keeps_every_other_entry(name: str, key: str, copy_fixture) -> None:
    x = copy_fixture(f"custom/nested/{name}")
    top = torch.load(x, weights_only=True)
    untied = tiecli.untie(x, x.parent / f"untied-{name}")
    assert untied.to_dict()["restored"] == ["lm_head.weight"]
    deduped = tiecli.dedupe(untied.output, x.parent / f"deduped-{name}")
    assert [t.alias for t in deduped.removed] == ["lm_head.weight"]
    # untied: lm_head has a storage of its own; deduped again: one storage for both
    for path, shared in ((untied.output, False), (deduped.output, True)):
        got = torch.load(path, weights_only=True)
        assert sorted(got) == sorted(top)
        assert {k: v for k, v in got.items() if k != key} == {
            k: v for k, v in top.items() if k != key
        }
        assert_same(got[key], top[key])
        assert (
            got[key]["lm_head.weight"].data_ptr() == got[key]["transformer.wte.weight"].data_ptr()
        ) == shared
