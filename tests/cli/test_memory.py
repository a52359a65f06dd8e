"""`dedupe` streams: its peak memory stays far below the size of the checkpoint it rewrites."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROWS_PER_CHUNK = 2048
# name: (shape, seed); lm_head.weight is the embedding's stored copy (same seed)
TENSORS = {
    "model.embed_tokens.weight": ((32_000, 512), 1),
    "model.layers.0.mlp.weight": ((4096, 1536), 2),
    "model.layers.1.mlp.weight": ((4096, 1536), 3),
    "model.layers.2.mlp.weight": ((4096, 1536), 4),
    "lm_head.weight": ((32_000, 512), 1),
}


def _chunks(shape: tuple[int, int], seed: int):
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape
    for r in range(0, rows, ROWS_PER_CHUNK):
        yield torch.randn(min(ROWS_PER_CHUNK, rows - r), cols, generator=g)


def write_big_checkpoint(path: Path) -> int:
    """A float32 safetensors file written chunk by chunk (never whole in memory)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, ((rows, cols), _) in TENSORS.items():
        header[name] = {
            "dtype": "F32",
            "shape": [rows, cols],
            "data_offsets": [offset, offset + rows * cols * 4],
        }
        offset += rows * cols * 4
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for shape, seed in TENSORS.values():
            for chunk in _chunks(shape, seed):
                f.write(chunk.numpy().tobytes())
    return path.stat().st_size


PEAK_RSS = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stdout.write(done.stdout)
sys.stderr.write(done.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr)
sys.exit(done.returncode)
"""


def peak_rss(*command: str) -> tuple[int, str, str]:
    """Run ``command`` under a fresh wrapper; its peak RSS in bytes (Linux reports KiB)."""
    done = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, *command], capture_output=True, text=True, timeout=120
    )
    *err, last = done.stderr.strip().splitlines()
    assert done.returncode == 0, done.stderr
    return int(last), done.stdout, "\n".join(err)


@pytest.mark.slow
@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="ru_maxrss units are platform-specific"
)
def test_dedupe_peak_memory_is_far_below_checkpoint_size(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    size = write_big_checkpoint(path)
    assert 180e6 < size < 260e6
    lm_head_bytes = 32_000 * 512 * 4

    # the same command on a tiny checkpoint: what the interpreter and imports take
    tiny = tmp_path / "tiny.safetensors"
    embed = torch.randn(8, 4)
    save_file({"model.embed_tokens.weight": embed, "lm_head.weight": embed.clone()}, str(tiny))
    baseline, out, err = peak_rss(
        sys.executable, "-m", "tiecli", "dedupe", str(tiny), "--json", "-q"
    )
    assert json.loads(out)["bytes_saved"] == 8 * 4 * 4, err

    rss, out, err = peak_rss(sys.executable, "-m", "tiecli", "dedupe", str(path), "--json", "-q")
    doc = json.loads(out)
    assert doc["removed"] == ["lm_head.weight"], err
    assert doc["bytes_saved"] == lm_head_bytes
    # the tie record, and up to a page of header padding that keeps copies page-aligned
    assert path.stat().st_size < size - lm_head_bytes + 2 * 4096
    print(
        f"\npeak RSS {rss / 1e6:.1f} MB for a {size / 1e6:.1f} MB checkpoint ({rss / size:.0%}); "
        f"{baseline / 1e6:.1f} MB for a tiny one"
    )
    assert rss < 0.4 * size
    assert rss - baseline < 0.2 * size  # the work itself streams: bounded buffers, no whole tensors

    # the rewrite kept the values (read one tensor at a time)
    with safe_open(str(path), "pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert f.metadata()["lm_head.weight"] == "model.embed_tokens.weight"
        for name, (shape, seed) in TENSORS.items():
            if name == "lm_head.weight":
                continue
            assert torch.equal(f.get_tensor(name), torch.cat(list(_chunks(shape, seed)))), name
