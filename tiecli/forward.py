"""Rebuilding a model from a checkpoint and proving it with a forward pass.

The model comes from ``config.json`` through transformers (built on the meta
device, so no time goes to random init) or from a ``module:function`` the user
names. Weights are loaded with ties restored, placed on the device so that
every tie is one storage there, and the model runs on a seeded input. Against
a reference checkpoint the outputs must be bit-identical (or within ``atol``).
"""

from __future__ import annotations

import importlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .detect import Problem, Tie, find_ties
from .errors import CheckpointFormatError, MissingDependencyError, UsageError
from .formats import open_checkpoint
from .guard import declared_module_ties
from .progress import NO_PROGRESS, Progress

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

    def to_dict(self) -> dict[str, Any]:
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
    from .declared import build_meta_model

    assert ckpt.config_path is not None
    model = build_meta_model(ckpt.config_path.parent, real_buffers=True)
    if model is None:
        import transformers

        archs = (ckpt.config or {}).get("architectures") or ["(none named)"]
        raise CheckpointFormatError(
            f"config.json names architecture {', '.join(map(str, archs))}, which transformers "
            f"{transformers.__version__} cannot build",
            ckpt.config_path,
            hint="upgrade transformers or pass --model module:function",
        )
    return model


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


# -- loading ------------------------------------------------------------------


def _place(
    tensors: dict[str, Any], ties: list[Tie], device: Any, dtype: Any
) -> tuple[dict[str, Any], int]:
    """Tensors on ``device``: each source moved once, tied aliases as views of it."""
    alias_of = {
        t.alias: t for t in ties if t.kind == "tied" and t.drift is None and t.source in tensors
    }
    placed: dict[str, Any] = {}
    for name, t in tensors.items():
        if name in alias_of:
            continue
        t = t.to(device)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        placed[name] = t.contiguous()
    shared = 0
    for name, tie in alias_of.items():
        if name not in tensors:
            continue
        src = placed[tie.source]
        placed[name] = src if tie.transform == "identity" else src.t()
        shared += 1
    return {n: placed[n] for n in tensors}, shared


class _LoadFailed(Exception):
    pass


def load_onto(
    model: Any, path: Path, device: Any, dtype: Any, use_transformers: bool
) -> tuple[Any, list[str], RunStats, list[Tie]]:
    """Load the checkpoint at ``path`` into ``model`` on ``device``; (model, problems, stats, ties)."""
    import torch

    from .serialization import load_opened

    started = time.perf_counter()
    with open_checkpoint(path, torch_free=False) as ckpt:
        report = find_ties(ckpt, use_transformers=use_transformers)
        tensors = load_opened(ckpt, report)
    ties = report.ties
    placed, shared = _place(tensors, ties, device, dtype)
    # assign: the model's parameters become the placed tensors, so ties stay one storage
    try:
        result = model.load_state_dict(placed, strict=False, assign=True)
    except RuntimeError as e:  # shapes the model does not have (config and weights disagree)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "load failed")
        raise _LoadFailed(f"the weights do not fit the model: {detail}") from None
    problems = []
    if result.missing_keys:
        problems.append(
            f"missing from the checkpoint: {', '.join(result.missing_keys[:8])}"
            + (" ..." if len(result.missing_keys) > 8 else "")
        )
    if result.unexpected_keys:
        problems.append(f"not used by the model: {', '.join(result.unexpected_keys[:8])}")
    for mod in model.modules():  # buffers were built on the CPU; parameters are placed already
        for name, buf in mod._buffers.items():
            if buf is not None and not buf.is_meta:
                mod._buffers[name] = buf.to(device)
    model.eval()
    stats = RunStats(load_seconds=time.perf_counter() - started, shared_ties=shared)
    seen: set[tuple[int, int]] = set()
    for _name, p in model.named_parameters(remove_duplicate=False):
        stats.untied_bytes += p.numel() * p.element_size()
        key = (p.untyped_storage().data_ptr(), p.storage_offset())
        if key not in seen:
            seen.add(key)
            stats.unique_bytes += p.numel() * p.element_size()
            stats.parameters += p.numel()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return model, problems, stats, ties


