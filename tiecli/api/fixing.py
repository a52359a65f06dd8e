"""``fix``: rewrite a checkpoint so that every consumer loads the same model.

What changes is decided in ``agreement.py``. The weights are written as
``untie`` writes them (beside the target, verified, renamed into place); the
config after them, under the same lock. Every tensor change leaves the pair
bit-identical, which every consumer loads the same way whatever the flags say:
a run killed between the two renames leaves a checkpoint the consumers agree
on, with the old config (``docs/decisions.md``).
"""

from __future__ import annotations

import json
import re
from dataclasses import field, replace
from pathlib import Path
from typing import Any

from ..agreement import (
    ConfigEdit,
    Decision,
    Resolution,
    apply_edits,
    config_edits,
    decide,
    nested_configs,
)
from ..arch.patterns import flags
from ..checkpoint import Checkpoint
from ..consumers import FLAG
from ..detect import find_ties
from ..errors import UsageError, param
from ..lean import dataclass
from ..options import RewriteOptions
from ..progress import NO_PROGRESS, Progress
from ..ties import TieReport
from .remote import from_remote
from .results import PathLike, RewriteResult
from .target import open_to_rewrite, refuse_dcp, refuse_shard, refuse_unreadable_record

CONFIG = "config.json"


@dataclass
class TensorWrite:
    """One tensor ``fix`` writes anew (a copy or a trim) or leaves out."""

    name: str
    action: str  # copy | trim | drop (left out of the files)
    origin: str  # the tensor whose bytes it holds
    shape: tuple[int, ...]
    bytes: int
    rows_before: int | None = None  # trim: the rows it had

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "action": self.action,
            "from": self.origin,
            "shape": list(self.shape),
            "bytes": self.bytes,
        }
        if self.rows_before is not None:
            d["rows_before"] = self.rows_before
        return d


@dataclass(kw_only=True)
class FixResult(RewriteResult):
    """What ``fix`` changed: config edits, tensors written, and how each tie is resolved."""

    config: str | None
    config_edits: list[ConfigEdit]
    tensor_writes: list[TensorWrite]
    resolutions: list[Resolution]
    flags_before: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    command: str = "fix"

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {
            "config": self.config,
            "config_edits": [e.to_dict() for e in self.config_edits],
            "tensor_writes": [w.to_dict() for w in self.tensor_writes],
            "resolutions": [r.to_dict() for r in self.resolutions],
            "flags_before": self.flags_before,
            "notes": self.notes,
        }


# -- config.json, in its own style ----------------------------------------------------


def config_text(original: str, config: dict[str, Any]) -> str:
    """``config`` as JSON in the style of ``original``: its indent (spaces or a tab,
    or none), its separators, its line endings, its escaping of non-ASCII text and
    its trailing whitespace. Keys keep their order."""
    crlf = "\r\n" in original
    text = original.replace("\r\n", "\n")
    m = re.search(r"^[{\[]\n([ \t]+)\S", text.lstrip())
    indent: str | None = m.group(1) if m else None
    colon = re.search(r'"([ \t]*):([ \t]*)', text)
    key_sep = colon.group(1) + ":" + colon.group(2) if colon else ": "
    if indent is not None:
        item_sep = ", " if re.search(r", \n", text) else ","
    else:
        comma = re.search(r',(\s*)"', text)
        item_sep = "," + (comma.group(1) if comma else " ")
    ascii_only = not any(ord(c) > 127 for c in text)
    body = json.dumps(
        config,
        indent=indent,
        separators=(item_sep, key_sep),
        ensure_ascii=ascii_only,
    )
    lead = text[: len(text) - len(text.lstrip())]
    trail = text[len(text.rstrip()) :]
    out = lead + body + trail
    return out.replace("\n", "\r\n") if crlf else out


# -- the command ------------------------------------------------------------------------


def _model_folder(local: Path) -> Path:
    """What a URL's download is fixed as: the private folder it was downloaded into when
    it holds the file's config.json (a fixed config needs a folder), else the file."""
    if local.is_file() and (local.parent / CONFIG).is_file():
        return local.parent
    return local


def fix(
    path: PathLike,
    output: PathLike | None = None,
    *,
    dry_run: bool = False,
    tie: bool = False,
    untie_head: bool = False,
    trim_padding: bool = False,
    force: bool = False,
    fsync: bool = False,
    use_transformers: bool = True,
    progress: Progress = NO_PROGRESS,
    timeout: float | None = None,
) -> FixResult:
    """Rewrite the checkpoint at ``path`` (in place without ``output``) so that every
    consumer loads the model its stored tensors describe.

    A URL is downloaded first (streamed to disk, beside ``output``, which it requires),
    as for ``dedupe`` and ``untie``; ``timeout`` bounds each request.

    ``tie``: where the config unties a head that is absent, make it say tied (every
    consumer uses the embedding). ``untie_head``: store a copy of the embedding as
    the head instead (the config says untied). ``trim_padding``: cut a padded
    embedding to the config's vocabulary. Raises UsageError (exit 2) where the
    intent cannot be known and UnsafeChangeError (exit 1) where a change would not
    be safe; nothing is changed then."""
    if tie and untie_head:
        raise UsageError(
            f"{param('tie')} and {param('untie_head')} choose opposite models; pass one of them"
        )
    options = RewriteOptions(
        output=Path(output) if output is not None else None,
        dry_run=dry_run,
        force=force,
        fsync=fsync,
        tie=tie,
        untie_head=untie_head,
        trim_padding=trim_padding,
    )
    remote = from_remote(
        path,
        "fix",
        options,
        timeout,
        progress,
        lambda local: _fix_local(_model_folder(local), options, use_transformers, progress),
    )
    if remote is not None:
        return remote
    return _fix_local(path, options, use_transformers, progress)


