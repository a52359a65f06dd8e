"""Rebuilding a model from a checkpoint and proving it with a forward pass.

The model comes from ``config.json`` through transformers (built on the meta
device, so no time goes to random init) or from a ``module:function`` the user
names. Weights are loaded with ties restored, placed on the device so that
every tie is one storage there, and the model runs on a seeded input. Against
a reference checkpoint the outputs must be bit-identical (or within ``atol``).

A model larger than one device is placed across GPUs, the CPU and disk by
accelerate (``infer_auto_device_map``, ``dispatch_model``), as transformers'
``device_map="auto"`` places it; weights are read tensor by tensor straight to
their device or to a temporary offload folder.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .arch.declared import module_ties
from .checkpoint import Checkpoint
from .detect import find_ties
from .errors import (
    CheckpointFormatError,
    MissingDependencyError,
    TiecliError,
    TieRecordError,
    UsageError,
    debugging,
)
from .formats import open_checkpoint
from .grouping import fills
from .progress import NO_PROGRESS, Progress
from .ties import Problem, Tie

BATCH, SEQ = 2, 8
DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclass
class RunStats:
    parameters: int = 0
    unique_bytes: int = 0  # parameter bytes on the device, each storage once
    untied_bytes: int = 0  # what a tie-unaware load (one copy per name) would take
    load_seconds: float = 0.0
    forward_seconds: float = 0.0
    shared_ties: int = 0
    # with --device-map: {module: device} as placed, the memory accelerate balanced,
    # the modules whose weights are offloaded (to disk, or to the CPU beside a GPU)
    device_map: dict[str, Any] | None = None
    max_memory: dict[str, int] | None = None
    offloaded: list[str] = field(default_factory=list)
    offload_bytes: int = 0  # written to the offload folder
    bytes_by_device: dict[str, int] = field(default_factory=dict)  # unique parameter bytes
    missing: int = 0  # the model's parameters the checkpoint does not hold


@dataclass
class ForwardReport:
    device: str
    device_name: str
    architecture: str
    stats: RunStats
    outputs_finite: bool
    ties_shared_on_device: bool
    against: str | None = None
    outputs_equal: bool | None = None
    max_abs_diff: float | None = None
    atol: float | None = None
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    tie_devices: list[dict[str, Any]] = field(default_factory=list)
    peak_host_bytes: int = 0  # the process's resident-memory high-water mark
    device_peak_bytes: dict[str, int] = field(default_factory=dict)  # per GPU

    def to_dict(self) -> dict[str, Any]:
        s = self.stats
        device_map = None
        if s.device_map is not None:
            device_map = {k: v if isinstance(v, str) else str(v) for k, v in s.device_map.items()}
        return {
            "device": self.device,
            "device_name": self.device_name,
            "architecture": self.architecture,
            "outputs_equal": self.outputs_equal,
            "max_abs_diff": self.max_abs_diff,
            "atol": self.atol,
            "against": self.against,
            "outputs_finite": self.outputs_finite,
            "ties_shared_on_device": self.ties_shared_on_device,
            "seconds": round(self.seconds, 4),
            "parameters": self.stats.parameters,
            "unique_parameter_bytes": self.stats.unique_bytes,
            "tie_unaware_bytes": self.stats.untied_bytes,
            "shared_ties": self.stats.shared_ties,
            "load_seconds": round(self.stats.load_seconds, 4),
            "forward_seconds": round(self.stats.forward_seconds, 4),
            "device_map": device_map,
            "max_memory": s.max_memory,
            "offloaded": s.offloaded,
            "offload_bytes": s.offload_bytes,
            "bytes_by_device": s.bytes_by_device,
            "tie_devices": self.tie_devices,
            "peak_host_bytes": self.peak_host_bytes,
            "device_peak_bytes": self.device_peak_bytes,
        }


def resolve_device(device: str) -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(
            f"--device {device!r} is not a device (use auto, cpu, cuda or cuda:N)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                "--device cuda asked for, but CUDA is not available here; use --device cpu or auto"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    elif dev.type != "cpu":
        raise UsageError(f"--device {device!r}: only cpu and cuda are supported")
    return dev


def _device_name(dev: Any) -> str:
    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -- building -----------------------------------------------------------------


def _from_spec(spec: str) -> tuple[Any, Any]:
    """Call ``module:function``; it returns a module or (module, example input)."""
    if ":" not in spec:
        raise UsageError(f"--model {spec!r}: expected module:function")
    mod_name, func_name = spec.split(":", 1)
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise UsageError(f"--model {spec!r}: cannot import {mod_name!r} ({e})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UsageError(f"--model {spec!r}: {mod_name} has no function {func_name!r}")
    made = func()
    example = None
    if isinstance(made, tuple):
        made, example = made[0], made[1]
    import torch

    if not isinstance(made, torch.nn.Module):
        raise UsageError(f"--model {spec!r} returned a {type(made).__name__}, not an nn.Module")
    return made, example


def _from_config(ckpt: Checkpoint) -> Any:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "rebuilding a model from config.json needs transformers",
            ckpt.path,
            hint="pip install 'tiecli[hf]', or pass --model module:function",
        ) from None
    from .arch.build import Budget, BuildRefused
    from .arch.build import build_model as build_from_config

    assert ckpt.config_path is not None
    # bounded by the checkpoint, offline, without the folder's code: as detection builds it
    budget = Budget.of(ckpt.entries)
    try:
        return build_from_config(ckpt.config_path.parent, real_buffers=True, budget=budget)
    except BuildRefused as e:
        raise _not_built(ckpt, str(e)) from None


def _not_built(ckpt: Checkpoint, why: str) -> Exception:
    """Why no model: an architecture transformers lacks is a bad input (exit 2); a config it
    refuses, or a class that raises while it is built, a failed check naming the class."""
    import transformers

    config = ckpt.config or {}
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    known = [a for a in archs if a.isidentifier() and hasattr(transformers, a)]
    from .arch.build import CUSTOM_CODE

    if why == CUSTOM_CODE:
        return CheckpointFormatError(
            f"{why}, so it cannot rebuild this model",
            ckpt.config_path,
            hint="build it yourself and pass --model module:function",
        )
    if not known:
        return CheckpointFormatError(
            f"config.json names architecture {', '.join(archs) or '(none named)'}, which "
            f"transformers {transformers.__version__} cannot build ({why})",
            ckpt.config_path,
            hint="upgrade transformers or pass --model module:function",
        )
    return _BuildFailed(known[0], why)


def build_model(ckpt: Checkpoint, model_spec: str | None) -> tuple[Any, Any]:
    if model_spec:
        return _from_spec(model_spec)
    if ckpt.config is None:
        raise UsageError(
            "has no config.json beside it to rebuild the model from",
            ckpt.path,
            hint="pass --model module:function",
        )
    return _from_config(ckpt), None


class _LoadFailed(Exception):
    pass


class _BuildFailed(_LoadFailed):
    def __init__(self, architecture: str, message: str):
        super().__init__(message)
        self.architecture = architecture


def _cause(e: BaseException) -> str:
    """``Type: first line of the message``, for a problem that stays one line."""
    text = " ".join(str(e).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# -- placing across devices ----------------------------------------------------

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)")
PAGE = 4096  # offloaded weights start on a page: mapped back, they are aligned as a copy is


@dataclass
class Placement:
    """How ``--device-map`` places a model, through accelerate.

    ``spec`` is one of :data:`DEVICE_MAPS` or a ``{module: device}`` map
    (device: a GPU index, ``"cpu"`` or ``"disk"``); ``max_memory`` is
    ``{device: bytes}``; ``gpus`` says whether GPUs may be used at all.
    """

    spec: str | dict[str, int | str]
    max_memory: dict[int | str, int] | None = None
    gpus: bool = True


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _device_key(text: str, option: str) -> int | str:
    """A GPU index, ``cuda:N``, ``cuda`` (GPU 0), ``cpu`` or ``disk``, as accelerate names it."""
    key = text.strip().lower()
    if key in ("cpu", "disk"):
        return key
    number = key[5:] if key.startswith("cuda:") else ("0" if key == "cuda" else key)
    if not number.isdigit():
        raise UsageError(
            f"{option}: {text.strip()!r} is not a device (a GPU index, cuda:N, cpu or disk)"
        )
    index = int(number)
    if index >= _gpu_count():
        raise UsageError(
            f"{option}: GPU {index} asked for, but {_gpu_count() or 'no'} CUDA device(s) are here"
        )
    return index


def parse_size(text: str, option: str = "--max-memory") -> int:
    """``60GiB``, ``1.5GB``, ``20KB`` or plain bytes; GB/MB/KB are powers of 10, GiB/MiB/KiB of 2."""
    m = _SIZE.fullmatch(text.strip().lower())
    if m is None or m.group(2) not in _UNITS:
        raise UsageError(
            f"{option}: {text.strip()!r} is not a size (bytes, or a number with KB, MB, GB, TB, "
            f"KiB, MiB, GiB or TiB)"
        )
    value = float(m.group(1)) * _UNITS[m.group(2)]
    if not math.isfinite(value) or value > 1 << 80:
        raise UsageError(f"{option}: {text.strip()!r} is larger than any machine's memory")
    return int(value)


def parse_max_memory(text: str | dict[Any, Any]) -> dict[int | str, int]:
    """``0=60GiB,1=60GiB,cpu=100GiB,disk=500GiB`` as ``{0: bytes, 1: bytes, "cpu": bytes, ...}``."""
    option = "--max-memory"
    pairs = list(text.items()) if isinstance(text, dict) else []
    if isinstance(text, str):
        for item in text.split(","):
            if "=" not in item:
                raise UsageError(
                    f"{option} {text!r}: expected DEVICE=SIZE pairs separated by commas "
                    f"(e.g. 0=60GiB,cpu=100GiB,disk=500GiB)"
                )
            key, value = item.split("=", 1)
            pairs.append((key, value))
    out: dict[int | str, int] = {}
    for key, value in pairs:
        device = _device_key(str(key), option)
        if device in out:
            raise UsageError(f"{option}: {str(key).strip()!r} is given twice")
        out[device] = value if isinstance(value, int) else parse_size(str(value), option)
    if not any(k != "disk" for k in out):
        raise UsageError(f"{option}: give the memory of a GPU or the CPU too (e.g. cpu=16GiB)")
    return out


def parse_device_map(text: str | dict[str, Any]) -> str | dict[str, int | str]:
    """``auto``, ``balanced``, ``balanced_low_0``, ``sequential``, or a JSON ``{module: device}``."""
    option = "--device-map"
    if isinstance(text, str) and text.strip() in DEVICE_MAPS:
        return text.strip()
    loaded: Any = text
    if isinstance(text, str):
        try:
            loaded = json.loads(text)
        except ValueError:
            loaded = None
    if not isinstance(loaded, dict) or not loaded:
        raise UsageError(
            f"{option} {str(text)[:80]!r}: expected {', '.join(DEVICE_MAPS)}, or a JSON object "
            f'{{"module name": device}} with a GPU index, "cpu" or "disk" for each'
        )
    out: dict[str, int | str] = {}
    for module, device in loaded.items():
        if isinstance(device, bool) or not isinstance(device, (int, str)):
            raise UsageError(f"{option}: {device!r} (for {module!r}) is not a device")
        out[str(module)] = _device_key(str(device), option)
    return out


def placement_for(
    device_map: str | dict[str, Any] | None, max_memory: str | dict[Any, Any] | None, device: str
) -> Placement | None:
    """The placement the options ask for; None without ``--device-map``."""
    if device_map is None:
        if max_memory is not None:
            raise UsageError("--max-memory goes with --device-map (auto, balanced or sequential)")
        return None
    spec = parse_device_map(device_map)
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(
            f"--device {device} with --device-map: the map chooses the devices "
            f"(use --device cpu, cuda or auto, and --max-memory to choose GPUs)"
        )
    if device == "cuda":
        resolve_device(device)  # CUDA must be there
    gpus = device != "cpu"
    memory = parse_max_memory(max_memory) if max_memory is not None else None
    if isinstance(spec, dict) and memory is not None:
        raise UsageError("--max-memory goes with --device-map auto, balanced or sequential")
    used = list(spec.values()) if isinstance(spec, dict) else list(memory or {})
    if not gpus and any(isinstance(d, int) for d in used):
        raise UsageError("--device cpu leaves GPUs out, but the placement names one")
    return Placement(spec, memory, gpus)


def _to_device(d: int | str) -> Any:
    """accelerate's name of a device as a torch device; ``"disk"`` stays a string."""
    import torch

    if d == "disk":
        return "disk"
    if isinstance(d, int) or (isinstance(d, str) and d.isdigit()):
        return torch.device("cuda", int(d))
    return torch.device(d)


