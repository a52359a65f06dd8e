#!/usr/bin/env python
"""tiecli benchmark: one command reproduces every figure of SPEC section 9.

    python benchmarks/bench.py [--sizes small,1x,2x] [--repeat 5]
                               [--out benchmarks/results.md] [--workdir DIR] [--keep]

It generates synthetic Qwen2-shaped bf16 checkpoints (streamed, little memory),
times tiecli against `cp`, a load-then-save script and a transformers round
trip in one run, writes a Markdown report plus a JSON file of raw timings, and
prints PASS/FAIL lines for the spec targets. See benchmarks/README.md.

The same file doubles as the worker for the baselines it times
(`bench.py _worker KIND IN OUT`), so every baseline is a plain subprocess too.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import mmap
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_WORKDIR = HERE / "out" / "work"
MB = 1e6  # reports use decimal MB / GB, like `ls -l --si` and disk vendors

# --------------------------------------------------------------------------- #
# Synthetic checkpoints
# --------------------------------------------------------------------------- #

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
        for s in specs:
            for chunk in tensor_chunks(s):
                f.write(chunk)
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
    specs = qwen2_specs(cfg)
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


# --------------------------------------------------------------------------- #
# Baseline workers (run as `python bench.py _worker KIND IN OUT`)
# --------------------------------------------------------------------------- #


def worker(kind: str, src: str, dst: str) -> None:
    s, d = Path(src), Path(dst)
    if kind == "loadsave_sync":
        # The same script made durable like tiecli's output (fsync before done).
        worker("loadsave", src, dst)
        for f in [d] if d.is_file() else sorted(d.iterdir()):
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        return
    if kind == "loadsave":
        # What users do today: load everything, drop the alias, save. Per shard
        # for a sharded folder; other files (config.json) are copied over.
        from safetensors.torch import load_file, save_file

        if s.is_file():
            sd = load_file(s)
            sd.pop(HEAD, None)
            save_file(sd, d, metadata={"format": "pt"})
            return
        d.mkdir()
        for f in sorted(s.iterdir()):
            if f.suffix == ".safetensors":
                sd = load_file(f)
                sd.pop(HEAD, None)
                save_file(sd, d / f.name, metadata={"format": "pt"})
                del sd
            elif f.name.endswith(".index.json"):
                idx = json.loads(f.read_text())
                idx["weight_map"].pop(HEAD, None)
                (d / f.name).write_text(json.dumps(idx, indent=2))
            elif f.is_file():
                shutil.copyfile(f, d / f.name)
    elif kind == "torchsave":
        import torch

        sd = torch.load(s, map_location="cpu", weights_only=True)
        sd.pop(HEAD, None)
        torch.save(sd, d)
    elif kind == "transformers":
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        kw = (
            {"dtype": torch.bfloat16}
            if (major, minor) >= (4, 56)
            else {"torch_dtype": torch.bfloat16}
        )
        model = AutoModelForCausalLM.from_pretrained(s, **kw)
        model.save_pretrained(d)
    else:
        raise SystemExit(f"unknown worker {kind!r}")


# --------------------------------------------------------------------------- #
# Measuring
# --------------------------------------------------------------------------- #


def du(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def copy_any(src: Path, dst: Path) -> None:
    remove(dst)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)


def _proc_mem(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of one process in bytes; (0, 0) once it is gone."""
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    return rss, anon


@dataclass
class Sample:
    seconds: float
    rc: int
    peak_rss: int  # bytes: max(GNU time %M of the command, polled process-tree VmRSS sum)
    peak_anon: int  # bytes: polled process-tree RssAnon sum (file-backed mmap pages excluded)
    stderr: str = ""


GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
RSS_METHOD = (
    "max(GNU `/usr/bin/time -f %M` of the command, VmRSS summed over the command's process tree "
    "polled every 5 ms from /proc)"
    if GNU_TIME
    else "VmRSS summed over the command's process tree, polled every 5 ms from /proc (no /usr/bin/time here; "
    "a poll can miss spikes shorter than 5 ms)"
)


