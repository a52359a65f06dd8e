"""The library functions behind the commands; each returns a result object.

Every command is the same pipeline: open the checkpoint, find its ties, and
(for rewrites) plan and write. The CLI only renders what these return.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .checkpoint import Checkpoint
from .detect import find_ties
from .errors import UnsafeChangeError, VerificationError
from .formats import open_checkpoint
from .progress import NO_PROGRESS, Progress
from .ties import Problem, Tie, TieReport

PathLike = str | os.PathLike[str]
R = TypeVar("R", bound="RewriteResult")


def _header(result: Any) -> dict[str, Any]:
    """The fields every command's JSON document starts with."""
    return {
        "command": result.command,
        "path": result.path,
        "format": result.format,
        "ok": result.ok,
        "problems": [p.to_dict() for p in result.problems],
    }


@dataclass
class InspectResult:
    path: str
    format: str
    tensors: int
    bytes: int
    ties: list[Tie]
    dedupable_bytes: int
    problems: list[Problem]
    declared_by: str | None = None
    nested_key: str | None = None
    config: str | None = None
    notes: list[str] = field(default_factory=list)
    bytes_read: int = 0
    # what each consumer (transformers 4/5, vLLM, MLX-LM, llama.cpp) loads; empty
    # without a config.json, which every consumer needs
    consumers: list[Any] = field(default_factory=list)
    consumer_problems: list[Problem] = field(default_factory=list)
    remote: dict[str, int] | None = None  # a remote checkpoint: requests and bytes_read
    command: str = "inspect"

    @property
    def consumers_agree(self) -> bool:
        return not self.consumer_problems

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    def to_dict(self) -> dict[str, Any]:
        return (
            _header(self)
            | {
                "tensors": self.tensors,
                "bytes": self.bytes,
                "ties": [t.to_dict() for t in self.ties],
                "dedupable_bytes": self.dedupable_bytes,
                "declared_by": self.declared_by,
                "nested_key": self.nested_key,
                "config": self.config,
                "notes": self.notes,
                "consumers": [c.to_dict() for c in self.consumers],
                "consumers_agree": self.consumers_agree,
                "consumer_problems": [p.to_dict() for p in self.consumer_problems],
            }
            | ({"remote": self.remote} if self.remote is not None else {})
        )


def _remote_options(path: PathLike, max_download: int | None, timeout: float | None) -> Any:
    """Options for reading a URL; None for a local path (nothing remote is imported)."""
    if not isinstance(path, str) or "://" not in path:
        return None
    from .formats.remote import RemoteOptions, is_remote

    if not is_remote(path):
        return None
    options = RemoteOptions()
    if max_download is not None:
        options.max_download = max_download
    if timeout is not None:
        options.timeout = timeout
    return options


def _from_remote(
    path: PathLike,
    output: PathLike | None,
    command: str,
    dry_run: bool,
    force: bool,
    timeout: float | None,
    progress: Progress,
    rewrite: Any,
) -> Any:
    """``dedupe``/``untie`` of a URL: never in place (nothing is written to a remote
    location), so only with an output. The checkpoint is downloaded, streamed to disk,
    into a private folder beside the output, rewritten from there like a local one,
    and the download removed. Returns None for a local path."""
    options = _remote_options(path, None, timeout)
    if options is None:
        return None
    import shutil
    import tempfile

    from .errors import OutputError, UsageError
    from .formats.remote import download, shown_url

    shown = shown_url(str(path))
    if output is None or dry_run:
        raise UsageError(
            f"is remote; {command} writes a local result only, with -o OUT (never in place, "
            "never a dry run: inspect reports what dedupe would save); nothing was changed",
            shown,
            hint=f"tiecli {command} {shlex.quote(shown)} -o LOCAL_OUTPUT",
        )
    out = Path(output)
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputError("already exists; pass --force to replace it", out)
    if not out.parent.is_dir():
        raise OutputError("parent folder does not exist", out)
    staging = Path(tempfile.mkdtemp(prefix=".tiecli-download-", dir=out.parent))
    try:
        local, stats = download(str(path), staging, options, progress)
        result = rewrite(local)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.path = shown
    result.remote = stats.to_dict()
    return result