def _device_of(name: str, device_map: dict[str, Any]) -> Any:
    """The device the map gives ``name``: its own entry or its nearest listed ancestor's."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        key = ".".join(parts[:i])
        if key in device_map:
            return device_map[key]
    return None


def _main_device(device_map: dict[str, Any]) -> Any:
    """Where inputs go and offloaded layers run: the first GPU in the map, else the CPU."""
    import torch

    gpus = sorted({d.index for d in device_map.values() if d != "disk" and d.type == "cuda"})
    return torch.device("cuda", gpus[0]) if gpus else torch.device("cpu")


def _accelerate_name(d: Any) -> int | str:
    return d if d == "disk" else (d.index if d.type == "cuda" else d.type)


def _device_map(
    model: Any, placement: Placement, special_dtypes: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, int] | None]:
    """accelerate's device map for ``model`` (and the memory it balanced), as torch devices."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "--device-map places the model with accelerate",
            hint="pip install 'tiecli[hf]' (or accelerate)",
        ) from None
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    spec = placement.spec
    if isinstance(spec, dict):
        _check_map(model, spec)
        return {k: _to_device(v) for k, v in spec.items()}, None
    memory: dict[Any, Any] | None = None
    disk_budget = None
    if placement.max_memory is not None:
        # accelerate leaves disk unbounded (and its balancing cannot parse the key): tiecli
        # holds the model to a disk budget itself
        memory = {k: v for k, v in placement.max_memory.items() if k != "disk"}
        disk_budget = placement.max_memory.get("disk")
    if memory is None and not placement.gpus:
        import psutil  # accelerate's own dependency

        memory = {"cpu": psutil.virtual_memory().available}
    no_split = sorted(getattr(model, "_no_split_modules", None) or [])
    with _quiet_accelerate():
        if spec == "sequential":
            balanced = get_max_memory(memory)
        else:
            balanced = get_balanced_memory(
                model,
                max_memory=memory,
                no_split_module_classes=no_split,
                special_dtypes=special_dtypes,
                low_zero=spec == "balanced_low_0",
            )
        try:
            found = infer_auto_device_map(
                model,
                max_memory=dict(balanced),
                no_split_module_classes=no_split,
                special_dtypes=special_dtypes,
            )
        except Exception as e:  # noqa: BLE001 - accelerate's own failure, on this model
            raise _LoadFailed(f"accelerate found no placement for the model ({_cause(e)})") from e
    device_map = {k: _to_device(v) for k, v in found.items()}
    if disk_budget is not None:
        import torch

        on_disk = sum(
            p.numel() * torch.empty((), dtype=special_dtypes.get(n, p.dtype)).element_size()
            for n, p in model.named_parameters()
            if _device_of(n, device_map) == "disk"
        )
        if on_disk > disk_budget:
            raise UsageError(
                f"--max-memory disk={disk_budget}: the placement puts {on_disk} bytes of weights "
                f"on disk; allow more memory on a GPU, the CPU or disk"
            )
    used = {str(k): int(v) for k, v in balanced.items()}
    if disk_budget is not None:
        used["disk"] = disk_budget
    return device_map, used


