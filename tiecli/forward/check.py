"""The forward check: rebuild the model, load it with ties restored, run it on the seeded
input, and compare its outputs with a reference checkpoint's (bit-identical, or within
``atol``)."""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import field
from pathlib import Path
from typing import Any

from ..arch.declared import module_ties
from ..errors import TiecliError, UsageError, debugging, param
from ..formats import open_checkpoint
from ..lean import dataclass
from ..progress import NO_PROGRESS, Progress
from ..ties import Problem
from .build import build_model
from .devices import device_name, gpu_count, host_peak, release, resolve_device
from .dispatch import main_device
from .inputs import example_input
from .load import load_onto
from .placement import Placement, placement_for
from .result import BuildFailed, ForwardReport, LoadFailed, RunStats, cause
from .tie_placement import tie_devices, ties_on_device

DTYPES = ("float32", "float16", "bfloat16", "float64")


def float_outputs(out: Any) -> list[Any]:
    """The floating tensors of a model's output (a tensor, a model output, a dict, a tuple)."""
    import torch

    if torch.is_tensor(out):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict) or hasattr(out, "to_tuple"):
        values = out.to_tuple() if hasattr(out, "to_tuple") else tuple(out.values())
        return [t for v in values for t in float_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in float_outputs(v)]
    return []


def run_forward(model: Any, example: Any, device: Any) -> tuple[list[Any], float]:
    """Run ``model`` on its seeded input: (its floating outputs on the CPU, seconds taken)."""
    import torch

    args, kwargs = example_input(model, example, device)
    started = time.perf_counter()
    with torch.inference_mode():
        out, started = call(model, args, kwargs, seeded=example is None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return [t.detach().float().cpu() for t in float_outputs(out)], time.perf_counter() - started


def call(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], seeded: bool) -> Any:
    """(``model(*args, **kwargs)``, when the run that answered started).

    An all-ones mask says nothing the model does not assume, but some models take
    another path with one that reads config fields their config class lacks
    (Qwen2.5-Omni's and Qwen3-Omni's thinkers ask for ``vision_start_token_id``):
    a seeded input then runs without it.
    """
    started = time.perf_counter()
    try:
        return _seeded_call(model, args, kwargs), started
    except AttributeError:
        if "attention_mask" not in kwargs or not seeded:
            raise
        rest = {k: v for k, v in kwargs.items() if k != "attention_mask"}
        started = time.perf_counter()
        return _seeded_call(model, args, rest), started


def _seeded_call(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``model(*args, **kwargs)`` with torch's random generators seeded alike for every run.

    A forward that draws noise (a diffusion language model's masking, a sampled
    router) would otherwise give two identical models different outputs; the
    caller's generator state is restored afterwards.
    """
    import torch

    cuda = sorted(
        {p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"}
        if hasattr(model, "parameters")
        else set()
    )
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(0)  # every device's generator (CPU, CUDA, MPS, XPU ...)
        return model(*args, **kwargs)


def compare(a: list[Any], b: list[Any]) -> tuple[bool, float]:
    """(bit-identical, the largest absolute difference); NaN where one holds NaN."""
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
        raise UsageError(f"{param('dtype')} {dtype!r}: choose one of {', '.join(DTYPES)}")
    tdtype = getattr(torch, dtype) if dtype else None
    gpus = list(range(gpu_count())) if dev.type == "cuda" or (placement and placement.gpus) else []
    for i in gpus:
        torch.cuda.reset_peak_memory_stats(i)
    runs = _Runs(dev, placement, tdtype, model_spec, use_transformers, gpus, progress)

    outputs, report = runs.one(path)
    if against is not None:
        ref_outputs, ref_report = runs.one(against)
        report.against = str(against)
        report.atol = atol
        report.problems += [
            Problem(p.code, p.severity, f"reference: {p.message}", p.tensors)
            for p in ref_report.problems
        ]
        if outputs is not None and ref_outputs is not None:
            equal, diff = compare(outputs, ref_outputs)
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
    report.peak_host_bytes = host_peak()
    report.device_peak_bytes = {f"cuda:{i}": torch.cuda.max_memory_allocated(i) for i in gpus}
    report.seconds = time.perf_counter() - started
    return report


@dataclass
class _Runs:
    """One check's runs, each a model built, loaded and run; the reference runs in the
    placement the first run got (``placed_by``: a :class:`Placement`, then its device map)."""

    dev: Any
    placement: Placement | None
    dtype: Any
    model_spec: str | None
    use_transformers: bool
    gpus: list[int]
    progress: Progress
    placed_by: Placement | dict[str, Any] | None = field(init=False)

    def __post_init__(self) -> None:
        self.placed_by = self.placement

    def one(self, p: Path) -> tuple[list[Any] | None, ForwardReport]:
        """(the outputs, None when the model did not run; the report of this run)."""
        import torch

        dev, progress = self.dev, self.progress
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
            if self.placement is not None
            else None
        )
        try:
            with open_checkpoint(p) as ckpt:
                model, example = build_model(ckpt, self.model_spec)
            arch = type(model).__name__
            stage = "loading the weights"
            shown = dev if self.placement is None else "the devices accelerate places it on"
            with progress.task(f"loading {p.name} on {shown}", 1) as bar:
                model, load_problems, stats, ties = load_onto(
                    model,
                    p,
                    dev,
                    self.dtype,
                    self.use_transformers,
                    placement=self.placed_by,
                    offload_dir=Path(folder.name) if folder is not None else None,
                )
                bar.advance(1)
            if stats.device_map is not None:
                self.placed_by = stats.device_map  # the reference runs in the same placement
                main = main_device(stats.device_map)
            for msg in load_problems:
                problems.append(Problem("forward-failed", "error", f"{p}: {msg}"))
            declared = module_ties(model)
            problems += ties_on_device(model, ties, declared)
            where = tie_devices(model, ties, declared)
            stage = "the forward pass"
            if stats.missing:  # left on meta: running would only fail on them, or worse
                raise LoadFailed(
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
        except BuildFailed as e:
            arch = e.architecture
            problems.append(Problem("forward-failed", "error", f"{p}: {arch}: {e}"))
        except LoadFailed as e:
            problems.append(Problem("forward-failed", "error", f"{p}: {e}"))
        except TiecliError:
            raise  # a bad input or option: one Error line, exit 2
        except Exception as e:  # noqa: BLE001 - the model's code can raise anything
            if debugging():
                raise
            outputs = None
            problems.append(
                Problem("forward-failed", "error", f"{p}: {arch}: {stage} raised {cause(e)}")
            )
        finally:
            release(self.gpus)
            if folder is not None:
                folder.cleanup()
        report = ForwardReport(
            device=str(main),
            device_name=device_name(main),
            architecture=arch,
            stats=stats,
            outputs_finite=finite,
            ties_shared_on_device=not any(pr.code == "tie-broken-on-device" for pr in problems),
            problems=problems,
            tie_devices=where,
        )
        return outputs, report
