"""In-place rewrites interrupted at any step leave a checkpoint with the original values.

Two ways to interrupt: (a) inject a failure at the N-th rename or write, for every
N, either letting tiecli clean up (an error) or not (a crash: its temporaries stay,
as after a kill); (b) SIGKILL a real ``python -m tiecli dedupe`` at random moments.
After each, the checkpoint must load (with tiecli, and with plain safetensors /
torch through the index) with the original values, and the next run must finish
the job and leave exactly what an uninterrupted run leaves.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import FIXTURES, MANIFEST, sharded_pickle
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tiecli
import tiecli.atomic
import tiecli.io.writes as writes

# -- what is interrupted -------------------------------------------------------


def _cloned_head_pickle(x: Path) -> Path:
    """A .bin whose head is a stored copy of the embedding: deduped without torch."""
    x.mkdir(parents=True)
    sd = torch.load(FIXTURES / "llama-tied/bin/pytorch_model.bin", weights_only=True)
    sd["lm_head.weight"] = sd["lm_head.weight"].clone()
    torch.save(sd, x / "pytorch_model.bin")
    return x / "pytorch_model.bin"


def _copy(rel: str, file: str | None = None):
    def make(x: Path) -> Path:
        shutil.copytree(FIXTURES / rel, x)
        return x / file if file else x

    return make


def _deduped(rel: str):
    def make(x: Path) -> Path:
        x.parent.mkdir(parents=True)
        tiecli.dedupe(FIXTURES / rel, x)
        return x

    return make


# name: (command, options, how to make the target, the model whose ties are involved)
TARGETS = {
    "dedupe-sharded": ("dedupe", {}, _copy("t5/full-sharded"), "t5"),
    "dedupe-file": ("dedupe", {}, _copy("bert-mlm/full", "model.safetensors"), "bert-mlm"),
    "untie-sharded": ("untie", {}, _copy("t5/hf-sharded"), "t5"),
    "untie-file": ("untie", {}, _copy("gpt2/hf", "model.safetensors"), "gpt2"),
    "untie-recorded-sharded": ("untie", {}, _deduped("bert-mlm/full-sharded"), "bert-mlm"),
    "untie-pickle": ("untie", {}, _copy("llama-tied/bin", "pytorch_model.bin"), "llama-tied"),
    "dedupe-pickle": ("dedupe", {}, _cloned_head_pickle, "llama-tied"),
    "convert-sharded-pickle": ("dedupe", {"to": "safetensors"}, sharded_pickle, "gpt2"),
}


def run(target: str, x: Path) -> None:
    command, options, _, _ = TARGETS[target]
    getattr(tiecli, command)(x, **options)


# -- reading without tiecli ------------------------------------------------------


def plain(x: Path) -> dict[str, torch.Tensor]:
    """What a loader that knows nothing of ties reads: every name the index (or file) lists."""
    folder = x if x.is_dir() else x.parent
    if x.is_dir():
        for name in (
            "model.safetensors.index.json",
            "model.safetensors",
            "pytorch_model.bin.index.json",
            "pytorch_model.bin",
        ):
            if (folder / name).is_file():
                x = folder / name
                break
    if x.name.endswith(".index.json"):
        weight_map = json.loads(x.read_text())["weight_map"]
        out = {}
        for shard in sorted(set(weight_map.values())):
            names = [n for n, s in weight_map.items() if s == shard]
            if shard.endswith(".safetensors"):
                with safe_open(str(folder / shard), "pt") as f:
                    out |= {n: f.get_tensor(n) for n in names}
            else:
                sd = torch.load(folder / shard, weights_only=True)
                out |= {n: sd[n] for n in names}
        return out
    if x.suffix == ".safetensors":
        return load_file(x)
    return torch.load(x, weights_only=True)


def assert_original(x: Path, original: dict[str, torch.Tensor], ties: dict[str, str]) -> None:
    loaded = tiecli.load(x)
    assert sorted(loaded) == sorted(original)
    for name, t in original.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    seen = plain(x)
    assert set(original) - set(seen) <= set(ties), "a plain loader lost a name that is not an alias"
    for name, t in seen.items():
        assert torch.equal(t, original[name]), name


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tiecli-" in p.name]


def tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# -- (a) fault injection at every step --------------------------------------------


class Fault:
    """Fails the N-th call (counting from 0) of the patched steps."""

    def __init__(self, at: int):
        self.at = at
        self.calls = 0
        self.fired = False

    def hit(self) -> bool:
        self.calls += 1
        if self.calls - 1 == self.at:
            self.fired = True
            return True
        return False


def arm(m: pytest.MonkeyPatch, step: str, fault: Fault) -> None:
    if step == "rename":
        real_replace = os.replace

        def replace(src, dst, **kw):
            if fault.hit():
                raise OSError(errno.EIO, "injected rename failure")
            return real_replace(src, dst, **kw)

        m.setattr(tiecli.atomic.os, "replace", replace)
        return

    # step == "write": the disk fills up half-way through a write
    real_copy, real_write, real_save = writes.copy_range, writes.write_all, torch.save

    def copy_range(src, dst, src_off, dst_off, count, *rest):
        if fault.hit():
            real_copy(src, dst, src_off, dst_off, count // 2, *rest)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(src, dst, src_off, dst_off, count, *rest)

    def write_all(fd, data, offset):
        if fault.hit():
            real_write(fd, memoryview(data)[: len(data) // 2], offset)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data, offset)

    def save(obj, f, *args, **kw):
        if fault.hit():
            f.write(b"PK\x03\x04 half a zip")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kw)

    m.setattr(writes, "copy_range", copy_range)
    m.setattr(writes, "write_all", write_all)
    m.setattr(torch, "save", save)


@pytest.mark.parametrize("mode", ["error", "crash"])
@pytest.mark.parametrize("step", ["rename", "write"])
@pytest.mark.parametrize("target", list(TARGETS))
def test_interrupted_at_every_step(
    target: str, step: str, mode: str, tmp_path: Path, monkeypatch
) -> None:
    _, _, make, model = TARGETS[target]
    ties = MANIFEST["models"][model]["ties"]

    reference = make(tmp_path / "reference" / "x")
    run(target, reference)
    expected = tree(reference if reference.is_dir() else reference.parent)

    for n in range(100):
        root = tmp_path / f"run{n}"
        x = make(root / "x")
        original = tiecli.load(x)
        fault = Fault(n)
        with monkeypatch.context() as m:
            arm(m, step, fault)
            if mode == "crash":  # as after SIGKILL: nothing cleans up the temporaries
                m.setattr(tiecli.atomic.Staging, "abort", lambda self: None)
            try:
                run(target, x)
            except OSError as e:
                assert fault.fired, e
                assert isinstance(e, tiecli.TiecliError), "an OS error must surface as OutputError"
                renamed = step == "rename" and n > 0  # some files already in place
                assert ("run the command again" in str(e)) == renamed, e
                assert ("nothing was changed" in str(e)) == (not renamed), e
            else:
                assert not fault.fired
                break
        assert_original(x, original, ties)
        if mode == "error":
            assert leftovers(root) == []

        run(target, x)  # no fault: finishes the job, cleans up
        assert leftovers(root) == []
        assert_original(x, original, ties)
        assert tree(x if x.is_dir() else x.parent) == expected
    else:
        pytest.fail("the run never finished without reaching the fault")
    assert n >= 1, "no step was interrupted"


def test_killed_dedupe_leaves_no_orphan_copies_in_shards(tmp_path: Path, monkeypatch) -> None:
    """Index renamed, shards not: the next run must still remove the aliases' bytes."""
    x = shutil.copytree(FIXTURES / "t5/full-sharded", tmp_path / "x")
    reference = shutil.copytree(FIXTURES / "t5/full-sharded", tmp_path / "ref" / "x")
    tiecli.dedupe(reference)
    fault = Fault(1)
    with monkeypatch.context() as m:
        arm(m, "rename", fault)
        m.setattr(tiecli.atomic.Staging, "abort", lambda self: None)
        with pytest.raises(OSError):
            tiecli.dedupe(x)
    index = json.loads((x / "model.safetensors.index.json").read_text())
    assert not set(MANIFEST["models"]["t5"]["ties"]) & set(
        index["weight_map"]
    )  # the index went first
    result = tiecli.dedupe(x)
    assert result.changed
    assert tree(x) == tree(reference)
    assert (
        sum(p.stat().st_size for p in x.glob("*.safetensors"))
        < sum(p.stat().st_size for p in (FIXTURES / "t5/full-sharded").glob("*.safetensors"))
        - MANIFEST["models"]["t5"]["alias_bytes"]
        + 4096
    )