def _check_map(model: Any, device_map: dict[str, Any]) -> None:
    """A map the user wrote names modules the model has and gives every tensor a device."""
    modules = dict(model.named_modules())
    tensors = list(model.state_dict())
    unknown = [k for k in device_map if k and k not in modules and k not in tensors]
    if unknown:
        raise UsageError(
            f"--device-map names {', '.join(unknown[:4])}, which {type(model).__name__} does not have"
        )
    bare = [n for n in tensors if _device_of(n, device_map) is None]
    if bare:
        more = f" and {len(bare) - 4} more" if len(bare) > 4 else ""
        raise UsageError(f"--device-map gives no device to {', '.join(bare[:4])}{more}")


@contextmanager
def _quiet_accelerate() -> Iterator[None]:
    """accelerate's warnings (offloaded parameters on meta, and so on) stay off stderr."""
    import logging

    logger = logging.getLogger("accelerate")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _offload(t: Any, folder: Path, number: int) -> dict[str, str]:
    """Write one tensor to the offload folder as accelerate's offload index reads it back.

    A safetensors file of its own whose data starts on a page, so the weight
    mapped back for the forward pass is aligned as a fresh allocation is.
    """
    import torch

    from .dtypes import TORCH_TO_CODE

    name = str(t.dtype).removeprefix("torch.")
    nbytes = t.numel() * t.element_size()
    header = json.dumps(
        {"w": {"dtype": TORCH_TO_CODE[name], "shape": list(t.shape), "data_offsets": [0, nbytes]}},
        separators=(",", ":"),
    ).encode()
    header += b" " * (-(8 + len(header)) % PAGE)
    path = folder / f"{number:07d}.safetensors"
    data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        f.write(memoryview(data))
    return {"safetensors_file": str(path), "weight_name": "w", "dtype": name}


# -- loading ------------------------------------------------------------------


def _sources(ckpt: Checkpoint, report: Any) -> dict[str, tuple[str, bool]]:
    """``{name: (stored name, transposed)}`` for every name the model is given.

    Names the file leaves out come from their tie, as :func:`tiecli.load`
    restores them (an absent alias from its source, an absent source from
    its alias); a malformed tie record is an error.
    """
    bad = [p for p in report.problems if p.code == "bad-record"]
    if bad:
        raise TieRecordError(bad[0].message, ckpt.path)
    src = {n: (n, False) for n in ckpt.entries}
    for f in fills(report.ties, ckpt.entries):
        src[f.name] = (f.origin, f.transform == "transpose")
    return src