def _predict(ckpt: Checkpoint, report: TieReport, only: str | None = None) -> tuple[Any, Any]:
    from .consumers import predict, select

    return predict(report.ties, ckpt.entries, ckpt.config, ckpt.format, select(only))


def _fold(problems: list[Problem], found: list[Problem]) -> list[Problem]:
    """Consumer findings about tensors an existing problem already names are attached to
    it when that problem is as severe (it already fails, or warns of a warning); the
    others are problems of their own, so a warning never hides a failing consumer."""
    rank = {"warning": 0, "error": 1}
    out = []
    for f in found:
        home = next(
            (
                p
                for p in problems
                if f.tensors
                and set(f.tensors) <= set(p.tensors)
                and rank.get(p.severity, 1) >= rank.get(f.severity, 1)
            ),
            None,
        )
        if home is not None:
            home.related.append(f)
        else:
            out.append(f)
    return out


def _inspect_opened(ckpt: Checkpoint, report: TieReport) -> InspectResult:
    loads, found = _predict(ckpt, report)
    return InspectResult(
        path=ckpt.shown,
        format=ckpt.format,
        tensors=len(ckpt.entries),
        bytes=ckpt.stored_bytes(),
        ties=report.ties,
        dedupable_bytes=report.dedupable_bytes,
        problems=report.problems,
        declared_by=report.declared_by,
        nested_key=ckpt.nested_key,
        config=ckpt.config_url or (str(ckpt.config_path) if ckpt.config_path else None),
        notes=list(ckpt.notes),
        bytes_read=ckpt.bytes_read,
        consumers=loads,
        consumer_problems=found,
        remote=ckpt.remote.to_dict() if ckpt.remote is not None else None,
    )


def inspect(
    path: PathLike,
    *,
    use_transformers: bool = True,
    progress: Progress = NO_PROGRESS,
    max_download: int | None = None,
    timeout: float | None = None,
    config: PathLike | None = None,
) -> InspectResult:
    """Tensors, ties and problems of the checkpoint at ``path``; changes nothing.

    ``path`` may be a URL (``hf://owner/repo[@revision][/folder]``, ``https://``,
    any fsspec URL): it is read by ranges, downloading at most ``max_download``
    bytes of whole tensors to confirm ties, each request given ``timeout`` seconds.
    """
    from .checkpoint import collecting_less

    options = _remote_options(path, max_download, timeout)
    with collecting_less(), open_checkpoint(path, remote=options, progress=progress) as ckpt:
        _use_config(ckpt, config)
        report = find_ties(ckpt, use_transformers=use_transformers, progress=progress)
        return _inspect_opened(ckpt, report)


def _use_config(ckpt: Checkpoint, config: PathLike | None) -> None:
    """Describe the checkpoint with the ``config.json`` the user named (``--config``),
    in place of one beside it."""
    if config is None:
        return
    from .errors import CheckpointFormatError, CheckpointNotFoundError
    from .formats import read_json

    path = Path(config)
    if not path.is_file():
        raise CheckpointNotFoundError("no such file (given with --config)", path)
    doc = read_json(path, what="config.json")
    if not isinstance(doc, dict):
        raise CheckpointFormatError("config.json is not a JSON object", path)
    ckpt.config, ckpt.config_path = doc, path


def _refuse_dcp(path: PathLike, out: PathLike | None, to: str | None, command: str) -> None:
    """A torch distributed checkpoint is read, never rewritten as one: its deduped or
    untied form is a Hugging Face safetensors folder written elsewhere."""
    from .formats.dcp import is_dcp

    if isinstance(path, str) and "://" in path or not is_dcp(Path(path)):
        return
    from .errors import UsageError

    shown = shlex.quote(str(path))
    if command != "dedupe":
        raise UsageError(
            "is a torch distributed checkpoint, which tiecli does not rewrite as one; "
            "nothing was changed",
            Path(path),
            hint=f"convert it first: tiecli dedupe {shown} --to safetensors -o OUT; "
            f"then {command} OUT",
        )
    if out is None or to != "safetensors":
        raise UsageError(
            "is a torch distributed checkpoint; tiecli writes its deduped form as a "
            "Hugging Face safetensors folder beside it, never in place; nothing was changed",
            Path(path),
            hint=f"tiecli dedupe {shown} --to safetensors -o OUT",
        )


