"""``fix``: rewrite a checkpoint so that every consumer loads the same model.

Transformers 4 and 5, vLLM, MLX-LM and llama.cpp resolve a tie between the
input embedding and the output head each by its own rule (``consumers.py``).
Where their rules part, ``fix`` changes the checkpoint until they meet, on the
model its stored tensors describe: the config's tie flags are made to say what
the tensors are (untied for a head that differs from the embedding; the same
at every level that carries the flag), a missing embedding is stored as a copy
of the head, and, when asked, a padded embedding is cut to the vocabulary.
Where the tensors cannot say which model was meant (an untied config, no head)
it refuses and names the flag that chooses.

The weights are written as ``untie`` writes them (beside the target, verified,
renamed into place); the config after them, under the same lock. Every tensor
change leaves the pair bit-identical, which every consumer loads the same way
whatever the flags say: a run killed between the two renames leaves a
checkpoint the consumers agree on, with the old config (``docs/decisions.md``).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .api import (
    PathLike,
    RewriteResult,
    _from_remote,
    _refuse_dcp,
    _refuse_shard,
    _refuse_unreadable_record,
    _rewriting,
)
from .arch.patterns import flags
from .arch.patterns import table as pattern_table
from .checkpoint import Checkpoint
from .consumers import FLAG, Pair, pairs_of, rules, tied_by
from .detect import find_ties
from .errors import UnsafeChangeError, UsageError
from .progress import NO_PROGRESS, Progress
from .ties import TieReport

CONFIG = "config.json"


def nested_configs() -> list[str]:
    """The sub-configs any consumer reads the tie flag in (``text_config``...)."""
    names = [n for r in rules() for n in r["flag"].get("nested", [])]
    return list(dict.fromkeys([*names, *pattern_table()["nested_configs"]]))


@dataclass
class ConfigEdit:
    key: str  # "tie_word_embeddings" or "text_config.tie_word_embeddings"
    before: bool | None  # None: the level did not carry the flag
    after: bool

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "from": self.before, "to": self.after}


@dataclass
class TensorWrite:
    name: str
    action: str  # copy | trim
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


@dataclass
class Resolution:
    """What ``fix`` does about one tie the config's flag governs."""

    alias: str
    source: str
    situation: str  # as consumers.json names it: both_equal, both_differ, ...
    action: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "alias": self.alias,
            "source": self.source,
            "situation": self.situation,
            "action": self.action,
        }


@dataclass(kw_only=True)
class FixResult(RewriteResult):
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


# -- deciding -----------------------------------------------------------------------


@dataclass
class Decision:
    target: bool | None  # what every level of the config's flag is to say (None: as it is)
    copies: list[tuple[str, str]]  # (name to store, tensor whose bytes it takes)
    trims: dict[str, int]  # name -> rows kept
    resolutions: list[Resolution]


def _readings(cfg: dict[str, Any]) -> set[bool]:
    """The tie flag as each consumer that reads one reads it."""
    out = {tied_by(r["flag"], cfg) for r in rules()}
    return {v for v in out if v is not None}


