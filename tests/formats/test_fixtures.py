"""Checks for the committed checkpoint fixtures under ``fixtures/``.

Needs only torch, safetensors and transformers (not the tiecli package).
The generator is imported from ``fixtures/make_fixtures.py`` and re-run into a
temporary folder once per session; the committed files must match it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "fixtures"
SCRIPT = FIX / "make_fixtures.py"
NOT_GENERATED = {"make_fixtures.py", "README.md"}
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".ckpt"}

MODELS = ["gpt2", "llama-tied", "llama-untied", "t5", "bert-mlm"]
FORMS = ["hf", "hf-sharded", "full", "full-sharded", "bin"]
# Written out by hand so a change in transformers' declarations makes a test fail.
EXPECTED_TIES = {
    "gpt2": {"lm_head.weight": "transformer.wte.weight"},
    "llama-tied": {"lm_head.weight": "model.embed_tokens.weight"},
    "llama-untied": {},
    "t5": {
        "encoder.embed_tokens.weight": "shared.weight",
        "decoder.embed_tokens.weight": "shared.weight",
        "lm_head.weight": "shared.weight",
    },
    "bert-mlm": {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    },
}
TIED_MODELS = [m for m in MODELS if EXPECTED_TIES[m]]


# ----------------------------------------------------------------- helpers
def generated_files(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.name not in NOT_GENERATED
    )


COMMITTED = generated_files(FIX) if FIX.is_dir() else []
COMMITTED_WEIGHTS = [f for f in COMMITTED if Path(f).suffix in WEIGHT_SUFFIXES]


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def tload(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def flatten(obj, prefix: str = "") -> dict[str, object]:
    """Nested dicts/lists -> {"a/b/c": leaf}."""
    if isinstance(obj, dict):
        out: dict[str, object] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}/"))
        return out
    if (
        isinstance(obj, (list, tuple))
        and obj
        and any(isinstance(v, (dict, torch.Tensor)) for v in obj)
    ):
        out = {}
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}/"))
        return out
    return {prefix.rstrip("/"): obj}


def load_weights(path: Path) -> dict[str, object]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return flatten(tload(path))


def sharing_groups(tensors: dict[str, object]) -> set[frozenset[str]]:
    groups: dict[int, set[str]] = {}
    for k, v in tensors.items():
        if isinstance(v, torch.Tensor):
            groups.setdefault(v.untyped_storage().data_ptr(), set()).add(k)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def st_names(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def st_metadata(path: Path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def sharded_names(folder: Path) -> dict[str, str]:
    """weight_map of a sharded folder, after checking it against the shards."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    shards = sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
    assert sorted(set(weight_map.values())) == shards
    assert len(shards) >= 3
    total = 0
    for shard in shards:
        with safe_open(str(folder / shard), "pt") as f:
            names = list(f.keys())
            total += sum(nbytes(f.get_tensor(k)) for k in names)
        assert sorted(names) == sorted(k for k, v in weight_map.items() if v == shard)
    assert index["metadata"]["total_size"] == total
    return weight_map


