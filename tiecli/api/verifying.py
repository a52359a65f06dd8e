"""``verify``: each checkpoint's ties checked, and what its consumers load; with
``forward``, the model rebuilt and run."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..detect import find_ties
from ..errors import param
from ..formats import open_checkpoint
from ..progress import NO_PROGRESS, Progress
from ..ties import Problem, TieReport
from .inspecting import consumer_loads, fold_consumer_problems, use_config
from .remote import remote_options
from .results import CheckpointVerdict, PathLike, VerifyResult


def _duplicate_stored(path: str, report: TieReport, dcp: bool = False) -> list[Problem]:
    out = []
    for t in report.ties:
        if t.duplicated:
            fix = f"tiecli dedupe {path}" + (" --to safetensors" if t.across_files else "")
            if dcp:
                fix = f"tiecli dedupe {path} --to safetensors -o OUT"
            if remote_options(path, None, None) is not None:
                fix = "download it, run tiecli dedupe on the local copy and upload the result"
            out.append(
                Problem(
                    "duplicate-stored",
                    "error",
                    f"{t.alias} is stored as a second copy of {t.source} ({t.bytes} bytes wasted); "
                    f"fix: {fix}",
                    [t.alias, t.source],
                )
            )
    return out


def verify(
    paths: PathLike | Sequence[PathLike],
    *,
    require_deduped: bool = False,
    strict: bool = False,
    forward: bool = False,
    device: str = "auto",
    against: PathLike | None = None,
    atol: float | None = None,
    dtype: str | None = None,
    model: str | None = None,
    for_consumers: str | None = None,
    use_transformers: bool = True,
    device_map: str | dict[str, Any] | None = None,
    max_memory: str | dict[Any, Any] | None = None,
    progress: Progress = NO_PROGRESS,
    max_download: int | None = None,
    timeout: float | None = None,
    config: PathLike | None = None,
) -> VerifyResult:
    """Check each checkpoint's ties; ``ok`` is False with every problem listed when not.

    With ``forward``, also rebuild the model on ``device``, load the weights with
    ties restored, check each tie is one storage there, run a seeded forward
    pass, and compare with ``against`` (bit-identical, or within ``atol``).
    ``device_map`` and ``max_memory`` place a model larger than one device
    across GPUs, the CPU and disk, as accelerate does (see ``forward_check``).

    Each checkpoint with a config.json is also checked against what its consumers
    load (``consumers-disagree``, ``consumer-bad-load``); ``for_consumers`` limits
    that to the consumers named (``"transformers<5,vllm"``).
    """
    from ..errors import UsageError
    from ..formats import checkpoint_roots

    items: Sequence[PathLike] = [paths] if isinstance(paths, (str, os.PathLike)) else paths
    remote = {str(p) for p in items if remote_options(p, None, None) is not None}
    given = [Path(p) for p in items if str(p) not in remote]
    if not forward and (
        against is not None
        or atol is not None
        or dtype is not None
        or model is not None
        or device_map is not None
        or max_memory is not None
    ):
        names = ("against", "atol", "dtype", "model", "device_map")
        raise UsageError(
            ", ".join(param(n) for n in names)
            + f" and {param('max_memory')} go with {param('forward')}"
        )
    from ..consumer_choice import select

    select(for_consumers)  # a bad --for is a usage error before anything is opened
    if forward and remote:
        raise UsageError(
            f"{param('forward')} loads the whole checkpoint; it reads local checkpoints only",
            hint=f"download it first, or run verify without {param('forward')} on the URL",
        )
    roots: list[Path | str] = [
        *checkpoint_roots(given),
        *dict.fromkeys(str(p) for p in items if str(p) in remote),
    ]
    if forward and len(roots) != 1:
        raise UsageError(f"{param('forward')} checks one checkpoint at a time")
    verdicts = []
    for root in roots:
        options = remote_options(root, max_download, timeout)
        with open_checkpoint(root, remote=options, progress=progress) as ckpt:
            use_config(ckpt, config)
            report = find_ties(ckpt, use_transformers=use_transformers, progress=progress)
            problems = list(report.problems)
            if require_deduped:
                problems += _duplicate_stored(ckpt.shown, report, not ckpt.form.in_place)
            loads, found = consumer_loads(ckpt, report, for_consumers)
            problems += fold_consumer_problems(problems, found)
            verdicts.append(
                CheckpointVerdict(
                    ckpt.shown,
                    ckpt.format,
                    report.ties,
                    problems,
                    loads,
                    remote=ckpt.remote.to_dict() if ckpt.remote is not None else None,
                )
            )
    result = VerifyResult(
        [str(p) if str(p) in remote else str(Path(p)) for p in items],
        verdicts,
        strict=strict,
        require_deduped=require_deduped,
        for_consumers=for_consumers,
    )
    from ..formats import form_named

    if forward and not form_named(verdicts[0].format).rebuilds:
        raise UsageError(
            f"is a GGUF file; {param('forward')} rebuilds PyTorch models only (llama.cpp runs GGUF)",
            roots[0],
        )
    if forward:
        from ..forward import forward_check

        assert isinstance(roots[0], Path)
        result.forward = forward_check(
            roots[0],
            device=device,
            against=Path(against) if against is not None else None,
            atol=atol,
            dtype=dtype,
            model_spec=model,
            use_transformers=use_transformers,
            device_map=device_map,
            max_memory=max_memory,
            progress=progress,
        )
        verdicts[0].problems += result.forward.problems
    return result
