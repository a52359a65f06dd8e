"""Synthetic checkpoints for the benchmark, written by streaming (little memory).

Qwen2-shaped bf16 checkpoints (a single file, 4 shards, a ``.bin``, a Hugging Face
folder) whose ``lm_head.weight`` is a stored byte-identical copy of the embedding,
and MoE-shaped checkpoints of many small tensors (10k to 200k) in 4 shards, for the
cost of ``inspect`` per tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

MB = 1e6  # reports use decimal MB / GB, like `ls -l --si` and disk vendors

# Qwen2.5-0.5B: hidden 896, 24 layers, 14 heads of 64, 2 KV heads, MLP 4864,
# vocab 151936. `2x` doubles both the vocabulary and the layer count, so every
# byte count (and the tied tensor) doubles. `small` is a smoke-test shape.
SIZES: dict[str, dict] = {
    "small": dict(
        vocab=8192,
        hidden=512,
        inter=2816,
        layers=3,
        heads=8,
        kv_heads=2,
        variants=("single", "sharded", "bin", "hf"),
    ),
    "1x": dict(
        vocab=151936,
        hidden=896,
        inter=4864,
        layers=24,
        heads=14,
        kv_heads=2,
        variants=("single", "sharded", "bin", "hf"),
    ),
    "2x": dict(
        vocab=303872, hidden=896, inter=4864, layers=48, heads=14, kv_heads=2, variants=("single",)
    ),
    # MoE: many small tensors (48 layers of ~100 to ~1,400 experts), 4 shards, for
    # inspect's cost per tensor; `moe` has the tensor count of a large MoE release
    "moe10k": dict(moe=10_000, vocab=1024, hidden=32, inter=16, layers=48, variants=("sharded",)),
    "moe": dict(moe=46_082, vocab=1024, hidden=32, inter=16, layers=48, variants=("sharded",)),
    "moe200k": dict(moe=200_000, vocab=1024, hidden=32, inter=16, layers=48, variants=("sharded",)),
}
ALL_VARIANTS = ("single", "sharded", "bin", "hf")
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
SEED = 20240601
POOL_BYTES = 64 << 20  # random bf16 values, reused at per-tensor offsets
CHUNK = 16 << 20


@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    offset: int  # where in the random pool this tensor's bytes start (even)

    @property
    def nbytes(self) -> int:
        n = 2
        for d in self.shape:
            n *= d
        return n


def qwen2_specs(cfg: dict) -> list[TensorSpec]:
    """Names and shapes of a Qwen2ForCausalLM state dict, lm_head stored separately."""
    import numpy as np

    h, i, v = cfg["hidden"], cfg["inter"], cfg["vocab"]
    head_dim = h // cfg["heads"]
    kv = cfg["kv_heads"] * head_dim
    shapes: list[tuple[str, tuple[int, ...]]] = [(EMBED, (v, h))]
    for n in range(cfg["layers"]):
        p = f"model.layers.{n}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "self_attn.q_proj.bias", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.v_proj.weight", (kv, h)),
        ]
    shapes += [("model.norm.weight", (h,)), (HEAD, (v, h))]
    rng = np.random.default_rng(SEED)
    offsets = rng.integers(0, POOL_BYTES // 2, size=len(shapes)) * 2
    specs = [
        TensorSpec(name, shape, int(off))
        for (name, shape), off in zip(shapes, offsets, strict=True)
    ]
    specs[-1].offset = specs[0].offset  # lm_head: a byte-identical copy of the embedding
    return specs


def moe_specs(cfg: dict) -> list[TensorSpec]:
    """Exactly ``cfg["moe"]`` tensors of an MoE decoder (tiny experts), lm_head stored
    as a copy of the embedding."""
    import numpy as np

    h, i, v, layers, total = cfg["hidden"], cfg["inter"], cfg["vocab"], cfg["layers"], cfg["moe"]
    per_layer = 7  # two norms, q/k/v/o, the router
    experts, extra = divmod(total - 3 - per_layer * layers, 3)
    shapes: list[tuple[str, tuple[int, ...]]] = [(EMBED, (v, h))]
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
        shapes += [(p + f"self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        if n < extra:
            shapes.append((p + "self_attn.q_norm.weight", (h,)))
        mine = experts // layers + (n < experts % layers)
        shapes.append((p + "mlp.gate.weight", (mine, h)))
        for e in range(mine):
            q = f"{p}mlp.experts.{e}."
            shapes += [(q + "gate_proj.weight", (i, h)), (q + "up_proj.weight", (i, h))]
            shapes.append((q + "down_proj.weight", (h, i)))
    shapes += [("model.norm.weight", (h,)), (HEAD, (v, h))]
    assert len(shapes) == total, (len(shapes), total)
    rng = np.random.default_rng(SEED)
    offsets = rng.integers(0, POOL_BYTES // 2, size=len(shapes)) * 2
    specs = [TensorSpec(n, s, int(o)) for (n, s), o in zip(shapes, offsets, strict=True)]
    specs[-1].offset = specs[0].offset
    return specs


def specs_for(cfg: dict) -> list[TensorSpec]:
    return moe_specs(cfg) if "moe" in cfg else qwen2_specs(cfg)


_POOL: memoryview | None = None


def pool() -> memoryview:
    """64 MiB of seeded random bf16 values: finite, non-constant, |x| in [2^-15, 2)."""
    global _POOL
    if _POOL is None:
        import numpy as np

        r = np.frombuffer(np.random.default_rng(SEED).bytes(POOL_BYTES), dtype=np.uint16)
        vals = (r & 0x807F) | ((((r >> 7) & 0xF) + 0x70) << 7)  # sign, 7-bit mantissa, exp 112..127
        _POOL = memoryview(vals.astype("<u2").tobytes())
    return _POOL


def tensor_chunks(spec: TensorSpec) -> Iterator[memoryview]:
    """The tensor's bytes, streamed: the pool from `offset`, wrapping around."""
    p, left, pos = pool(), spec.nbytes, spec.offset
    while left:
        n = min(left, CHUNK, POOL_BYTES - pos)
        yield p[pos : pos + n]
        left -= n
        pos = (pos + n) % POOL_BYTES