@pytest.mark.parametrize("command", ["dedupe", "untie"])
def test_next_run_removes_leftovers_even_with_nothing_to_do(command: str, tmp_path: Path) -> None:
    x = tmp_path / "x"
    if command == "dedupe":  # already deduped: nothing to do
        tiecli.dedupe(FIXTURES / "gpt2/full-sharded", x)
    else:  # every name stored: nothing to restore
        shutil.copytree(FIXTURES / "gpt2/full-sharded", x)
    before = tree(x)
    (x / ".model-00001-of-00003.safetensors.tiecli-tmp").write_bytes(b"half a shard")
    (x / ".model.safetensors.index.json.tiecli-tmp").write_text("{")
    assert_original(
        x, load_file(FIXTURES / "gpt2/full/model.safetensors"), MANIFEST["models"]["gpt2"]["ties"]
    )
    result = getattr(tiecli, command)(x)
    assert result.changed is False
    assert leftovers(tmp_path) == []
    assert tree(x) == before


@pytest.mark.parametrize("step", ["exchange", "aside", "in"])
def test_failed_forced_replace_keeps_the_old_output(step: str, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    tiecli.untie(FIXTURES / "t5/hf", out)
    before = tree(out)
    with monkeypatch.context() as m:
        if step == "exchange":  # one atomic swap, where the system has it
            fault = Fault(0)

            def exchange(a: Path, b: Path) -> bool:
                fault.hit()
                raise OSError(errno.EIO, "injected exchange failure")

            m.setattr(tiecli.atomic, "exchange", exchange)
        else:  # two renames: the old output aside, then the new one in
            m.setattr(tiecli.atomic, "exchange", lambda a, b: False)
            fault = Fault(0 if step == "aside" else 1)
            arm(m, "rename", fault)
        with pytest.raises(tiecli.OutputError, match="nothing was changed"):
            tiecli.dedupe(FIXTURES / "t5/full", out, force=True)
    assert fault.fired
    assert tree(out) == before
    tiecli.dedupe(FIXTURES / "t5/full", out, force=True)
    assert leftovers(tmp_path) == []
    assert "lm_head.weight" not in load_file(out / "model.safetensors")


# -- (b) SIGKILL of a real process ------------------------------------------------

VOCAB, HIDDEN = 32_000, 512  # a 65.5 MB float32 embedding


def _big_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """~170 MB in 3 shards: an embedding, its stored lm_head copy, some big matrices."""
    g = torch.Generator().manual_seed(1234)
    embed = torch.randn(VOCAB, HIDDEN, generator=g)
    tensors = {
        "model.embed_tokens.weight": embed,
        "lm_head.weight": embed.clone(),
        "model.layers.0.mlp.weight": torch.randn(4096, 2048, generator=g),  # 33.5 MB
        "model.layers.1.mlp.weight": torch.randn(2048, 1024, generator=g),
        "model.layers.1.norm.weight": torch.randn(HIDDEN, generator=g),
    }
    shards = [
        ["model.embed_tokens.weight"],
        ["lm_head.weight", "model.layers.0.mlp.weight"],
        ["model.layers.1.mlp.weight", "model.layers.1.norm.weight"],
    ]
    return _write_sharded(folder, tensors, shards)


def _write_sharded(
    folder: Path, tensors: dict[str, torch.Tensor], shards: list[list[str]]
) -> dict[str, torch.Tensor]:
    """Save ``tensors`` as a sharded safetensors checkpoint in HF's layout."""
    folder.mkdir(parents=True)
    weight_map = {}
    for i, names in enumerate(shards, 1):
        shard = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(folder / shard), metadata={"format": "pt"})
        weight_map |= {n: shard for n in names}
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
        "weight_map": weight_map,
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return tensors