class _Reader:
    """One stored tensor at a time, on the CPU.

    A safetensors tensor is read (``preadv``) into a fresh allocation, so a
    checkpoint never sits in host memory whole, not even as mapped pages; a
    pickle's tensor is the memory-mapped one ``torch.load(mmap=True)`` gave.
    Returns (tensor, fresh).
    """

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.pickles = ckpt.form.loaded_tensors(ckpt)
        self.staging: Any = None

    def read(self, name: str, reuse: bool = False) -> tuple[Any, bool]:
        """``reuse``: into one staging buffer, valid until the next read (for a tensor that
        is copied to a GPU or written to disk at once: no allocation per tensor piles up)."""
        import torch

        from .dtypes import CODE_TO_TORCH

        entry = self.ckpt.entries[name]
        if entry.file in self.pickles:
            return self.pickles[entry.file].state_dict[name], False
        dtype = CODE_TO_TORCH.get(entry.dtype)
        if dtype is None:  # an element type torch has no name for: as safetensors reads it
            from safetensors import safe_open

            with safe_open(str(entry.file), framework="pt") as f:
                return f.get_tensor(name), False
        if reuse:
            if self.staging is None or self.staging.numel() < entry.nbytes:
                self.staging = None
                self.staging = torch.empty(max(entry.nbytes, 1), dtype=torch.uint8)
            flat = self.staging[: entry.nbytes]
            t = flat.view(getattr(torch, dtype)).reshape(entry.shape)
        else:
            t = torch.empty(entry.shape, dtype=getattr(torch, dtype))
            flat = t.reshape(-1).view(torch.uint8)
        if entry.nbytes:
            entry.blob.readinto(0, memoryview(flat.numpy()))
        return t, not reuse


def _put(t: Any, fresh: bool, transposed: bool, device: Any, dtype: Any) -> Any:
    """``t`` on ``device`` as a fresh, contiguous allocation (cast when ``dtype`` asks).

    Never a view of the file's mapping: the allocator aligns a copy the same
    way whatever the tensor's offset in the file, so equal weights run through
    the same kernels and give equal outputs.
    """
    import torch

    if transposed:
        t = t.t()
    to = dtype if dtype is not None and t.is_floating_point() else t.dtype
    if fresh and not transposed and t.device == device and t.dtype == to:
        return t
    return t.to(device=device, dtype=to, copy=True, memory_format=torch.contiguous_format)


def _model_names(model: Any, names: list[str]) -> tuple[dict[str, str], dict[str, Any]]:
    """The file's names as the model's, the way transformers' loader renames them.

    transformers 5 saves composite models under their original names
    (``language_model.model.embed_tokens.weight``) and mixture-of-experts
    layers one tensor per expert; loading renames the first and merges the
    second (``WeightConverter``: stack, concatenate, split). Returns
    ``{name in the file: name in the model}`` and, for names a converter
    merges, ``{model name: (converter, [(name in the file, pattern)])}``,
    in the order transformers reads them.
    """
    same = {n: n for n in names}
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )
    except ImportError:  # transformers 4, or none: names are used as they are
        return same, {}
    if not isinstance(model, PreTrainedModel):
        return same, {}
    try:
        transforms = get_model_conversion_mapping(model)
    except (AttributeError, TypeError, ValueError):  # a transformers whose API differs
        return same, {}
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {k: c for c in converters for k in c.source_patterns}
    wanted = model.state_dict()
    prefix = model.base_model_prefix
    mapping: dict[str, str] = {}
    groups: dict[str, Any] = {}
    for name in sorted(names, key=dot_natural_key):  # experts in order, as transformers reads
        new, pattern = rename_source_key(name, renamings, converters, prefix, wanted)
        if new not in wanted and name in wanted:
            new, pattern = name, None
        mapping[name] = new
        if pattern is not None:
            if new not in groups:
                groups[new] = (deepcopy(by_pattern[pattern]), [])
            groups[new][1].append((name, pattern))
    return mapping, groups


def _renamed(ties: list[Tie], mapping: dict[str, str]) -> list[Tie]:
    return [
        replace(t, alias=mapping.get(t.alias, t.alias), source=mapping.get(t.source, t.source))
        for t in ties
    ]


def _loaded_dtypes(
    ckpt: Checkpoint,
    sources: dict[str, tuple[str, bool]],
    mapping: dict[str, str],
    dtype: Any,
) -> dict[str, Any]:
    """``{model name: dtype it is loaded in}``, for accelerate to size the modules by."""
    import torch

    from .dtypes import CODE_TO_TORCH

    out = {}
    for name, (stored, _) in sources.items():
        code = CODE_TO_TORCH.get(ckpt.entries[stored].dtype)
        if code is None:
            continue
        t = getattr(torch, code)
        out[mapping.get(name, name)] = dtype if dtype is not None and t.is_floating_point else t
    return out


