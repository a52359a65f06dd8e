"""Torch distributed checkpoints (DCP): read without torch, deduped to a Hugging Face folder.

The checkpoints are real ``dcp.save`` outputs (``tests/dcp_save.py``): two ranks on
127.0.0.1 (gloo, CPU) train a tiny tied Llama under FSDP2 and save its state dict,
so every tensor is split across the ranks' files and the tied pair is stored twice;
the same ranks' ``{"model": ..., "optim": ...}``; and a single process's save. One
module fixture writes them all (starting ranks is the slow part).
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT
from typer.testing import CliRunner

from tiecli.cli import app

runner = CliRunner()
INPUT = [[1, 5, 9, 17, 33, 65, 3, 2]]
TIE = ("lm_head.weight", "model.embed_tokens.weight")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dcp")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "dcp_save.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def cli(*args: object) -> tuple[int, dict, str]:
    result = runner.invoke(app, [*map(str, args), "--json", "-q"])
    doc = json.loads(result.stdout) if result.stdout.strip() else {}
    return result.exit_code, doc, result.stderr


def copy(saved: Path, name: str, dst: Path) -> Path:
    shutil.copytree(saved / name, dst)
    return dst


def one_line_error(args: list[object]) -> str:
    result = runner.invoke(app, [*map(str, args)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert not result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


# -- what a real save holds --------------------------------------------------------------


def test_fsdp_save_really_splits_tensors_and_stores_the_tie_twice(saved: Path) -> None:
    """The premise: FSDP2 splits each tensor across the ranks' files, and DCP keeps
    both names of the tie (it dedupes only one name written by several ranks)."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(saved / "fsdp")).read_metadata()
    embed = meta.state_dict_metadata[TIE[1]]
    head = meta.state_dict_metadata[TIE[0]]
    assert len(embed.chunks) == 2 and len(head.chunks) == 2
    files = {meta.storage_data[i].relative_path for i in meta.storage_data if i.fqn in TIE}
    assert files == {"__0_0.distcp", "__1_0.distcp"}
    with (saved / "fsdp-safetensors" / "__0_0.distcp").open("rb") as f:  # the other layout
        head = f.read(9)
    assert head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0


@pytest.mark.parametrize("form", ["fsdp", "fsdp-safetensors", "single"])
def test_inspect_reports_the_tie_with_both_copies_stored(saved: Path, form: str) -> None:
    code, doc, _err = cli("inspect", saved / form, "--config", saved / "config.json")
    assert code == 0
    assert doc["format"] == "dcp"
    assert doc["tensors"] == 21  # the model's: embedding, head, 2 layers of 9, final norm
    ties = {(t["alias"], t["source"]): t for t in doc["ties"]}
    tie = ties[TIE]
    assert tie["kind"] == "tied" and "declared" in tie["evidence"]
    assert tie["stored"] is True and tie["source_stored"] is True
    assert doc["dedupable_bytes"] == 256 * 64 * 4


def test_config_beside_the_folder_is_used_and_verify_gates_the_duplicate(
    saved: Path, tmp_path: Path
) -> None:
    x = copy(saved, "fsdp", tmp_path / "ckpt")
    shutil.copy(saved / "config.json", x / "config.json")
    code, doc, _err = cli("verify", x, "--require-deduped")
    assert code == 1
    dup = [p for p in doc["problems"] if p["code"] == "duplicate-stored"]
    assert dup and "--to safetensors -o" in dup[0]["message"]
    code, doc, _err = cli("inspect", x)
    assert doc["config"] == str(x / "config.json")
    assert any("declared" in t["evidence"] for t in doc["ties"])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_drift_between_the_halves_fails_verify(saved: Path, tmp_path: Path) -> None:
    """A declared tie whose stored copies differ (a single-process save written here)."""
    import torch
    import torch.distributed.checkpoint as dcp

    x = tmp_path / "drift"
    torch.manual_seed(1)
    embed = torch.randn(256, 64)
    head = embed.clone()
    head[3, 5] += 1.0
    state = {TIE[1]: embed, TIE[0]: head, "model.norm.weight": torch.randn(64)}
    dcp.save(state, checkpoint_id=str(x), no_dist=True)
    shutil.copy(saved / "config.json", x / "config.json")
    code, doc, _err = cli("verify", x)
    assert code == 1
    drift = [p for p in doc["problems"] if p["code"] == "drift"]
    assert drift and set(drift[0]["tensors"]) == set(TIE)


def test_ties_by_value_and_pattern_without_a_config(saved: Path) -> None:
    code, doc, _err = cli("inspect", saved / "fsdp")
    assert code == 0 and doc["config"] is None
    (tie,) = [t for t in doc["ties"] if (t["alias"], t["source"]) == TIE]
    assert {"value", "pattern"} <= set(tie["evidence"])


