"""``dedupe`` and ``untie``: open, find ties, plan, write; they differ only in the plan."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..checkpoint import Checkpoint
from ..detect import find_ties
from ..errors import UnsafeChangeError, VerificationError, param
from ..options import RewriteOptions
from ..progress import NO_PROGRESS, Progress
from ..ties import TieReport
from .inspecting import use_config
from .remote import from_remote
from .results import DedupeResult, PathLike, RewriteResult, UntieResult
from .target import open_to_rewrite, refuse_dcp, refuse_unreadable_record

if TYPE_CHECKING:
    from ..plan import Plan

R = TypeVar("R", bound=RewriteResult)


def _rewrite_fields(
    ckpt: Checkpoint, report: TieReport, plan: Plan, options: RewriteOptions
) -> dict[str, Any]:
    """The fields every rewrite result has, from the plan."""
    out = options.output
    return {
        "path": str(ckpt.path),
        "format": ckpt.format,
        "output": str(out) if out else str(ckpt.path),
        "bytes_before": ckpt.stored_bytes(),
        "bytes_after": plan.bytes_after,
        "problems": report.problems,
        "dry_run": options.dry_run,
        "changed": plan.changes(ckpt),
        "notes": list(ckpt.notes),
    }


def _carry_out(
    result: R,
    ckpt: Checkpoint,
    plan: Plan,
    options: RewriteOptions,
    progress: Progress,
) -> R:
    """Write the plan (unless a dry run) and note where the output went."""
    from ..write.run import execute

    if not result.dry_run:
        written = execute(ckpt, plan, options, progress=progress)
        result.output = str(written.output)
        result.changed = written.changed
        result.not_copied = [{"path": str(p), "reason": why} for p, why in written.not_copied]
    return result


def _pickle_has_more(ckpt: Checkpoint) -> bool:
    return ckpt.form.holds_more_than_tensors(ckpt)


def dedupe(
    path: PathLike,
    output: PathLike | None = None,
    *,
    by_value: bool = False,
    min_bytes: int = 1 << 20,
    dry_run: bool = False,
    to: str | None = None,
    force: bool = False,
    fsync: bool = False,
    use_transformers: bool = True,
    progress: Progress = NO_PROGRESS,
    timeout: float | None = None,
    config: PathLike | None = None,
    max_shard_size: int | str | None = None,
) -> DedupeResult:
    """Rewrite with one stored copy per tie plus the tie record (in place without ``output``).

    A URL is downloaded first (streamed to disk, beside ``output``, which it requires)."""
    options = RewriteOptions(
        output=Path(output) if output is not None else None,
        dry_run=dry_run,
        force=force,
        fsync=fsync,
        to=to,
        by_value=by_value,
        min_bytes=min_bytes,
        max_shard_size=max_shard_size,
    )
    remote = from_remote(
        path,
        "dedupe",
        options,
        timeout,
        progress,
        # a download is never a torch distributed checkpoint, nor given a config
        lambda local: _dedupe_local(
            local, replace(options, max_shard_size=None), None, use_transformers, progress
        ),
    )
    if remote is not None:
        return remote
    return _dedupe_local(path, options, config, use_transformers, progress)


def _dedupe_local(
    path: PathLike,
    options: RewriteOptions,
    config: PathLike | None,
    use_transformers: bool,
    progress: Progress,
) -> DedupeResult:
    """``dedupe`` of a local checkpoint. Ties are first taken as equal from their
    samples (the verification of the rewrite compares every removed alias in full);
    where that is not enough, every tie is decided exactly and the run starts over."""
    if options.to not in (None, "safetensors"):
        from ..errors import UsageError

        to = param("to")
        raise UsageError(f"{to} {options.to!r}: the only conversion is {to} safetensors")
    refuse_dcp(path, "dedupe", options)
    options = replace(options, max_shard_size=_shard_size(options.max_shard_size))
    with open_to_rewrite(Path(path), "dedupe", options) as ckpt:
        use_config(ckpt, config)
        # a dry run writes nothing, so nothing verifies it: it decides every tie exactly
        report = find_ties(
            ckpt, use_transformers=use_transformers, progress=progress, sampled=not options.dry_run
        )
        result = _dedupe(ckpt, report, options, progress)
        if result is None:
            report = find_ties(ckpt, use_transformers=use_transformers, progress=progress)
            result = _dedupe(ckpt, report, options, progress)
        assert result is not None  # ties decided exactly leave nothing to decide again
        return result


def _shard_size(size: int | str | None) -> int:
    """``--max-shard-size``: bytes, or ``5GB``/``500MB``/``2GiB``; transformers' default."""
    from ..formats.folder_names import MAX_SHARD_SIZE

    if size is None:
        return MAX_SHARD_SIZE
    if isinstance(size, int):
        value = size
    else:
        from ..forward import parse_size

        value = parse_size(size, "max_shard_size")
    if value <= 0:
        from ..errors import UsageError

        raise UsageError(f"{param('max_shard_size')} must be more than 0 bytes")
    return value