def write_safetensors(path: Path, specs: list[TensorSpec]) -> int:
    """Write the header ourselves, then stream tensor data: memory stays ~flat."""
    small = sum(s.nbytes for s in specs) <= 256 << 20  # many small tensors: one buffer
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for s in specs:
        header[s.name] = {
            "dtype": "BF16",
            "shape": list(s.shape),
            "data_offsets": [off, off + s.nbytes],
        }
        off += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        data = bytearray() if small else None
        for s in specs:
            for chunk in tensor_chunks(s):
                if data is None:
                    f.write(chunk)
                else:
                    data += chunk
        if data is not None:
            f.write(data)
    return off


def write_sharded(folder: Path, specs: list[TensorSpec], shards: int = 4) -> None:
    total = sum(s.nbytes for s in specs)
    groups: list[list[TensorSpec]] = [[] for _ in range(shards)]
    acc = 0
    for s in specs:
        k = min(shards - 1, acc * shards // total)
        groups[k].append(s)
        acc += s.nbytes
    groups = [g for g in groups if g]
    weight_map = {}
    for k, g in enumerate(groups, 1):
        name = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(folder / name, g)
        weight_map.update({s.name: name for s in g})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_bin(path: Path, specs: list[TensorSpec]) -> None:
    """torch.save of a state dict whose lm_head is a separate clone of the embedding."""
    import torch

    sd = {}
    for s in specs:
        if s.name == HEAD:
            sd[s.name] = sd[EMBED].clone()
            continue
        buf = bytearray(s.nbytes)
        pos = 0
        for chunk in tensor_chunks(s):
            buf[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
        sd[s.name] = torch.frombuffer(buf, dtype=torch.bfloat16).reshape(s.shape)
    torch.save(sd, path)
    del sd


def hf_config(cfg: dict) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": cfg["hidden"],
        "intermediate_size": cfg["inter"],
        "num_hidden_layers": cfg["layers"],
        "num_attention_heads": cfg["heads"],
        "num_key_value_heads": cfg["kv_heads"],
        "vocab_size": cfg["vocab"],
        "max_position_embeddings": 32768,
        "max_window_layers": cfg["layers"],
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "use_cache": True,
        "attention_dropout": 0.0,
        "bos_token_id": 151643 if cfg["vocab"] > 151643 else 0,
        "eos_token_id": 151643 if cfg["vocab"] > 151643 else 1,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }


def inputs_for(size_dir: Path) -> dict[str, Path]:
    """The PATH each variant is given to tiecli."""
    return {
        "single": size_dir / "single" / "model.safetensors",
        "sharded": size_dir / "sharded",
        "bin": size_dir / "bin" / "pytorch_model.bin",
        "hf": size_dir / "hf",
    }


def generate(
    size: str, size_dir: Path, variants: tuple[str, ...], log: Callable[[str], None]
) -> dict[str, float]:
    """Create the inputs (reused when a previous --keep run left the same ones)."""
    cfg = SIZES[size]
    marker = size_dir / ".generated.json"
    want = {
        "size": size,
        "cfg": {k: v for k, v in cfg.items() if k != "variants"},
        "seed": SEED,
        "pool": POOL_BYTES,
        "variants": sorted(variants),
        "version": 1,
    }
    if marker.exists():
        try:
            if json.loads(marker.read_text()) == want:
                log(f"[{size}] reusing inputs in {size_dir}")
                return {}
        except ValueError:
            pass
    if size_dir.exists():
        shutil.rmtree(size_dir)
    size_dir.mkdir(parents=True)
    specs = specs_for(cfg)
    paths = inputs_for(size_dir)
    took: dict[str, float] = {}
    for v in variants:
        t = time.perf_counter()
        if v == "single" or (v == "hf" and "single" not in variants):
            folder = size_dir / "single"
            folder.mkdir(exist_ok=True)
            write_safetensors(folder / "model.safetensors", specs)
        if v == "sharded":
            paths["sharded"].mkdir()
            write_sharded(paths["sharded"], specs)
        if v == "bin":
            paths["bin"].parent.mkdir()
            write_bin(paths["bin"], specs)
        if v == "hf":
            paths["hf"].mkdir()
            (paths["hf"] / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
            src, dst = size_dir / "single" / "model.safetensors", paths["hf"] / "model.safetensors"
            try:
                os.link(src, dst)  # same bytes; no command ever writes an input
            except OSError:
                shutil.copyfile(src, dst)
            if "single" not in variants:
                shutil.rmtree(size_dir / "single")
        took[v] = time.perf_counter() - t
        log(f"[{size}] generated {v:8s} {du(paths[v]) / MB:9.1f} MB in {took[v]:.1f} s")
    os.sync()
    marker.write_text(json.dumps(want))
    return took


def du(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