@dataclass(kw_only=True)
class RewriteResult:
    """What ``dedupe`` and ``untie`` share: the input, the output and the byte counts."""

    path: str
    format: str
    output: str | None
    bytes_before: int
    bytes_after: int
    problems: list[Problem]
    dry_run: bool = False
    changed: bool = True
    command: str = ""
    # other files of the folder that -o left out, with the reason (links out of it...)
    not_copied: list[dict[str, str]] = field(default_factory=list)
    remote: dict[str, int] | None = None  # a URL's download: requests and bytes_read
    notes: list[str] = field(default_factory=list)  # what inspect notes too (a GGUF head kept)

    @property
    def ok(self) -> bool:
        return True  # drift is reported, but judging is verify's job

    def to_dict(self) -> dict[str, Any]:
        return (
            _header(self)
            | {
                "output": self.output,
                "dry_run": self.dry_run,
                "changed": self.changed,
                "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after,
                "not_copied": self.not_copied,
                "notes": self.notes,
            }
            | ({"remote": self.remote} if self.remote is not None else {})
        )


@dataclass(kw_only=True)
class DedupeResult(RewriteResult):
    removed: list[Tie]
    kept: list[tuple[Tie, str]]
    record: list[dict[str, Any]] = field(default_factory=list)
    command: str = "dedupe"

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {
            "bytes_saved": self.bytes_saved,
            "removed": [t.alias for t in self.removed],
            "removed_ties": [t.to_dict() for t in self.removed],
            "kept": [t.to_dict() | {"reason": reason} for t, reason in self.kept],
            "record": self.record,
        }


@dataclass(kw_only=True)
class UntieResult(RewriteResult):
    restored: list[Tie]
    made: dict[str, tuple[str, str]]  # name written -> (stored tensor it copies, transform)
    command: str = "untie"

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {
            "restored": list(self.made),
            "restored_ties": [t.to_dict() for t in self.restored],
        }


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
    from .write.run import execute

    if not result.dry_run:
        written = execute(
            ckpt, plan, out, force=force, to_safetensors=to_st, fsync=fsync, progress=progress
        )
        result.output = str(written.output)
        result.changed = written.changed
        result.not_copied = [{"path": str(p), "reason": why} for p, why in written.not_copied]
    return result


def _refuse_unreadable_record(ckpt: Checkpoint, report: TieReport) -> None:
    """A record tiecli cannot read may be the only note of an alias: never rewrite over it."""
    bad = [p for p in report.problems if p.code == "bad-record"]
    if bad:
        from .errors import TieRecordError

        raise TieRecordError(
            f"its tie record cannot be read ({bad[0].message}); nothing was changed",
            ckpt.path,
            hint="fix or remove the 'tiecli' metadata entry first",
        )


@contextlib.contextmanager
def _rewriting(
    path: Path,
    out: Path | None,
    command: str,
    dry_run: bool,
    to: str | None,
    also: Sequence[Path] = (),
) -> Iterator[Checkpoint]:
    """Open the checkpoint to rewrite: refuse what would corrupt it, and lock what the
    rewrite replaces (a dry run writes nothing and takes no lock) for as long as it runs;
    ``also``: other files it replaces in place (``fix``: the config.json)."""
    if out is None:
        _refuse_shard(path, command)
    if dry_run:
        with open_checkpoint(path) as ckpt:
            yield ckpt
        return
    from .atomic import locked
    from .errors import BusyError
    from .write.paths import lock_targets

    targets = lock_targets(path, out, to == "safetensors")
    if out is None:
        targets = [*targets, *also]
    with locked(targets, out or path), open_checkpoint(path) as ckpt:
        opened = ckpt.index_path or (ckpt.weight_files[0] if ckpt.weight_files else None)
        held = {t.resolve() for t in targets}
        if out is None and opened is not None and opened.resolve() not in held:
            # another run converted or replaced it between the lock and the opening
            raise BusyError(
                f"changed while this run started ({opened.name} is not what it locked); "
                "nothing was changed",
                path,
                hint="run the command again",
            )
        yield ckpt