def assumption_wrong(ckpt: Checkpoint, assumed: tuple[str, str, str]) -> bool:
    """Whether a tie taken as equal from its samples differs in full."""
    from ..values import equal

    alias, source, transform = assumed
    return not equal(ckpt.entries[alias], ckpt.entries[source], transform)


def _dedupe(
    ckpt: Checkpoint, report: TieReport, options: RewriteOptions, progress: Progress
) -> DedupeResult | None:
    """The rewrite with ``report``'s ties, written unless a dry run; None where a tie
    taken as equal from its samples must be decided exactly first: it would be kept
    (nothing verifies a kept tie, so its drift must be exact), or the verification of
    the rewrite found it unequal in full."""
    from ..plan import plan_dedupe

    refuse_unreadable_record(ckpt, report)
    if options.to_safetensors and ckpt.form.refuses_conversion:
        from ..errors import UsageError

        raise UsageError(
            f"is a GGUF file; {param('to')} safetensors converts PyTorch pickles only; "
            "nothing was changed",
            ckpt.path,
        )
    to_st = options.converts(ckpt.form)
    if to_st and options.output is None and _pickle_has_more(ckpt):
        raise UnsafeChangeError(
            f"holds more than tensors (under {ckpt.nested_key!r} or beside them: epoch, "
            "optimizer state...), which safetensors cannot keep; converting in place would "
            "delete them",
            ckpt.path,
            hint=f"write the conversion elsewhere with {param('output')}",
        )
    plan = plan_dedupe(ckpt, report, options)
    ckpt.form.reshard(plan, _shard_size(options.max_shard_size))
    assumed = set(report.assumed)
    if any((t.alias, t.source, t.transform) in assumed for t, _why in plan.kept):
        return None
    result = DedupeResult(
        **_rewrite_fields(ckpt, report, plan, options),
        removed=plan.removed,
        kept=plan.kept,
        record=[r.to_json() for r in plan.record],
    )
    result.changed |= to_st
    try:
        return _carry_out(result, ckpt, plan, options, progress)
    except VerificationError:
        if any(assumption_wrong(ckpt, a) for a in report.assumed):
            return None
        raise


def untie(
    path: PathLike,
    output: PathLike | None = None,
    *,
    dry_run: bool = False,
    force: bool = False,
    fsync: bool = False,
    use_transformers: bool = True,
    progress: Progress = NO_PROGRESS,
    timeout: float | None = None,
) -> UntieResult:
    """Write every alias as its own stored tensor (in place without ``output``).

    A URL is downloaded first (streamed to disk, beside ``output``, which it requires)."""
    options = RewriteOptions(
        output=Path(output) if output is not None else None,
        dry_run=dry_run,
        force=force,
        fsync=fsync,
    )
    remote = from_remote(
        path,
        "untie",
        options,
        timeout,
        progress,
        lambda local: _untie_local(local, options, use_transformers, progress),
    )
    if remote is not None:
        return remote
    return _untie_local(path, options, use_transformers, progress)


def _untie_local(
    path: PathLike, options: RewriteOptions, use_transformers: bool, progress: Progress
) -> UntieResult:
    from ..plan import plan_untie

    refuse_dcp(path, "untie", options)
    with open_to_rewrite(Path(path), "untie", options) as ckpt:
        report = find_ties(ckpt, use_transformers=use_transformers, progress=progress)
        refuse_unreadable_record(ckpt, report)
        plan = plan_untie(ckpt, report)
        result = UntieResult(
            **_rewrite_fields(ckpt, report, plan, options),
            restored=plan.restored,
            made=plan.made,
        )
        return _carry_out(result, ckpt, plan, options, progress)
