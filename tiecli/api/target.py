"""Opening a checkpoint to rewrite: what is refused before anything is written
(a shard alone, a torch distributed checkpoint in place, a record that cannot be
read), and the lock held on what the rewrite replaces while it runs."""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..checkpoint import Checkpoint
from ..formats import open_checkpoint
from ..options import RewriteOptions
from ..ties import TieReport
from .results import PathLike


def refuse_dcp(path: PathLike, command: str, options: RewriteOptions) -> None:
    """A torch distributed checkpoint is read, never rewritten as one: its deduped or
    untied form is a Hugging Face safetensors folder written elsewhere."""
    from ..formats.folder_names import is_dcp

    if isinstance(path, str) and "://" in path or not is_dcp(Path(path)):
        return
    from ..errors import UsageError

    shown = shlex.quote(str(path))
    if command != "dedupe":
        raise UsageError(
            "is a torch distributed checkpoint, which tiecli does not rewrite as one; "
            "nothing was changed",
            Path(path),
            hint=f"convert it first: tiecli dedupe {shown} --to safetensors -o OUT; "
            f"then {command} OUT",
        )
    if options.output is None or not options.to_safetensors:
        raise UsageError(
            "is a torch distributed checkpoint; tiecli writes its deduped form as a "
            "Hugging Face safetensors folder beside it, never in place; nothing was changed",
            Path(path),
            hint=f"tiecli dedupe {shown} --to safetensors -o OUT",
        )


def refuse_unreadable_record(ckpt: Checkpoint, report: TieReport) -> None:
    """A record tiecli cannot read may be the only note of an alias: never rewrite over it."""
    bad = [p for p in report.problems if p.code == "bad-record"]
    if bad:
        from ..errors import TieRecordError

        raise TieRecordError(
            f"its tie record cannot be read ({bad[0].message}); nothing was changed",
            ckpt.path,
            hint="fix or remove the 'tiecli' metadata entry first",
        )


@contextlib.contextmanager
def open_to_rewrite(
    path: Path, command: str, options: RewriteOptions, also: Sequence[Path] = ()
) -> Iterator[Checkpoint]:
    """Open the checkpoint to rewrite: refuse what would corrupt it, and lock what the
    rewrite replaces (a dry run writes nothing and takes no lock) for as long as it runs;
    ``also``: other files it replaces in place (``fix``: the config.json)."""
    out = options.output
    if out is None:
        refuse_shard(path, command)
    if options.dry_run:
        with open_checkpoint(path) as ckpt:
            yield ckpt
        return
    from ..atomic import locked
    from ..errors import BusyError
    from ..write.paths import lock_targets

    targets = lock_targets(path, out, options.to_safetensors)
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


def refuse_shard(path: Path, command: str) -> None:
    """A shard an index names is rewritten with its checkpoint, never alone: the index
    would go on naming what the shard no longer holds."""
    from ..formats import INDEX_SUFFIX, checkpoint_roots

    if not path.is_file() or path.name.endswith(INDEX_SUFFIX):
        return
    root = checkpoint_roots([path])[0]
    if root != path:
        from ..errors import UsageError

        raise UsageError(
            f"is a shard of the checkpoint indexed by {root.name}; rewriting it alone would "
            "leave that index naming tensors the shard no longer holds; nothing was changed",
            path,
            hint=f"rewrite the whole checkpoint: tiecli {command} {shlex.quote(str(root))}",
        )