def _tie_on_meta(model: Any, pairs: dict[str, str]) -> None:
    """Each identity tie one parameter of the unloaded model, so accelerate keeps it together."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, source in pairs.items():
        a, s = params.get(alias), params.get(source)
        if a is None or s is None or a is s or not a.is_meta or a.shape != s.shape:
            continue
        owner, _, leaf = alias.rpartition(".")
        setattr(model.get_submodule(owner), leaf, s)


def _never_saved(model: Any, missing: list[str]) -> set[str]:
    """Missing parameters the architecture never writes and always computes on load
    (``_keys_to_ignore_on_save``: Marian's sinusoidal position tables), where every
    parameter of their module is missing: transformers initialises those modules from
    the config alone, so the forward pass may too."""
    import re

    patterns = getattr(model, "_keys_to_ignore_on_save", None) or []
    ignored = {k for k in missing if any(re.search(p, k) for p in patterns)}
    out: set[str] = set()
    for key in ignored:
        prefix = key.rpartition(".")[0]
        module = model.get_submodule(prefix)
        names = {f"{prefix}.{n}" for n, _ in module.named_parameters(recurse=False)}
        if names <= ignored:
            out |= names
    return out


def _initialise(model: Any, names: set[str], device_of: Callable[[str], Any]) -> None:
    """Give each parameter in ``names`` (still on meta) storage on its device and let the
    model's own ``_init_weights`` fill its module, as ``from_pretrained`` does."""
    import torch

    for prefix in sorted({n.rpartition(".")[0] for n in names}):
        module = model.get_submodule(prefix)
        for name, p in list(module.named_parameters(recurse=False)):
            fresh = torch.empty(p.shape, dtype=p.dtype, device=device_of(f"{prefix}.{name}"))
            setattr(module, name, torch.nn.Parameter(fresh, requires_grad=False))
        with torch.no_grad():
            model._init_weights(module)


def load_onto(
    model: Any,
    path: Path,
    device: Any,
    dtype: Any,
    use_transformers: bool,
    *,
    placement: Placement | dict[str, Any] | None = None,
    offload_dir: Path | None = None,
) -> tuple[Any, list[str], RunStats, list[Tie]]:
    """Load the checkpoint at ``path`` into ``model``; (model, problems, stats, ties).

    Everything goes to ``device``, or, with ``placement`` (a :class:`Placement`
    or a device map already made, ``{module: torch device or "disk"}``), where
    accelerate places each module: GPUs, the CPU, and ``offload_dir`` on disk.
    Tensors are read one at a time and go straight to their device.
    """
    import torch

    started = time.perf_counter()
    cpu = torch.device("cpu")
    stats = RunStats()
    with open_checkpoint(path, torch_free=False) as ckpt:
        report = find_ties(ckpt, use_transformers=use_transformers)
        sources = _sources(ckpt, report)
        alias_of = {
            t.alias: t
            for t in report.ties
            if t.kind == "tied" and t.drift is None and t.source in sources
        }
        mapping, groups = _model_names(model, list(sources))
        ties = _renamed(report.ties, mapping)
        declared = module_ties(model)
        wanted = _wanted(ties, declared)
        _tie_on_meta(model, {a: s for a, (s, how) in wanted.items() if how == "identity"})
        params = {n for n, _ in model.named_parameters(remove_duplicate=False)}

        device_map: dict[str, Any] | None = None
        if isinstance(placement, Placement):
            device_map, stats.max_memory = _device_map(
                model, placement, _loaded_dtypes(ckpt, sources, mapping, dtype)
            )
        elif placement is not None:
            device_map = dict(placement)
        if device_map is not None:
            _check_ties_placed(wanted, params, device_map)
            if any(d == "disk" for d in device_map.values()) and offload_dir is None:
                raise UsageError("the placement offloads to disk, but no offload folder was given")
            stats.device_map = device_map
            main = _main_device(device_map)

        def where(name: str) -> Any:
            """The device a tensor is loaded on; ``"disk"`` for a parameter offloaded to disk."""
            if device_map is None:
                return device
            d = _device_of(name, device_map)
            if d is None:  # a name the model does not have: reported as unexpected
                return main
            return cpu if d == "disk" and name not in params else d

        reader = _Reader(ckpt)
        placed: dict[str, Any] = {}  # model name -> tensor (a meta stand-in when on disk)
        index: dict[str, dict[str, str]] = {}  # model name -> where its weight is on disk
        kept: dict[str, Any] = {}  # file name -> placed tensor, for the aliases that view it
        kept_on_disk: dict[str, dict[str, str]] = {}  # file name -> its offload index entry
        needed = {t.source for t in alias_of.values()}

        def land(target: str, t: Any) -> Any:
            """``t`` (on the CPU when bound for disk) where ``target`` lives."""
            d = where(target)
            if d != "disk":
                return t if t.device == d else t.to(d)
            assert offload_dir is not None
            index[target] = _offload(t, offload_dir, len(index))
            stats.offload_bytes += t.numel() * t.element_size()
            return torch.empty_like(t, device="meta")

        def read(name: str, target: str, at_once: bool = False) -> Any:
            """The file's tensor ``name`` on the device ``target`` loads on; ``at_once``:
            the caller copies it to a GPU or writes it to disk before the next read."""
            if name in alias_of and alias_of[name].source in kept:
                src = kept[alias_of[name].source]
                return src if alias_of[name].transform == "identity" else src.t()
            stored, transposed = sources[name]
            d = where(target)
            reuse = at_once and (d == "disk" or d.type != "cpu")
            t, fresh = reader.read(stored, reuse=reuse)
            if reuse and d == "disk":  # written from where it was read: no copy
                t = t.t() if transposed else t
                if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                    t = t.to(dtype)
            else:
                t = _put(t, fresh, transposed, cpu if d == "disk" else d, dtype)
            if name in needed:
                kept[name] = t
            return t

        in_group = {n for _, names in groups.values() for n, _ in names}
        for name in mapping:  # in transformers' reading order
            if name in alias_of or name in in_group:
                continue
            target = mapping[name]
            placed[target] = land(target, read(name, target, at_once=True))
            if name in needed:
                kept[name] = placed[target]
                if target in index:
                    kept_on_disk[name] = index[target]
        for target, (converter, names) in groups.items():
            for name, pattern in names:
                converter.add_tensor(target, name, pattern, lambda n=name, t=target: read(n, t))
            for full, t in converter.convert(target, model=model, config=model.config).items():
                # a merged tensor is a new allocation; a split one a view into it: copy both alike
                placed[full] = land(full, t.clone(memory_format=torch.contiguous_format))
        for name, tie in alias_of.items():
            target = mapping[name]
            if name in in_group or tie.source not in kept:
                continue
            src = kept[tie.source]
            placed[target] = src if tie.transform == "identity" else src.t()
            if tie.source in kept_on_disk:
                index[target] = kept_on_disk[tie.source]
            stats.shared_ties += 1
        kept.clear()
    # ties the architecture declares whose alias the file leaves out (transformers 5
    # saves them so): the alias is the source's storage, as transformers ties it
    for alias, source in declared.items():
        if alias not in placed and source in placed:
            placed[alias] = placed[source]
            if source in index:
                index[alias] = index[source]
            stats.shared_ties += 1
    # assign: the model's parameters become the placed tensors, so ties stay one storage
    try:
        result = model.load_state_dict(placed, strict=False, assign=True)
    except RuntimeError as e:  # shapes the model does not have (config and weights disagree)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "load failed")
        raise _LoadFailed(f"the weights do not fit the model: {detail}") from None
    _one_parameter_per_tensor(model, placed)
    problems = []
    never_saved = _never_saved(model, result.missing_keys)
    if never_saved:
        _initialise(model, never_saved, lambda n: cpu if where(n) == "disk" else where(n))
    missing = [k for k in result.missing_keys if k not in never_saved]
    stats.missing = len(missing)
    if missing:
        problems.append(
            f"missing from the checkpoint: {', '.join(missing[:8])}"
            + (" ..." if len(missing) > 8 else "")
        )
    if result.unexpected_keys:
        problems.append(f"not used by the model: {', '.join(result.unexpected_keys[:8])}")
    for prefix, mod in model.named_modules():  # buffers were built on the CPU
        for name, buf in mod._buffers.items():
            if buf is not None and not buf.is_meta:
                mod._buffers[name] = buf.to(where(f"{prefix}.{name}" if prefix else name))
    model.eval()
    if device_map is not None:
        from accelerate import dispatch_model

        disk = any(d == "disk" for d in device_map.values())
        with _quiet_accelerate():
            dispatch_model(
                model,
                device_map={k: _accelerate_name(v) for k, v in device_map.items()},
                main_device=_accelerate_name(main),
                offload_dir=str(offload_dir) if disk else None,
                offload_index=index if disk else None,
                skip_keys=getattr(model, "_skip_keys_device_placement", None),
            )
        stats.offloaded = sorted(
            k for k, d in device_map.items() if d == "disk" or (d == cpu and main != cpu)
        )
    stats.load_seconds = time.perf_counter() - started
    _count(model, stats)
    for d in {main} if device_map is not None else {device}:
        if d.type == "cuda":
            torch.cuda.synchronize(d)
    return model, problems, stats, ties


def _one_parameter_per_tensor(model: Any, placed: dict[str, Any]) -> None:
    """Names given one tensor become one parameter, as ``tie_weights`` leaves them.

    ``load_state_dict(assign=True)`` wraps each name's tensor in a parameter
    of its own; a tie that is one parameter is what accelerate's dispatch
    keeps together (``find_tied_parameters``, ``retie_parameters``).
    """
    first: dict[int, Any] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        t = placed.get(name)
        if t is None:
            continue
        if id(t) not in first:
            first[id(t)] = p
        elif first[id(t)] is not p:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, first[id(t)])


