"""PyTorch zip checkpoints read and deduped without torch, laid out as torch lays them out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import fixture_path

import tiecli
from tiecli.formats.torchzip import open_torchzip
from tiecli.formats.torchzip_pickle import dumps

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
MODELS = json.loads((FIXTURES / "MANIFEST.json").read_text())["models"]


def _data_pkl(path: Path) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


@pytest.mark.parametrize("model", sorted(MODELS))
def test_the_pickle_is_written_back_byte_for_byte(model: str) -> None:
    path = fixture_path(model, "bin") / "pytorch_model.bin"
    reader = open_torchzip(path)
    assert reader is not None
    try:
        assert dumps(reader.top) == _data_pkl(path)
        torch_sd = torch.load(path, weights_only=True)
        entries = {e.name: e for e in reader.entries()}
        assert list(entries) == list(torch_sd)
        for name, t in torch_sd.items():
            e = entries[name]
            assert e.shape == tuple(t.shape)
            raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
            assert e.blob.read(0, e.nbytes) == raw, name
    finally:
        reader.close()


def _head_first(folder: Path, head_first: bool) -> Path:
    """A .bin whose lm_head is a stored copy of the embedding (before it, or after)."""
    folder.mkdir(parents=True)
    sd = torch.load(fixture_path("llama-tied", "bin") / "pytorch_model.bin", weights_only=True)
    head = sd.pop("lm_head.weight").clone()
    sd = ({"lm_head.weight": head} | sd) if head_first else (sd | {"lm_head.weight": head})
    torch.save(sd, folder / "pytorch_model.bin")
    return folder / "pytorch_model.bin"


@pytest.mark.parametrize("head_first", [False, True])
def test_dedupe_of_a_bin_needs_no_torch_and_torch_reads_the_result(
    tmp_path: Path, head_first: bool
) -> None:
    src = _head_first(tmp_path / "in", head_first)
    out = tmp_path / "out.bin"
    _without_torch(f"tiecli.dedupe({str(src)!r}, {str(out)!r}).removed")

    before = torch.load(src, weights_only=True)
    after = torch.load(out, weights_only=True, mmap=True)
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert after["lm_head.weight"].data_ptr() == after["model.embed_tokens.weight"].data_ptr()
    assert out.stat().st_size < src.stat().st_size - before["lm_head.weight"].nbytes + 1024
    # torch computes record offsets from its own layout (format version 1): they must agree
    env = dict(os.environ, TORCH_SERIALIZATION_DEBUG="1")
    check = f"import torch; torch.load({str(out)!r}, weights_only=True, map_location='meta')"
    subprocess.run([sys.executable, "-c", check], check=True, env=env, timeout=120)
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None
    reader = torch._C.PyTorchFileReader(str(out))
    storages = [n for n in reader.get_all_records() if n.startswith("data/")]
    assert sorted(int(n[5:]) for n in storages) == list(range(len(storages)))
    assert all(reader.get_record_offset(n) % 64 == 0 for n in storages)
    assert not tiecli.dedupe(out).changed  # idempotent


def test_inspect_of_a_bin_needs_no_torch(tmp_path: Path) -> None:
    src = _head_first(tmp_path / "in", False)
    _without_torch(f"tiecli.inspect({str(src)!r}).ties")


def _without_torch(ties: str) -> None:
    """Run ``ties`` (an expression giving a list of ties) in a fresh interpreter: the
    head must be its only alias, and torch must never have been imported."""
    code = (
        "import sys, tiecli\n"
        f"ties = {ties}\n"
        "assert [t.alias for t in ties] == ['lm_head.weight'], ties\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _strided(folder: Path) -> Path:
    folder.mkdir()
    w = torch.randn(8, 4)
    torch.save({"w": w, "wt": w.t()}, folder / "m.pt")
    return folder / "m.pt"


def _not_only_tensors(folder: Path) -> Path:
    folder.mkdir()
    torch.save({"w": torch.randn(4), "step": 3}, folder / "m.pt")
    return folder / "m.pt"


def _deflated(folder: Path) -> Path:
    folder.mkdir()
    plain = folder / "plain.pt"
    torch.save({"w": torch.randn(64)}, plain)
    packed = folder / "m.pt"
    with zipfile.ZipFile(plain) as z, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as o:
        for info in z.infolist():
            o.writestr(info.filename, z.read(info.filename))
    plain.unlink()
    return packed


def _nested(folder: Path) -> Path:
    return FIXTURES / "custom" / "nested" / "lightning.ckpt"


@pytest.mark.parametrize("make", [_strided, _not_only_tensors, _deflated, _nested])
def test_what_torch_must_read_is_left_to_torch(tmp_path: Path, make) -> None:
    """Declined by the torch-free reader; read (or refused) through torch as before."""
    path = make(tmp_path / "x")
    assert open_torchzip(path) is None
    try:
        report = tiecli.inspect(path)
    except tiecli.TiecliError as e:  # torch's reader may refuse it: with its own message
        assert e.exit_code == 2
    else:
        assert report.tensors > 0


def test_sharded_bins_are_deduped_within_each_shard(tmp_path: Path) -> None:
    folder = tmp_path / "x"
    folder.mkdir()
    sd = torch.load(fixture_path("llama-tied", "bin") / "pytorch_model.bin", weights_only=True)
    sd["lm_head.weight"] = sd["lm_head.weight"].clone()
    names = list(sd)
    shards = {
        "pytorch_model-00001-of-00002.bin": names[:3] + ["lm_head.weight"],
        "pytorch_model-00002-of-00002.bin": [n for n in names[3:] if n != "lm_head.weight"],
    }
    for file, part in shards.items():
        torch.save({n: sd[n] for n in part}, folder / file)
    index = {"metadata": {}, "weight_map": {n: f for f, p in shards.items() for n in p}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    r = tiecli.dedupe(folder, tmp_path / "out")
    assert [t.alias for t in r.removed] == ["lm_head.weight"]
    loaded = tiecli.load(tmp_path / "out")
    assert all(torch.equal(loaded[n], sd[n]) for n in sd)


def test_a_state_dicts_metadata_is_kept_and_other_state_is_left_to_torch(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(64, 32), torch.nn.Linear(32, 64, bias=False))
    sd = model.state_dict()  # an OrderedDict with _metadata, as torch.save pickles it
    assert hasattr(sd, "_metadata")
    src = tmp_path / "plain.bin"
    torch.save(sd, src)
    assert open_torchzip(src) is not None
    out = tmp_path / "out.bin"
    tiecli.dedupe(src, out)
    assert torch.load(out, weights_only=True)._metadata == sd._metadata

    sd.extra = torch.randn(3)  # a tensor in the dict's state: not a flat state dict
    hidden = tmp_path / "hidden.bin"
    torch.save(sd, hidden)
    assert open_torchzip(hidden) is None


@pytest.mark.parametrize(
    "raw",
    [
        b"\x80\x02ctorch\nFloatStorage\n}X\x04\x00\x00\x00nameX\x05\x00\x00\x00Int8Ssb.",
        b"\x80\x02ccollections\nOrderedDict\n)R}X\x01\x00\x00\x00aK\x01sb.",
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n)R}X\x01\x00\x00\x00aK\x01sb.",
        b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueI0\n\x85R.",
    ],
)
def test_the_placeholder_unpickler_declines_what_torch_refuses(raw: bytes) -> None:
    """State on a class, a storage or a tensor call, and any other global: declined."""
    import io

    from tiecli.formats.torchzip_pickle import Declined, Unpickler

    try:
        top = Unpickler(io.BytesIO(raw)).load()
    except Declined:
        return
    # an OrderedDict may carry state (its _metadata): the reader then checks what it is
    assert raw.startswith(b"\x80\x02ccollections"), top


def test_a_pickle_that_names_the_wrong_storage_fails_verification(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every record is copied intact, but the written pickle swaps two same-shaped
    tensors: the read-back must notice, though no byte of any record differs."""
    from tiecli.formats import torchzip_write

    src = _head_first(tmp_path / "in", False)
    sd = torch.load(src, weights_only=True)
    shape = sd["model.layers.0.self_attn.q_proj.weight"].shape
    a, b = [n for n in sd if sd[n].shape == shape][:2]
    assert not torch.equal(sd[a], sd[b])
    real = torchzip_write.dumps

    def swapped(top):
        items = dict(top.items)
        items[a], items[b] = items[b], items[a]
        return real(top.with_items(items))

    monkeypatch.setattr(torchzip_write, "dumps", swapped)
    with pytest.raises(tiecli.TiecliError, match="verification failed") as e:
        tiecli.dedupe(src, tmp_path / "out.bin")
    assert e.value.exit_code == 1
    assert not (tmp_path / "out.bin").exists()