def _dedupe_process(folder: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tiecli", "dedupe", str(folder), "--json", "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_for_temporary(proc: subprocess.Popen, folder: Path) -> float | None:
    """Seconds until the first temporary appears (None if the process ended first)."""
    t0 = time.monotonic()
    while proc.poll() is None:
        if any(p.name.endswith(".tiecli-tmp") for p in folder.iterdir()):
            return time.monotonic() - t0
        time.sleep(0.002)
    return None


@pytest.mark.slow
def test_sigkill_during_in_place_dedupe(tmp_path: Path) -> None:
    start = time.monotonic()
    pristine = tmp_path / "pristine"
    original = _big_checkpoint(pristine)
    size = sum(p.stat().st_size for p in pristine.iterdir())
    assert 150e6 < size < 250e6

    # an uninterrupted run, timed: what every interrupted one must end as
    reference = shutil.copytree(pristine, tmp_path / "reference" / "x")
    t0 = time.monotonic()
    proc = _dedupe_process(reference)
    writing_after = _wait_for_temporary(proc, reference)
    out, err = proc.communicate(timeout=60)
    duration = time.monotonic() - t0
    assert proc.returncode == 0, err.decode()
    assert writing_after is not None
    doc = json.loads(out)
    assert doc["removed"] == ["lm_head.weight"]
    assert doc["bytes_saved"] == original["lm_head.weight"].nbytes
    expected = tree(reference)

    # kills at random moments of the whole run, then at random moments once
    # writing has begun (the window that matters, a fifth of the run)
    rng = random.Random(20240607)
    plan = ["anywhere"] * 3 + ["writing"] * 4
    killed_running = left_temporaries = 0
    for i, when in enumerate(plan):
        root = tmp_path / f"kill{i}"
        x = shutil.copytree(pristine, root / "x")
        proc = _dedupe_process(x)
        if when == "anywhere":
            time.sleep(rng.uniform(0.05, duration))
        elif _wait_for_temporary(proc, x) is not None:
            time.sleep(rng.uniform(0, duration - writing_after))
        if proc.poll() is None:
            killed_running += 1
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        left_temporaries += bool(leftovers(root))

        assert_original(x, original, {"lm_head.weight": "model.embed_tokens.weight"})
        tiecli.dedupe(x)  # the next run finishes and cleans up
        assert leftovers(root) == []
        assert tree(x) == expected
        shutil.rmtree(root)
        if time.monotonic() - start > 25:
            break
    print(
        f"\nclean run {duration:.2f} s (writing from {writing_after:.2f} s); {i + 1} kills, "
        f"{killed_running} while running, {left_temporaries} mid-write (left temporaries)"
    )
    assert killed_running >= 2, "the kills came too late to interrupt anything"
    assert left_temporaries >= 1, "no kill landed while files were being written"


# -- (c) a soak: many kills per command ----------------------------------------------

SOAK_KILLS = 50


def _soak_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """~21 MB in 3 shards, the head a stored copy of the embedding in another shard."""
    g = torch.Generator().manual_seed(99)
    embed = torch.randn(4096, 512, generator=g)  # 8.4 MB
    tensors = {
        "model.embed_tokens.weight": embed,
        "model.layers.0.mlp.weight": torch.randn(1024, 1024, generator=g),
        "lm_head.weight": embed.clone(),
        "model.norm.weight": torch.randn(512, generator=g),
    }
    shards = [
        ["model.embed_tokens.weight"],
        ["model.layers.0.mlp.weight", "lm_head.weight"],
        ["model.norm.weight"],
    ]
    return _write_sharded(folder, tensors, shards)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["dedupe", "untie"])