def ties_on_device(model: Any, ties: list[Tie], extra: dict[str, str]) -> list[Problem]:
    """Every declared or recorded tie must be one storage on the device."""
    params = dict(model.named_parameters(remove_duplicate=False))
    wanted = {t.alias: t.source for t in ties if t.kind == "tied" and t.drift is None}
    wanted |= extra
    problems = []
    for alias, source in sorted(wanted.items()):
        a, s = params.get(alias), params.get(source)
        if a is None or s is None:
            continue
        same = (
            a.device == s.device
            and a.untyped_storage().data_ptr() == s.untyped_storage().data_ptr()
            and a.storage_offset() == s.storage_offset()
        )
        if not same:
            problems.append(
                Problem(
                    "tie-broken-on-device",
                    "error",
                    f"{alias} and {source} are tied but are separate storages on {a.device}: "
                    f"the loaded model holds two copies that can drift apart",
                    [alias, source],
                )
            )
    return problems


# -- running ------------------------------------------------------------------


def example_input(model: Any, example: Any, device: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    import torch

    g = torch.Generator().manual_seed(0)
    if example is not None:
        if isinstance(example, dict):
            return (), {k: v.to(device) if torch.is_tensor(v) else v for k, v in example.items()}
        if isinstance(example, tuple):
            return tuple(v.to(device) if torch.is_tensor(v) else v for v in example), {}
        return (example.to(device),), {}
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None) if config is not None else None
    if vocab is None:
        emb = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
        if emb is None:
            raise UsageError(
                "cannot make an input for this model; let --model return (module, example_input)"
            )
        vocab = emb.num_embeddings
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g).to(device)
    if config is None:
        return (ids,), {}
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        start = getattr(config, "decoder_start_token_id", None) or 0
        dec = torch.randint(0, vocab, (BATCH, SEQ), generator=g).to(device)
        dec[:, 0] = start
        kwargs["decoder_input_ids"] = dec
    return (), kwargs


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


def forward_check(
    path: Path,
    *,
    device: str = "auto",
    against: Path | None = None,
    atol: float | None = None,
    dtype: str | None = None,
    model_spec: str | None = None,
    use_transformers: bool = True,
    progress: Progress = NO_PROGRESS,
) -> ForwardReport:
    import torch

    started = time.perf_counter()
    dev = resolve_device(device)
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    tdtype = getattr(torch, dtype) if dtype else None

    def one(p: Path) -> tuple[list[Any] | None, ForwardReport]:
        with open_checkpoint(p) as ckpt:
            model, example = build_model(ckpt, model_spec)
        arch = type(model).__name__
        problems: list[Problem] = []
        try:
            with progress.task(f"loading {p.name} on {dev}", 1) as bar:
                model, load_problems, stats, ties = load_onto(
                    model, p, dev, tdtype, use_transformers
                )
                bar.advance(1)
        except _LoadFailed as e:
            failed = Problem("forward-failed", "error", f"{p}: {e}")
            return None, ForwardReport(
                str(dev), _device_name(dev), arch, RunStats(), False, False, problems=[failed]
            )
        for msg in load_problems:
            problems.append(Problem("forward-failed", "error", f"{p}: {msg}"))
        problems += ties_on_device(model, ties, declared_module_ties(model))
        outputs: list[Any] | None = None
        finite = False
        try:
            with progress.task(f"forward pass on {dev}", 1) as bar:
                outputs, stats.forward_seconds = run_forward(model, example, dev)
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
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            problems.append(
                Problem("forward-failed", "error", f"{p}: forward pass raised: {first}")
            )
        report = ForwardReport(
            device=str(dev),
            device_name=_device_name(dev),
            architecture=arch,
            stats=stats,
            outputs_finite=finite,
            ties_shared_on_device=not any(pr.code == "tie-broken-on-device" for pr in problems),
            problems=problems,
        )
        del model
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
    report.seconds = time.perf_counter() - started
    return report