def load_sharded(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("model-*-of-*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def fresh_model(name: str):
    """Build the model anew from the committed config.json, bypassing the generator."""
    config = transformers.AutoConfig.from_pretrained(FIX / name / "hf")
    arch = config.architectures[0]
    return getattr(transformers, arch)(config)


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def gen_module():
    spec = importlib.util.spec_from_file_location("make_fixtures", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def regen(tmp_path_factory, gen_module) -> Path:
    out = tmp_path_factory.mktemp("fixtures-regen")
    stale = out / "gpt2" / "stale.txt"
    stale.parent.mkdir()
    stale.write_text("left over from an older run")
    gen_module.main(out)
    assert not stale.exists(), "generator did not remove stale output"
    return out


@pytest.fixture(scope="session")
def manifest() -> dict:
    return json.loads((FIX / "MANIFEST.json").read_text())


# ------------------------------------------------- committed == regenerated
def test_committed_file_set_matches_regenerated(regen):
    assert COMMITTED, "no committed fixtures found; run fixtures/make_fixtures.py"
    assert COMMITTED == generated_files(regen)
    for m in MODELS:
        for form in FORMS:
            assert (FIX / m / form / "config.json").is_file()


@pytest.mark.parametrize("rel", COMMITTED_WEIGHTS)
def test_weight_file_matches_regenerated(regen, rel):
    ours, theirs = load_weights(FIX / rel), load_weights(regen / rel)
    assert list(ours) == list(theirs)
    for k, a in ours.items():
        b = theirs[k]
        if isinstance(a, torch.Tensor):
            assert isinstance(b, torch.Tensor), k
            assert a.dtype == b.dtype, k
            assert a.shape == b.shape, k
            assert a.stride() == b.stride(), k
            assert torch.equal(a, b), k
        else:
            assert a == b, k
    assert sharing_groups(ours) == sharing_groups(theirs)
    if rel.endswith(".safetensors"):
        # deterministic serialisation: same tensors + metadata -> same bytes
        assert (FIX / rel).read_bytes() == (regen / rel).read_bytes()
        assert st_metadata(FIX / rel) == {"format": "pt"}


def test_index_and_manifest_match_regenerated(regen, manifest):
    for rel in COMMITTED:
        if rel.endswith(".index.json"):
            assert json.loads((FIX / rel).read_text()) == json.loads((regen / rel).read_text()), rel
    new = json.loads((regen / "MANIFEST.json").read_text())
    manifest = dict(manifest)  # session fixture: don't mutate it
    for key in ("transformers_version", "torch_version"):
        manifest.pop(key, None), new.pop(key, None)
    assert manifest == new


def test_total_size_small():
    total = sum(p.stat().st_size for p in FIX.rglob("*") if p.is_file())
    assert total < 2 * 1024 * 1024


# ----------------------------------------------------------------- manifest
def test_manifest_lists_everything(manifest):
    assert list(manifest["models"]) == MODELS
    custom = manifest["custom"]
    for rel in [
        "custom/transposed.safetensors",
        "custom/transposed.pt",
        "custom/value-duplicate.safetensors",
        "custom/no-ties.safetensors",
        "custom/nested/lightning.ckpt",
        "custom/nested/fairseq.pt",
        "custom/nested/deepspeed.pt",
        "drift",
    ]:
        assert isinstance(custom.get(rel), str) and custom[rel], rel
        assert (FIX / rel).exists(), rel


@pytest.mark.parametrize("name", MODELS)
def test_manifest_ties_match_transformers(manifest, name):
    model = fresh_model(name)
    entry = manifest["models"][name]
    declared = dict(model.get_expanded_tied_weights_keys(all_submodels=True))
    assert entry["ties"] == declared == EXPECTED_TIES[name]
    assert entry["architecture"] == type(model).__name__
    assert entry["model_type"] == model.config.model_type
    full = load_file(str(FIX / name / "full" / "model.safetensors"))
    assert entry["alias_bytes"] == sum(nbytes(full[a]) for a in declared)
    assert entry["num_state_dict_names"] == len(model.state_dict())


# ----------------------------------------------------------------- structure
@pytest.mark.parametrize("name", ["gpt2", "t5", "bert-mlm", "llama-tied"])
def test_hf_forms_lack_aliases(manifest, name):
    ties = EXPECTED_TIES[name]
    sd_names = list(fresh_model(name).state_dict())
    expected = sorted(set(sd_names) - set(ties))
    hf = st_names(FIX / name / "hf" / "model.safetensors")
    sharded = sharded_names(FIX / name / "hf-sharded")
    for names in (hf, list(sharded)):
        assert sorted(names) == expected
        assert not set(ties) & set(names)
        assert set(ties.values()) <= set(names)
    assert manifest["models"][name]["hf_missing"] == [k for k in sd_names if k in ties]


@pytest.mark.parametrize("name", MODELS)
def test_full_forms_store_every_name(name):
    model = fresh_model(name)
    sd_names = list(model.state_dict())
    ties = EXPECTED_TIES[name]
    full = load_file(str(FIX / name / "full" / "model.safetensors"))
    assert sorted(full) == sorted(sd_names)
    weight_map = sharded_names(FIX / name / "full-sharded")
    assert sorted(weight_map) == sorted(sd_names)
    assert len(set(weight_map.values())) == 3
    # contiguous runs in state-dict order
    order = [weight_map[k] for k in sd_names]
    assert order == sorted(order)
    if ties:
        assert any(weight_map[a] != weight_map[s] for a, s in ties.items())
    sharded = load_sharded(FIX / name / "full-sharded")
    for k, t in full.items():
        assert t.dtype == torch.float32
        assert torch.equal(t, sharded[k]), k
        if t.numel() > 1:  # values are ours, not transformers' init (no constant norms)
            assert t.unique().numel() > 1, k
    for a, s in ties.items():
        assert torch.equal(full[a], full[s]), a
    # hf form holds the same values for the names it keeps
    hf = load_file(str(FIX / name / "hf" / "model.safetensors"))
    for k, t in hf.items():
        assert torch.equal(t, full[k]), k


@pytest.mark.parametrize("name", MODELS)
def test_bin_ties_share_storage(name):
    sd = tload(FIX / name / "bin" / "pytorch_model.bin")
    full = load_file(str(FIX / name / "full" / "model.safetensors"))
    assert list(sd) == list(fresh_model(name).state_dict())
    for k, t in sd.items():
        assert torch.equal(t, full[k]), k
    ties = EXPECTED_TIES[name]
    for a, s in ties.items():
        assert sd[a].untyped_storage().data_ptr() == sd[s].untyped_storage().data_ptr(), a
        assert sd[a].storage_offset() == sd[s].storage_offset()
    groups = sharing_groups(sd)
    expected = {}
    for a, s in ties.items():
        expected.setdefault(s, {s}).add(a)
    assert groups == {frozenset(g) for g in expected.values()}


def test_llama_untied_has_no_ties():
    assert fresh_model("llama-untied").get_expanded_tied_weights_keys(all_submodels=True) == {}
    for form in ("hf", "full"):
        sd = load_file(str(FIX / "llama-untied" / form / "model.safetensors"))
        assert "lm_head.weight" in sd
        assert sd["lm_head.weight"].shape == sd["model.embed_tokens.weight"].shape
        assert not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
        assert not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"].T)
    sd = tload(FIX / "llama-untied" / "bin" / "pytorch_model.bin")
    assert sharing_groups(sd) == set()


# ----------------------------------------------------------------- custom
def test_custom_has_no_config():
    assert (FIX / "custom").is_dir()
    assert list((FIX / "custom").rglob("config.json")) == []


def test_drift_differs_in_one_element():
    drift = FIX / "drift"
    assert sorted(p.name for p in drift.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((drift / "config.json").read_text()) == json.loads(
        (FIX / "llama-tied" / "full" / "config.json").read_text()
    )
    sd = load_file(str(drift / "model.safetensors"))
    base = load_file(str(FIX / "llama-tied" / "full" / "model.safetensors"))
    assert sorted(sd) == sorted(base)
    for k in base:
        if k != "lm_head.weight":
            assert torch.equal(sd[k], base[k]), k
    diff = sd["lm_head.weight"] != sd["model.embed_tokens.weight"]
    assert int(diff.sum()) == 1 and bool(diff[3, 5])
    delta = sd["lm_head.weight"][3, 5] - sd["model.embed_tokens.weight"][3, 5]
    assert abs(float(delta) - 0.5) < 1e-6


def test_transposed():
    sd = load_file(str(FIX / "custom" / "transposed.safetensors"))
    assert sorted(sd) == [
        "embed.weight",
        "head.weight",
        "norm.bias",
        "norm.weight",
        "out.bias",
        "proj.weight",
    ]
    assert sd["embed.weight"].shape == (64, 16) and sd["head.weight"].shape == (16, 64)
    assert torch.equal(sd["head.weight"], sd["embed.weight"].T)
    assert not torch.equal(sd["proj.weight"], sd["proj.weight"].T)
    assert torch.equal(sd["norm.weight"], torch.ones(16))
    assert torch.equal(sd["norm.bias"], torch.zeros(16))
    assert torch.equal(sd["out.bias"], torch.zeros(16))

    pt = tload(FIX / "custom" / "transposed.pt")
    assert list(pt) == ["embed.weight", "head.weight", "proj.weight"]
    e, h = pt["embed.weight"], pt["head.weight"]
    assert h.untyped_storage().data_ptr() == e.untyped_storage().data_ptr()
    assert not h.is_contiguous() and h.stride() == (1, 16)
    assert torch.equal(h, e.T) and torch.equal(e, sd["embed.weight"])
    assert pt["proj.weight"].untyped_storage().data_ptr() != e.untyped_storage().data_ptr()


def test_value_duplicate():
    sd = load_file(str(FIX / "custom" / "value-duplicate.safetensors"))
    assert sorted(sd) == [
        "a.weight",
        "b.weight",
        "c.weight",
        "d.bias",
        "e.bias",
        "f.scale",
        "g.scale",
    ]
    assert torch.equal(sd["a.weight"], sd["b.weight"]) and sd["a.weight"].shape == (32, 16)
    assert sd["c.weight"].shape == (32, 16) and not torch.equal(sd["a.weight"], sd["c.weight"])
    assert torch.equal(sd["d.bias"], torch.zeros(16)) and torch.equal(sd["e.bias"], torch.zeros(16))
    assert torch.equal(sd["f.scale"], torch.full((16,), 0.5))
    assert torch.equal(sd["g.scale"], torch.full((16,), 0.5))


def test_no_ties():
    path = FIX / "custom" / "no-ties.safetensors"
    sd = load_file(str(path))
    assert 18 <= len(sd) <= 24
    assert sum(nbytes(t) for t in sd.values()) >= 300 * 1024
    dtypes = [t.dtype for t in sd.values()]
    assert {torch.float32, torch.float16, torch.bfloat16} == set(dtypes)
    assert sum(1 for t in sd.values() if t.shape == (64, 64) and t.dtype == torch.float32) >= 8
    assert sum(1 for t in sd.values() if t.shape == (64,) and t.dtype == torch.float32) >= 4
    items = list(sd.items())
    for k, t in items:
        assert t.float().unique().numel() > 1, k
    for i, (k1, t1) in enumerate(items):
        for k2, t2 in items[i + 1 :]:
            if t1.dtype != t2.dtype:
                continue
            assert not (t1.shape == t2.shape and torch.equal(t1, t2)), (k1, k2)
            if t1.dim() == 2 and t1.shape == t2.T.shape:
                assert not torch.equal(t1, t2.T), (k1, k2)
    for k, t in items:  # a square matrix is not its own transpose either
        if t.dim() == 2 and t.shape[0] == t.shape[1]:
            assert not torch.equal(t, t.T), k


@pytest.mark.parametrize(
    "rel,key,extra",
    [
        (
            "lightning.ckpt",
            "state_dict",
            {"epoch": 3, "global_step": 10, "hyper_parameters": {"lr": 0.001}},
        ),
        ("fairseq.pt", "model", {"args": None, "extra_state": {"epoch": 2}}),
        ("deepspeed.pt", "module", {"buffer_names": []}),
    ],
)
def test_nested(rel, key, extra):
    obj = tload(FIX / "custom" / "nested" / rel)
    assert sorted(obj) == sorted([key, *extra])
    for k, v in extra.items():
        assert obj[k] == v, k
    sd = obj[key]
    gpt2 = tload(FIX / "gpt2" / "bin" / "pytorch_model.bin")
    assert list(sd) == list(gpt2)
    for k in gpt2:
        assert torch.equal(sd[k], gpt2[k]), k
    assert (
        sd["lm_head.weight"].untyped_storage().data_ptr()
        == sd["transformer.wte.weight"].untyped_storage().data_ptr()
    )