def test_fifty_kills_per_command_corrupt_nothing(command: str, tmp_path: Path) -> None:
    """SIGKILL a real in-place run at least 50 times: every time the checkpoint loads as before."""
    pristine = tmp_path / "pristine"
    original = _soak_checkpoint(pristine)
    ties = {"lm_head.weight": "model.embed_tokens.weight"}
    if command == "untie":
        tiecli.dedupe(pristine)  # untie puts the head back into its shard
    reference = shutil.copytree(pristine, tmp_path / "reference")
    getattr(tiecli, command)(reference)
    expected = tree(reference)

    def start(x: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "tiecli", command, str(x), "-q", "--json"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    x = tmp_path / "run"
    shutil.copytree(pristine, x)
    t0 = time.monotonic()
    proc = start(x)
    writing_after = _wait_for_temporary(proc, x)
    proc.communicate(timeout=60)
    duration = time.monotonic() - t0
    assert proc.returncode == 0 and writing_after is not None
    shutil.rmtree(x)

    rng = random.Random(7 if command == "dedupe" else 8)
    killed_running = mid_write = 0
    for i in range(SOAK_KILLS):
        shutil.copytree(pristine, x)
        proc = start(x)
        if i % 2 == 0:
            time.sleep(rng.uniform(0.0, duration))  # anywhere in the run
        elif _wait_for_temporary(proc, x) is not None:  # once writing has begun
            # writing is a short stretch of the run: aim at its start
            time.sleep(rng.uniform(0.0, max(0.0, duration - writing_after) / 8))
        killed_running += proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        mid_write += bool(leftovers(x))
        assert_original(x, original, ties)  # never a corrupted checkpoint
        getattr(tiecli, command)(x)  # the next run completes and cleans up
        assert leftovers(x) == [] and tree(x) == expected
        shutil.rmtree(x)
    print(f"\n{command}: {SOAK_KILLS} kills, {killed_running} while running, {mid_write} mid-write")
    assert killed_running >= SOAK_KILLS // 2
    assert mid_write >= 5, "too few kills landed while files were being written"
