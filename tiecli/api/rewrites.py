"""``dedupe`` and ``untie``: open, find ties, plan, write; they differ only in the plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from ..checkpoint import Checkpoint
from ..detect import TieReport, find_ties
from ..errors import UnsafeChangeError, VerificationError
from ..progress import NO_PROGRESS, Progress
from .inspecting import use_config
from .remote import from_remote
from .results import DedupeResult, PathLike, RewriteResult, UntieResult
from .target import open_to_rewrite, refuse_dcp, refuse_unreadable_record

R = TypeVar("R", bound=RewriteResult)


def _rewrite_fields(
    ckpt: Checkpoint, report: TieReport, plan: Any, out: Path | None, dry_run: bool
) -> dict[str, Any]:
    """The fields every rewrite result has, from the plan."""
    return {
        "path": str(ckpt.path),
        "format": ckpt.format,
        "output": str(out) if out else str(ckpt.path),
        "bytes_before": ckpt.stored_bytes(),
        "bytes_after": plan.bytes_after,
        "problems": report.problems,
        "dry_run": dry_run,
        "changed": plan.changes(ckpt),
        "notes": list(ckpt.notes),
    }


def _carry_out(
    result: R,
    ckpt: Checkpoint,
    plan: Any,
    out: Path | None,
    force: bool,
    to_st: bool,
    fsync: bool,
    progress: Progress,
) -> R:
    """Write the plan (unless a dry run) and note where the output went."""
    from ..rewrite import execute

    if not result.dry_run:
        written = execute(
            ckpt, plan, out, force=force, to_safetensors=to_st, fsync=fsync, progress=progress
        )
        result.output = str(written.output)
        result.changed = written.changed
        result.not_copied = [{"path": str(p), "reason": why} for p, why in written.not_copied]
    return result


def _pickle_has_more(ckpt: Checkpoint) -> bool:
    from ..formats.pytorch import PickleFile

    return any(r.holds_more_than_tensors() for r in ckpt.readers if isinstance(r, PickleFile))


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
    remote: DedupeResult | None = from_remote(
        path,
        output,
        "dedupe",
        dry_run,
        force,
        timeout,
        progress,
        lambda local: dedupe(
            local,
            output,
            by_value=by_value,
            min_bytes=min_bytes,
            to=to,
            force=force,
            fsync=fsync,
            use_transformers=use_transformers,
            progress=progress,
        ),
    )
    if remote is not None:
        return remote
    if to not in (None, "safetensors"):
        from ..errors import UsageError

        raise UsageError(f"--to {to!r}: the only conversion is --to safetensors")
    refuse_dcp(path, output, to, "dedupe")
    shard_size = _shard_size(max_shard_size)
    out = Path(output) if output is not None else None
    with open_to_rewrite(Path(path), out, "dedupe", dry_run, to) as ckpt:
        use_config(ckpt, config)
        # Ties are taken as equal from their samples; the verification of the rewrite
        # compares every removed alias in full. A dry run writes nothing, so it reads all.
        report = find_ties(
            ckpt, use_transformers=use_transformers, progress=progress, sampled=not dry_run
        )
        try:
            return _dedupe(
                ckpt,
                report,
                out,
                by_value,
                min_bytes,
                dry_run,
                to,
                force,
                fsync,
                progress,
                shard_size,
            )
        except _KeptUnchecked:
            pass  # a tie kept for another reason is reported as it is: decide it exactly
        except VerificationError:
            if not any(assumption_wrong(ckpt, a) for a in report.assumed):
                raise
        # a tie equal in its samples but not in full: decide every tie exactly and start over
        report = find_ties(ckpt, use_transformers=use_transformers, progress=progress)
        return _dedupe(
            ckpt, report, out, by_value, min_bytes, dry_run, to, force, fsync, progress, shard_size
        )


def _shard_size(size: int | str | None) -> int:
    """``--max-shard-size``: bytes, or ``5GB``/``500MB``/``2GiB``; transformers' default."""
    from ..formats.dcp import MAX_SHARD_SIZE

    if size is None:
        return MAX_SHARD_SIZE
    if isinstance(size, int):
        value = size
    else:
        from ..forward import parse_size

        value = parse_size(size, "--max-shard-size")
    if value <= 0:
        from ..errors import UsageError

        raise UsageError("--max-shard-size must be more than 0 bytes")
    return value


class _KeptUnchecked(Exception):
    """A tie taken as equal from its samples would be kept, where nothing compares it."""


def assumption_wrong(ckpt: Checkpoint, assumed: tuple[str, str, str]) -> bool:
    from ..values import equal

    alias, source, transform = assumed
    return not equal(ckpt.entries[alias], ckpt.entries[source], transform)


def _dedupe(
    ckpt: Checkpoint,
    report: TieReport,
    out: Path | None,
    by_value: bool,
    min_bytes: int,
    dry_run: bool,
    to: str | None,
    force: bool,
    fsync: bool,
    progress: Progress,
    shard_size: int | None = None,
) -> DedupeResult:
    from ..plan import plan_dedupe

    refuse_unreadable_record(ckpt, report)
    if to == "safetensors" and ckpt.format == "gguf":
        from ..errors import UsageError

        raise UsageError(
            "is a GGUF file; --to safetensors converts PyTorch pickles only; nothing was changed",
            ckpt.path,
        )
    to_st = to == "safetensors" and ckpt.format.startswith("pytorch")
    if to_st and out is None and _pickle_has_more(ckpt):
        raise UnsafeChangeError(
            f"holds more than tensors (under {ckpt.nested_key!r} or beside them: epoch, "
            "optimizer state...), which safetensors cannot keep; converting in place would "
            "delete them",
            ckpt.path,
            hint="write the conversion elsewhere with -o",
        )
    plan = plan_dedupe(ckpt, report, by_value=by_value, min_bytes=min_bytes, to_safetensors=to_st)
    if ckpt.format == "dcp":
        from ..formats.dcp import shard_plan

        shard_plan(plan, shard_size or _shard_size(None))
    if report.assumed:
        assumed = set(report.assumed)
        if any((t.alias, t.source, t.transform) in assumed for t, _why in plan.kept):
            raise _KeptUnchecked  # nothing verifies a kept tie: its drift must be exact
    result = DedupeResult(
        **_rewrite_fields(ckpt, report, plan, out, dry_run),
        removed=plan.removed,
        kept=plan.kept,
        record=[r.to_json() for r in plan.record],
    )
    result.changed |= to_st
    return _carry_out(result, ckpt, plan, out, force, to_st, fsync, progress)


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
    from ..plan import plan_untie

    remote: UntieResult | None = from_remote(
        path,
        output,
        "untie",
        dry_run,
        force,
        timeout,
        progress,
        lambda local: untie(
            local,
            output,
            force=force,
            fsync=fsync,
            use_transformers=use_transformers,
            progress=progress,
        ),
    )
    if remote is not None:
        return remote
    refuse_dcp(path, output, None, "untie")
    out = Path(output) if output is not None else None
    with open_to_rewrite(Path(path), out, "untie", dry_run, None) as ckpt:
        report = find_ties(ckpt, use_transformers=use_transformers, progress=progress)
        refuse_unreadable_record(ckpt, report)
        plan = plan_untie(ckpt, report)
        result = UntieResult(
            **_rewrite_fields(ckpt, report, plan, out, dry_run),
            restored=plan.restored,
            made=plan.made,
        )
        return _carry_out(result, ckpt, plan, out, force, False, fsync, progress)