def _fix_local(
    path: PathLike, options: RewriteOptions, use_transformers: bool, progress: Progress
) -> FixResult:
    refuse_dcp(path, "fix", options)
    p = Path(path)
    if options.output is None:
        refuse_shard(p, "fix")
    cfg_path = (p if p.is_dir() else p.parent) / CONFIG
    with open_to_rewrite(p, "fix", options, also=[cfg_path]) as ckpt:
        report = find_ties(ckpt, use_transformers=use_transformers, progress=progress)
        refuse_unreadable_record(ckpt, report)
        return _fix(ckpt, report, options, progress)


def _fix(
    ckpt: Checkpoint, report: TieReport, options: RewriteOptions, progress: Progress
) -> FixResult:
    from ..plan import first_rows, plan_fix

    out = options.output
    notes: list[str] = []
    if ckpt.config is None:
        notes.append("no config.json: every consumer needs one, so none is predicted")
        decision = Decision(None, [], {}, [])
        edits: list[ConfigEdit] = []
    else:
        decision = decide(ckpt, report, options.tie, options.untie_head, options.trim_padding)
        edits = config_edits(ckpt.config, decision.target)
    plan = plan_fix(ckpt, decision.copies, decision.trims, decision.dropped)
    writes = []
    for name, rows in decision.trims.items():
        e = ckpt.entries[name]
        cut = first_rows(e, rows)
        writes.append(TensorWrite(name, "trim", name, cut.shape, cut.nbytes, e.shape[0]))
    for name in decision.dropped:
        e = ckpt.entries[name]
        writes.append(TensorWrite(name, "drop", name, e.shape, 0))
    for name, origin in decision.copies:
        src = ckpt.entries[origin]
        shape = (decision.trims[origin], *src.shape[1:]) if origin in decision.trims else src.shape
        nbytes = first_rows(src, shape[0]).nbytes if origin in decision.trims else src.nbytes
        writes.append(TensorWrite(name, "copy", origin, shape, nbytes))
    changed = bool(edits or writes)
    if not changed:
        notes.append("every consumer already loads the same model: nothing to change")
    result = FixResult(
        path=str(ckpt.path),
        format=ckpt.format,
        output=str(out) if out else str(ckpt.path),
        bytes_before=ckpt.stored_bytes(),
        bytes_after=plan.bytes_after,
        problems=report.problems,
        dry_run=options.dry_run,
        changed=changed,
        config=str(ckpt.config_path) if ckpt.config_path else None,
        config_edits=edits,
        tensor_writes=writes,
        resolutions=decision.resolutions,
        flags_before=flags(ckpt.config, FLAG, nested_configs()),
        notes=notes,
    )
    if options.dry_run:
        return result
    new_config: bytes | None = None
    if edits:
        assert ckpt.config is not None and ckpt.config_path is not None
        original = ckpt.config_path.read_bytes().decode("utf-8-sig")
        new_config = config_text(original, apply_edits(ckpt.config, edits)).encode()
    folder_output = ckpt.folder is not None or ckpt.index_path is not None
    if out is not None and new_config is not None and not folder_output:
        raise UsageError(
            f"needs its {CONFIG} changed too, and a single-file output has no folder to hold "
            "it; nothing was changed",
            out,
            hint=f"fix the folder: tiecli fix {ckpt.config_path.parent if ckpt.config_path else ''}"
            " -o OUT_FOLDER",
        )
    from ..atomic import clean_leftovers
    from ..write.run import execute

    if out is None and ckpt.config_path is not None:
        clean_leftovers(ckpt.config_path.parent, {CONFIG})  # of a run killed mid-write
    if out is not None or plan.changes(ckpt):
        written = execute(
            ckpt,
            plan,
            replace(options, output=out),
            progress=progress,
            files={CONFIG: new_config} if out is not None and new_config is not None else None,
        )
        result.output = str(written.output)
        result.not_copied = [{"path": str(q), "reason": why} for q, why in written.not_copied]
    if out is None and new_config is not None:
        assert ckpt.config_path is not None
        replace_config(ckpt.config_path, new_config)
    result.changed = changed or out is not None
    return result


def replace_config(path: Path, data: bytes) -> None:
    """Put ``data`` in place of the config, atomically: written beside it, fsynced,
    renamed over it (a link, as in a Hugging Face cache snapshot, is replaced by
    the file, never written through)."""
    from ..atomic import Staging, output_errors
    from ..write.folder import replace_file

    staging = Staging(durable=True)
    try:
        with output_errors(path):
            tmp = staging.file(path)
            replace_file(tmp, data, durable=True)
            staging.commit()  # the config's owner and mode are kept
    except BaseException:
        staging.abort()
        raise
