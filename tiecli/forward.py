"""Rebuilding a model from a checkpoint and proving it with a forward pass.

The model comes from ``config.json`` through transformers (built on the meta
device, so no time goes to random init) or from a ``module:function`` the user
names. Weights are loaded with ties restored, placed on the device so that
every tie is one storage there, and the model runs on a seeded input. Against
a reference checkpoint the outputs must be bit-identical (or within ``atol``).
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
import time
from copy import deepcopy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .detect import Problem, Tie, find_ties
from .errors import (
    CheckpointFormatError,
    MissingDependencyError,
    TiecliError,
    UsageError,
    debugging,
)
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
    from .declared import Budget, BuildRefused
    from .declared import build_model as build_from_config

    assert ckpt.config_path is not None
    # bounded by the checkpoint, offline, without the folder's code: as detection builds it
    budget = Budget(len(ckpt.entries), sum(e.nbytes for e in ckpt.entries.values()))
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


# -- loading ------------------------------------------------------------------


def _place(
    tensors: dict[str, Any], ties: list[Tie], device: Any, dtype: Any
) -> tuple[dict[str, Any], int]:
    """Tensors on ``device``: each source copied once, tied aliases as views of it."""
    import torch

    alias_of = {
        t.alias: t for t in ties if t.kind == "tied" and t.drift is None and t.source in tensors
    }
    placed: dict[str, Any] = {}
    for name, t in tensors.items():
        if name in alias_of:
            continue
        # Always a fresh allocation on the device, never a view of the file's mapping:
        # the allocator aligns it the same way whatever the tensor's offset in the file,
        # so equal weights run through the same kernels and give equal outputs.
        to = dtype if dtype is not None and t.is_floating_point() else t.dtype
        placed[name] = t.to(
            device=device, dtype=to, copy=True, memory_format=torch.contiguous_format
        )
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


def _to_model(model: Any, placed: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The placed tensors under the model's names, converted as transformers' loader does.

    transformers 5 saves composite models under their original names
    (``language_model.model.embed_tokens.weight``) and mixture-of-experts
    layers one tensor per expert; loading renames the first and merges the
    second (``WeightConverter``: stack, concatenate, split). The same renaming
    and conversions are applied here, with the loader's own code. Returns the
    tensors and ``{name in the file: name in the model}``.
    """
    import torch

    same = {n: n for n in placed}
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
        return placed, same
    if not isinstance(model, PreTrainedModel):
        return placed, same
    try:
        transforms = get_model_conversion_mapping(model)
    except (AttributeError, TypeError, ValueError):  # a transformers whose API differs
        return placed, same
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {k: c for c in converters for k in c.source_patterns}
    wanted = model.state_dict()
    prefix = model.base_model_prefix
    out: dict[str, Any] = {}
    mapping: dict[str, str] = {}
    pending: dict[str, Any] = {}  # model name -> its converter, collecting the file's tensors
    for name in sorted(placed, key=dot_natural_key):  # experts in order, as transformers reads
        new, pattern = rename_source_key(name, renamings, converters, prefix, wanted)
        if new not in wanted and name in wanted:
            new, pattern = name, None
        mapping[name] = new
        if pattern is None:
            out[new] = placed[name]
            continue
        if new not in pending:
            pending[new] = deepcopy(by_pattern[pattern])
        pending[new].add_tensor(new, name, pattern, lambda t=placed[name]: t)
    for target, converter in pending.items():
        for full, t in converter.convert(target, model=model, config=model.config).items():
            # a merged tensor is a new allocation; a split one a view into it: copy both alike
            out[full] = t.clone(memory_format=torch.contiguous_format)
    return out, mapping


def _renamed(ties: list[Tie], mapping: dict[str, str]) -> list[Tie]:
    return [
        replace(t, alias=mapping.get(t.alias, t.alias), source=mapping.get(t.source, t.source))
        for t in ties
    ]


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
    placed, shared = _place(tensors, report.ties, device, dtype)
    placed, mapping = _to_model(model, placed)
    ties = _renamed(report.ties, mapping)
    # ties the architecture declares whose alias the file leaves out (transformers 5
    # saves them so): the alias is the source's storage, as transformers ties it
    for alias, source in declared_module_ties(model).items():
        if alias not in placed and source in placed:
            placed[alias] = placed[source]
            shared += 1
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


def _special_ids(config: Any) -> set[int]:
    """Token ids the config (and its text, vision, audio sub-configs) names.

    Image, video and audio placeholders (``image_token_id``,
    ``image_token_index``, ``boi_token_index`` ...) make a multimodal model
    expect features the input does not carry; the seeded input avoids them all.
    """
    ids: set[int] = set()
    seen: set[int] = set()

    def walk(c: Any) -> None:
        if id(c) in seen:
            return
        seen.add(id(c))
        for key, value in vars(c).items():
            if hasattr(value, "to_dict") and hasattr(value, "model_type"):
                walk(value)
            elif "token_id" in key or "token_index" in key:
                values = value if isinstance(value, (list, tuple)) else [value]
                ids.update(v for v in values if isinstance(v, int) and not isinstance(v, bool))

    walk(config)
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

    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[[i for i in avoid if 0 <= i < vocab]] = False
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
        arch = "(not built)"
        stats = RunStats()
        problems: list[Problem] = []
        outputs: list[Any] | None = None
        finite = False
        stage = "building the model"
        try:
            with open_checkpoint(p) as ckpt:
                model, example = build_model(ckpt, model_spec)
            arch = type(model).__name__
            stage = "loading the weights"
            with progress.task(f"loading {p.name} on {dev}", 1) as bar:
                model, load_problems, stats, ties = load_onto(
                    model, p, dev, tdtype, use_transformers
                )
                bar.advance(1)
            for msg in load_problems:
                problems.append(Problem("forward-failed", "error", f"{p}: {msg}"))
            problems += ties_on_device(model, ties, declared_module_ties(model))
            stage = "the forward pass"
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
        report = ForwardReport(
            device=str(dev),
            device_name=_device_name(dev),
            architecture=arch,
            stats=stats,
            outputs_finite=finite,
            ties_shared_on_device=not any(pr.code == "tie-broken-on-device" for pr in problems),
            problems=problems,
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
    report.seconds = time.perf_counter() - started
    return report