def test_inspect_reads_a_dcp_without_importing_torch(saved: Path) -> None:
    code = (
        "import sys, tiecli\n"
        f"r = tiecli.inspect({str(saved / 'fsdp')!r}, use_transformers=False)\n"
        "assert r.tensors == 21, r.tensors\n"
        "assert 'torch' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_load_gives_what_torch_dcp_load_gives(saved: Path) -> None:
    """tiecli.load gathers each tensor from its chunks as torch's own reader does."""
    import torch
    import torch.distributed.checkpoint as dcp

    import tiecli

    ours = tiecli.load(saved / "fsdp")
    theirs = {n: torch.zeros_like(t) for n, t in ours.items()}
    dcp.load(theirs, checkpoint_id=str(saved / "fsdp"), no_dist=True)
    assert len(ours) == 21
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


def test_verify_forward_runs_the_model_from_a_dcp(saved: Path, tmp_path: Path) -> None:
    x = copy(saved, "fsdp", tmp_path / "ckpt")
    shutil.copy(saved / "config.json", x / "config.json")
    code, doc, err = cli("verify", x, "--forward", "--device", "cpu")
    assert code == 0, err
    assert doc["forward"]["ties_shared_on_device"] is True


def test_nested_training_state_picks_the_model_part_and_says_so(saved: Path) -> None:
    code, doc, _err = cli("inspect", saved / "nested", "--config", saved / "config.json")
    assert code == 0
    assert doc["nested_key"] == "model"
    assert any("'model'" in n for n in doc["notes"])
    assert doc["tensors"] == 21  # the optimizer's moments are left out
    assert {(t["alias"], t["source"]) for t in doc["ties"]} == {TIE}


# -- dedupe --to safetensors -o ----------------------------------------------------------


@pytest.mark.parametrize("form", ["fsdp", "fsdp-safetensors", "nested", "single"])
def test_dedupe_to_safetensors_loads_bit_identical_with_one_copy(
    saved: Path, tmp_path: Path, form: str
) -> None:
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    code, doc, err = cli(
        "dedupe", saved / form, "--to", "safetensors", "-o", out, "--config", saved / "config.json"
    )
    assert code == 0, err
    assert doc["removed"] == [TIE[0]]
    assert doc["bytes_saved"] == 256 * 64 * 4
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert TIE[0] not in f.keys() and TIE[1] in f.keys()
        record = json.loads(f.metadata()["tiecli"])
    assert {(t["alias"], t["source"]) for t in record["ties"]} == {TIE}

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(INPUT)).logits
    assert torch.equal(logits, torch.load(saved / "logits.pt"))


def test_max_shard_size_writes_shards_and_an_index(saved: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    code, doc, err = cli(
        "dedupe",
        saved / "fsdp",
        "--to",
        "safetensors",
        "-o",
        out,
        "--config",
        saved / "config.json",
        "--max-shard-size",
        "100KB",
    )
    assert code == 0, err
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert TIE[0] not in index["weight_map"] and "tiecli" in index["metadata"]
    assert index["metadata"]["total_size"] == doc["bytes_after"]
    for shard in shards:
        assert (out / shard).stat().st_size <= 100_000 + 4096  # tensors plus the header
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(INPUT)).logits
    assert torch.equal(logits, torch.load(saved / "logits.pt"))


def test_in_place_dedupe_and_untie_are_refused_naming_the_conversion(
    saved: Path, tmp_path: Path
) -> None:
    x = copy(saved, "fsdp", tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in x.iterdir()}
    for args in (
        ["dedupe", x],
        ["dedupe", x, "-o", tmp_path / "o"],
        ["untie", x, "-o", tmp_path / "u"],
    ):
        line = one_line_error(args)
        assert "--to safetensors -o" in line
    assert {p.name: p.read_bytes() for p in x.iterdir()} == before
    assert not (tmp_path / "o").exists() and not (tmp_path / "u").exists()


def test_fix_is_refused_naming_the_conversion(saved: Path, tmp_path: Path) -> None:
    """fix rewrites files as they are; a DCP folder would come out as safetensors files
    named .metadata and __0_0.distcp."""
    x = copy(saved, "fsdp", tmp_path / "ckpt")
    shutil.copy(saved / "config.json", x / "config.json")
    before = {p.name: p.read_bytes() for p in x.iterdir()}
    for args in (["fix", x], ["fix", x, "-o", tmp_path / "o"]):
        line = one_line_error(args)
        assert "--to safetensors -o OUT; then fix OUT" in line
    assert {p.name: p.read_bytes() for p in x.iterdir()} == before
    assert not (tmp_path / "o").exists()


# -- hostile and broken folders ------------------------------------------------------------


class _Boom:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.write_text, (self.marker, "ran"))


def test_metadata_that_would_run_code_is_refused_and_nothing_runs(
    saved: Path, tmp_path: Path
) -> None:
    x = copy(saved, "fsdp", tmp_path / "ckpt")
    marker = tmp_path / "ran"
    hostile = pickle.dumps(_Boom(marker))
    # the proof that the pickle would run code: plain pickle.load of it writes the marker
    pickle.loads(hostile)
    assert marker.read_text() == "ran"
    marker.unlink()
    (x / ".metadata").write_bytes(hostile)
    for command in ("inspect", "verify"):
        line = one_line_error([command, x])
        assert "pathlib" in line and "does not load it" in line
    line = one_line_error(["dedupe", x, "--to", "safetensors", "-o", tmp_path / "o"])
    assert not marker.exists()
    assert not (tmp_path / "o").exists()