def test_large_records_keep_their_offset_within_a_page(tmp_path: Path) -> None:
    """Spaces after the pickle's STOP move every record so the largest one lands where
    it sat within a page in the input; torch reads the file as it reads its own."""
    g = torch.Generator().manual_seed(3)
    embed = torch.randn(1024, 1024, generator=g)  # 4 MiB
    sd = {
        "model.embed_tokens.weight": embed,
        "model.norm.weight": torch.randn(1024, generator=g),
        "lm_head.weight": embed.clone(),
    }
    src, out = tmp_path / "in.bin", tmp_path / "out.bin"
    torch.save(sd, src)
    assert [t.alias for t in tiecli.dedupe(src, out).removed] == ["lm_head.weight"]
    before, after = (torch._C.PyTorchFileReader(str(p)) for p in (src, out))
    assert after.get_record_offset("data/0") % 4096 == before.get_record_offset("data/0") % 4096
    assert _data_pkl(out).rstrip(b" ").endswith(b".")  # the pickle, then the padding
    env = dict(os.environ, TORCH_SERIALIZATION_DEBUG="1")
    check = (
        f"import torch; torch.load({str(out)!r}, weights_only=True, map_location='meta'); "
        f"sd = torch.load({str(out)!r}, weights_only=True, mmap=True); "
        "assert sd['lm_head.weight'].data_ptr() == sd['model.embed_tokens.weight'].data_ptr()"
    )
    subprocess.run([sys.executable, "-c", check], check=True, env=env, timeout=120)
    loaded = torch.load(out, weights_only=True)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert not tiecli.dedupe(out).changed