def _refuse_shard(path: Path, command: str) -> None:
    """A shard an index names is rewritten with its checkpoint, never alone: the index
    would go on naming what the shard no longer holds."""
    from .formats import INDEX_SUFFIX, checkpoint_roots

    if not path.is_file() or path.name.endswith(INDEX_SUFFIX):
        return
    root = checkpoint_roots([path])[0]
    if root != path:
        from .errors import UsageError

        raise UsageError(
            f"is a shard of the checkpoint indexed by {root.name}; rewriting it alone would "
            "leave that index naming tensors the shard no longer holds; nothing was changed",
            path,
            hint=f"rewrite the whole checkpoint: tiecli {command} {shlex.quote(str(root))}",
        )


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
    remote: DedupeResult | None = _from_remote(
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
        from .errors import UsageError

        raise UsageError(f"--to {to!r}: the only conversion is --to safetensors")
    _refuse_dcp(path, output, to, "dedupe")
    shard_size = _shard_size(max_shard_size)
    out = Path(output) if output is not None else None
    with _rewriting(Path(path), out, "dedupe", dry_run, to) as ckpt:
        _use_config(ckpt, config)
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
            if not any(_assumption_wrong(ckpt, a) for a in report.assumed):
                raise
        # a tie equal in its samples but not in full: decide every tie exactly and start over
        report = find_ties(ckpt, use_transformers=use_transformers, progress=progress)
        return _dedupe(
            ckpt, report, out, by_value, min_bytes, dry_run, to, force, fsync, progress, shard_size
        )


def _shard_size(size: int | str | None) -> int:
    """``--max-shard-size``: bytes, or ``5GB``/``500MB``/``2GiB``; transformers' default."""
    from .formats.dcp import MAX_SHARD_SIZE

    if size is None:
        return MAX_SHARD_SIZE
    if isinstance(size, int):
        value = size
    else:
        from .forward import parse_size

        value = parse_size(size, "max_shard_size")
    if value <= 0:
        from .errors import UsageError

        raise UsageError("--max-shard-size must be more than 0 bytes")
    return value


class _KeptUnchecked(Exception):
    """A tie taken as equal from its samples would be kept, where nothing compares it."""


def _assumption_wrong(ckpt: Checkpoint, assumed: tuple[str, str, str]) -> bool:
    from .values import equal

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
    from .plan import plan_dedupe

    _refuse_unreadable_record(ckpt, report)
    if to == "safetensors" and ckpt.form.refuses_conversion:
        from .errors import UsageError

        raise UsageError(
            "is a GGUF file; --to safetensors converts PyTorch pickles only; nothing was changed",
            ckpt.path,
        )
    to_st = to == "safetensors" and ckpt.form.converts
    if to_st and out is None and _pickle_has_more(ckpt):
        raise UnsafeChangeError(
            f"holds more than tensors (under {ckpt.nested_key!r} or beside them: epoch, "
            "optimizer state...), which safetensors cannot keep; converting in place would "
            "delete them",
            ckpt.path,
            hint="write the conversion elsewhere with -o",
        )
    plan = plan_dedupe(ckpt, report, by_value=by_value, min_bytes=min_bytes, to_safetensors=to_st)
    ckpt.form.reshard(plan, shard_size or _shard_size(None))
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
    from .plan import plan_untie

    remote: UntieResult | None = _from_remote(
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
    _refuse_dcp(path, output, None, "untie")
    out = Path(output) if output is not None else None
    with _rewriting(Path(path), out, "untie", dry_run, None) as ckpt:
        report = find_ties(ckpt, use_transformers=use_transformers, progress=progress)
        _refuse_unreadable_record(ckpt, report)
        plan = plan_untie(ckpt, report)
        result = UntieResult(
            **_rewrite_fields(ckpt, report, plan, out, dry_run),
            restored=plan.restored,
            made=plan.made,
        )
        return _carry_out(result, ckpt, plan, out, force, False, fsync, progress)


@dataclass
class CheckpointVerdict:
    path: str
    format: str
    ties: list[Tie]
    problems: list[Problem]
    consumers: list[Any] = field(default_factory=list)
    remote: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "ties": [t.to_dict() for t in self.ties],
            "problems": [p.to_dict() for p in self.problems],
            "consumers": [c.to_dict() for c in self.consumers],
        } | ({"remote": self.remote} if self.remote is not None else {})


@dataclass
class VerifyResult:
    paths: list[str]
    checkpoints: list[CheckpointVerdict]
    strict: bool = False
    require_deduped: bool = False
    forward: Any = None  # ForwardReport with --forward
    for_consumers: str | None = None  # --for: the consumers checked (None: all)
    command: str = "verify"

    @property
    def path(self) -> str:
        return self.paths[0] if len(self.paths) == 1 else ", ".join(self.paths)

    @property
    def format(self) -> str:
        formats = sorted({c.format for c in self.checkpoints})
        return formats[0] if len(formats) == 1 else ",".join(formats)

    @property
    def checked(self) -> list[str]:
        return [c.path for c in self.checkpoints]

    @property
    def problems(self) -> list[Problem]:
        return [p for c in self.checkpoints for p in c.problems]

    @property
    def failures(self) -> list[Problem]:
        failing = ("error", "warning") if self.strict else ("error",)
        return [p for p in self.problems if p.severity in failing]

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        problems = []
        for c in self.checkpoints:
            problems += [p.to_dict() | {"path": c.path} for p in c.problems]
        d = _header(self) | {
            "problems": problems,  # each also names its checkpoint
            "checked": self.checked,
            "strict": self.strict,
            "require_deduped": self.require_deduped,
            "for": self.for_consumers,
            "checkpoints": [c.to_dict() for c in self.checkpoints],
        }
        if self.forward is not None:
            d["forward"] = self.forward.to_dict()
        remote = [c.remote for c in self.checkpoints if c.remote is not None]
        if remote:
            d["remote"] = {k: sum(r[k] for r in remote) for k in ("requests", "bytes_read")}
        return d


def _duplicate_stored(path: str, report: TieReport, dcp: bool = False) -> list[Problem]:
    out = []
    for t in report.ties:
        if t.duplicated:
            fix = f"tiecli dedupe {path}" + (" --to safetensors" if t.across_files else "")
            if dcp:
                fix = f"tiecli dedupe {path} --to safetensors -o OUT"
            if _remote_options(path, None, None) is not None:
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
    from .errors import UsageError
    from .formats import checkpoint_roots

    items: Sequence[PathLike] = [paths] if isinstance(paths, (str, os.PathLike)) else paths
    remote = {str(p) for p in items if _remote_options(p, None, None) is not None}
    given = [Path(p) for p in items if str(p) not in remote]
    if not forward and (
        against is not None
        or atol is not None
        or dtype is not None
        or model is not None
        or device_map is not None
        or max_memory is not None
    ):
        raise UsageError(
            "--against, --atol, --dtype, --model, --device-map and --max-memory go with --forward"
        )
    from .consumers import select

    select(for_consumers)  # a bad --for is a usage error before anything is opened
    if forward and remote:
        raise UsageError(
            "--forward loads the whole checkpoint; it reads local checkpoints only",
            hint="download it first, or run verify without --forward on the URL",
        )
    roots: list[Path | str] = [
        *checkpoint_roots(given),
        *dict.fromkeys(str(p) for p in items if str(p) in remote),
    ]
    if forward and len(roots) != 1:
        raise UsageError("--forward checks one checkpoint at a time")
    verdicts = []
    for root in roots:
        options = _remote_options(root, max_download, timeout)
        with open_checkpoint(root, remote=options, progress=progress) as ckpt:
            _use_config(ckpt, config)
            report = find_ties(ckpt, use_transformers=use_transformers, progress=progress)
            problems = list(report.problems)
            if require_deduped:
                problems += _duplicate_stored(ckpt.shown, report, not ckpt.form.in_place)
            loads, found = _predict(ckpt, report, for_consumers)
            problems += _fold(problems, found)
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
    from .formats import form_named

    if forward and not form_named(verdicts[0].format).rebuilds:
        raise UsageError(
            "is a GGUF file; --forward rebuilds PyTorch models only (llama.cpp runs GGUF)",
            roots[0],
        )
    if forward:
        from .forward import forward_check

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