def test_metadata_with_a_hostile_global_inside_valid_metadata_is_refused(
    saved: Path, tmp_path: Path
) -> None:
    """A single disallowed class deep inside otherwise valid metadata is enough."""
    import torch.distributed.checkpoint as dcp

    x = copy(saved, "fsdp", tmp_path / "ckpt")
    marker = tmp_path / "ran"
    meta = dcp.FileSystemReader(str(x)).read_metadata()
    meta.planner_data = {"x": _Boom(marker)}
    (x / ".metadata").write_bytes(pickle.dumps(meta))
    line = one_line_error(["inspect", x])
    assert "does not load it" in line
    assert not marker.exists()


def _rewrite_metadata(x: Path, change) -> None:  # noqa: ANN001
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(x)).read_metadata()
    change(meta)
    (x / ".metadata").write_bytes(pickle.dumps(meta))


def _chunks(meta, fqn: str = TIE[1]):  # noqa: ANN001, ANN202
    return meta.state_dict_metadata[fqn].chunks


def _storage(meta, fqn: str = TIE[1], n: int = 1):  # noqa: ANN001, ANN202
    return [k for k in meta.storage_data if k.fqn == fqn][n]


def _out_of_range(meta) -> None:  # noqa: ANN001
    import torch

    c = _chunks(meta)[1]
    _chunks(meta)[1] = dataclasses.replace(c, sizes=torch.Size([c.sizes[0] + 1, c.sizes[1]]))


def _past_file(meta) -> None:  # noqa: ANN001
    key = _storage(meta)
    meta.storage_data[key] = dataclasses.replace(meta.storage_data[key], offset=10**9)


def _overlap(meta) -> None:  # noqa: ANN001
    _chunks(meta).append(_chunks(meta)[0])


def _gap(meta) -> None:  # noqa: ANN001
    del _chunks(meta)[1]


def _escape(meta) -> None:  # noqa: ANN001
    key = _storage(meta)
    meta.storage_data[key] = dataclasses.replace(
        meta.storage_data[key], relative_path="../x.distcp"
    )


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (_out_of_range, "out of range"),
        (_past_file, "outside __1_0.distcp"),
        (_overlap, "overlap"),
        (_gap, "do not cover"),
        (_escape, "outside the checkpoint folder"),
    ],
)
def test_broken_chunks_are_one_line_errors(saved: Path, tmp_path: Path, change, words: str) -> None:  # noqa: ANN001
    x = copy(saved, "fsdp", tmp_path / "ckpt")
    (tmp_path / "x.distcp").write_bytes((x / "__1_0.distcp").read_bytes())
    _rewrite_metadata(x, change)
    line = one_line_error(["inspect", x])
    assert words in line and TIE[1] in line
    one_line_error(["dedupe", x, "--to", "safetensors", "-o", tmp_path / "o"])
    assert not (tmp_path / "o").exists()


def test_a_distcp_file_linked_out_of_the_folder_is_not_read(saved: Path, tmp_path: Path) -> None:
    x = copy(saved, "fsdp", tmp_path / "ckpt")
    outside = tmp_path / "elsewhere.distcp"
    (x / "__1_0.distcp").rename(outside)
    (x / "__1_0.distcp").symlink_to(outside)
    line = one_line_error(["inspect", x])
    assert "outside the checkpoint folder" in line


def test_a_damaged_chunk_archive_is_a_one_line_error(saved: Path, tmp_path: Path) -> None:
    x = copy(saved, "fsdp", tmp_path / "ckpt")
    data = bytearray((x / "__1_0.distcp").read_bytes())
    data[-22:] = b"\0" * 22  # the last chunk's end-of-archive record
    (x / "__1_0.distcp").write_bytes(bytes(data))
    line = one_line_error(["inspect", x])
    assert "__1_0.distcp" in line


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ("offsets", "does not place its chunk at the metadata's offsets"),
        ("name", "holds no tensor named 'lm_head.weight'"),
    ],
)
def test_a_safetensors_rank_file_that_disagrees_with_the_metadata_is_one_line(
    saved: Path, tmp_path: Path, change: str, words: str
) -> None:
    """A rank's safetensors file is checked against .metadata: the chunk's offsets in its
    DCP_SHARDING_INFO and its name; the input is left as it was."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    x = copy(saved, "fsdp-safetensors", tmp_path / "ckpt")
    f = x / "__1_0.distcp"
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    sharding = json.loads(meta["DCP_SHARDING_INFO"])
    if change == "offsets":
        sharding[TIE[0]]["saved_offsets"] = [0, 0]
    else:
        tensors["lm_head.weight.renamed"] = tensors.pop(TIE[0])
    save_file(tensors, str(f), metadata=meta | {"DCP_SHARDING_INFO": json.dumps(sharding)})
    before = f.read_bytes()
    line = one_line_error(["inspect", x])
    assert "__1_0.distcp" in line and words in line, line
    assert f.read_bytes() == before