_NO_TORCH = (
    "import sys\n"
    "class _Refuse:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'torch' or name.startswith('torch.'):\n"
    "            raise ImportError('torch is not importable here')\n"
    "sys.meta_path.insert(0, _Refuse())\n"
    "import tiecli\n"
)


def _run_without_torch(code: str) -> None:
    """Run ``code`` where ``import torch`` fails."""
    subprocess.run([sys.executable, "-c", _NO_TORCH + code], check=True, timeout=120)


def _shared_bin(folder: Path, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """A flat .bin whose lm_head shares the embedding's storage (a deduped checkpoint)."""
    folder.mkdir(parents=True)
    sd = torch.load(fixture_path("llama-tied", "bin") / "pytorch_model.bin", weights_only=True)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    sd |= extra or {}
    torch.save(sd, folder / "pytorch_model.bin")
    return folder / "pytorch_model.bin"


def test_untie_of_a_bin_needs_no_torch_and_torch_reads_the_result(tmp_path: Path) -> None:
    src = _shared_bin(tmp_path / "in")
    out = tmp_path / "out.bin"
    _run_without_torch(
        f"r = tiecli.untie({str(src)!r}, {str(out)!r})\n"
        "assert [t.alias for t in r.restored] == ['lm_head.weight'], r.restored\n"
        "assert 'torch' not in sys.modules\n"
    )
    before = torch.load(src, weights_only=True)
    after = torch.load(out, weights_only=True)
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    head, embed = after["lm_head.weight"], after["model.embed_tokens.weight"]
    assert head.untyped_storage().data_ptr() != embed.untyped_storage().data_ptr()
    assert head.untyped_storage().nbytes() == head.nbytes  # a storage of its own
    # laid out as torch lays it out: its offsets agree with the ones torch computes
    env = dict(os.environ, TORCH_SERIALIZATION_DEBUG="1")
    check = f"import torch; torch.load({str(out)!r}, weights_only=True, map_location='meta')"
    subprocess.run([sys.executable, "-c", check], check=True, env=env, timeout=120)
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None
    # and dedupe, also without torch, shares the storage again
    again = tmp_path / "again.bin"
    _run_without_torch(
        f"r = tiecli.dedupe({str(out)!r}, {str(again)!r})\n"
        "assert [t.alias for t in r.removed] == ['lm_head.weight'], r.removed\n"
        "assert 'torch' not in sys.modules\n"
    )
    sd = torch.load(again, weights_only=True)
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    assert all(torch.equal(sd[k], before[k]) for k in before)


def test_untie_copies_only_the_aliased_part_of_a_storage(tmp_path: Path) -> None:
    """A source that is a view into a larger storage: the copy holds its elements only,
    with a checksum of its own."""
    folder = tmp_path / "in"
    folder.mkdir()
    base = torch.randn(3, 16, 8)
    embed = base[1]  # a contiguous view at an offset
    torch.save({"embed.weight": embed, "head.weight": embed, "other": base[2]}, folder / "m.bin")
    out = tmp_path / "out.bin"
    _run_without_torch(f"tiecli.untie({str(folder / 'm.bin')!r}, {str(out)!r})\n")
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None
    sd = torch.load(out, weights_only=True)
    assert torch.equal(sd["head.weight"], embed) and torch.equal(sd["embed.weight"], embed)
    assert sd["head.weight"].untyped_storage().nbytes() == embed.nbytes
    assert (
        sd["head.weight"].untyped_storage().data_ptr() != sd["other"].untyped_storage().data_ptr()
    )