def _wanted(ties: list[Tie], extra: dict[str, str]) -> dict[str, tuple[str, str]]:
    """``{alias: (source, transform)}``: every recorded or declared tie the model must keep."""
    wanted: dict[str, tuple[str, str]] = {
        t.alias: (t.source, t.transform) for t in ties if t.kind == "tied" and t.drift is None
    }
    for alias, source in extra.items():
        wanted.setdefault(alias, (source, "identity"))
    return wanted


def _check_ties_placed(
    wanted: dict[str, tuple[str, str]], params: set[str], device_map: dict[str, Any]
) -> None:
    """A tie stays on one device, and a transposed one off disk and off CPU offload.

    accelerate keeps a tie that is one parameter together; a map written by
    hand may not, and a transposed tie is a view accelerate's offload cannot
    keep (its offload index holds whole tensors).
    """
    main = _main_device(device_map)
    for alias, (source, how) in sorted(wanted.items()):
        if alias not in params or source not in params:
            continue
        da, ds = _device_of(alias, device_map), _device_of(source, device_map)
        if da != ds:
            raise UsageError(
                f"--device-map puts {alias} on {_shown(da)} and {source}, its tie, on "
                f"{_shown(ds)}: a tie must stay on one device"
            )
        if how != "identity" and (da == "disk" or (da.type == "cpu" and main.type != "cpu")):
            raise UsageError(
                f"the placement offloads {alias}, the transposed tie of {source}, to "
                f"{_shown(da)}, where accelerate cannot keep it a view; give it room on a device"
            )


def _shown(d: Any) -> str:
    return d if isinstance(d, str) else str(d)