def _vocab_sizes(cfg: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    if isinstance(cfg.get("vocab_size"), int):
        out["vocab_size"] = cfg["vocab_size"]
    for key in nested_configs():
        sub = cfg.get(key)
        if isinstance(sub, dict) and isinstance(sub.get("vocab_size"), int):
            out[f"{key}.vocab_size"] = sub["vocab_size"]
    return out


def decide(
    ckpt: Checkpoint, report: TieReport, tie: bool, untie_head: bool, trim_padding: bool
) -> Decision:
    """What makes every consumer load one model, from the config and the governed
    pairs; refuses (UsageError, exit 2) where only the user can say which model."""
    cfg = ckpt.config or {}
    shown = ckpt.path
    readings = _readings(cfg)
    mixed = len(readings) > 1 or len(set(flags(cfg, FLAG, nested_configs()).values())) > 1
    said = None if mixed else (readings.pop() if readings else True)
    pairs = [p for p in pairs_of(report.ties, ckpt.entries, cfg) if p.governed]
    targets: dict[bool, list[Pair]] = {True: [], False: []}
    copies: list[tuple[str, str]] = []
    trims: dict[str, int] = {}
    resolutions: list[Resolution] = []

    def want(p: Pair, value: bool) -> None:
        targets[value].append(p)

    for p in pairs:
        situation = p.situation
        if situation == "padded":
            long, short, rows = _padding(ckpt, p)
            if not trim_padding:
                raise UsageError(
                    f"{long} has {ckpt.entries[long].shape[0]} rows and {short} {rows}, the "
                    f"first {rows} bit-identical: a padded vocabulary, which most consumers "
                    "refuse (mismatched shapes) and MLX serves as extra logits; nothing was "
                    "changed",
                    shown,
                    hint=f"pass --trim-padding to drop the last "
                    f"{ckpt.entries[long].shape[0] - rows} rows of {long}",
                )
            sizes = _vocab_sizes(cfg)
            wrong = {k: v for k, v in sizes.items() if v != rows}
            if not sizes or wrong:
                said_vocab = (
                    ", ".join(f"{k}={v}" for k, v in (wrong or sizes).items()) or "no vocab_size"
                )
                raise UnsafeChangeError(
                    f"--trim-padding would cut {long} to {rows} rows (those of {short}) but "
                    f"config.json says {said_vocab}, not {rows}; nothing was changed",
                    shown,
                    hint="make config.json's vocab_size the vocabulary's size first",
                )
            trims[long] = rows
            value = True if tie or said is None else said
            if untie_head:
                value = False
            want(p, value)
            resolutions.append(
                Resolution(
                    p.alias,
                    p.source,
                    situation,
                    f"trim {long} to its first {rows} rows (config vocab_size {rows})",
                )
            )
        elif situation == "both_differ":
            if tie:
                raise UsageError(
                    f"--tie would make every consumer use {p.source} as the head, but "
                    f"{p.alias} is stored and differs from it (a head trained untied): "
                    "loading it tied would drop it; nothing was changed",
                    shown,
                    hint="leave out --tie: fix makes the config say untied",
                )
            want(p, False)
            action = "config says untied: every consumer uses the stored head"
            if said is False:
                action = "nothing: the config says untied, every consumer uses the stored head"
            resolutions.append(Resolution(p.alias, p.source, situation, action))
        elif situation == "source_absent":
            if said is False and not tie:
                raise UsageError(
                    f"config.json says {FLAG}=false but {p.source} is absent, only "
                    f"{p.alias} stored: which embedding was meant cannot be known; "
                    "nothing was changed",
                    shown,
                    hint=f"pass --tie to store a copy of {p.alias} as {p.source} and make the "
                    "config say tied",
                )
            copies.append((p.source, p.alias))
            want(p, False if untie_head else True)
            resolutions.append(
                Resolution(p.alias, p.source, situation, f"store {p.source} as a copy of {p.alias}")
            )
        elif situation == "alias_absent":
            if untie_head:
                copies.append((p.alias, p.source))
                want(p, False)
                action = f"store {p.alias} as a copy of {p.source}; config says untied"
            elif tie or said is None:
                want(p, True)
                action = f"config says tied: every consumer uses {p.source} as {p.alias}"
            elif said:
                action = "nothing: every consumer uses the embedding as the head"
            else:
                raise UsageError(
                    f"config.json says {FLAG}=false but {p.alias} is absent: transformers "
                    "initialises it randomly, vLLM leaves it uninitialised, MLX refuses and "
                    f"llama.cpp uses {p.source}; which model was meant cannot be known; "
                    "nothing was changed",
                    shown,
                    hint=f"pass --tie to make the config say tied (every consumer uses "
                    f"{p.source} as the head), or --untie-head to store a copy of {p.source} "
                    f"as {p.alias} (the config stays untied)",
                )
            resolutions.append(Resolution(p.alias, p.source, situation, action))
        else:  # both_equal: any flag loads the same values
            value = True if tie or said is None else said
            if untie_head:
                value = False
            if said is None or tie or untie_head:
                want(p, value)
            resolutions.append(
                Resolution(
                    p.alias,
                    p.source,
                    situation,
                    "nothing: the stored copies are equal"
                    if said is not None and value == said
                    else f"config says {'tied' if value else 'untied'}",
                )
            )
    if targets[True] and targets[False]:
        a, b = targets[True][0], targets[False][0]
        raise UsageError(
            f"{a.alias} needs the config to say tied and {b.alias} untied; nothing was changed",
            shown,
            hint="pass --untie-head to store every absent head, so the config can say untied",
        )
    target = True if targets[True] else False if targets[False] else None
    if target is None and mixed:  # no tensors to judge by: transformers 5's reading
        target = tie or (not untie_head and any(flags(cfg, FLAG, nested_configs()).values()))
    return Decision(target, copies, trims, resolutions)


def _padding(ckpt: Checkpoint, p: Pair) -> tuple[str, str, int]:
    """(the longer name, the shorter name, the shorter's rows) of a padded pair."""
    a, s = ckpt.entries[p.alias], ckpt.entries[p.source]
    long, short = (p.source, p.alias) if s.shape[0] > a.shape[0] else (p.alias, p.source)
    return long, short, ckpt.entries[short].shape[0]


def config_edits(cfg: dict[str, Any], target: bool | None) -> list[ConfigEdit]:
    """The levels whose flag must change for every consumer to read ``target``: a level
    that says otherwise; for untied, also a level that leaves it to the default (tied)."""
    if target is None:
        return []
    out = []
    levels: list[tuple[str, dict[str, Any]]] = [("", cfg)]
    levels += [(f"{k}.", cfg[k]) for k in nested_configs() if isinstance(cfg.get(k), dict)]
    for prefix, level in levels:
        value = level.get(FLAG)
        has = isinstance(value, bool)
        if (has and value != target) or (not has and target is False):
            out.append(ConfigEdit(prefix + FLAG, value if has else None, target))
    return out


def apply_edits(cfg: dict[str, Any], edits: list[ConfigEdit]) -> dict[str, Any]:
    """``cfg`` with the edits made: an existing key keeps its place, a new one goes last."""
    new = copy.deepcopy(cfg)
    for e in edits:
        *path, key = e.key.split(".")
        level = new
        for part in path:
            level = level[part]
        level[key] = e.after
    return new


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
        raise UsageError("--tie and --untie-head choose opposite models; pass one of them")
    remote: FixResult | None = _from_remote(
        path,
        output,
        "fix",
        dry_run,
        force,
        timeout,
        progress,
        lambda local: fix(
            _model_folder(local),
            output,
            tie=tie,
            untie_head=untie_head,
            trim_padding=trim_padding,
            force=force,
            fsync=fsync,
            use_transformers=use_transformers,
            progress=progress,
        ),
    )
    if remote is not None:
        return remote
    _refuse_dcp(path, output, None, "fix")
    p = Path(path)
    out = Path(output) if output is not None else None
    if out is None:
        _refuse_shard(p, "fix")
    cfg_path = (p if p.is_dir() else p.parent) / CONFIG
    with _rewriting(p, out, "fix", dry_run, None, also=[cfg_path]) as ckpt:
        report = find_ties(ckpt, use_transformers=use_transformers, progress=progress)
        _refuse_unreadable_record(ckpt, report)
        return _fix(
            ckpt, report, out, dry_run, tie, untie_head, trim_padding, force, fsync, progress
        )


def _fix(
    ckpt: Checkpoint,
    report: TieReport,
    out: Path | None,
    dry_run: bool,
    tie: bool,
    untie_head: bool,
    trim_padding: bool,
    force: bool,
    fsync: bool,
    progress: Progress,
) -> FixResult:
    from .plan import first_rows, plan_fix

    notes: list[str] = []
    if ckpt.config is None:
        notes.append("no config.json: every consumer needs one, so none is predicted")
        decision = Decision(None, [], {}, [])
        edits: list[ConfigEdit] = []
    else:
        decision = decide(ckpt, report, tie, untie_head, trim_padding)
        edits = config_edits(ckpt.config, decision.target)
    plan = plan_fix(ckpt, decision.copies, decision.trims)
    writes = []
    for name, rows in decision.trims.items():
        e = ckpt.entries[name]
        cut = first_rows(e, rows)
        writes.append(TensorWrite(name, "trim", name, cut.shape, cut.nbytes, e.shape[0]))
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
        dry_run=dry_run,
        changed=changed,
        config=str(ckpt.config_path) if ckpt.config_path else None,
        config_edits=edits,
        tensor_writes=writes,
        resolutions=decision.resolutions,
        flags_before=flags(ckpt.config, FLAG, nested_configs()),
        notes=notes,
    )
    if dry_run:
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
    from .atomic import clean_leftovers
    from .write.run import execute

    if out is None and ckpt.config_path is not None:
        clean_leftovers(ckpt.config_path.parent, {CONFIG})  # of a run killed mid-write
    if out is not None or plan.changes(ckpt):
        written = execute(
            ckpt,
            plan,
            out,
            force=force,
            fsync=fsync,
            progress=progress,
            files={CONFIG: new_config} if out is not None and new_config is not None else None,
        )
        result.output = str(written.output)
        result.not_copied = [{"path": str(q), "reason": why} for q, why in written.not_copied]
    if out is None and new_config is not None:
        assert ckpt.config_path is not None
        _replace_config(ckpt.config_path, new_config)
    result.changed = changed or out is not None
    return result


def _replace_config(path: Path, data: bytes) -> None:
    """Put ``data`` in place of the config, atomically: written beside it, fsynced,
    renamed over it (a link, as in a Hugging Face cache snapshot, is replaced by
    the file, never written through)."""
    from .atomic import Staging, output_errors
    from .write.folder import replace_file

    staging = Staging(durable=True)
    try:
        with output_errors(path):
            tmp = staging.file(path)
            replace_file(tmp, data, durable=True)
            staging.commit()  # the config's owner and mode are kept
    except BaseException:
        staging.abort()
        raise
