"""Edge cases where a careless rewrite would lose data or a report would mislead."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from helpers import fixture_path, with_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import tiecli
from tiecli.cli import app

runner = CliRunner()


def test_tensor_equal_to_a_drifted_copy_keeps_its_values(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    enc, dec = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    path = tmp_path / "m.safetensors"
    save_file(
        {"enc.w": enc, "dec.w": dec, "copy.w": dec.clone()}, path, metadata={"dec.w": "enc.w"}
    )
    ties = {t.alias: t for t in tiecli.inspect(path).ties}
    assert ties["dec.w"].drift is not None
    assert (ties["copy.w"].source, ties["copy.w"].kind) == ("dec.w", "duplicate")
    tiecli.dedupe(path, by_value=True, min_bytes=0)
    loaded = tiecli.load(path)
    assert torch.equal(loaded["copy.w"], dec) and torch.equal(loaded["enc.w"], enc)


def test_dedupe_keeps_the_record_of_a_drifted_tie(tmp_path: Path) -> None:
    a = torch.randn(16, 8)
    b = a.clone()
    b[0, 0] += 1
    path = tmp_path / "m.safetensors"
    save_file({"enc.w": a, "dec.w": b}, path, metadata={"format": "pt", "dec.w": "enc.w"})
    assert tiecli.dedupe(path).removed == []
    with safe_open(str(path), "pt") as f:
        assert f.metadata().get("dec.w") == "enc.w"
    r = runner.invoke(app, ["verify", str(path)])
    assert r.exit_code == 1 and "drift" in r.stdout


@pytest.mark.parametrize("command", ["dedupe", "untie"])
def test_unreadable_record_is_never_rewritten_over(tmp_path: Path, command: str) -> None:
    path = tmp_path / "m.safetensors"
    record = json.dumps({"version": 2, "ties": [{"alias": "head.w", "source": "emb.w"}]})
    save_file({"emb.w": torch.randn(8, 4)}, path, metadata={"format": "pt", "tiecli": record})
    before = path.read_bytes()
    r = runner.invoke(app, [command, str(path)])
    assert r.exit_code == 2
    assert r.stderr.startswith(f"Error: {path}: its tie record cannot be read")
    assert path.read_bytes() == before


def test_converting_a_training_checkpoint_in_place_is_refused(tmp_path: Path) -> None:
    sd = {"w": torch.randn(4, 4), "lm_head.weight": torch.randn(4, 4)}
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": sd, "epoch": 3, "optimizer_states": [{"lr": 0.1}]}, ckpt)
    before = ckpt.read_bytes()
    r = runner.invoke(app, ["dedupe", str(ckpt), "--to", "safetensors"])
    assert r.exit_code == 1 and "-o" in r.stderr and "epoch" in r.stderr
    assert ckpt.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "last.ckpt"
    ]
    r = runner.invoke(
        app, ["dedupe", str(ckpt), "--to", "safetensors", "-o", str(tmp_path / "w.safetensors")]
    )
    assert r.exit_code == 0 and ckpt.read_bytes() == before
    assert set(load_file(tmp_path / "w.safetensors")) == set(sd)


def test_pickle_dedupe_in_place_is_idempotent(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(fixture_path("gpt2", "bin"), folder)
    sd = torch.load(folder / "pytorch_model.bin", weights_only=True)
    del sd["lm_head.weight"]  # as save_pretrained writes it: the declared alias absent
    torch.save(sd, folder / "pytorch_model.bin")
    inode = (folder / "pytorch_model.bin").stat().st_ino
    for _ in range(2):
        result = tiecli.dedupe(folder)
        assert result.changed is False and result.record == []
    assert (folder / "pytorch_model.bin").stat().st_ino == inode


def test_pickle_shards_across_files_point_to_the_conversion(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    sd = load_file(fixture_path("gpt2", "full") / "model.safetensors")
    first = {n: t for n, t in sd.items() if n != "lm_head.weight"}
    torch.save(first, folder / "pytorch_model-00001-of-00002.bin")
    torch.save(
        {"lm_head.weight": sd["lm_head.weight"]}, folder / "pytorch_model-00002-of-00002.bin"
    )
    weight_map = {n: "pytorch_model-00001-of-00002.bin" for n in first}
    weight_map["lm_head.weight"] = "pytorch_model-00002-of-00002.bin"
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    shutil.copy(fixture_path("gpt2", "full") / "config.json", folder)
    assert tiecli.inspect(folder).dedupable_bytes == 0  # a pickle cannot share across files
    r = runner.invoke(app, ["verify", "--require-deduped", "--json", str(folder)])
    (p,) = json.loads(r.stdout)["problems"]
    assert r.exit_code == 1 and p["message"].endswith("--to safetensors")


def test_nan_in_a_drift_keeps_json_valid(tmp_path: Path) -> None:
    a = torch.randn(8, 4)
    b = a.clone()
    b[1, 1] = float("nan")
    path = tmp_path / "m.safetensors"
    save_file({"enc.w": a, "dec.w": b}, path, metadata={"dec.w": "enc.w"})
    r = runner.invoke(app, ["inspect", "--json", str(path)])
    assert r.exit_code == 0
    (tie,) = json.loads(r.stdout)["ties"]
    assert tie["drift"]["differing_elements"] == 1 and tie["drift"]["max_abs_diff"] is None


def test_weights_that_do_not_fit_the_config_fail_the_forward_cleanly(tmp_path: Path) -> None:
    folder = with_config("gpt2", "hf", tmp_path / "m", vocab_size=80)
    r = runner.invoke(app, ["verify", "--forward", "--device", "cpu", "--json", str(folder)])
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    codes = [p["code"] for p in json.loads(r.stdout)["problems"]]
    assert "forward-failed" in codes


def _raw(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def test_sub_byte_elements_are_never_compared_transposed(tmp_path: Path) -> None:
    path = tmp_path / "f4.safetensors"
    _raw(
        path,
        {
            "model.embed_tokens.weight": ("F4", [8, 4], bytes(range(16))),
            "lm_head.weight": ("F4", [4, 8], bytes(range(16))),
        },
    )
    r = runner.invoke(app, ["inspect", "--json", str(path)])
    assert r.exit_code == 0, r.stderr


def test_transposed_drift_counts_the_differing_elements(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(fixture_path("llama-tied", "full") / "config.json", folder)
    sd = load_file(fixture_path("llama-tied", "full") / "model.safetensors")
    head = sd["model.embed_tokens.weight"].t().contiguous()
    head[2, 3] += 0.5
    sd["lm_head.weight"] = head
    save_file(sd, folder / "model.safetensors")
    (tie,) = tiecli.inspect(folder, use_transformers=False).ties
    assert tie.transform == "transpose" and tie.drift is not None
    assert tie.drift.differing == 1 and tie.drift.max_abs_diff == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("use_memcmp", [True, False])
def test_mapped_comparison_with_and_without_the_c_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_memcmp: bool
) -> None:
    """Equal, and unequal at the first, a middle and the last byte, across window edges."""
    from tiecli import values
    from tiecli.formats.safetensors import SafetensorsFile
    from tiecli.io import clib

    if not use_memcmp:
        monkeypatch.setitem(clib.FOUND, "memcmp", None)
    monkeypatch.setattr(values, "CHUNK", 4096 + 24)  # pieces that straddle page boundaries
    n = 3 * 4096 + 7  # not a multiple of 8: the numpy path has a tail
    base = bytes(range(256)) * (n // 256) + bytes(n % 256)
    for where in (None, 0, n // 2, n - 1):
        other = bytearray(base)
        if where is not None:
            other[where] ^= 0x01
        path = tmp_path / f"t{where}.safetensors"
        save_file(
            {
                "a": torch.frombuffer(bytearray(base), dtype=torch.uint8),
                "b": torch.frombuffer(other, dtype=torch.uint8),
            },
            str(path),
        )
        f = SafetensorsFile(path)
        try:
            e = {x.name: x for x in f.entries()}
            assert values.same_bytes(e["a"], e["b"]) is (where is None), where
        finally:
            f.close()


def _drift_where_samples_miss(folder: Path) -> float:
    """Change the stored lm_head at one element the 8 samples do not look at."""
    from tiecli.values import sample_positions

    for f in folder.glob("*.safetensors"):
        tensors = load_file(f)
        if "lm_head.weight" in tensors:
            head = tensors["lm_head.weight"].clone()
            flat = head.view(-1)
            spot = next(i for i in range(flat.numel()) if i not in sample_positions(flat.numel()))
            flat[spot] += 1.0
            tensors["lm_head.weight"] = head
            with safe_open(str(f), "pt") as h:
                meta = h.metadata()
            save_file(tensors, str(f), metadata=meta)
            return float(head.view(-1)[spot])
    raise AssertionError("no lm_head stored")


@pytest.mark.parametrize("form", ["full", "full-sharded"])
@pytest.mark.parametrize("in_place", [True, False])
def test_drift_the_samples_miss_is_kept_not_deduped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str, in_place: bool
) -> None:
    """dedupe takes ties as equal from samples; the full comparison while verifying
    finds the difference, and the run starts over deciding every tie exactly."""
    from tiecli import confirm
    from tiecli.api import rewrites

    monkeypatch.setattr(confirm, "SAMPLED_FROM", 0)  # sample even these small tensors
    wrong: list[bool] = []
    real = rewrites.assumption_wrong
    monkeypatch.setattr(
        rewrites, "assumption_wrong", lambda *a: wrong.append(real(*a)) or wrong[-1]
    )
    ckpt = shutil.copytree(fixture_path("llama-tied", form), tmp_path / "in")
    _drift_where_samples_miss(ckpt)
    before = tiecli.load(ckpt)

    out = None if in_place else tmp_path / "out"
    r = tiecli.dedupe(ckpt, out)
    assert wrong == [True]  # the first, sampled attempt was refused by its verification
    assert r.removed == [] and [t.alias for t, _why in r.kept] == ["lm_head.weight"]
    assert [p.code for p in r.problems] == ["drift"]
    after = tiecli.load(out or ckpt)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_sampled_ties_that_hold_are_deduped_in_one_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tiecli import confirm, detect
    from tiecli.api import rewrites
    from tiecli.formats import open_checkpoint

    monkeypatch.setattr(confirm, "SAMPLED_FROM", 0)
    monkeypatch.setattr(rewrites, "assumption_wrong", lambda *a: pytest.fail("no retry expected"))
    ckpt = shutil.copytree(fixture_path("llama-tied", "full-sharded"), tmp_path / "in")
    with open_checkpoint(ckpt) as opened:
        report = detect.find_ties(opened, sampled=True)
    assert report.assumed == [("lm_head.weight", "model.embed_tokens.weight", "identity")]
    r = tiecli.dedupe(ckpt)
    assert [t.alias for t in r.removed] == ["lm_head.weight"]


def test_copied_ranges_keep_their_offset_within_a_page(tmp_path: Path) -> None:
    """The header is padded so the largest copied range is page-aligned as in its source."""
    g = torch.Generator().manual_seed(5)
    embed = torch.randn(1024, 1024, generator=g)  # 4 MiB
    sd = {
        "model.embed_tokens.weight": embed,
        "lm_head.weight": embed.clone(),
        "model.layers.0.mlp.weight": torch.randn(2048, 1024, generator=g),  # the largest run
        "model.norm.weight": torch.randn(1024, generator=g),
    }
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(sd, str(src))

    def data_at(path: Path, name: str) -> int:
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        assert n % 8 == 0
        return 8 + n + json.loads(raw[8 : 8 + n])[name]["data_offsets"][0]

    r = tiecli.dedupe(src, out)
    assert [t.alias for t in r.removed] == ["lm_head.weight"]
    before = {n: data_at(src, n) for n in ("model.layers.0.mlp.weight", "model.norm.weight")}
    after = {n: data_at(out, n) for n in before}
    assert all(after[n] % 4096 == before[n] % 4096 for n in before), (before, after)
    loaded = load_file(str(out))
    assert all(torch.equal(loaded[k], sd[k]) for k in loaded) and "lm_head.weight" not in loaded
    assert out.stat().st_size < src.stat().st_size - embed.nbytes + 2 * 4096


def test_a_kept_tie_taken_as_equal_from_samples_is_decided_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tie kept for another reason (its source in another pickle shard) is never
    verified: dedupe must not report it on the strength of its samples."""
    from tiecli import confirm
    from tiecli.values import sample_positions

    monkeypatch.setattr(confirm, "SAMPLED_FROM", 0)
    folder = tmp_path / "x"
    folder.mkdir()
    sd = load_file(fixture_path("llama-tied", "full") / "model.safetensors")
    head = sd["model.embed_tokens.weight"].clone()
    flat = head.view(-1)
    flat[next(i for i in range(flat.numel()) if i not in sample_positions(flat.numel()))] += 1
    shards = {
        "pytorch_model-00001-of-00002.bin": {
            "model.embed_tokens.weight": sd["model.embed_tokens.weight"]
        },
        "pytorch_model-00002-of-00002.bin": {"lm_head.weight": head},
    }
    for file, part in shards.items():
        torch.save(part, folder / file)
    index = {"metadata": {}, "weight_map": {n: f for f, p in shards.items() for n in p}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(
        (fixture_path("llama-tied", "full") / "config.json").read_text()
    )
    r = tiecli.dedupe(folder, tmp_path / "out")
    assert r.removed == []
    assert [p.code for p in r.problems] == ["drift"]
    assert r.kept[0][0].drift is not None


def test_an_alias_and_the_written_source_are_checked_in_one_read_of_the_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The removed alias and the written copy of its source are compared with the
    input's source in one pass: each piece of the source is read once, not twice;
    an alias that differs past the sampled elements is still found."""
    from tiecli.api import rewrites
    from tiecli.io import FileBlob

    g = torch.Generator().manual_seed(9)
    embed = torch.randn(1024, 1024, generator=g)  # 4 MiB: several pieces
    sd = {"model.embed_tokens.weight": embed, "lm_head.weight": embed.clone()}
    sd["model.norm.weight"] = torch.randn(1024, generator=g)
    src = tmp_path / "in.safetensors"
    save_file(sd, str(src))
    seen: list[tuple[str, int, int]] = []
    real = FileBlob.window

    def window(self: FileBlob, offset: int, length: int):  # type: ignore[no-untyped-def]
        seen.append((self.file.path.name, self.start + offset, length))
        return real(self, offset, length)

    monkeypatch.setattr(FileBlob, "window", window)
    r = tiecli.dedupe(src, tmp_path / "out.safetensors")
    assert [t.alias for t in r.removed] == ["lm_head.weight"]
    header = json.loads(src.read_bytes()[8 : 8 + struct.unpack("<Q", src.read_bytes()[:8])[0]])
    lo, hi = header["model.embed_tokens.weight"]["data_offsets"]
    from_source = sum(n for name, at, n in seen if name == src.name and lo <= at < hi)
    assert from_source == embed.nbytes  # not twice: once for both comparisons

    flat = sd["lm_head.weight"].view(-1)
    flat[3 * 1024 * 1024 // 4 + 5] += 1.0  # in the last pieces, where no sample looks
    save_file(sd, str(src))
    wrong: list[bool] = []
    real_wrong = rewrites.assumption_wrong
    monkeypatch.setattr(
        rewrites, "assumption_wrong", lambda *a: wrong.append(real_wrong(*a)) or wrong[-1]
    )
    r = tiecli.dedupe(src, tmp_path / "again.safetensors")
    assert wrong == [True]  # the sampled attempt was refused by its verification
    assert r.removed == []
    got = load_file(str(tmp_path / "again.safetensors"))
    assert all(torch.equal(got[k], sd[k]) for k in sd)