def _home(model: Any, name: str, p: Any) -> tuple[Any, ...]:
    """Where the weight of parameter ``name`` lives: (device, which storage, where in it).

    A parameter on a device is its storage there. One that accelerate offloads
    is a meta tensor in the model; its weight is what the offload hooks load:
    a CPU tensor of their state dict, or a file and name of the offload index.
    """
    if not p.is_meta:
        return (str(p.device), p.untyped_storage().data_ptr(), p.storage_offset())
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        hook = getattr(model.get_submodule(".".join(parts[:i])), "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or [hook]:
            weights = getattr(h, "weights_map", None)
            if weights is None or not getattr(h, "offload", False):
                continue
            loader = getattr(weights, "dataset", weights)
            key = getattr(weights, "prefix", "") + ".".join(parts[i:])
            state = getattr(loader, "state_dict", None) or {}
            if key in state:
                t = state[key]
                return ("cpu", t.untyped_storage().data_ptr(), t.storage_offset())
            info = (getattr(loader, "index", None) or {}).get(key)
            if info is not None:
                where = info.get("safetensors_file") or f"{loader.save_folder}/{key}.dat"
                return ("disk", where, info.get("weight_name", key))
    return ("meta", name, 0)


def _count(model: Any, stats: RunStats) -> None:
    seen: set[tuple[Any, ...]] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        size = p.numel() * p.element_size()
        stats.untied_bytes += size
        home = _home(model, name, p)
        if home not in seen:
            seen.add(home)
            stats.unique_bytes += size
            stats.parameters += p.numel()
            stats.bytes_by_device[home[0]] = stats.bytes_by_device.get(home[0], 0) + size


def ties_on_device(model: Any, ties: list[Tie], extra: dict[str, str]) -> list[Problem]:
    """Every declared or recorded tie must be one storage on the device (or one offloaded weight)."""
    problems = []
    for alias, source, same, where in _tie_homes(model, ties, extra):
        if not same:
            problems.append(
                Problem(
                    "tie-broken-on-device",
                    "error",
                    f"{alias} and {source} are tied but are separate storages on {where}: "
                    f"the loaded model holds two copies that can drift apart",
                    [alias, source],
                )
            )
    return problems


def tie_devices(model: Any, ties: list[Tie], extra: dict[str, str]) -> list[dict[str, Any]]:
    """Where each tie lives: ``{alias, source, device, shared}``; ``disk`` when offloaded there."""
    return [
        {"alias": a, "source": s, "device": where, "shared": same}
        for a, s, same, where in _tie_homes(model, ties, extra)
    ]


def _tie_homes(
    model: Any, ties: list[Tie], extra: dict[str, str]
) -> list[tuple[str, str, bool, str]]:
    params = dict(model.named_parameters(remove_duplicate=False))
    out = []
    for alias, (source, _) in sorted(_wanted(ties, extra).items()):
        a, s = params.get(alias), params.get(source)
        if a is None or s is None:
            continue
        ha, hs = _home(model, alias, a), _home(model, source, s)
        out.append((alias, source, ha == hs, ha[0]))
    return out


# -- running ------------------------------------------------------------------


def _special_ids(config: Any) -> set[int]:
    """Token ids the config (and its text, vision, audio sub-configs) names.

    Image, video and audio placeholders (``image_token_id``,
    ``image_token_index``, ``boi_token_index`` ...) make a multimodal model
    expect features the input does not carry; the seeded input avoids them all.
    """
    from .arch.build import sub_configs

    ids: set[int] = set()
    for c in sub_configs(config):
        for key, value in vars(c).items():
            if "token_id" in key or "token_index" in key:
                values = value if isinstance(value, (list, tuple)) else [value]
                ids.update(v for v in values if isinstance(v, int) and not isinstance(v, bool))
    return ids


def _vocab_size(model: Any, config: Any) -> int | None:
    """Rows of the model's input embeddings; else the text config's vocabulary."""
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
        rows = getattr(emb, "num_embeddings", None)
        if isinstance(rows, int) and rows > 0:
            return rows
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        for c in (text, config):
            vocab = getattr(c, "vocab_size", None)
            if isinstance(vocab, int) and vocab > 0:
                return vocab
    return None


def _token_ids(vocab: int, avoid: set[int], shape: tuple[int, int], g: Any) -> Any:
    """Seeded ids below ``vocab``, none of them in ``avoid``."""
    import torch

    banned = sorted(i for i in avoid if 0 <= i < vocab)
    if vocab > 1 << 20:  # a vocabulary from a config: no table of its size, redraw instead
        ids = torch.randint(0, vocab, shape, generator=g)
        if banned and len(banned) < vocab // 2:
            hit = torch.isin(ids, torch.tensor(banned))
            while hit.any():
                ids[hit] = torch.randint(0, vocab, (int(hit.sum()),), generator=g)
                hit = torch.isin(ids, torch.tensor(banned))
        return ids
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[banned] = False
    pool = allowed.nonzero().flatten()
    if not len(pool):
        pool = torch.arange(vocab)
    return pool[torch.randint(0, len(pool), shape, generator=g)]


def _required(model: Any) -> set[str]:
    """Names of ``forward``'s arguments that have no default."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {
        p.name
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _accepts(model: Any, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _pixel_values(config: Any, g: Any) -> Any:
    """Seeded images of the size the vision config expects."""
    import torch

    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", None) or 224
    h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
    channels = getattr(vision, "num_channels", None) or 3
    return torch.rand((BATCH, channels, h, w), generator=g)


def example_input(model: Any, example: Any, device: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The seeded input: the one ``--model`` returned, else token ids the model accepts.

    Ids come from the input embeddings' vocabulary (a composite config has none
    at the top level) and avoid every special token the config names, so that a
    multimodal model runs on text alone; an argument ``forward`` cannot do
    without (BLIP's ``pixel_values``) gets a seeded value of the configured size.
    """
    import torch

    g = torch.Generator().manual_seed(0)
    if example is not None:
        if isinstance(example, dict):
            return (), {k: v.to(device) if torch.is_tensor(v) else v for k, v in example.items()}
        if isinstance(example, tuple):
            return tuple(v.to(device) if torch.is_tensor(v) else v for v in example), {}
        return (example.to(device),), {}
    config = getattr(model, "config", None)
    vocab = _vocab_size(model, config)
    if vocab is None:
        emb = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
        if emb is None:
            raise UsageError(
                "cannot make an input for this model; let --model return (module, example_input)"
            )
        vocab = emb.num_embeddings
    avoid = _special_ids(config) if config is not None else set()
    ids = _token_ids(vocab, avoid, (BATCH, SEQ), g)
    if config is None:
        return (ids.to(device),), {}
    dtype = next((q.dtype for q in model.parameters() if q.is_floating_point()), None)
    main = getattr(model, "main_input_name", "input_ids")
    required = _required(model)
    kwargs: dict[str, Any] = {}
    if main == "input_ids" or _names(model, "input_ids"):
        image = _image_tokens(config) if "pixel_values" in required else None
        if image is not None:  # the image's placeholders first, as a processor writes them
            token, count = image
            ids = torch.cat([torch.full((BATCH, count), token, dtype=ids.dtype), ids], dim=1)
        kwargs["input_ids"] = ids
        if _accepts(model, "attention_mask"):
            kwargs["attention_mask"] = torch.ones_like(ids)
    if getattr(config, "is_encoder_decoder", False):
        start = getattr(config, "decoder_start_token_id", None) or 0
        dec = _token_ids(vocab, avoid, (BATCH, SEQ), g)
        dec[:, 0] = start
        kwargs["decoder_input_ids"] = dec
    if "pixel_values" in required or main == "pixel_values":
        kwargs["pixel_values"] = _pixel_values(config, g).to(dtype)
    if "input_features" in required or main == "input_features":
        features = _input_features(config, g)
        if features is None:
            raise UsageError(
                "cannot make audio features for this model; "
                "let --model return (module, example_input)"
            )
        kwargs["input_features"] = features.to(dtype)
    return (), {k: v.to(device) for k, v in kwargs.items()}


def _names(model: Any, name: str) -> bool:
    """``forward`` names the argument (not only through ``**kwargs``)."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _image_tokens(config: Any) -> tuple[int, int] | None:
    """(image token id, placeholders per image) when the config names both."""
    token = getattr(config, "image_token_id", None)
    if not isinstance(token, int):
        token = getattr(config, "image_token_index", None)
    for key in ("num_query_tokens", "image_seq_length", "mm_tokens_per_image"):
        count = getattr(config, key, None)
        if isinstance(token, int) and isinstance(count, int) and 0 < count <= 4096:
            return token, count
    return None


def _input_features(config: Any, g: Any) -> Any:
    """Seeded log-mel features shaped as a Whisper-style encoder expects them."""
    import torch

    bins = getattr(config, "num_mel_bins", None)
    positions = getattr(config, "max_source_positions", None)
    if not isinstance(bins, int) or not isinstance(positions, int):
        return None
    # two convolutions, the second with stride 2: frames = 2 × encoder positions
    return torch.randn((BATCH, bins, 2 * positions), generator=g)


def _float_outputs(out: Any) -> list[Any]:
    import torch

    if torch.is_tensor(out):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict) or hasattr(out, "to_tuple"):
        values = out.to_tuple() if hasattr(out, "to_tuple") else tuple(out.values())
        return [t for v in values for t in _float_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _float_outputs(v)]
    return []


def run_forward(model: Any, example: Any, device: Any) -> tuple[list[Any], float]:
    import torch

    args, kwargs = example_input(model, example, device)
    started = time.perf_counter()
    with torch.inference_mode():
        try:
            out = model(*args, **kwargs)
        except AttributeError:
            # an all-ones mask says nothing the model does not assume, but some models
            # take another path with one that reads config fields their config class
            # lacks (Qwen3-Omni's thinker asks for vision_start_token_id): run without
            if "attention_mask" not in kwargs or example is not None:
                raise
            kwargs.pop("attention_mask")
            started = time.perf_counter()
            out = model(*args, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return [t.detach().float().cpu() for t in _float_outputs(out)], time.perf_counter() - started


def _compare(a: list[Any], b: list[Any]) -> tuple[bool, float]:
    import torch

    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=False)):
        return False, math.inf
    equal = all(torch.equal(x, y) for x, y in zip(a, b, strict=False))
    worst = 0.0
    for x, y in zip(a, b, strict=False):
        d = (x - y).abs()
        if d.numel():
            m = float(d.max()) if not torch.isnan(d).all() else math.nan
            worst = m if m > worst or math.isnan(m) else worst
    return equal, worst


def _host_peak() -> int:
    """The process's resident-memory high-water mark, in bytes (0 where unknown)."""
    try:
        import resource
    except ImportError:  # not on this platform
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def forward_check(
    path: Path,
    *,
    device: str = "auto",
    against: Path | None = None,
    atol: float | None = None,
    dtype: str | None = None,
    model_spec: str | None = None,
    use_transformers: bool = True,
    device_map: str | dict[str, Any] | None = None,
    max_memory: str | dict[Any, Any] | None = None,
    progress: Progress = NO_PROGRESS,
) -> ForwardReport:
    """Rebuild, load, run and compare (see the module doc).

    With ``device_map`` (``auto``, ``balanced``, ``balanced_low_0``,
    ``sequential`` or ``{module: device}``) and ``max_memory``
    (``"0=60GiB,cpu=100GiB,disk=1TB"`` or a dict), accelerate places the model
    across GPUs, the CPU and a temporary offload folder; ``against`` then runs
    in the placement the first model got, after the first is released.
    """
    import torch

    started = time.perf_counter()
    placement = placement_for(device_map, max_memory, device)
    dev = resolve_device(device)
    if placement is not None:
        dev = torch.device("cpu")  # until the map says which device leads
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    tdtype = getattr(torch, dtype) if dtype else None
    gpus = list(range(_gpu_count())) if dev.type == "cuda" or (placement and placement.gpus) else []
    for i in gpus:
        torch.cuda.reset_peak_memory_stats(i)
    placed_by: Placement | dict[str, Any] | None = placement

    def one(p: Path) -> tuple[list[Any] | None, ForwardReport]:
        nonlocal placed_by
        arch = "(not built)"
        stats = RunStats()
        problems: list[Problem] = []
        outputs: list[Any] | None = None
        finite = False
        main = dev
        where: list[dict[str, Any]] = []
        stage = "building the model"
        folder = (
            tempfile.TemporaryDirectory(prefix="tiecli-offload-", ignore_cleanup_errors=True)
            if placement is not None
            else None
        )
        try:
            with open_checkpoint(p) as ckpt:
                model, example = build_model(ckpt, model_spec)
            arch = type(model).__name__
            stage = "loading the weights"
            shown = dev if placement is None else "the devices accelerate places it on"
            with progress.task(f"loading {p.name} on {shown}", 1) as bar:
                model, load_problems, stats, ties = load_onto(
                    model,
                    p,
                    dev,
                    tdtype,
                    use_transformers,
                    placement=placed_by,
                    offload_dir=Path(folder.name) if folder is not None else None,
                )
                bar.advance(1)
            if stats.device_map is not None:
                placed_by = stats.device_map  # the reference runs in the same placement
                main = _main_device(stats.device_map)
            for msg in load_problems:
                problems.append(Problem("forward-failed", "error", f"{p}: {msg}"))
            declared = module_ties(model)
            problems += ties_on_device(model, ties, declared)
            where = tie_devices(model, ties, declared)
            stage = "the forward pass"
            if stats.missing:  # left on meta: running would only fail on them, or worse
                raise _LoadFailed(
                    f"forward pass not run: {stats.missing} parameter(s) of the model are not "
                    "in the checkpoint"
                )
            with progress.task(f"forward pass on {main}", 1) as bar:
                outputs, stats.forward_seconds = run_forward(model, example, main)
                bar.advance(1)
            finite = all(bool(torch.isfinite(t).all()) for t in outputs) and bool(outputs)
            if not outputs:
                problems.append(
                    Problem(
                        "forward-failed", "error", f"{p}: the model returned no floating outputs"
                    )
                )
            elif not finite:
                problems.append(Problem("forward-failed", "error", f"{p}: outputs hold NaN or Inf"))
            del model
        except _BuildFailed as e:
            arch = e.architecture
            problems.append(Problem("forward-failed", "error", f"{p}: {arch}: {e}"))
        except _LoadFailed as e:
            problems.append(Problem("forward-failed", "error", f"{p}: {e}"))
        except TiecliError:
            raise  # a bad input or option: one Error line, exit 2
        except Exception as e:  # noqa: BLE001 - the model's code can raise anything
            if debugging():
                raise
            outputs = None
            problems.append(
                Problem("forward-failed", "error", f"{p}: {arch}: {stage} raised {_cause(e)}")
            )
        finally:
            _release(gpus)
            if folder is not None:
                folder.cleanup()
        report = ForwardReport(
            device=str(main),
            device_name=_device_name(main),
            architecture=arch,
            stats=stats,
            outputs_finite=finite,
            ties_shared_on_device=not any(pr.code == "tie-broken-on-device" for pr in problems),
            problems=problems,
            tie_devices=where,
        )
        return outputs, report

    outputs, report = one(path)
    if against is not None:
        ref_outputs, ref_report = one(against)
        report.against = str(against)
        report.atol = atol
        report.problems += [
            Problem(p.code, p.severity, f"reference: {p.message}", p.tensors)
            for p in ref_report.problems
        ]
        if outputs is not None and ref_outputs is not None:
            equal, diff = _compare(outputs, ref_outputs)
            report.max_abs_diff = diff
            report.outputs_equal = equal if atol is None else (diff <= atol)
            if not report.outputs_equal:
                limit = "bit-identical outputs" if atol is None else f"max abs diff <= {atol:g}"
                report.problems.append(
                    Problem(
                        "forward-mismatch",
                        "error",
                        f"outputs differ from {against}: max abs diff {diff:g} (required: {limit})",
                    )
                )
    report.peak_host_bytes = _host_peak()
    report.device_peak_bytes = {f"cuda:{i}": torch.cuda.max_memory_allocated(i) for i in gpus}
    report.seconds = time.perf_counter() - started
    return report


def _release(gpus: list[int]) -> None:
    """Memory of a model run is given back before the next one loads."""
    import gc

    gc.collect()
    if gpus:
        import torch

        torch.cuda.empty_cache()