def measure(argv: list[str], scratch: Path, poll_s: float = 0.005) -> Sample:
    """Run argv once: wall time, exit code, peak memory of the whole process tree.

    The kernel's ru_maxrss of a child we fork ourselves starts at *our* RSS (exec
    keeps the forked image's high-water mark), so the command runs under GNU
    time, a ~2 MB process whose own child starts clean.
    """
    import psutil

    out, err, tfile = scratch / ".stdout", scratch / ".stderr", scratch / ".maxrss"
    remove(tfile)
    full = [GNU_TIME, "-f", "%M", "-o", str(tfile)] + argv if GNU_TIME else argv
    with open(out, "wb") as fo, open(err, "wb") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, cwd=scratch)
        pid = proc.pid
        stop = threading.Event()
        peak = {"rss": 0, "anon": 0}

        def poll() -> None:
            tree: list[int] = [] if GNU_TIME else [pid]
            n = 0
            while not stop.is_set():
                if n % 10 == 0 or not tree:  # rescanning /proc for children is the costly part
                    try:
                        kids = [c.pid for c in psutil.Process(pid).children(recursive=True)]
                        tree = kids if GNU_TIME else [pid] + kids
                    except psutil.Error:
                        pass
                n += 1
                rss = anon = 0
                for p in tree:
                    r, a = _proc_mem(p)
                    rss, anon = rss + r, anon + a
                peak["rss"], peak["anon"] = max(peak["rss"], rss), max(peak["anon"], anon)
                stop.wait(poll_s)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        rc = proc.wait()
        seconds = time.perf_counter() - t0
        stop.set()
        th.join()
    stderr = err.read_bytes().decode(errors="replace")
    kernel_peak = 0
    if GNU_TIME:
        try:
            kernel_peak = int(tfile.read_text().strip().splitlines()[-1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    return Sample(seconds, rc, max(kernel_peak, peak["rss"]), peak["anon"], stderr)


@dataclass
class Case:
    key: str  # stable id used by the target checks and the JSON
    label: str  # what the table shows
    argv: list[str]
    out: Path | None = None  # removed before (and after) each run
    fresh: tuple[Path, Path] | None = None  # (input, scratch copy): recopied before each run
    samples: list[Sample] = field(default_factory=list)


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def drop_caches() -> None:
    """Empty the page cache (root only): the next run reads everything from disk."""
    os.sync()
    DROP_CACHES.write_text("3\n")


def prefault(nbytes: int) -> None:
    """Touch ``nbytes`` of fresh memory and give it back (untimed).

    On a VM that returns free guest memory to its host (free page reporting, as
    on this benchmark's Firecracker machine), the next command to allocate that
    memory pays the host's page faults: ``cp`` of the same file took 0.35 s or
    3.6 s depending on it. Touching memory just before each timed run leaves the
    guest's free lists backed, so every row pays for its own work only.
    """
    if nbytes <= 0:
        return
    m = mmap.mmap(-1, nbytes)
    block = b"\1" * (1 << 20)
    for off in range(0, nbytes - len(block) + 1, len(block)):
        m[off : off + len(block)] = block
    m.close()


def prefault_bytes(gb: float | None, checkpoint: int) -> int:
    if gb is not None:
        return int(gb * (1 << 30))
    import psutil

    return min(2 * checkpoint + (1 << 30), psutil.virtual_memory().available // 2)


def run_cases(
    cases: list[Case],
    repeat: int,
    scratch: Path,
    log: Callable[[str], None],
    cold: bool = False,
    warm_bytes: int = 0,
) -> None:
    """Round-robin over the cases `repeat` times, so drift hits every row alike."""
    for r in range(repeat):
        for c in cases:
            if c.out is not None:
                remove(c.out)
            if c.fresh is not None:
                copy_any(*c.fresh)
            os.sync()  # flush dirty pages of earlier runs (untimed); page cache stays warm
            if cold:
                drop_caches()
            prefault(warm_bytes)
            s = measure(c.argv, scratch)
            c.samples.append(s)
            if s.rc != 0:
                tail = "\n    ".join(s.stderr.strip().splitlines()[-6:])
                log(f"  ! {c.label}: exit {s.rc}\n    {tail}")
            if c.out is not None and r < repeat - 1:
                remove(c.out)
        log(f"  round {r + 1}/{repeat} done")
    for c in cases:
        if c.out is not None:
            remove(c.out)
        if c.fresh is not None:
            remove(c.fresh[1])


def warm(paths: list[Path]) -> None:
    """Read inputs once so every timed run starts page-cache warm."""
    for p in paths:
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.read(CHUNK):
                    pass


# --------------------------------------------------------------------------- #
# What is timed
# --------------------------------------------------------------------------- #


def tiecli_argv() -> list[str]:
    exe = Path(sys.executable).parent / "tiecli"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("tiecli")
    return [found] if found else [sys.executable, "-m", "tiecli"]


def transformers_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):
        return False


def variant_cases(variant: str, inp: Path, scratch: Path, deduped: Path) -> list[Case]:
    T = tiecli_argv()
    W = [sys.executable, str(Path(__file__).resolve()), "_worker"]
    is_dir = inp.is_dir()
    suffix = "" if is_dir else inp.suffix
    o = lambda name: scratch / (name + suffix)  # noqa: E731
    cp = ["cp", "-r"] if is_dir else ["cp"]
    sync_target = '"$1"/* "$1"' if is_dir else '"$1"'
    cases = [
        Case("cp", "cp" + (" -r" if is_dir else ""), cp + [str(inp), str(o("cp"))], out=o("cp")),
        Case(
            "cp_sync",
            "cp + sync (fsync'd floor)",
            [
                "sh",
                "-c",
                f'{" ".join(cp)} "$0" "$1" && sync {sync_target}',
                str(inp),
                str(o("cpsync")),
            ],
            out=o("cpsync"),
        ),
        Case(
            "dedupe",
            "tiecli dedupe -o",
            T + ["dedupe", str(inp), "-o", str(o("dedupe")), "-q"],
            out=o("dedupe"),
        ),
        Case(
            "dedupe_fsync",
            "tiecli dedupe -o --fsync",
            T + ["dedupe", str(inp), "-o", str(o("dedupe_fsync")), "--fsync", "-q"],
            out=o("dedupe_fsync"),
        ),
    ]
    if variant != "hf":
        cases.append(
            Case(
                "dedupe_inplace",
                "tiecli dedupe (in place)",
                T + ["dedupe", str(o("inplace")), "-q"],
                fresh=(inp, o("inplace")),
            )
        )
    if variant == "bin":
        cases.append(
            Case(
                "dedupe_to_st",
                "tiecli dedupe --to safetensors -o",
                T
                + [
                    "dedupe",
                    str(inp),
                    "--to",
                    "safetensors",
                    "-o",
                    str(scratch / "to_st.safetensors"),
                    "-q",
                ],
                out=scratch / "to_st.safetensors",
            )
        )
        cases.append(
            Case(
                "loadsave",
                "torch.load + torch.save",
                W + ["torchsave", str(inp), str(o("loadsave"))],
                out=o("loadsave"),
            )
        )
    else:
        what = "load_file + save_file" + (" (per shard)" if variant == "sharded" else "")
        cases.append(
            Case(
                "loadsave", what, W + ["loadsave", str(inp), str(o("loadsave"))], out=o("loadsave")
            )
        )
        cases.append(
            Case(
                "loadsave_sync",
                what + " + fsync",
                W + ["loadsave_sync", str(inp), str(o("loadsave_sync"))],
                out=o("loadsave_sync"),
            )
        )
    if variant == "hf" and transformers_available():
        cases.append(
            Case(
                "transformers",
                "transformers from_pretrained + save_pretrained",
                W + ["transformers", str(inp), str(o("hf_rt"))],
                out=o("hf_rt"),
            )
        )
    cases.append(
        Case(
            "inspect",
            "tiecli inspect --json" + (" (with config)" if variant == "hf" else ""),
            T + ["inspect", str(inp), "--json", "-q"],
        )
    )
    if variant != "hf":
        cases.append(
            Case(
                "untie",
                "tiecli untie -o (deduped input)",
                T + ["untie", str(deduped), "-o", str(o("untie")), "-q"],
                out=o("untie"),
            )
        )
        cases.append(
            Case("verify_deduped", "tiecli verify (deduped)", T + ["verify", str(deduped), "-q"])
        )
    cases.append(
        Case("verify_original", "tiecli verify (original)", T + ["verify", str(inp), "-q"])
    )
    return cases


def startup_cases() -> list[Case]:
    T = tiecli_argv()
    return [
        Case("help", "tiecli --help", T + ["--help"]),
        Case("version", "tiecli --version", T + ["--version"]),
        Case("import_tiecli", 'python -c "import tiecli"', [sys.executable, "-c", "import tiecli"]),
        Case(
            "import_torch",
            'python -c "import torch" (reference)',
            [sys.executable, "-c", "import torch"],
        ),
        Case("python", 'python -c "pass" (reference)', [sys.executable, "-c", "pass"]),
    ]


# --------------------------------------------------------------------------- #
# Reporting
# --------------------------------------------------------------------------- #


def summarize(c: Case, cp_median: float | None) -> dict:
    t = [s.seconds for s in c.samples]
    med = statistics.median(t)
    return {
        "key": c.key,
        "label": c.label,
        "argv": c.argv,
        "seconds": t,
        "rc": [s.rc for s in c.samples],
        "peak_rss_mb": [round(s.peak_rss / MB, 1) for s in c.samples],
        "peak_anon_mb": [round(s.peak_anon / MB, 1) for s in c.samples],
        "median_s": med,
        "min_s": min(t),
        "max_s": max(t),
        "x_cp": (med / cp_median) if cp_median else None,
        "max_peak_rss_mb": max(s.peak_rss for s in c.samples) / MB,
        "max_peak_anon_mb": max(s.peak_anon for s in c.samples) / MB,
        "ok": all(s.rc == 0 for s in c.samples),
    }


def table(rows: list[dict]) -> str:
    head = "| command | median s | min–max s | × cp | peak RSS MB | peak anon MB |\n|---|---:|---:|---:|---:|---:|\n"
    lines = []
    for r in rows:
        xcp = f"{r['x_cp']:.2f}" if r["x_cp"] is not None else "—"
        label = r["label"] + ("" if r["ok"] else f" **(exit {sorted(set(r['rc']) - {0})})**")
        lines.append(
            f"| {label} | {r['median_s']:.3f} | {r['min_s']:.3f}–{r['max_s']:.3f} | {xcp} "
            f"| {r['max_peak_rss_mb']:.0f} | {r['max_peak_anon_mb']:.0f} |"
        )
    return head + "\n".join(lines) + "\n"


def machine_info(workdir: Path) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    fs, best = "unknown", ""
    try:
        real = str(workdir.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            mnt = parts[1]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fs = mnt, f"{parts[2]} ({parts[0]} on {mnt})"
    except OSError:
        pass

    def version(pkg: str) -> str:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as v

        try:
            return v(pkg)
        except PackageNotFoundError:
            return "not installed"

    import psutil

    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "disk_free_gb": round(shutil.disk_usage(workdir).free / 1e9, 1),
        "filesystem": fs,
        "workdir": str(workdir),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "safetensors": version("safetensors"),
        "tiecli": version("tiecli"),
    }


def check_targets(results: dict) -> list[tuple[bool, str]]:
    """SPEC section 9 targets, from the medians (memory: the worst run)."""
    out: list[tuple[bool, str]] = []

    def row(size: str, variant: str, key: str) -> dict | None:
        for r in results.get(size, {}).get(variant, {}).get("rows", []):
            if r["key"] == key and r["ok"]:
                return r
        return None

    def add(ok: bool, text: str) -> None:
        out.append((ok, text))

    st = results.get("startup", {}).get("rows", [])
    for r in st:
        if r["key"] == "help":
            add(r["median_s"] <= 0.4, f"tiecli --help ≤ 0.4 s: {r['median_s']:.3f} s")
    for size in [s for s in results if s != "startup"]:
        tag = f"[{size}]" + (" (smoke size)" if size == "small" else "")
        cp = row(size, "single", "cp")
        for key, what in (("dedupe", "dedupe -o"), ("dedupe_inplace", "dedupe in place")):
            r = row(size, "single", key)
            if r and cp:
                add(
                    r["x_cp"] <= 1.25,
                    f"{tag} single: {what} ≤ 1.25× cp: {r['x_cp']:.2f}× "
                    f"({r['median_s']:.2f} s vs cp {cp['median_s']:.2f} s)",
                )
        d, ls = row(size, "single", "dedupe"), row(size, "single", "loadsave")
        if d and ls:
            f = ls["median_s"] / d["median_s"]
            add(f >= 3, f"{tag} single: dedupe ≥ 3× faster than load-then-save: {f:.2f}×")
        lss = row(size, "single", "loadsave_sync")
        if d and lss:
            f = lss["median_s"] / d["median_s"]
            add(f >= 3, f"{tag} single: dedupe ≥ 3× faster than load-then-save + fsync: {f:.2f}×")
        d, tr = row(size, "hf", "dedupe"), row(size, "hf", "transformers")
        if d and tr:
            f = tr["median_s"] / d["median_s"]
            add(f >= 5, f"{tag} hf: dedupe ≥ 5× faster than transformers round trip: {f:.2f}×")
        d = row(size, "single", "dedupe")
        if d and tr:
            f = tr["median_s"] / d["median_s"]
            add(
                f >= 5,
                f"{tag} single-file dedupe ≥ 5× faster than the transformers round trip: {f:.2f}×",
            )
        for key, what in (
            ("dedupe", "dedupe -o"),
            ("dedupe_fsync", "dedupe -o --fsync"),
            ("dedupe_inplace", "dedupe in place"),
        ):
            r, cps = row(size, "single", key), row(size, "single", "cp_sync")
            if r and cps:
                f = r["median_s"] / cps["median_s"]
                add(f <= 1.25, f"{tag} single: {what} ≤ 1.25× cp + sync: {f:.2f}×")
        for key in (
            "dedupe",
            "dedupe_fsync",
            "dedupe_inplace",
            "untie",
            "verify_deduped",
            "verify_original",
        ):
            r = row(size, "single", key)
            if r:
                add(
                    r["max_peak_rss_mb"] <= 150,
                    f"{tag} single: {r['label']} peak RSS ≤ 150 MB: "
                    f"{r['max_peak_rss_mb']:.0f} MB (anon {r['max_peak_anon_mb']:.0f} MB)",
                )
        r = row(size, "single", "inspect")
        if r:
            add(r["median_s"] <= 0.5, f"{tag} single: inspect ≤ 0.5 s: {r['median_s']:.3f} s")
            add(
                r["max_peak_rss_mb"] <= 100,
                f"{tag} single: inspect peak RSS ≤ 100 MB: "
                f"{r['max_peak_rss_mb']:.0f} MB (anon {r['max_peak_anon_mb']:.0f} MB)",
            )
        for variant in ("sharded", "bin"):
            cp, r = row(size, variant, "cp"), row(size, variant, "dedupe")
            if cp and r:
                add(
                    r["x_cp"] <= 1.5,
                    f"{tag} {variant}: dedupe -o ≤ 1.5× cp: {r['x_cp']:.2f}× "
                    f"({r['median_s']:.2f} s vs cp {cp['median_s']:.2f} s)",
                )
    # a command that failed is a failed target too
    for size, variants in results.items():
        groups = {"": variants} if size == "startup" else variants
        for variant, g in groups.items():
            for r in g.get("rows", []):
                if not r["ok"]:
                    add(
                        False,
                        f"[{size}] {variant}: {r['label']} exited {sorted(set(r['rc']) - {0})}",
                    )
    return out


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #


def resolve_workdir(arg: str | None) -> Path:
    wd = Path(arg).resolve() if arg else DEFAULT_WORKDIR
    out_root = (HERE / "out").resolve()
    repo = REPO.resolve()
    if (wd == repo or repo in wd.parents) and not (wd == out_root or out_root in wd.parents):
        raise SystemExit(
            f"error: --workdir {wd} is inside the repository; use benchmarks/out/ or a folder outside it"
        )
    return wd


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        worker(*argv[1:4])
        return 0

    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="1x,2x", help="comma list of small,1x,2x (default: 1x,2x)")
    ap.add_argument(
        "--variants",
        default="auto",
        help="comma list of single,sharded,bin,hf; auto = all for small/1x, single for 2x",
    )
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per command (default 5)")
    ap.add_argument(
        "--out", default=str(HERE / "results.md"), help="Markdown report; raw JSON goes next to it"
    )
    ap.add_argument(
        "--workdir",
        default=None,
        help=f"where checkpoints are generated (default {DEFAULT_WORKDIR})",
    )
    ap.add_argument(
        "--keep", action="store_true", help="keep generated checkpoints (and reuse them next run)"
    )
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target FAILs")
    ap.add_argument(
        "--prefault-gb",
        type=float,
        default=None,
        help="memory touched and freed before every timed run (default: 2x the checkpoint "
        "+ 1 GB, at most half the free memory; 0 = off)",
    )
    ap.add_argument(
        "--cold",
        action="store_true",
        help="drop the page cache before every timed run (root only): disk-bound figures",
    )
    a = ap.parse_args(argv)
    if a.cold:
        try:
            drop_caches()
        except OSError as e:
            ap.error(f"--cold needs to write {DROP_CACHES} (run as root): {e.strerror}")

    sizes = [s.strip() for s in a.sizes.split(",") if s.strip()]
    for s in sizes:
        if s not in SIZES:
            ap.error(f"unknown size {s!r}; choose from {', '.join(SIZES)}")
    if a.repeat < 1:
        ap.error("--repeat must be ≥ 1")
    if a.variants != "auto":
        chosen = tuple(v.strip() for v in a.variants.split(",") if v.strip())
        bad = [v for v in chosen if v not in ALL_VARIANTS]
        if bad:
            ap.error(f"unknown variant(s) {bad}; choose from {', '.join(ALL_VARIANTS)}")
    workdir = resolve_workdir(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out_md = Path(a.out).resolve()
    out_json = out_md.with_suffix(".json")

    def log(msg: str) -> None:
        print(msg, flush=True)

    machine = machine_info(workdir)
    log(
        f"tiecli benchmark — {machine['cpu']}, {machine['cores']} cores, {machine['ram_gb']} GB RAM, "
        f"{machine['filesystem']}, {machine['disk_free_gb']} GB free; tiecli = {' '.join(tiecli_argv())}"
    )

    results: dict = {}
    gen_times: dict = {}
    created: list[Path] = []
    md_sections: list[str] = []
    try:
        # startup costs: independent of checkpoint size
        scratch = workdir / "_scratch"
        scratch.mkdir(exist_ok=True)
        created.append(scratch)
        log("\n== startup ==")
        cases = startup_cases()
        run_cases(cases, a.repeat, scratch, log, a.cold, prefault_bytes(a.prefault_gb, 0))
        rows = [summarize(c, None) for c in cases]
        results["startup"] = {"rows": rows}
        md_sections.append("### startup (no checkpoint)\n\n" + table(rows))
        print(table(rows))

        for size in sizes:
            cfg = SIZES[size]
            variants = cfg["variants"] if a.variants == "auto" else chosen
            size_dir = workdir / size
            if not size_dir.exists():
                created.append(size_dir)
            elif not a.keep:
                created.append(size_dir)
            # disk check: inputs (hf is a hard link) + ~4 outputs of the largest variant alive at once
            specs = qwen2_specs(cfg)
            one = sum(s.nbytes for s in specs)
            need = one * (len([v for v in variants if v != "hf"]) + 4)
            free = shutil.disk_usage(workdir).free
            if not (size_dir / ".generated.json").exists() and free < need:
                raise SystemExit(
                    f"error: {size} needs ~{need / 1e9:.1f} GB free in {workdir}, have {free / 1e9:.1f} GB"
                )
            log(f"\n== {size}: {len(specs)} tensors, {one / MB:.1f} MB per checkpoint ==")
            gen_times[size] = generate(size, size_dir, tuple(variants), log)
            paths = inputs_for(size_dir)
            results[size] = {}
            for variant in variants:
                inp = paths[variant]
                vscratch = size_dir / f"_scratch_{variant}"
                remove(vscratch)
                vscratch.mkdir()
                try:
                    deduped = vscratch / ("deduped" + ("" if inp.is_dir() else inp.suffix))
                    if variant != "hf":
                        r = subprocess.run(
                            tiecli_argv() + ["dedupe", str(inp), "-o", str(deduped), "-q"],
                            capture_output=True,
                            text=True,
                        )
                        if r.returncode != 0:
                            log(
                                f"  ! could not make the deduped input for untie/verify: {r.stderr.strip()[-400:]}"
                            )
                    before = {
                        p: (p.stat().st_size, p.stat().st_mtime_ns)
                        for p in (
                            [inp] if inp.is_file() else [f for f in inp.rglob("*") if f.is_file()]
                        )
                    }
                    warm([inp] + ([deduped] if deduped.exists() else []))
                    log(
                        f"-- {size}/{variant}: {inp.relative_to(workdir)} ({du(inp) / MB:.1f} MB), "
                        f"{a.repeat} round(s)"
                    )
                    cases = variant_cases(variant, inp, vscratch, deduped)
                    run_cases(
                        cases,
                        a.repeat,
                        vscratch,
                        log,
                        a.cold,
                        prefault_bytes(a.prefault_gb, one),
                    )
                    after = {
                        p: (p.stat().st_size, p.stat().st_mtime_ns) for p in before if p.exists()
                    }
                    if after != before:
                        log(f"  ! WARNING: the input {inp} changed during the run")
                finally:
                    remove(vscratch)
                cp_med = statistics.median(s.seconds for s in cases[0].samples)
                rows = [summarize(c, cp_med) for c in cases]
                results[size][variant] = {"input": str(inp), "bytes": du(inp), "rows": rows}
                title = (
                    f"### {size} / {variant} — `{inp.relative_to(workdir)}`, "
                    f"{du(inp) / MB:.1f} MB, {len(specs)} tensors"
                )
                md_sections.append(title + "\n\n" + table(rows))
                print(f"\n{title}\n")
                print(table(rows))
    finally:
        if not a.keep:
            for p in created:
                remove(p)
            try:
                workdir.rmdir()  # only when empty
            except OSError:
                pass

    checks = check_targets(results)
    check_lines = [f"{'PASS' if ok else 'FAIL'}  {text}" for ok, text in checks]
    print("\n== targets (SPEC §9) ==")
    print("\n".join(check_lines))

    cache = (
        "The page cache is **dropped before every timed run** (`--cold`): inputs, and Python "
        "itself, come from disk"
        if a.cold
        else "Inputs are read once before timing and stay **page-cache warm** "
        "(nothing is dropped from the cache)"
    )
    faulted = (
        "memory is not touched beforehand (`--prefault-gb 0`)"
        if a.prefault_gb == 0
        else "then, untimed, the harness touches and frees "
        + (f"{a.prefault_gb:g} GB" if a.prefault_gb else "2× the checkpoint + 1 GB")
        + " of memory, so no row pays the host for memory the VM handed back "
        "(free page reporting)"
    )
    notes = (
        "Method: every row runs as a subprocess; rows are timed round-robin, "
        f"{a.repeat} round(s). {cache}; `sync` runs, untimed, before every timed run so no "
        f"run pays for an earlier run's dirty pages; {faulted}. "
        "Destructive runs get a fresh copy of the input "
        "first (copy not timed); outputs are deleted between runs (not timed). "
        "`× cp` = median / median of plain `cp` of the same file(s) in the same run (`cp` does not "
        "fsync; the `cp + sync` row is the durable floor). Peak RSS = max over runs of "
        f"{RSS_METHOD}; it counts file-backed mmap pages the process touched. "
        "Peak anon = the same poll of RssAnon (heap only, mmap'd file pages excluded; a poll can "
        "miss spikes shorter than 5 ms)."
    )
    m = machine
    md = [
        "# tiecli benchmark results",
        "",
        f"Generated by `python benchmarks/bench.py --sizes {','.join(sizes)} --repeat {a.repeat}"
        f"{' --cold' if a.cold else ''}` on {m['date']}.",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores; RAM {m['ram_gb']} GB",
        f"- Work dir: {m['filesystem']}, {m['disk_free_gb']} GB free at start",
        f"- {m['os']}; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"safetensors {m['safetensors']}, tiecli {m['tiecli']}",
        "",
        notes,
        "",
        "## Results",
        "",
        "\n".join(md_sections),
        "## Targets (SPEC §9)",
        "",
        "```",
        "\n".join(check_lines),
        "```",
        "",
    ]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(md))
    out_json.write_text(
        json.dumps(
            {
                "machine": machine,
                "argv": sys.argv,
                "repeat": a.repeat,
                "generation_seconds": gen_times,
                "results": results,
                "targets": [{"ok": ok, "text": t} for ok, t in checks],
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {out_md} and {out_json}")
    failed_cmds = any(
        not r["ok"]
        for g in results.values()
        for r in (g.get("rows", []) if "rows" in g else [x for v in g.values() for x in v["rows"]])
    )
    if failed_cmds:
        return 1
    return 1 if a.strict and not all(ok for ok, _ in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
