"""verify --forward for models larger than one device: placed by accelerate across GPUs,
the CPU and disk, with outputs bit-identical to an unconstrained run.

The fixtures are ~25 KB, so a memory budget of a few kilobytes (``cpu=20KB``) is
what pushes part of them to disk. GPU tests are marked ``gpu`` and skip without CUDA.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import TIED_MODELS, fixture_path
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import tiecli
from tiecli.cli import app

runner = CliRunner()
PARTLY_ON_DISK = ["--device-map", "auto", "--max-memory", "cpu=20KB,disk=1MB"]


def verify_json(*args: str) -> tuple[int, dict]:
    r = runner.invoke(app, ["verify", "--json", "-q", "--forward", *args])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.stdout + r.stderr
    return r.exit_code, json.loads(r.stdout)


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temporary folder runs offload into, empty and watched."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def deduped(model: str, tmp_path: Path) -> Path:
    out = tmp_path / f"{model}-deduped"
    tiecli.dedupe(fixture_path(model, "full"), out)
    return out


# accelerate splits these ~25 KB models at 20 KB of CPU; BERT's tied decoder bias
# trips accelerate's tie handling at that size, so it goes to disk whole
BUDGETS = [("gpt2", 20), ("llama-tied", 20), ("t5", 20), ("bert-mlm", 10)]
assert sorted(m for m, _ in BUDGETS) == sorted(TIED_MODELS)


@pytest.mark.parametrize(("model", "kb"), BUDGETS)
def test_offloaded_to_disk_is_bit_identical_to_the_reference(
    model: str, kb: int, tmp_path: Path, private_tmp: Path
) -> None:
    full = fixture_path(model, "full")
    code, doc = verify_json(
        "--device", "cpu", "--device-map", "auto", "--max-memory", f"cpu={kb}KB,disk=1MB",
        "--against", str(full), str(deduped(model, tmp_path)),
    )  # fmt: skip
    assert code == 0, doc["problems"]
    f = doc["forward"]
    assert f["outputs_equal"] is True and f["max_abs_diff"] == 0.0
    # offloaded to disk as accelerate placed it: part of the model, or all of it
    assert set(f["device_map"].values()) == ({"cpu", "disk"} if kb == 20 else {"disk"})
    assert f["offloaded"] and all(f["device_map"][m] == "disk" for m in f["offloaded"])
    assert f["offload_bytes"] > 0 and f["bytes_by_device"]["disk"] == f["offload_bytes"]
    assert f["max_memory"] == {"cpu": kb * 1000, "disk": 10**6}
    # every tie is reported, shared, with the device it lives on
    assert f["ties_shared_on_device"] is True and f["tie_devices"]
    assert all(t["shared"] and t["device"] in ("cpu", "disk") for t in f["tie_devices"])
    assert f["peak_host_bytes"] > 0 and f["device_peak_bytes"] == {}
    # the offload folder the run made is gone
    assert [p for p in private_tmp.iterdir() if p.name.startswith("tiecli-offload-")] == []


def _outputs(path: Path, placement) -> tuple[list, dict]:
    from tiecli.arch.build import build_meta_model
    from tiecli.forward import load_onto, run_forward, tie_devices

    cpu = torch.device("cpu")
    model = build_meta_model(path, real_buffers=True)
    with tempfile.TemporaryDirectory() as folder:
        model, problems, stats, ties = load_onto(
            model, path, cpu, None, True, placement=placement, offload_dir=Path(folder)
        )
        assert problems == []
        outputs, _ = run_forward(model, None, cpu)
        where = {t["alias"]: t for t in tie_devices(model, ties, {})}
    return outputs, {"stats": stats, "ties": where}


@pytest.mark.parametrize(("model", "cpu"), [("t5", "20KB"), ("llama-tied", "10KB")])
def test_offloaded_outputs_equal_an_unconstrained_load(model: str, cpu: str) -> None:
    from tiecli.forward import Placement, parse_max_memory

    path = fixture_path(model, "hf")
    free, _ = _outputs(path, None)
    placed, info = _outputs(path, Placement("auto", parse_max_memory(f"cpu={cpu}")))
    assert "disk" in info["stats"].device_map.values()
    assert len(free) == len(placed) and all(
        torch.equal(a, b) for a, b in zip(free, placed, strict=True)
    )


def test_ties_on_disk_share_one_stored_weight(tmp_path: Path, private_tmp: Path) -> None:
    # T5's four names on disk: all four read one file of the offload folder
    code, doc = verify_json(
        "--device", "cpu", "--device-map", "auto", "--max-memory", "cpu=10KB",
        "--against", str(fixture_path("t5", "full")), str(deduped("t5", tmp_path)),
    )  # fmt: skip
    assert code == 0, doc["problems"]
    f = doc["forward"]
    assert f["device_map"] == {"": "disk"} and f["outputs_equal"] is True
    ties = {t["alias"]: t for t in f["tie_devices"]}
    assert set(ties) == {
        "encoder.embed_tokens.weight",
        "decoder.embed_tokens.weight",
        "lm_head.weight",
    }
    assert all(
        t["source"] == "shared.weight" and t["device"] == "disk" and t["shared"]
        for t in ties.values()
    )
    # one copy written per tie: the offload holds the unique bytes only
    assert f["offload_bytes"] == f["unique_parameter_bytes"] < f["tie_unaware_bytes"]


def test_a_tie_split_in_the_offload_index_is_reported() -> None:
    # the check reads the offload hooks: an alias loaded from a copy of its own is broken
    from accelerate.utils import PrefixedDataset

    from tiecli.arch.build import build_meta_model
    from tiecli.forward import Placement, load_onto, parse_max_memory, ties_on_device

    path = fixture_path("llama-tied", "hf")
    model = build_meta_model(path, real_buffers=True)
    with tempfile.TemporaryDirectory() as folder:
        placement = Placement("auto", parse_max_memory("cpu=10KB"))
        model, _, _, ties = load_onto(
            model,
            path,
            torch.device("cpu"),
            None,
            True,
            placement=placement,
            offload_dir=Path(folder),
        )
        assert ties_on_device(model, ties, {}) == []
        weights = model.lm_head._hf_hook.weights_map
        assert isinstance(weights, PrefixedDataset)
        index = weights.dataset.index
        copy = Path(folder) / "copy.safetensors"
        shutil.copy(index["lm_head.weight"]["safetensors_file"], copy)
        index["lm_head.weight"] = dict(index["lm_head.weight"], safetensors_file=str(copy))
        (p,) = ties_on_device(model, ties, {})
    assert p.code == "tie-broken-on-device" and "disk" in p.message
    assert set(p.tensors) == {"lm_head.weight", "model.embed_tokens.weight"}


def test_a_device_map_written_by_hand(tmp_path: Path, private_tmp: Path) -> None:
    layout = {
        "model.embed_tokens": "disk",
        "lm_head": "disk",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
    }
    full = fixture_path("llama-tied", "full")
    code, doc = verify_json(
        "--device",
        "cpu",
        "--device-map",
        json.dumps(layout),
        "--against",
        str(full),
        str(deduped("llama-tied", tmp_path)),
    )
    assert code == 0, doc["problems"]
    f = doc["forward"]
    assert f["device_map"] == layout and f["outputs_equal"] is True
    (tie,) = f["tie_devices"]
    assert (tie["alias"], tie["device"], tie["shared"]) == ("lm_head.weight", "disk", True)


def test_a_perturbed_copy_still_mismatches(tmp_path: Path, private_tmp: Path) -> None:
    full = fixture_path("llama-tied", "full")
    bad = tmp_path / "perturbed"
    shutil.copytree(full, bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.1.mlp.down_proj.weight"][0, 0] += 0.125  # a layer that goes to disk
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    code, doc = verify_json(
        "--device",
        "cpu",
        *PARTLY_ON_DISK,
        "--against",
        str(bad),
        str(deduped("llama-tied", tmp_path)),
    )
    assert code == 1
    assert "model.layers" in doc["forward"]["offloaded"]
    assert doc["forward"]["outputs_equal"] is False and doc["forward"]["max_abs_diff"] > 0
    assert [p["code"] for p in doc["problems"]] == ["forward-mismatch"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--device-map", "auto", "--max-memory", "cpu=lots"], "is not a size"),
        (["--device-map", "auto", "--max-memory", "cpu"], "DEVICE=SIZE"),
        (["--device-map", "auto", "--max-memory", "tpu=1GB"], "is not a device"),
        (["--device-map", "auto", "--max-memory", "cpu=1GB,cpu=2GB"], "given twice"),
        (["--device-map", "auto", "--max-memory", "disk=1GB"], "the CPU too"),
        (["--device-map", "auto", "--max-memory", "7=1GB"], "GPU 7"),
        (["--device-map", "auto", "--max-memory", "cpu=20KB,disk=1KB"], "bytes of weights on disk"),
        (["--max-memory", "cpu=1GB"], "goes with --device-map"),
        (["--device-map", "everywhere"], "expected auto, balanced"),
        (["--device-map", "[1, 2]"], "expected auto, balanced"),
        (["--device-map", '{"lm_head": "moon"}'], "is not a device"),
        (["--device-map", '{"model": "cpu"}'], "gives no device to lm_head.weight"),
        (["--device-map", '{"": "cpu", "no.such": "cpu"}'], "does not have"),
        (["--device-map", '{"model": "cpu", "lm_head": "disk"}'], "a tie must stay on one device"),
        (["--device-map", '{"": "cpu"}', "--max-memory", "cpu=1GB"], "goes with --device-map auto"),
        (["--device-map", "auto", "--device", "cuda:1"], "--device cuda:1"),
    ],
)
def test_bad_placement_options_are_one_line_errors(args: list[str], says: str) -> None:
    r = runner.invoke(app, ["verify", "--forward", *args, str(fixture_path("llama-tied", "hf"))])
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in r.stderr
    assert says in lines[0]


def test_placement_options_need_forward() -> None:
    r = runner.invoke(app, ["verify", "--device-map", "auto", str(fixture_path("gpt2", "hf"))])
    assert r.exit_code == 2 and "go with --forward" in r.stderr


BIG = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Stack(nn.Module):
        # 8 layers of 8 MiB, an embedding in front: 64 MiB of weights
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(16, 1024)
            self.layers = nn.ModuleList(nn.Linear(1024, 2048, bias=False) if i % 2 == 0
                                        else nn.Linear(2048, 1024, bias=False) for i in range(8))

        def forward(self, ids):
            x = self.embed(ids)
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return x

    def build():
        with torch.device("meta"):  # no memory goes to weights the checkpoint replaces
            model = Stack()
        return model, torch.arange(16).reshape(2, 8)
    """
)

MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    import accelerate, torch, transformers  # imported before the baseline
    import stack
    from tiecli.api import verify
    stack.build()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    r = verify(sys.argv[1], forward=True, device="cpu", model="stack:build",
               device_map="auto", max_memory="cpu=12MiB")
    f = r.forward
    print(json.dumps({"ok": r.ok, "before": before, "peak": f.peak_host_bytes,
                      "disk": f.stats.offload_bytes, "ties": f.ties_shared_on_device}))
    """
)


def test_weights_stream_to_disk_without_a_host_copy(tmp_path: Path) -> None:
    # 64 MiB of weights, 12 MiB of CPU: the run's resident-memory high-water mark grows by
    # less than half the checkpoint (read tensor by tensor, written to the offload folder)
    (tmp_path / "stack.py").write_text(BIG)
    g = torch.Generator().manual_seed(0)
    sd = {"embed.weight": torch.randn(16, 1024, generator=g)}
    for i in range(8):
        shape = (2048, 1024) if i % 2 == 0 else (1024, 2048)
        sd[f"layers.{i}.weight"] = torch.randn(shape, generator=g) * 0.03
    save_file(sd, tmp_path / "stack.safetensors")
    r = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path / "stack.safetensors")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": f"{tmp_path}:{Path(tiecli.__file__).parent.parent}", "PATH": "/usr/bin:/bin",
             "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["ok"] is True and m["ties"] is True
    assert m["disk"] > 48 << 20  # most of it went to disk
    assert m["peak"] - m["before"] < 32 << 20, m  # half the checkpoint


# -- on GPUs ---------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("cpu", "offloaded_to"), [("1GB", "cpu"), ("10KB", "disk")])
def test_gpu_with_offload_is_bit_identical(cpu: str, offloaded_to: str, tmp_path: Path) -> None:
    # embeddings and head on GPU 0, the layers offloaded to the CPU or to disk
    full = fixture_path("llama-tied", "full")
    code, doc = verify_json(
        "--device", "cuda", "--device-map", "auto", "--max-memory", f"0=20KB,cpu={cpu}",
        "--against", str(full), str(deduped("llama-tied", tmp_path)),
    )  # fmt: skip
    assert code == 0, doc["problems"]
    f = doc["forward"]
    assert f["outputs_equal"] is True and f["ties_shared_on_device"] is True
    assert f["device"] == "cuda:0" and set(f["device_map"].values()) == {"cuda:0", offloaded_to}
    assert "model.layers" in f["offloaded"]
    assert f["device_peak_bytes"]["cuda:0"] > 0
    (tie,) = f["tie_devices"]
    assert tie["device"] == "cuda:0" and tie["shared"] is True


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_by_hand(tmp_path: Path) -> None:
    layout = {
        "model.embed_tokens": 0,
        "lm_head": 0,
        "model.rotary_emb": 0,
        "model.layers.0": 0,
        "model.layers.1": 1,
        "model.norm": 1,
    }
    full = fixture_path("llama-tied", "full")
    code, doc = verify_json(
        "--device-map",
        json.dumps(layout),
        "--against",
        str(full),
        str(deduped("llama-tied", tmp_path)),
    )
    assert code == 0, doc["problems"]
    f = doc["forward"]
    assert f["outputs_equal"] is True and f["ties_shared_on_device"] is True
    assert set(f["device_map"].values()) == {"cuda:0", "cuda:1"}
    assert set(f["device_peak_bytes"]) >= {"cuda:0", "cuda:1"}


TRANSPOSED = textwrap.dedent(
    """
    import torch
    from torch import nn

    class TiedLM(nn.Module):
        # the head is the embedding's transpose: one storage, two layouts
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(32, 8)
            self.head = nn.Parameter(torch.empty(8, 32))

        def forward(self, ids):
            return torch.tanh(self.embed(ids)) @ self.head

    def build():
        return TiedLM(), torch.arange(12).reshape(2, 6)
    """
)


def test_a_transposed_tie_is_placed_whole_or_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"transposed_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(TRANSPOSED)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    emb = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    torch.save({"embed.weight": emb, "head": emb.t()}, tmp_path / "lm.pt")
    args = ["--device", "cpu", "--model", f"{name}:build", "--device-map", "auto"]
    code, doc = verify_json(*args, "--max-memory", "cpu=1GB", str(tmp_path / "lm.pt"))
    assert code == 0, doc["problems"]
    assert doc["forward"]["tie_devices"] == [
        {"alias": "head", "source": "embed.weight", "device": "cpu", "shared": True}
    ]
    # on disk a transposed view cannot be kept: a clear refusal, not a silent copy
    r = runner.invoke(
        app, ["verify", "--forward", *args, "--max-memory", "cpu=100", str(tmp_path / "lm.pt")]
    )
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "transposed tie of embed.weight" in r.stderr
    sys.modules.pop(name, None)


def test_human_output_shows_the_placement_and_each_tie(private_tmp: Path) -> None:
    r = runner.invoke(
        app,
        [
            "verify",
            "-q",
            "--forward",
            "--device",
            "cpu",
            *PARTLY_ON_DISK,
            str(fixture_path("gpt2", "full")),
        ],
    )
    assert r.exit_code == 0, r.output
    out = " ".join(r.stdout.split())  # rich wraps long lines
    assert "placement: cpu" in out and "disk" in out
    assert "offloaded:" in out
    assert "tie lm_head.weight -> transformer.wte.weight:" in out
    assert "(one storage)" in out
    assert "peak memory: host" in out
